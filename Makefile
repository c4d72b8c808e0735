# One entry point for set-up, the main job, tests, benchmarks and lint. CI runs `make test` (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the CPU build on CPU machines: an unpinned torch pulls the multi-GB CUDA build.
CPU_STACK := torch==2.13.0 triton==3.7.1

.PHONY: setup demo train test bench lint test-gpu-stack
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

lint: setup  ## ruff: the lint rules and the formatting (ruff.toml), as CI checks them
	$(BIN)/ruff check opd_fast tests bench setup.py
	$(BIN)/ruff format --check opd_fast tests bench setup.py

# The GPU machine's preinstalled stack (torch 2.11 CUDA build, triton 3.6, transformers 5.17, huggingface_hub 1.33;
# peft 0.18.0, the oldest that imports with transformers 5) on this CPU, before spending GPU minutes: the suite on
# HEAD in its own checkout (an editable build writes _C*.so into the tree). numpy < 2.4 for triton 3.6's
# interpreter. About 5 GB and 10 minutes; not part of CI.
GPU_STACK := torch==2.11.0 triton==3.6.0 "numpy<2.4" transformers==5.17.0 huggingface_hub==1.33.0 peft==0.18.0
test-gpu-stack:
	rm -rf .gpu-stack && git clone -q . .gpu-stack
	cd .gpu-stack && $(PY) -m venv .venv && .venv/bin/pip install -q --upgrade pip setuptools wheel && \
	  .venv/bin/pip install -q $(GPU_STACK) && \
	  OPD_FAST_NO_CUDA=1 .venv/bin/pip install -q --no-build-isolation -e ".[test]" $(GPU_STACK) && \
	  TORCH_EXTENSIONS_DIR=$$PWD/.cache/torch_extensions .venv/bin/python -m pytest -q -rs tests
