# The README's two commands: `make demo` and `make test`. Both create .venv and install slmops into it first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := dev,llama,server,gemma,postgres,optimize,privacy,s3,onnx,mqtt
STAMP := $(VENV)/.installed-$(shell cat Makefile pyproject.toml | sha256sum | cut -c1-12)
# llama-cpp-python compiles llama.cpp. A native (-march=native) build on these x86_64 VMs enables AMX tile
# instructions that the CPU advertises but the hypervisor traps (SIGILL in ggml_backend_amx_mul_mat), so build
# for a portable AVX2 baseline instead. Other architectures keep llama.cpp's defaults.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

.PHONY: demo test lint typecheck unit install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "slmops needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/slmops demo

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) demo-work .pytest_cache .mypy_cache .ruff_cache
