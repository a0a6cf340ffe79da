# `make quickstart` and `make test` are the two commands in the README; both set up .venv first.
VENV ?= .venv

.PHONY: setup quickstart test test-all ui

setup:
	bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/personafuse run experiments/quickstart.yaml

test:
	WITH_DEEPSPEED=1 bash scripts/setup.sh
	$(VENV)/bin/python -m pytest

test-all:
	WITH_DEEPSPEED=1 bash scripts/setup.sh
	$(VENV)/bin/python -m pytest -m "not gpu"

ui: setup
	$(VENV)/bin/personafuse ui
