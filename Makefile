# Two entry points: `make pretrain` and `make test`. Both create or update .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The defaults run the tiny preset; pass ARGS for a preset and overrides, e.g.
# make pretrain ARGS="tiny train.max_steps=50 run.name=tiny-50"
ARGS ?=

.PHONY: pretrain test venv bench clean golden-losses

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"

# Re-install only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Without ARGS, a second `make pretrain` continues runs/tiny from its newest checkpoint (rm -rf runs/tiny
# to start over); with ARGS, a run directory that has checkpoints needs checkpoint.resume=auto.
pretrain: $(STAMP)
	$(VENV)/bin/liquid pretrain $(if $(ARGS),$(ARGS),checkpoint.resume=auto)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(VENV)/bin/liquid bench scan

# Regenerate tests/assets/losses/tiny_cpu.json (the golden loss curve tests/test_golden_losses.py compares
# against) after an intended numerical change.
golden-losses: $(STAMP)
	$(PY) -m tests.golden_losses --write

# Export checks against transformers 5 (its own environment): make check-export-hf5
include Makefile.export
# The GPU machine's checks (CUDA tests, NCCL equivalence runs, bench gpu): make gpu-check
include Makefile.gpu

clean: clean-hf5
	rm -rf $(VENV) runs .pytest_cache
