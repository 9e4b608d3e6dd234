# FieldGuard: `make demo` and `make test` work from a fresh clone; every target bootstraps what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NPM_STAMP := node_modules/.installed-stamp
# test workers: one more than the cores, since much of a test is waiting on a process or a socket
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 1)')

.PHONY: demo test lint unit bench clean setup

setup: $(STAMP) $(NPM_STAMP)

$(STAMP): pyproject.toml
	@echo "make: creating $(VENV) with $(PYTHON) (Python 3.11+)"
	@$(PYTHON) -m venv $(VENV)
	@echo "make: upgrading pip in $(VENV)"
	@$(PY) -m pip install --quiet --upgrade pip
	@echo "make: installing FieldGuard and its dependencies from pyproject.toml into $(VENV) (half a minute or more the first time)"
	@$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

$(NPM_STAMP): package.json package-lock.json
	@echo "make: installing json-server and the FHIR schema from package-lock.json (npm ci)"
	@scripts/setup-npm.sh
	@touch $@

demo: setup
	$(VENV)/bin/fieldguard demo

lint: $(STAMP)
	$(PY) -m ruff check proxy tests examples benchmarks
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --no-cache

unit: setup
	scripts/setup-debian.sh softhsm2 fonts-dejavu-core
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

test: lint unit

bench: setup
	scripts/setup-debian.sh wrk nginx-light
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.scaleout

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache demo-data
