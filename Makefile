# streamloc: two-command quick start (`make demo`, `make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.streamloc-installed
EXTRAS ?= s3,demo,dev
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test bench clean help

help:
	@echo "make install   create $(VENV) and install streamloc[$(EXTRAS)] (editable; quick when done)"
	@echo "make demo      install, then run the main job on the embedded Blue Marble default"
	@echo "make test      install, then run the test suite"
	@echo "make bench     run the benchmarks under benchmarks/"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip setuptools wheel
	$(PY) -m pip install --progress-bar off -e '.[$(EXTRAS)]'
	@touch $(STAMP)

demo: install
	$(PY) -m shard_tools demo --output $(DEMO_DIR)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
