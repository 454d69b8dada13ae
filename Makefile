# Two entry points that work on a fresh clone with only Python 3.11 and make.
#   make repro  - create .venv if missing, install, run the default pipeline (`dvc repro evaluate`: base, SFT,
#                 reward model, PPO-ptx, its controls, best-of-n, the report)
#   make test   - same set-up, then the test suite (offline)
#   make compare - the whole DAG (`dvc repro`): also DPO, RLOO, GRPO and a second round, judged by `compare`
#   make seeds N=3 - the pipeline over N training seeds as DVC experiments, summarized (docs/seeds.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro compare test seeds clean
N ?= 3

$(BIN)/rlhf: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/rlhf

setup: $(BIN)/rlhf

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro evaluate

compare: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

seeds: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/rlhf seeds run --seeds $(N)

clean:
	rm -rf models data/prepared data/samples data/rankings checkpoints plots reports reports_compare .dvc/tmp
