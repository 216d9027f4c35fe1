# The two commands a new user needs: `make demo` and `make test`. Each creates .venv if missing,
# installs torch (TORCH_SPEC, a CPU wheel by default) with the project, at the exact versions
# of requirements/lock.txt (pip constraints), and runs.
#   make test-latest   the newest releases of everything (.venv-latest)
#   make test-min      pyproject.toml's lower bounds (requirements/min.txt, .venv-min)
#   make lock          rewrite requirements/lock.txt from the newest releases (then run make test)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= requirements/lock.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf-extensions-installed
PYTEST_ARGS ?=
PIP_INSTALL = $(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install demo test test-all test-latest test-min lock bench device-check quality format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) $(UPGRADE_FLAGS) "$(TORCH_SPEC)" -e ".[dev]"
	$(PY) -m pip check
	$(PY) -m pip freeze --exclude-editable > $(VENV)/installed-versions.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m recipes.demo

test: install
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

# Not part of CI (time): run both before a submission that touches dependencies.
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS= UPGRADE_FLAGS="--upgrade --upgrade-strategy eager"

test-min:
	$(MAKE) test VENV=.venv-min CONSTRAINTS=requirements/min.txt

lock:
	rm -rf .venv-lock
	$(MAKE) install VENV=.venv-lock CONSTRAINTS=
	{ echo "# Exact versions that \`make test\` and \`make demo\` install (pip constraints; torch comes"; \
	  echo "# from TORCH_SPEC). Written by \`make lock\` from the newest releases on $$(date -u +%F)."; \
	  grep -v -i -E '^(torch|hf-extensions|pip)==' .venv-lock/installed-versions.txt; } > requirements/lock.txt
	rm -rf .venv-lock

bench: install
	$(PY) -m benchmarks

# On a CUDA machine: every method's step at real sizes -> benchmarks/results/device_check.json.
# Anywhere: DEVICE_CHECK_ARGS=--tiny (the tiny sizes the test suite runs).
device-check: install
	$(PY) -m benchmarks.device_check $(DEVICE_CHECK_ARGS)

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .venv-latest .venv-min .venv-lock outputs .pytest_cache .ruff_cache *.egg-info
