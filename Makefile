# The two quick-start commands: `make demo` (main job on generated sample data) and `make test`.
PYTHON ?= python3

.PHONY: install demo test test-all bench

install:
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) tools/train.py

test: install
	$(PYTHON) -m pytest

test-all: install
	$(PYTHON) -m pytest -m "slow or not slow"
