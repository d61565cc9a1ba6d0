"""Run a grid: schedule its runs in dependency order on an executor, summarise, and build the
results table (``DIR/results.csv``, ``DIR/results.ipynb`` and its HTML copy).

Layout of ``DIR`` (``--output``)::

    runs/<run>/            every run folder (params.yaml, metrics.json, checkpoints/, tensorboard/)
    runs/<run>.ipynb       the executed notebook of each run
    runs/.pipeline/        each run's fingerprint and state (skip / resume / re-run)
    logs/<run>.log         local executor: each run's output
    slurm/                 slurm executor: submitit's job files and logs
    results.csv            one row per finished run
    results.ipynb, .html   the paper-style table, executed, and a self-contained copy

A rerun with the same grid skips finished runs, resumes interrupted ones from ``last.pt`` and
re-runs only what changed (and what reads it), exactly as the demo does; ``force`` starts every
run afresh. A failed run never stops the others: runs that read it are reported as not run.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..evaluate.grid_results import results_rows, write_results_csv
from ..progress import tqdm
from ..runs import atomic_write_text, resolve_path
from .executors import EXECUTORS, LocalExecutor, SlurmExecutor
from .grid import GridRun, expand_grid, load_grid, slurm_settings
from .steps import (_read_state, _state_path, code_fingerprint, is_up_to_date, run_notebook,
                    step_fingerprint, step_parameters)

__all__ = ["GridSummary", "run_grid", "export_html", "RESULTS_NOTEBOOK"]

RESULTS_NOTEBOOK = "results.ipynb"
POLL_SECONDS = 2.0


@dataclass
class GridSummary:
    """What a grid run did, run by run."""

    output: Path
    finished: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run -> "why; log: path"
    not_run: dict[str, str] = field(default_factory=dict)  # run -> the failed run it reads
    seconds: float = 0.0
    results_csv: Path | None = None
    results_html: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_run

    def describe(self) -> str:
        lines = [f"[grid] {len(self.finished)} finished ({len(self.resumed)} of them resumed), "
                 f"{len(self.skipped)} skipped (up to date), {len(self.failed)} failed, "
                 f"{len(self.not_run)} not run, in {self.seconds:.1f} s"]
        lines += [f"[grid]   FAILED {name}: {why}" for name, why in self.failed.items()]
        lines += [f"[grid]   not run {name}: it reads {up}, which failed"
                  for name, up in self.not_run.items()]
        if self.results_csv is not None:
            lines.append(f"[grid] results: {self.results_csv}"
                         + (f", {self.results_html}" if self.results_html else ""))
        return "\n".join(lines)


def _executor(kind: str, output: Path, jobs: int, slurm: Mapping[str, Any],
              threads: int | None = None):
    if kind == "local":
        return LocalExecutor(output, jobs=jobs, threads=threads)
    if kind == "slurm":
        return SlurmExecutor(output, slurm, jobs=jobs if jobs > 1 else None)
    raise ValueError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")


def run_grid(grid_file: str | Path, output: str | Path, executor: str = "local", jobs: int = 1,
             slurm: Mapping[str, Any] | None = None, force: bool = False,
             progress: bool = True, results: bool = True,
             threads: int | None = None) -> GridSummary:
    """Run every run of ``grid_file`` into ``output``; see the module docstring."""
    started = time.time()
    grid = load_grid(grid_file)
    runs = expand_grid(grid)  # every run validated before anything starts
    out = resolve_path(output)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    engine = _executor(executor, out, max(1, int(jobs)), slurm_settings(grid, slurm or {}),
                       threads)
    print(f"[grid] {grid.path.name}: {len(runs)} runs "
          f"({len(grid.stages)} stages x {_combinations(grid)} combinations) -> {out}; "
          f"executor {engine.describe()}")
    code = code_fingerprint()
    fingerprints: dict[str, str] = {}
    specs: dict[str, dict] = {}
    for run in runs:
        step = run.step()
        params = step_parameters(step, runs_dir)
        fingerprint = step_fingerprint(step, params, fingerprints, code)
        fingerprints[run.name] = fingerprint
        if force:  # start afresh, also on a requeue: the worker itself never forces
            shutil.rmtree(runs_dir / run.name, ignore_errors=True)
            _state_path(runs_dir, step).unlink(missing_ok=True)
        specs[run.name] = {"out": str(runs_dir), "name": run.name, "notebook": run.notebook,
                           "params": params, "links": run.links, "fingerprint": fingerprint}
    summary = GridSummary(output=out)
    pending = list(runs)
    running: dict[str, Any] = {}
    finished: set[str] = set()
    bar = tqdm(total=len(runs), desc="grid runs", disable=not progress)
    while pending or running:
        for run in list(pending):
            failed_up = [u for u in run.upstream() if u in summary.failed or u in summary.not_run]
            if failed_up:
                summary.not_run[run.name] = failed_up[0]
                pending.remove(run)
                bar.update(1)
                continue
            if any(u not in finished for u in run.upstream()):
                continue
            if is_up_to_date(runs_dir, run.step(), specs[run.name]["fingerprint"]):
                summary.skipped.append(run.name)
                finished.add(run.name)
                pending.remove(run)
                bar.update(1)
                print(f"[grid] {run.name}: up to date, skipped")
                continue
            if len(running) >= engine.capacity:
                continue
            handle = engine.start(specs[run.name])
            running[run.name] = (handle, time.time())
            pending.remove(run)
            job = f" (Slurm job {handle.job_id})" if handle.job_id else ""
            print(f"[grid] start {run.name}{job}")
        for name, (handle, since) in list(running.items()):
            if not handle.done():
                continue
            del running[name]
            engine.release(handle)
            bar.update(1)
            state = _read_state(runs_dir, _step_of(runs, name)) or {}
            if handle.ok() and state.get("status") == "done":
                finished.add(name)
                summary.finished.append(name)
                if state.get("resumed"):  # recorded by execute_step, wherever it ran
                    summary.resumed.append(name)
                print(f"[grid] done {name} in {time.time() - since:.1f} s")
            else:
                summary.failed[name] = f"{handle.failure()}; log: {handle.log}"
                print(f"[grid] FAILED {name}: {handle.failure()}; log: {handle.log}")
        if running:
            time.sleep(POLL_SECONDS)
    bar.close()
    if results:
        summary.results_csv, summary.results_html = build_results(out, runs, progress=progress)
    summary.seconds = time.time() - started
    return summary


def _combinations(grid) -> int:
    count = 1
    for values in grid.axes.values():
        count *= len(values)
    return count


def _step_of(runs: list[GridRun], name: str):
    return next(r for r in runs if r.name == name).step()


def build_results(out: Path, runs: list[GridRun], progress: bool = True):
    """``results.csv`` of the finished runs, then ``results.ipynb`` executed into ``out`` and
    its HTML copy; (csv path, html path or None when no run finished)."""
    rows = [{"name": r.name, "stage": r.stage, "folder": str(out / "runs" / r.name),
             "axes": r.axes} for r in runs if (out / "runs" / r.name / "metrics.json").is_file()]
    csv_path = out / "results.csv"
    write_results_csv(results_rows(rows), csv_path)
    if not rows:
        return csv_path, None
    executed = run_notebook(RESULTS_NOTEBOOK, out / RESULTS_NOTEBOOK, {"grid_dir": str(out)},
                            progress=progress)
    return csv_path, export_html(executed, out / "results.html")


def export_html(notebook_path: Path, html_path: Path) -> Path:
    """A self-contained HTML copy of an executed notebook (figures embedded as data URIs),
    written atomically."""
    import nbformat  # here: only the grid's last step needs nbconvert (about 1 s to import)
    from nbconvert import HTMLExporter  # here: as nbformat

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook_path), as_version=4))
    atomic_write_text(html_path, body)
    return html_path
