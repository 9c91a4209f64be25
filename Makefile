# The two set-up commands of the README, and the test command CI runs.
PY ?= python3

.PHONY: install test train-model
install:            ## CPU torch first (a bare `torch` pulls CUDA), then the project with test extras
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test,bench]"

test:
	$(PY) -m pytest -q -p no:cacheprovider tests

train-model:        ## re-train the bundled model (about 45 minutes on 2 CPU cores)
	$(PY) models/train.py --minutes 45 --out models/expertmap-moe-tiny
	$(PY) models/card.py --model models/expertmap-moe-tiny
