# streamloc: two-command quick start (`make demo`, `make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.streamloc-installed
EXTRAS ?= s3,demo,dev
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install system-deps demo test bench clean help

help:
	@echo "make install   create $(VENV) and install streamloc[$(EXTRAS)] (editable; quick when done)"
	@echo "make demo      install, then run the main job on the embedded Blue Marble default"
	@echo "make test      install (+ system-deps), then run the test suite"
	@echo "make system-deps  as root: apt-get install slurm-wlm munge (real SLURM for the tests)"
	@echo "make bench     run the benchmarks under benchmarks/"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip setuptools wheel
	$(PY) -m pip install --progress-bar off -e '.[$(EXTRAS)]'
	@touch $(STAMP)

demo: install
	$(PY) -m shard_tools demo --output $(DEMO_DIR)

# A real single-node SLURM for the tests: Debian's slurm-wlm and munge, installed
# when we are root with apt-get; elsewhere the SLURM tests skip and say why.
system-deps:
	@if command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/munged ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing slurm-wlm and munge (a real single-node SLURM for the tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    slurm-wlm munge >/dev/null; \
	else echo "note: SLURM tests will skip (root and apt-get are needed to install slurm-wlm, munge)"; fi

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
