# make demo | make test | make bench: each creates .venv on first use (torch first, then the package).

VENV := .venv
PYTHON := $(VENV)/bin/python
# Touched after a complete install; reinstalls only when pyproject.toml changes.
STAMP := $(VENV)/.curvlab-installed

.PHONY: demo test bench venv

demo: venv
	$(VENV)/bin/curvlab compare --force

test: venv
	$(PYTHON) -m pytest -q tests curvlab

BENCHMARKS := products spectra kfac diagonal gram memory floors asdl_compare data_parallel

# ASDL (PyPI asdfghjkl, pure Python) is the reference benchmarks/asdl_compare.py compares against; only benchmarks need it.
bench: venv
	$(PYTHON) -m pip install 'asdfghjkl==0.1a5'
	for name in $(BENCHMARKS); do $(PYTHON) benchmarks/$$name.py || exit 1; done
	$(VENV)/bin/curvlab bench --out reports/bench --force

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[dev]'
	touch $@
