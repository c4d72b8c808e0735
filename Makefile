# One entry point for set-up, the main job, tests, benchmarks and lint. CI runs `make test` (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the CPU build on CPU machines: an unpinned torch pulls the multi-GB CUDA build.
CPU_STACK := torch==2.13.0 triton==3.7.1

.PHONY: setup train test bench lint
setup: $(BIN)/opd-fast
$(BIN)/opd-fast: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(CPU_STACK)
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

train: setup  ## the tiny built-in default: 3 teachers distilled into one student on the CPU
	$(BIN)/opd-fast train configs/tiny.yaml --out runs/tiny --resume

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m pytest -q bench --benchmark-only

lint: setup
	$(BIN)/ruff check --line-length 120 opd_fast tests bench
