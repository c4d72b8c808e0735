# One entry point for set-up, the main job, tests, benchmarks and lint. CI runs `make test` (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the CPU build on CPU machines: an unpinned torch pulls the multi-GB CUDA build.
CPU_STACK := torch==2.13.0 triton==3.7.1

.PHONY: setup demo train test bench lint
setup: $(BIN)/opd-fast
$(BIN)/opd-fast: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(CPU_STACK)
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: setup  ## the main job: the paper's comparison in miniature on the CPU (opd-fast demo), report in runs/demo
	$(BIN)/opd-fast demo --out runs/demo

train: setup  ## the trainer alone on configs/tiny.yaml: 3 seeded tiny teachers distilled into one student
	$(BIN)/opd-fast train configs/tiny.yaml --out runs/tiny --resume

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m pytest -q bench/bench_opd_step.py --benchmark-only

lint: setup
	$(BIN)/ruff check --line-length 120 opd_fast tests bench
