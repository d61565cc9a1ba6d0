"""Run the workbench's notebooks headlessly with papermill (the README's main command).

``python -m handclip_nb.pipeline --output outputs/demo`` executes each pipeline step's notebook
on the embedded default (synthetic hands, tiny untrained backbone), writes the executed
notebooks and their run folders under ``--output``, and prints a comparison table read back
from the runs' ``metrics.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .runs import project_root, read_metrics, resolve_path

__all__ = ["Step", "DEMO_STEPS", "run_notebook", "run_pipeline", "comparison_table", "markdown_table", "main"]


#: The notebooks ship beside the package in the checkout.
NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass(frozen=True)
class Step:
    name: str  # folder name under the output directory
    notebook: str  # file in notebooks/
    parameters: dict = field(default_factory=dict)
    #: parameters that name another step's run folder, e.g. {"stage1_dir": "stage1-tiny-vit"}
    links: dict = field(default_factory=dict)


#: The demo: every available stage with both tiny architectures on the same synthetic people.
#: Stage 3 trains from the backbone (no warm start), so its numbers compare with stage 2's.
DEMO_STEPS = tuple(
    step
    for bb in ("tiny-vit", "tiny-rn")
    for step in (
        Step(f"stage0-{bb}", "stage0_zeroshot.ipynb", {"backbone": bb}),
        Step(f"stage1-{bb}", "stage1_prompt.ipynb", {"backbone": bb}),
        Step(f"stage2-{bb}", "stage2_image.ipynb", {"backbone": bb},
             links={"stage1_dir": f"stage1-{bb}"}),
        Step(f"stage3-{bb}", "stage3.ipynb", {"backbone": bb}),
        Step(f"attention-{bb}", "attention.ipynb", {"backbone": bb},
             links={"stage3_dir": f"stage3-{bb}"}),
    )
)


def run_notebook(notebook: str, executed_path: Path, parameters: dict,
                 progress: bool = True) -> Path:
    """Execute ``notebooks/<notebook>`` with papermill; the kernel runs in the project root."""
    import papermill as pm

    root = project_root()
    source = NOTEBOOKS_DIR / notebook
    if not source.is_file():
        raise FileNotFoundError(f"notebook {source} not found")
    executed_path.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(source), str(executed_path), parameters=parameters,
                        kernel_name="python3", cwd=str(root), progress_bar=progress)
    return executed_path


def run_pipeline(output: str | Path, steps=DEMO_STEPS, extra: dict | None = None,
                 progress: bool = True) -> list[Path]:
    out = resolve_path(output)
    run_dirs = []
    for step in steps:
        run_dir = out / step.name
        params = {**step.parameters, **(extra or {}), "output_dir": str(run_dir),
                  **{k: str(out / v) for k, v in step.links.items()}}
        started = time.time()
        run_notebook(step.notebook, out / f"{step.name}.ipynb", params, progress=progress)
        print(f"[pipeline] {step.name}: {time.time() - started:.1f} s -> {run_dir}")
        run_dirs.append(run_dir)
    return run_dirs


def comparison_table(run_dirs) -> "pandas.DataFrame":  # noqa: F821
    import pandas as pd

    rows = {}
    for d in run_dirs:
        m = read_metrics(d)
        row = {"stage": m["stage"], "backbone": m.get("backbone_display", m["backbone"]),
               "dataset": f"{m['dataset']}/{m['aspect']}"}
        for k, v in m["test"].items():
            row[k] = f"{v['mean']:.2f} ± {v['std']:.2f}"
        rows[Path(d).name] = row
    return pd.DataFrame(rows).T


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/demo", help="folder for executed notebooks")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="extra parameter for every step")
    args = parser.parse_args(argv)
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in args.param}
    started = time.time()
    run_dirs = run_pipeline(args.output, extra=extra)
    table = comparison_table(run_dirs)
    print(table.to_string())
    out = resolve_path(args.output)
    from .runs import atomic_write_text

    atomic_write_text(out / "comparison.csv", table.to_csv())
    atomic_write_text(out / "comparison.md", markdown_table(table))
    print(f"[pipeline] done in {time.time() - started:.1f} s; results in {out}")
    return 0


def markdown_table(table) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs the optional tabulate)."""
    header = ["run", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
