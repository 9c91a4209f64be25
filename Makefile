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
# e.g. make train-model CORPUS=/data/corpus WORKLOAD=/data/workloads/dev_mix.jsonl [MODEL=expertmap-moe-fine]
MODEL ?= expertmap-moe-tiny
TRAIN_FLAGS_expertmap-moe-tiny := --arch mixtral --experts 16 --top-k 2 --layers 8 --expert-hidden 256 --minutes 45
TRAIN_FLAGS_expertmap-moe-fine := --arch qwen2_moe --experts 64 --top-k 4 --layers 12 --expert-hidden 48 \
	--shared-expert-hidden 128 --balance-coef 0.04 --minutes 85 --save-dtype bfloat16
train-model:        ## re-train a bundled model (tiny: about 45 minutes on 2 CPU cores, fine: 85) and rewrite its card
	@[ -n "$(CORPUS)" ] && [ -n "$(WORKLOAD)" ] || { echo "make train-model: set CORPUS=DIR (.txt training files) and WORKLOAD=FILE (JSONL prompts)" >&2; exit 2; }
	@[ -n "$(TRAIN_FLAGS_$(MODEL))" ] || { echo "make train-model: MODEL=$(MODEL) is not a bundled model (expertmap-moe-tiny, expertmap-moe-fine)" >&2; exit 2; }
	$(PY) models/train.py --corpus "$(CORPUS)" $(TRAIN_FLAGS_$(MODEL)) --out models/$(MODEL)
	$(PY) models/card.py --workload "$(WORKLOAD)" --model models/$(MODEL)
