# The two commands of the README:
#   make demo   - creates .venv, installs the workbench, runs it end to end on the embedded
#                 default (synthetic hands, tiny untrained backbone) into outputs/demo/
#   make test   - creates .venv, installs the workbench with its test extras, runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench lab clean-outputs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (handclip)" >/dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m handclip_nb.pipeline --output outputs/demo

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) benchmarks/bench_rank_metrics.py

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean-outputs:
	rm -rf outputs/demo outputs/stage* outputs/.feature_cache
