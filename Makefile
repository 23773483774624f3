# `make demo` and `make test` set up everything they need first (setup is implicit).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo results test test-fast bench lock clean

setup: $(STAMP) gdal

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# gdalwarp is the independent reference of the alignment tests (Debian's gdal-bin)
gdal:
	@command -v gdalwarp >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gdal-bin >/dev/null); \
	  else echo "note: gdalwarp not found; install gdal-bin (or GDAL) to run the reference tests"; fi; }

demo: setup
	$(VENV)/bin/sarflow demo --out demo-output

# every downstream result on top of the demo's output, gathered into one MLflow results report
results: setup
	$(VENV)/bin/sarflow results --out demo-output

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

bench: setup
	$(PY) benchmarks/bench_tile.py --out benchmarks/results

# requirements.lock: every package of the dev environment pinned as installed here (after a
# change to pyproject.toml's dependencies: make setup, then make lock)
lock: setup
	$(PY) -m pip freeze --exclude-editable | grep -v -e '^-e' -e '^sarflow' -e '^ruff==' | sed 's/+cpu$$//' > requirements.lock

clean:
	rm -rf demo-output data .pytest_cache
