# Quick start: `make train` then `make test`. Both create .venv from the pins on
# first use and reuse it afterwards.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2
ARGS ?=
# The recipe `make train` runs unless ARGS picks experiment=, model= or data= itself
# (EXPERIMENT= runs the bare defaults of conf/config.yaml).
EXPERIMENT ?= census_mmoe
DEFAULT_EXPERIMENT = $(if $(EXPERIMENT),$(if $(filter experiment=% model=% data=%,$(ARGS)),,experiment=$(EXPERIMENT)))
PYTEST_ARGS ?=

.PHONY: help venv train test test-fast test-slow test-dist lint smoke bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): requirements/cpu.txt requirements/common.txt requirements/torchrec.txt requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -r requirements/cpu.txt -c requirements/constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/torchrec.txt
	$(PY) -c "import torch, torchrec, hydra, wandb, deepspeed; print('venv ready: torch', torch.__version__)"
	touch $(STAMP)

venv: $(STAMP)  ## create .venv from the pinned requirements

train: $(STAMP)  ## the census_mmoe recipe (MMoE on Census-Income), 2 processes (ARGS= for Hydra overrides)
	NPROC=$(NPROC) PYTHON=$(PY) bash launch/torchrun.sh $(DEFAULT_EXPERIMENT) $(ARGS)

test: $(STAMP)  ## full CI suite (unit, distributed, slow launch tests)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only (no slow tests)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff + mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:  ## remove the venv and outputs
	rm -rf $(VENV) outputs multirun
