# Quick start:  make demo   (set up .venv, answer a question about the bundled sample video)
#               make test   (set up .venv, run the test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmkv generate

test: $(STAMP)
	@sh tools/install_chromium.sh
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
