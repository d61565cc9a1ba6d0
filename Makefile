# The two commands of the README:
#   make demo   - creates .venv, installs the workbench, runs it end to end on the embedded
#                 default (synthetic hands, the shipped handclip-mini) into outputs/demo/;
#                 a rerun skips finished steps whose inputs did not change and resumes
#                 an interrupted one
#   make test   - creates .venv, installs the workbench with its test extras, runs the tests
#                 and then the nbval golden notebooks (tests/golden/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast goldens regenerate-goldens check-mini bench lab clean-outputs

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
	$(MAKE) goldens

# nbval: re-execute the golden notebooks and compare every cell's output (not --nbval-lax)
goldens: install
	rm -rf outputs/golden
	$(PY) -m pytest --nbval tests/golden --nbval-sanitize-with tests/golden/sanitize.cfg -p no:cacheprovider

# after an intended change: re-run the goldens' notebooks and review the diff before committing
regenerate-goldens: install
	$(PY) tests/golden/regenerate.py

# retrain handclip-mini from scratch with its params file and compare the probes with the card
check-mini: install
	$(VENV)/bin/papermill notebooks/pretrain_mini.ipynb outputs/pretrain_mini_check.ipynb \
		-f params/pretrain_mini.yaml -p output_dir outputs/pretrain-check

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) benchmarks/bench_rank_metrics.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_architectures.py

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean-outputs:
	rm -rf outputs/demo outputs/stage* outputs/.feature_cache
