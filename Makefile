# The two commands of the README:
#   make demo   - creates .venv, installs the workbench, runs it end to end on the embedded
#                 default (synthetic hands, the shipped handclip-mini) into outputs/demo/;
#                 a rerun skips finished steps whose inputs did not change and resumes
#                 an interrupted one
#   make test   - creates .venv, installs the workbench with its test extras, runs the tests
#                 (printing the 15 slowest, so a change that adds minutes shows in its CI log)
#                 and then the nbval golden notebooks (tests/golden/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast goldens regenerate-goldens check-mini bench lab clean-outputs \
	gpu-wheels gpu-check gpu-check-smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (handclip)" >/dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m handclip_nb.pipeline --output outputs/demo

# pytest-xdist: TEST_WORKERS processes, each module on one of them (--dist loadscope keeps a
# module's fixtures built once and its tests in order), the modules taken most expensive first
# (tests/session_sharing.py orders them; xdist's own reorder by test count would put the long
# few-test Slurm modules last); TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# Bytecode is cached for the test runs (__pycache__ beside the package's and the tests' sources,
# ignored by git), also where the environment sets PYTHONDONTWRITEBYTECODE (this project's
# machines do): a run starts about 150 Python processes (notebook kernels, grid workers, Slurm
# jobs), and each compiled the package again, about 0.5 s of CPU for a notebook kernel's
# imports. Not PYTHONPYCACHEPREFIX: under a prefix every installed package (torch's 1,500
# modules) is compiled again too, into an empty cache on every fresh clone.
test test-fast goldens: export PYTHONDONTWRITEBYTECODE =

test: install
	$(PY) -m pytest $(PYTEST_PARALLEL) --durations=15
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

# the inner loop: no notebook kernels, no Slurm cluster, no browser, no slow behaviour test
# (docs/architecture.md, "Tests and checks", says what it leaves out)
test-fast: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow and not notebook and not slurm and not browser"

bench: install
	$(PY) benchmarks/bench_rank_metrics.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_architectures.py
	$(PY) benchmarks/bench_data.py

# GPU check (benchmarks/README.md, "GPU check"). The lent GPU machine has no network and its
# own python3 with PyTorch (another version than our pin) but not openai-clip nor ftfy/wcwidth,
# which clip imports: `make gpu-wheels` (here) puts exactly those wheels into .whl/ (git-ignored
# through .git/info/exclude), which the device call carries; `make gpu-check` (there) installs
# them into $(GPU_SITE) when `import clip` fails and runs the check from the source tree.
# setuptools<81 travels too: clip imports pkg_resources, which later setuptools no longer have.
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_SITE ?= /tmp/handclip-site
GPU_CHECK_JSON ?= outputs/gpu_check.json
GPU_CHECK_ARGS ?=
# openai-clip as pinned in pyproject.toml (PyPI has only its sdist: built into a wheel here);
# the others at the versions of our .venv (pip show ftfy wcwidth setuptools)
GPU_CLIP_PIN ?= openai-clip==1.0.1
GPU_WHEEL_PINS ?= ftfy==6.3.1 wcwidth==0.9.4 setuptools==80.10.2

gpu-wheels:
	@exclude=$$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude); \
	mkdir -p "$$(dirname "$$exclude")"; \
	grep -qxF '/.whl/' "$$exclude" 2>/dev/null || echo '/.whl/' >> "$$exclude"
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip wheel --quiet --no-deps --no-cache-dir -w .whl $(GPU_CLIP_PIN)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEEL_PINS)
	@ls -l .whl

gpu-check:
	@$(GPU_PYTHON) -c "import clip" 2>/dev/null || PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) -c "import clip" \
		2>/dev/null || { ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'make gpu-wheels' \
		here and carry .whl"; exit 2; }; $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps \
		--no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; }
	PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py \
		--out $(GPU_CHECK_JSON) $(GPU_CHECK_ARGS)

# the same script on this CPU: tiny backbones, small sizes (under a minute)
gpu-check-smoke: install
	$(PY) benchmarks/gpu_check.py --smoke --out outputs/gpu_check_smoke.json

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean-outputs:
	rm -rf outputs/demo outputs/stage* outputs/.feature_cache
