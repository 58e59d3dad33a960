VENV ?= .venv
export VENV

.PHONY: setup demo demo-train test lint bench clean

setup:
	@bash scripts/setup.sh

# The main job: set up, prepare the embedded model once, run the demo pipeline end to end.
demo: setup
	$(VENV)/bin/cai models prepare smollm2
	$(VENV)/bin/cai run pipelines/demo.yaml

# The whole chain on the embedded model: SL-CAI data, SFT, RL-CAI labels, reward model, DPO.
demo-train: setup
	$(VENV)/bin/cai models prepare smollm2
	$(VENV)/bin/cai run pipelines/demo_train.yaml

# Lint and format check (settings in pyproject.toml), then the whole test suite, slow end-to-end tests included.
test: lint
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check cai tests benchmarks scripts
	$(VENV)/bin/ruff format --check cai tests benchmarks scripts

bench: setup
	$(VENV)/bin/python benchmarks/engine_local.py

clean:
	rm -rf runs
