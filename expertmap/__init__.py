"""ExpertMap: serve Mixture-of-Experts models with experts in host memory and a predicted,
budgeted expert cache on each device.

This folder is only the root of the installed namespace: the code lives in the repository's
top-level folders, installed as ``expertmap.actors``, ``expertmap.predictor``,
``expertmap.cluster``, ``expertmap.models`` (the bundled checkpoints) and ``expertmap.bench``
(see ``[tool.setuptools.package-dir]`` in pyproject.toml). Importing it does nothing else; the
version is the installed distribution's (``importlib.metadata.version("expertmap")``), defined
once in pyproject.toml.
"""
