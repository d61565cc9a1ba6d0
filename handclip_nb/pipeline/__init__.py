"""The papermill runner: the demo's steps (``steps``), and the experiment grid (``grid``:
the grid file and its runs; ``executors``: here or on Slurm; ``runner``: scheduling, the
summary and the results table). ``python -m handclip_nb.pipeline`` is :func:`.cli.main`.

Names are loaded lazily (PEP 562): the notebooks' tests import ``run_notebook`` and the
parameter tables without paying for submitit, which only the grid's executors need.
"""
from importlib import import_module

_EXPORTS = {
    "Step": "steps", "DEMO_STEPS": "steps", "GOLDEN_STEPS": "steps",
    "NOTEBOOK_STAGES": "steps", "OTHER_NOTEBOOKS": "steps", "NOTEBOOKS_DIR": "steps", "PARAMS_DIR": "steps",
    "run_notebook": "steps", "run_pipeline": "steps", "execute_step": "steps",
    "execute_spec": "steps", "step_parameters": "steps", "step_fingerprint": "steps",
    "code_fingerprint": "steps", "demo_table": "steps",
    "Grid": "grid", "GridRun": "grid", "GridError": "grid", "load_grid": "grid",
    "expand_grid": "grid",
    "run_grid": "runner", "GridSummary": "runner",
    "main": "cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
