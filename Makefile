# The README's two set-up commands, and the test command CI runs.
PY ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install redis test train-model
install: redis      ## CPU torch first (a bare `torch` pulls a multi-GB CUDA build), then the project
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,bench]"

redis:              ## Debian's redis-server: the tests start their own on a free loopback port
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

test:
	$(PY) -m pytest -q -p no:cacheprovider tests

# The training corpus and the card's prompt workload are not part of the project: name them,
# e.g. make train-model CORPUS=/data/corpus WORKLOAD=/data/workloads/dev_mix.jsonl
train-model:        ## re-train the bundled model (about 45 minutes on 2 CPU cores) and rewrite its card
	@[ -n "$(CORPUS)" ] && [ -n "$(WORKLOAD)" ] || { echo "make train-model: set CORPUS=DIR (.txt training files) and WORKLOAD=FILE (JSONL prompts)" >&2; exit 2; }
	$(PY) models/train.py --corpus "$(CORPUS)" --minutes 45 --out models/expertmap-moe-tiny
	$(PY) models/card.py --workload "$(WORKLOAD)" --model models/expertmap-moe-tiny
