"""Regenerate the nbval golden notebooks after an intended change.

    .venv/bin/python tests/golden/regenerate.py

Runs every notebook once through papermill with ``params/smoke.yaml`` (the steps of
``handclip_nb.pipeline.GOLDEN_STEPS``, run folders under ``outputs/golden/``) in the goldens'
kernel environment (``kernel_env.py``: no progress bars, one torch thread), and copies the
executed notebooks here as ``NN_<step>.ipynb``. ``make test`` then checks them cell by cell
with ``pytest --nbval tests/golden`` (see ``sanitize.cfg`` for what is masked).
Review the diff of the goldens before committing them: every changed number is a changed result.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kernel_env import golden_kernel_env  # beside this script: on sys.path when it runs

HERE = Path(__file__).resolve().parent


def main() -> int:
    from handclip_nb.pipeline import GOLDEN_STEPS, run_pipeline
    from handclip_nb.runs import project_root

    out = project_root() / "outputs" / "golden"
    shutil.rmtree(out, ignore_errors=True)  # fresh run folders, as on a clean checkout
    with golden_kernel_env():  # the kernels nbval starts get the same (conftest.py)
        run_pipeline(out, GOLDEN_STEPS, progress=False, force=True)
    for old in HERE.glob("[0-9][0-9]_*.ipynb"):
        old.unlink()
    for number, step in enumerate(GOLDEN_STEPS):
        target = HERE / f"{number:02d}_{step.name}.ipynb"
        shutil.copyfile(out / f"{step.name}.ipynb", target)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
