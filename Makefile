# The two set-up commands of the README: `make train` and `make test`. Each creates .venv when it is
# missing and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
# Which torch to install. Without an NVIDIA GPU: the pinned release (a CPU build where the machine
# provides one locally). With a GPU: the newest CUDA build. Override, e.g. TORCH="torch==2.5.1".
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.9" || echo "torch==2.13.0")
# Extra pip index for torch, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for a small CPU build.
TORCH_INDEX ?=
EXTRAS ?= dev,hf
ARGS ?=
# The suite on every core (pytest-xdist); PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n auto
STAMP := $(VENV)/.installed

.PHONY: install train test lint clean clean-runs
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Caches only. Runs stay: checkpoints in outputs/ and multirun/, offline W&B runs in wandb/.
clean:
	rm -rf .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Every run, on purpose only: outputs/ and multirun/ (under $CAUSALGPT_RUNS when it is set, as train.py
# writes them) and W&B runs not yet synced in wandb/.
RUNS := $(or $(CAUSALGPT_RUNS),.)
clean-runs:
	rm -rf "$(RUNS)/outputs" "$(RUNS)/multirun" wandb
