# semiseg — every target sets up .venv first if it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help setup train test test-slow test-ddp test-all lint format bench data clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev,launchers,deploy]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install semiseg with its dependencies

train: $(STAMP)  ## train and test the default (supervised on the synthetic set); ARGS="key=value ..."
	$(BIN)/python -m semiseg.train $(ARGS)

test: $(STAMP)  ## run the tests (slow ones left out)
	$(BIN)/python -m pytest $(ARGS)

test-slow: $(STAMP)  ## run only the slow tests
	$(BIN)/python -m pytest -m "slow or real_data_slow" $(ARGS)

test-ddp: $(STAMP)  ## run the DDP tests (2 CPU processes over gloo)
	$(BIN)/python -m pytest -m ddp $(ARGS)

test-all: $(STAMP)  ## run every test
	$(BIN)/python -m pytest -m "" $(ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: $(STAMP)  ## print speed and memory figures: data pipeline, then every method (benchmarks/)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/methods.py $(ARGS)

data: $(STAMP)  ## download the public datasets into SEMISEG_DATA_DIR (or ./data); ARGS="kosdd2 ..." (default: all)
	$(BIN)/python -m semiseg.data.download $(or $(ARGS),all)

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
