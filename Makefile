# Two commands on a fresh machine: `make run` (the default experiment) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/quickstart.toml
ARGS ?=

.PHONY: run test test-fast lint wheel-check fuzz bench bench-quick clean

# The venv is rebuilt when pyproject.toml changes; one stamp per extras set.
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.base
	$(VENV)/bin/ecavg run --config $(CONFIG) $(ARGS)

# Four pytest workers: the deployment tests mostly wait (on Flower's polling and heartbeats), so they overlap well
# even on two cores; one torch thread per process keeps the workers from oversubscribing the cores.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 4 --dist worksteal

test: $(VENV)/.dev
	$(PYTEST) $(ARGS)

# Everything but the tests that start real Flower deployments (marked `deploy`) and the slowest others (`slow`).
test-fast: $(VENV)/.dev
	$(PYTEST) -m "not deploy and not slow" $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

# Build the wheel, install it outside the checkout and run the sample from there (scripts/wheel_check.sh).
wheel-check: $(VENV)/.base
	PY=$(PY) bash scripts/wheel_check.sh

# The property-based fuzz tests with the long hypothesis profile (tests/conftest.py): fresh inputs on every run,
# and a count of the inputs tried at the end. `make test` runs the same tests with a bounded, fixed-seed budget.
fuzz: $(VENV)/.dev
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz_serialization.py \
		tests/test_fuzz_averaging.py tests/test_fuzz_config.py $(ARGS)

bench: $(VENV)/.dev
	$(PY) bench/run.py

bench-quick: $(VENV)/.dev
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) runs build dist *.egg-info
