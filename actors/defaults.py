"""Every default that more than one entry point shares, defined once.

The command line (``expertmap generate``/``record``/``serve``), the Serve application's arguments,
the engine's typed configuration and the benchmarks all read these names instead of spelling the
values themselves, so changing a default is a one-line change here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The bundled models by name, shipped as package data of ``expertmap.models``
#: (docs/bundled-model.md): ``--model NAME`` takes either name or a model folder.
BUNDLED_MODELS = {
    "expertmap-moe-tiny": Path(str(files("expertmap.models") / "expertmap-moe-tiny")),  # Mixtral, 16 experts, top-2
    "expertmap-moe-fine": Path(str(files("expertmap.models") / "expertmap-moe-fine")),  # Qwen2-MoE, 64 experts, top-4
}
#: The default model (the quickstart's): the 16-expert one.
BUNDLED_MODEL = BUNDLED_MODELS["expertmap-moe-tiny"]
#: The help text of every ``--model`` option.
MODEL_HELP = (f"a bundled model's name ({', '.join(BUNDLED_MODELS)}) or a Hugging Face MoE model folder "
              f"(default: {BUNDLED_MODEL.name})")
#: Link profile: the FineMoE paper's testbed, Mixtral-8x7B on an RTX 3090 over PCIe 4.0
#: (expertmap.actors.link_profiles; docs/link-and-host-models.md).
LINK = "rtx3090-pcie4-mixtral"
#: Device memory for cached experts: a quarter of all routed-expert bytes.
BUDGET = "0.25"
#: Cache policy of one in-process generation (``expertmap generate``): no map store is needed.
POLICY = "on-demand"
#: Cache policy of the Serve application: it fills its own map store as it serves.
SERVE_POLICY = "hybrid"
#: Layers ahead that a prefetch is issued (FineMoE's d for Mixtral-8x7B).
PREFETCH_DISTANCE = 3
#: What a miss does (``--miss``): wait for the copy over the link (``copy``), compute the expert on
#: the host from host memory (``host``), or whichever the cost model says finishes first (``auto``).
MISS = "copy"
#: Host profile for misses computed on the host (expertmap.actors.host_profiles): a desktop with
#: dual-channel DDR5.
HOST = "desktop-ddr5"
#: New tokens of one generation when the caller does not say.
MAX_NEW_TOKENS = 32
#: requests per pipeline micro-batch at most (their union of experts is copied once for all)
MAX_BATCH = 32
