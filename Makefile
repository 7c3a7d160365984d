# Every target sets up what it needs: a fresh clone with only Python 3.11 runs `make demo` or `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench sample-data clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dask]'
	touch $(STAMP)

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

clean:
	rm -rf $(VENV) state .pytest_cache .ruff_cache
