# One command each for the things a user does. `make` alone shows them.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin

.PHONY: help install run test bench fuzz lint browsers clean

help:
	@echo "make run       create .venv, install what serving needs, serve http://127.0.0.1:8000"
	@echo "make test      run the whole test suite"
	@echo "make bench     a short benchmark (what the others are: docs/benchmarks.md)"
	@echo "make install   everything for development (the dev and bench extras)"
	@echo "make fuzz      fuzz both WebSocket ports with raw bytes for FUZZ_MINUTES (10); see .fuzz/"
	@echo "make lint      ruff, mypy (strict), flake8-async, import-linter contracts, no import cycle, no module over 500 lines"
	@echo "make browsers  install Debian's chromium for the browser tests (root, apt-get)"

# One stamp per extra, so each target installs what it needs, once: `make run` only what
# serving needs, `make test`/`make lint` the dev extra, `make bench` the bench extra.
$(VENV)/bin/python:
	@command -v $(PY) >/dev/null || { echo "$(PY) not found: trio-chat needs Python 3.11"; exit 1; }
	$(PY) -m venv $(VENV)

SERVE   := $(VENV)/.installed-serve
DEV     := $(VENV)/.installed-dev
BENCH   := $(VENV)/.installed-bench

$(SERVE): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/pip install -c constraints.txt -e .
	touch $@

$(DEV): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $@

$(BENCH): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/pip install -c constraints.txt -e '.[bench]'
	touch $@

# Everything for development: what CI installs.
install: $(DEV) $(BENCH)

run: $(SERVE)
	$(BIN)/trio-chat serve

test: $(DEV)
	$(BIN)/pytest

bench: $(BENCH)
	$(BIN)/python benchmarks/server_cost.py --smoke
	@echo "more: docs/benchmarks.md ($(BIN)/python benchmarks/run_all.py runs them all)"

# Seeds go to .fuzz/seeds.log, hypothesis's example database to .fuzz/examples (replayed
# first next time), falsifying inputs to .fuzz/failures/.
FUZZ_MINUTES ?= 10
fuzz: $(DEV)
	TRIO_CHAT_FUZZ_MINUTES=$(FUZZ_MINUTES) $(BIN)/pytest -p no:cacheprovider tests/test_fuzz_sockets.py

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python tools/check_imports.py
	$(BIN)/flake8 trio_chat tests

browsers:
	apt-get update -q && apt-get install -y -q chromium

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
