# `make serve` and `make test` create their own virtual environment (.venv) on first use.
# `make serve` installs only what the service runs (torch and the runtime dependencies); `make test` adds
# the dev extra (pytest, the browser, schema and ONNX tools) on top.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# --no-compile: pip would byte-compile every file of torch (thousands) before the first start; Python compiles
# the modules it imports on first use instead, a fraction of them.
PIP := $(PY) -m pip install --disable-pip-version-check --no-compile

.PHONY: test test-fast serve install install-dev clean

install: $(VENV)/.installed-runtime

install-dev: $(VENV)/.installed-dev

# torch is installed first and pinned on its own: an unpinned resolver would fetch a multi-GB CUDA build.
# No --quiet: a first install takes a minute or more, and pip's lines show that it is moving.
$(VENV)/.installed-runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-runtime
	$(PIP) -e '.[dev]'
	touch $@

test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fast lane: every test not marked slow (no servers, subprocesses, browser or long training).
test-fast: install-dev
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# --host and --port only when HOST or PORT is given (`make serve PORT=8080`), so that ALEXNET_HOST and
# ALEXNET_PORT work as they do for `python -m service`; neither given: the service's defaults.
# Logs as plain lines for a terminal, unless ALEXNET_LOG_FORMAT says otherwise (the container keeps JSON).
serve: install
	ALEXNET_LOG_FORMAT=$(or $(ALEXNET_LOG_FORMAT),text) \
		$(PY) -m service $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

clean:
	rm -rf $(VENV) .pytest_cache
