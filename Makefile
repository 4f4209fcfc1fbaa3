# One command each for the things a user does. `make` alone shows them.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: help install run test fuzz lint browsers clean

help:
	@echo "make run       create .venv if needed and serve the chat on http://127.0.0.1:8000"
	@echo "make test      run the whole test suite"
	@echo "make fuzz      fuzz both WebSocket ports with raw bytes for FUZZ_MINUTES (10); see .fuzz/"
	@echo "make lint      ruff check, ruff format --check, mypy (strict on trio_chat/), flake8-async"
	@echo "make browsers  install Debian's chromium for the browser tests (root, apt-get)"

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "$(PY) not found: trio-chat needs Python 3.11"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/trio-chat serve

test: $(STAMP)
	$(BIN)/pytest

# Seeds go to .fuzz/seeds.log, hypothesis's example database to .fuzz/examples (replayed
# first next time), falsifying inputs to .fuzz/failures/.
FUZZ_MINUTES ?= 10
fuzz: $(STAMP)
	TRIO_CHAT_FUZZ_MINUTES=$(FUZZ_MINUTES) $(BIN)/pytest -p no:cacheprovider tests/test_fuzz_sockets.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/flake8 trio_chat tests

browsers:
	apt-get update -q && apt-get install -y -q chromium

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
