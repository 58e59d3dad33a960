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

# Lint and format check (settings in pyproject.toml), then the whole test suite, slow end-to-end tests included,
# in TEST_WORKERS processes, each test file's tests in one of them (module fixtures are built once).
TEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check cai tests benchmarks scripts
	$(VENV)/bin/ruff format --check cai tests benchmarks scripts

bench: setup
	$(VENV)/bin/python benchmarks/engine_local.py

clean:
	rm -rf runs
