# Every target sets up what it needs: a fresh clone with only Python 3.11 runs `make demo` or `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIST_STAMP := $(VENV)/.installed-dist

.PHONY: venv demo test test-fast lint bench sample-data dist dist-check clean

# runner/__init__.py holds the version the installed metadata carries.
$(STAMP): pyproject.toml runner/__init__.py
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dask,parquet]'
	touch $(STAMP)

# build and twine, for `make dist` and `make dist-check` only.
$(DIST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,dask,parquet,dist]'
	touch $(DIST_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ximrun run jobs/demo.toml; code=$$?; echo "exit code $$code"; \
	$(BIN)/ximrun status jobs/demo.toml; exit $$code

lint: $(STAMP)
	$(BIN)/ruff check runner tests bench scripts

# `make test` runs every test, the slow ones too (marked `slow` in tests/, registered in
# pyproject.toml); while iterating, `make test-fast` skips those: pytest -m "not slow".
test: lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m bench

sample-data: $(STAMP)
	$(BIN)/python scripts/make_sample_data.py

# The sdist and the wheel in dist/, checked by twine.
dist: $(DIST_STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

# Build both, install the wheel in a fresh venv away from the checkout and use it there.
dist-check: $(DIST_STAMP)
	PYTHON=$(BIN)/python bash scripts/check_dist.sh

clean:
	rm -rf $(VENV) state dist build .pytest_cache .ruff_cache
