# Every target sets up what it needs: a fresh clone with only Python 3.11 runs `make demo` or `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIST_STAMP := $(VENV)/.installed-dist

.PHONY: venv demo test test-fast lint bench sample-data dist dist-check clean chromium report-screenshot

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
test: lint chromium
	$(BIN)/python -m pytest -q

# The browser test of `ximrun report` (tests/test_report.py) needs Debian's chromium: installed
# when missing and possible (root, apt); otherwise that test is skipped and says why.
CHROMIUM_FLAGS := --headless --no-sandbox --disable-gpu --disable-background-networking \
	--disable-component-update --disable-sync --no-first-run
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium) \
		|| echo "chromium could not be installed: the browser test of the report will be skipped"

# docs/report.png, the README's picture: the demo job's report (after running it) in chromium.
report-screenshot: $(STAMP) chromium
	$(BIN)/ximrun run jobs/demo.toml -q
	$(BIN)/ximrun report jobs/demo.toml -o state/demo-report.html
	tmp=$$(mktemp -d) && chromium $(CHROMIUM_FLAGS) --user-data-dir=$$tmp --hide-scrollbars \
		--window-size=1200,2200 --screenshot=docs/report.png \
		"file://$(CURDIR)/state/demo-report.html" 2>/dev/null; status=$$?; rm -rf $$tmp; \
		exit $$status
	$(BIN)/python -c "from PIL import Image; p = 'docs/report.png'; \
		Image.open(p).convert('RGB').quantize(256).save(p, optimize=True)"

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
