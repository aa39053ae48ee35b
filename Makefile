# etfkern: `make demo` and `make test` do all set-up themselves on a fresh clone.
#   PYTHON=python3 make test   use an interpreter that already has torch (e.g. the GPU machine), no venv
#   VENV=path                  where the venv lives (default .venv); an existing one is reused
#   PYTEST_ARGS=...            extra pytest arguments
SHELL := /bin/bash
VENV ?= .venv
PYTEST_ARGS ?=
ifeq ($(origin PYTHON), undefined)
  PY := $(VENV)/bin/python
  STAMP_DIR := $(VENV)
else
  PY := $(PYTHON)
  STAMP_DIR := build
  DEPS_FLAGS := --any-torch
endif
DEPS_STAMP := $(STAMP_DIR)/.etfkern-deps
BUILD_STAMP := $(STAMP_DIR)/.etfkern-build
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null) setup.py pyproject.toml

.PHONY: all demo test test-fast bench gpu-check gpu-wheels build deps info clean
all: test

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel

# Installs only what is missing, so an interpreter with torch preinstalled and no registry works too.
$(DEPS_STAMP): requirements-dev.txt | $(if $(filter undefined,$(origin PYTHON)),$(VENV)/bin/python)
	@mkdir -p $(STAMP_DIR)
	$(PY) tools/install_deps.py requirements-dev.txt $(DEPS_FLAGS)
	@touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

deps: $(DEPS_STAMP)
build: $(BUILD_STAMP)

info: build
	$(PY) -m etfkern info

demo: build
	$(PY) -m etfkern demo

test: build
	$(PY) -m etfkern info
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $${PYTEST_WORKERS:-2} --dist loadfile -p no:cacheprovider tests $(PYTEST_ARGS)

test-fast: build
	$(PY) -m pytest -q -x -m "not slow and not distributed" tests $(PYTEST_ARGS)

bench: build
	$(PY) bench/run_all.py

# One time-boxed run on a GPU machine (under 9 minutes, one 10-minute device call): environment + CUDA build (stops
# on an error), the GPU tests, each family's benchmark; one archive + summary.txt in $$OUT (or bench/results/
# gpu-check). GPU_CHECK_DRY_RUN=1 rehearses it on CPU. Stages, time boxes: see tools/gpu_check.sh and the README.
gpu-check: deps
	PYTHON=$(PY) bash tools/gpu_check.sh

# The benchmark peers for the GPU machine (no package registry there): pure-Python wheels for its Python 3.12,
# downloaded here into .whl/ (git-ignored). Pass carry=[".whl"] to the device call; gpu_check.sh installs them.
GPU_PEER_WHEELS ?= liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_PEER_WHEELS)

clean:
	rm -rf build dist *.egg-info etfkern/*.so .pytest_cache
