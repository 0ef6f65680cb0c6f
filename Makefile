# `make test` and `make serve` create their own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: test test-fast serve install clean

install: $(VENV)/.installed

# torch is installed first and pinned on its own: an unpinned resolver would fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fast lane: every test not marked slow (no servers, subprocesses, browser or long training).
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

serve: install
	$(PY) -m service --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache
