"""Run a grid: schedule its runs in dependency order on an executor, summarise, and build the
results table (``DIR/results.csv``, ``DIR/results.ipynb`` and its HTML copy).

Layout of ``DIR`` (``--output``)::

    runs/<run>/            every run folder (params.yaml, metrics.json, checkpoints/, tensorboard/)
    runs/<run>.ipynb       the executed notebook of each run
    runs/.pipeline/        each run's fingerprint and state (skip / resume / re-run), and its
                           lease while an owner runs it (<run>.lease, :mod:`.leases`)
    .grids/                the grid files that write into DIR, with their runs' identities
    logs/<run>.log         local executor: each run's output
    slurm/                 slurm executor: submitit's job files and logs
    results.csv            one row per run of the grid file as it is now, finished with its
                           current inputs
    stale.csv              run folders under runs/ that are not tabled, and why
    results.ipynb, .html   the paper-style table, executed, and a self-contained copy

A rerun with the same grid skips finished runs, resumes interrupted ones from ``last.pt`` and
re-runs only what changed (and what reads it), exactly as the demo does; ``force`` starts every
run afresh. A failed run never stops the others: runs that read it are reported as not run.

One owner per run: the driver claims a run's lease before it starts it, and a run whose lease a
live owner holds (a job of a driver that died, a second grid process, a second grid file in
the same ``DIR``) is never started again: the driver waits for it (same inputs) or reports it
(other inputs). Two grid files in one ``DIR`` may share runs only where they are identical
(:func:`register_grid`). ``detach`` submits the whole grid to Slurm at once with dependencies
and returns; :func:`grid_status` and :func:`cancel_grid` look at and stop such a campaign, and
running the grid again collects its results.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import submitit

from ..evaluate.grid_results import (RESULTS_FILE, STALE_FILE, results_rows, write_results_csv,
                                     write_stale_csv)
from ..progress import tqdm
from ..runs import atomic_write_json, atomic_write_text, resolve_path
from .executors import EXECUTORS, LocalExecutor, SlurmExecutor, WatchHandle
from .grid import GridError, GridRun, expand_grid, load_grid, slurm_settings
from .leases import (LeaseHeld, claim, describe_owner, job_of, lease_path, owner_alive,
                     read_lease, slurm_states)
from .steps import (_read_state, _state_path, code_fingerprint, is_up_to_date, run_notebook,
                    step_fingerprint, step_parameters)

__all__ = ["GridSummary", "run_grid", "grid_status", "running_per_device", "cancel_grid",
           "register_grid", "export_html", "RESULTS_NOTEBOOK"]

RESULTS_NOTEBOOK = "results.ipynb"
POLL_SECONDS = 2.0
GRIDS_DIR = ".grids"


@dataclass
class GridSummary:
    """What a grid run did, run by run."""

    output: Path
    finished: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run -> "why; log: path"
    not_run: dict[str, str] = field(default_factory=dict)  # run -> the failed run it reads
    waited: dict[str, str] = field(default_factory=dict)  # run -> the live owner waited for
    submitted: dict[str, str] = field(default_factory=dict)  # detach: run -> Slurm job id
    stale: list[dict] = field(default_factory=list)  # {"run", "folder", "reason"}
    layout: list[str] = field(default_factory=list)  # how many runs share each GPU / slot
    placement: dict[str, str] = field(default_factory=dict)  # run -> its slot and GPU, or job
    detached: bool = False  # --detach: submitted, not waited for
    seconds: float = 0.0
    results_csv: Path | None = None
    results_html: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_run

    def describe(self) -> str:
        if self.detached:
            lines = [f"[grid] submitted {len(self.submitted)} Slurm job(s) with dependencies, "
                     f"{len(self.waited)} already queued or running, {len(self.skipped)} "
                     f"skipped (up to date), {len(self.failed)} failed, {len(self.not_run)} "
                     f"not run, in {self.seconds:.1f} s; see them with --status, stop them "
                     f"with --cancel, and run the command again to collect the results"]
        else:
            lines = [f"[grid] {len(self.finished)} finished ({len(self.resumed)} of them "
                     f"resumed), {len(self.skipped)} skipped (up to date), {len(self.failed)} "
                     f"failed, {len(self.not_run)} not run, in {self.seconds:.1f} s"]
        lines += [f"[grid]   {line}" for line in self.layout]
        lines += [f"[grid]   waited for {name}: {who}" for name, who in self.waited.items()]
        lines += [f"[grid]   FAILED {name}: {why}" for name, why in self.failed.items()]
        lines += [f"[grid]   not run {name}: it reads {up}, which failed"
                  for name, up in self.not_run.items()]
        lines += [f"[grid]   stale (not tabled) {s['run']}: {s['reason']}" for s in self.stale]
        if self.results_csv is not None:
            lines.append(f"[grid] results: {self.results_csv}"
                         + (f", {self.results_html}" if self.results_html else ""))
        return "\n".join(lines)


def _executor(kind: str, output: Path, jobs: int, slurm: Mapping[str, Any],
              threads: int | None = None, runs_per_gpu: int | None = None,
              slurm_runs_per_job: int = 1, run_memory_gib: float | None = None):
    if kind == "local":
        if slurm_runs_per_job != 1:
            raise ValueError("--slurm-runs-per-job is for --executor slurm; here it is "
                             "--runs-per-gpu K")
        return LocalExecutor(output, jobs=jobs, threads=threads,
                             kernel=slurm.get("kernel") if slurm else None,
                             runs_per_gpu=runs_per_gpu, run_memory_gib=run_memory_gib)
    if kind == "slurm":
        if runs_per_gpu is not None:
            raise ValueError("--runs-per-gpu is for --executor local; a Slurm job runs K "
                             "runs on its GPU with --slurm-runs-per-job K")
        return SlurmExecutor(output, slurm, jobs=jobs if jobs > 1 else None,
                             runs_per_job=slurm_runs_per_job, run_memory_gib=run_memory_gib)
    raise ValueError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")


@dataclass
class _Plan:
    """A grid file expanded for one output folder: its runs, their specs and fingerprints."""

    grid: Any
    runs: list[GridRun]
    out: Path
    runs_dir: Path
    specs: dict[str, dict]
    fingerprints: dict[str, str]

    def run(self, name: str) -> GridRun:
        return next(r for r in self.runs if r.name == name)


def _plan(grid_file: str | Path, output: str | Path) -> _Plan:
    grid = load_grid(grid_file)
    runs = expand_grid(grid)  # every run validated before anything starts
    out = resolve_path(output)
    runs_dir = out / "runs"
    code = code_fingerprint()
    fingerprints: dict[str, str] = {}
    specs: dict[str, dict] = {}
    for run in runs:
        step = run.step()
        params = step_parameters(step, runs_dir)
        fingerprint = step_fingerprint(step, params, fingerprints, code)
        fingerprints[run.name] = fingerprint
        specs[run.name] = {"out": str(runs_dir), "name": run.name, "notebook": run.notebook,
                           "params": params, "links": run.links, "fingerprint": fingerprint,
                           "grid": str(grid.path)}
    return _Plan(grid, runs, out, runs_dir, specs, fingerprints)


def _params_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec["params"], sort_keys=True, default=str)
                          .encode()).hexdigest()


def register_grid(plan: _Plan) -> Path:
    """Record that ``plan.grid`` writes into ``plan.out`` (``DIR/.grids/``), after checking
    that no other grid file registered there has a same-named run with other settings: two
    grids in one output folder share only identical runs (else :class:`GridError`)."""
    folder = plan.out / GRIDS_DIR
    mine = {r.name: {"key": r.key, "params": _params_hash(plan.specs[r.name])}
            for r in plan.runs}
    path_id = hashlib.sha256(str(plan.grid.path).encode()).hexdigest()[:12]
    record_path = folder / f"{plan.grid.name}-{path_id}.json"
    for other in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if other == record_path:
            continue
        try:
            record = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        theirs = record.get("runs") or {}
        clash = sorted(n for n in set(mine) & set(theirs) if theirs[n] != mine[n])
        if clash:
            raise GridError(
                f"output {plan.out} also holds grid {record.get('grid')}, whose run "
                f"{clash[0]!r} ({len(clash)} clashing run(s) in all) has other settings than "
                f"{plan.grid.path}'s: two grids in one output folder may share only identical "
                f"runs. Use another --output, or, if that grid is abandoned, delete {other}")
    atomic_write_json(record_path, {"grid": str(plan.grid.path), "runs": mine,
                                    "registered": time.time()})
    return record_path


def run_grid(grid_file: str | Path, output: str | Path, executor: str = "local", jobs: int = 1,
             slurm: Mapping[str, Any] | None = None, force: bool = False,
             progress: bool = True, results: bool = True,
             threads: int | None = None, detach: bool = False,
             runs_per_gpu: int | None = None, slurm_runs_per_job: int = 1,
             run_memory_gib: float | None = None) -> GridSummary:
    """Run every run of ``grid_file`` into ``output``; see the module docstring.
    ``runs_per_gpu`` (local) and ``slurm_runs_per_job`` (slurm): K runs side by side on one
    GPU, each with its share of the GPU's memory and of the cores; ``run_memory_gib``: what
    one run needs on the GPU, to refuse a K that cannot fit (docs/contracts.md, "Several
    runs on one GPU")."""
    started = time.time()
    plan = _plan(grid_file, output)
    grid, runs, out, runs_dir = plan.grid, plan.runs, plan.out, plan.runs_dir
    if detach and executor != "slurm":
        raise ValueError("--detach submits the grid to Slurm with dependencies: it needs "
                         "--executor slurm (a local grid runs as long as its driver)")
    # the executor first: a K that cannot fit is refused before the output folder is touched
    engine = _executor(executor, out, max(1, int(jobs)), slurm_settings(grid, slurm or {}),
                       threads, runs_per_gpu=runs_per_gpu,
                       slurm_runs_per_job=int(slurm_runs_per_job), run_memory_gib=run_memory_gib)
    runs_dir.mkdir(parents=True, exist_ok=True)
    register_grid(plan)
    print(f"[grid] {grid.path.name}: {len(runs)} runs "
          f"({len(grid.stages)} stages x {_combinations(grid)} combinations) -> {out}; "
          f"executor {engine.describe()}")
    if force:  # start afresh, also on a requeue: the worker itself never forces
        for run in runs:
            record = read_lease(lease_path(runs_dir, run.name))
            if record is not None and owner_alive(record):
                raise GridError(f"--force would delete run {run.name}, which "
                                f"{describe_owner(record)} is running; stop it first "
                                f"(--cancel) or wait for it")
        for run in runs:
            shutil.rmtree(runs_dir / run.name, ignore_errors=True)
            _state_path(runs_dir, run.step()).unlink(missing_ok=True)
    summary = GridSummary(output=out, layout=engine.layout())
    for line in summary.layout:
        print(f"[grid]   {line}")
    if detach:
        summary.detached = True
        _submit_all(plan, engine, summary)
    else:
        _schedule(plan, engine, summary, progress)
    summary.stale = stale_runs(plan)
    if results and not detach:
        summary.results_csv, summary.results_html = build_results(plan, summary.stale,
                                                                  progress=progress)
    summary.seconds = time.time() - started
    return summary


def _claim_or_watch(plan: _Plan, run: GridRun, engine, summary: GridSummary):
    """Claim ``run``'s lease (``("claimed", lease)``); or, when a live owner holds it with the
    same inputs, a handle that waits for it (``("watch", handle)``); or None after recording
    why the run cannot start (a live owner with other inputs)."""
    fingerprint = plan.fingerprints[run.name]
    try:
        return "claimed", claim(plan.runs_dir, run.name, grid=str(plan.grid.path),
                                fingerprint=fingerprint)
    except LeaseHeld as held:
        record = held.record
        if record.get("fingerprint") == fingerprint:
            summary.waited[run.name] = describe_owner(record)
            return "watch", engine.watch(run.name, lease_path(plan.runs_dir, run.name), record)
        summary.failed[run.name] = (f"its folder is owned by {describe_owner(record)}, with "
                                    f"other inputs: not touched; wait for it, stop it "
                                    f"(--cancel with that grid) or use another --output")
        return None


def _schedule(plan: _Plan, engine, summary: GridSummary, progress: bool) -> None:
    runs, runs_dir = plan.runs, plan.runs_dir
    pending = list(runs)
    running: dict[str, Any] = {}
    finished: set[str] = set()
    taken_over: set[str] = set()
    starting: list[tuple[GridRun, Any, dict]] = []  # claimed this pass: (run, lease, spec)
    bar = tqdm(total=len(runs), desc="grid runs", disable=not progress)
    try:
        while pending or running:
            for run in list(pending):
                failed_up = [u for u in run.upstream()
                             if u in summary.failed or u in summary.not_run]
                if failed_up:
                    summary.not_run[run.name] = failed_up[0]
                    pending.remove(run)
                    bar.update(1)
                    continue
                if any(u not in finished for u in run.upstream()):
                    continue
                if is_up_to_date(runs_dir, run.step(), plan.fingerprints[run.name]):
                    summary.skipped.append(run.name)
                    finished.add(run.name)
                    pending.remove(run)
                    bar.update(1)
                    print(f"[grid] {run.name}: up to date, skipped")
                    continue
                if sum(not isinstance(h, WatchHandle)
                       for h, _ in running.values()) + len(starting) >= engine.capacity:
                    continue
                outcome = _claim_or_watch(plan, run, engine, summary)
                pending.remove(run)
                if outcome is None:
                    bar.update(1)
                    print(f"[grid] FAILED {run.name}: {summary.failed[run.name]}")
                    continue
                kind, value = outcome
                if kind == "watch":
                    running[run.name] = (value, time.time())
                    print(f"[grid] {run.name}: run by {summary.waited[run.name]}; waiting for it")
                    continue
                starting.append((run, value, {**plan.specs[run.name], "lease": value.token}))
            for handle in _start(engine, starting, summary):
                running[handle.name] = (handle, time.time())
            starting.clear()
            for name, (handle, since) in list(running.items()):
                if not handle.done():
                    continue
                del running[name]
                engine.release(handle)
                run = plan.run(name)
                state = _read_state(runs_dir, run.step()) or {}
                current = state.get("fingerprint") == plan.fingerprints[name]
                if handle.ok() and state.get("status") == "done" and current:
                    finished.add(name)
                    summary.finished.append(name)
                    if state.get("resumed"):  # recorded by execute_step, wherever it ran
                        summary.resumed.append(name)
                    bar.update(1)
                    print(f"[grid] done {name} in {time.time() - since:.1f} s")
                elif name in summary.waited and name not in taken_over:
                    # the owner we waited for died: take its lease over and resume the run
                    taken_over.add(name)
                    pending.append(run)
                    print(f"[grid] {name}: {handle.failure()}; taking it over")
                else:
                    bar.update(1)
                    summary.failed[name] = f"{handle.failure()}; log: {handle.log}"
                    print(f"[grid] FAILED {name}: {handle.failure()}; log: {handle.log}")
            if running:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:  # the person at the terminal stops the grid: its runs too
        for handle, _ in running.values():
            if hasattr(handle, "stop"):
                handle.stop()
        raise
    finally:
        bar.close()


def _groups(engine, starting: list) -> list[list]:
    """The claimed runs of one pass, as the executor starts them: one by one, or K to a Slurm
    job (``--slurm-runs-per-job K``), never a run in the same job as a run it reads."""
    size = getattr(engine, "runs_per_job", 1)
    groups: list[list] = []
    for item in starting:
        current = groups[-1] if groups else None
        if (current is None or len(current) >= size
                or set(item[0].upstream()) & {r.name for r, _, _ in current}):
            groups.append([item])
        else:
            current.append(item)
    return groups


def _start(engine, starting: list, summary: GridSummary, after_of=None) -> list:
    """Start the claimed runs ``starting`` ((run, lease, spec), in dependency order) on
    ``engine``; record each run's job and place in its lease and the summary. ``after_of``:
    run -> the Slurm job ids it must wait for (``--detach``). Returns the handles."""
    handles = []
    for group in _groups(engine, starting):
        leases = [lease for _, lease, _ in group]
        specs = [spec for _, _, spec in group]
        after = sorted({job for run, _, _ in group for job in (after_of(run) if after_of else [])})
        if isinstance(engine, SlurmExecutor):
            job_name = engine.job_name(specs[0]) if len(specs) == 1 else engine.group_name(specs)
            for lease in leases:
                lease.update(job_name=job_name)
        try:
            if len(group) > 1:
                started = engine.start_group(specs, after=after)
            else:
                started = [engine.start(specs[0], after=after) if after
                           else engine.start(specs[0])]
        except Exception:
            for lease in leases:
                lease.release()
            raise
        for lease, handle in zip(leases, started):
            where = getattr(handle, "where", "")
            fields = {"job_id": handle.job_id} if handle.job_id else {}
            if where:  # grid_status counts the runs on each GPU and in each job from these
                fields.update(where=where, share=_share_of(engine, handle))
            if fields:
                lease.update(**fields)
            job = f"Slurm job {handle.job_id}" if handle.job_id else ""
            shown = ", ".join(x for x in (job, where) if x)
            summary.placement[handle.name] = shown
            waits = f", after {', '.join(after)}" if after else ""
            print(f"[grid] start {handle.name}" + (f" ({shown}{waits})" if shown else ""))
        handles.extend(started)
    return handles


def _share_of(engine, handle) -> str:
    """What a run shares with others: its GPU (``GPU 3``), the CPU, or its Slurm job."""
    if isinstance(engine, LocalExecutor):
        device = engine.device_of(handle.slot)
        return "CPU" if device is None else f"GPU {device}"
    return f"Slurm job {handle.job_id}"


def running_per_device(rows: list[dict]) -> str:
    """``GPU 2: 2 runs, GPU 3: 1 run`` of the running runs in :func:`grid_status`' rows."""
    counts: dict[str, int] = {}
    for row in rows:
        if row["status"] == "running" and row.get("share"):
            counts[row["share"]] = counts.get(row["share"], 0) + 1
    return ", ".join(f"{share}: {n} run{'s' if n > 1 else ''}"
                     for share, n in sorted(counts.items()))


def _submit_all(plan: _Plan, engine: SlurmExecutor, summary: GridSummary) -> None:
    """``--detach``: every run that is not up to date is submitted at once, in dependency
    order, each job waiting for the jobs of the runs it reads (``afterok``); a run already
    queued or running (a live lease with the same inputs) is not submitted again, and its job
    is what its dependents wait for."""
    job_ids: dict[str, str] = {}
    batch: list[tuple[GridRun, Any, dict]] = []  # claimed runs for the next job(s)

    def flush() -> None:
        for handle in _start(engine, batch, summary, after_of=lambda run: [
                job_ids[u] for u in run.upstream() if u in job_ids]):
            job_ids[handle.name] = summary.submitted[handle.name] = handle.job_id
        batch.clear()

    for run in plan.runs:
        failed_up = [u for u in run.upstream() if u in summary.failed or u in summary.not_run]
        if failed_up:
            summary.not_run[run.name] = failed_up[0]
            continue
        if is_up_to_date(plan.runs_dir, run.step(), plan.fingerprints[run.name]):
            summary.skipped.append(run.name)
            continue
        outcome = _claim_or_watch(plan, run, engine, summary)
        if outcome is None:
            continue
        kind, value = outcome
        if kind == "watch":
            if getattr(value, "job_id", ""):
                job_ids[run.name] = value.job_id
                print(f"[grid] {run.name}: already Slurm job {value.job_id}")
            else:  # owned by a local process: nothing a Slurm dependency can wait for
                summary.failed[run.name] = (f"run by {summary.waited.pop(run.name)} outside "
                                            f"Slurm; wait for it, then run --detach again")
            continue
        if any(u in {r.name for r, _, _ in batch} for u in run.upstream()):
            flush()  # a run never shares a job with a run it reads: that one goes first
        batch.append((run, value, {**plan.specs[run.name], "lease": value.token}))
        if len(batch) >= engine.runs_per_job:
            flush()
    flush()


def _combinations(grid) -> int:
    count = 1
    for values in grid.axes.values():
        count *= len(values)
    return count


def stale_runs(plan: _Plan) -> list[dict]:
    """Run folders under ``runs/`` that the results must not table: not a run of the grid file
    as it is now (another grid's, or of an earlier version of this one), or a run of it whose
    finished metrics were computed from other inputs (its inputs changed and it has not been
    re-run: its upstream failed, or its job never started)."""
    if not plan.runs_dir.is_dir():
        return []
    names = {r.name: r for r in plan.runs}
    others = _other_grids(plan)
    out = []
    for folder in sorted(p for p in plan.runs_dir.iterdir()
                         if p.is_dir() and not p.name.startswith(".")):
        run = names.get(folder.name)
        if run is None:
            owner = others.get(folder.name)
            reason = (f"a run of another grid in this folder ({owner})" if owner else
                      f"not a run of {plan.grid.path.name} as it is now (an earlier version "
                      f"of it, or another grid)")
        elif (folder / "metrics.json").is_file() and (
                _read_state(plan.runs_dir, run.step()) or {}).get("fingerprint") \
                != plan.fingerprints[run.name]:
            # (a run in progress with its current inputs is not stale, even in the instant
            # between its metrics.json and its state saying done)
            reason = "finished with other inputs than the grid's now; not re-run yet"
        else:
            continue
        out.append({"run": folder.name, "folder": str(folder), "reason": reason})
    return out


def _other_grids(plan: _Plan) -> dict[str, str]:
    """Run name -> the other registered grid file that has it."""
    found: dict[str, str] = {}
    folder = plan.out / GRIDS_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("grid") != str(plan.grid.path):
            for name in record.get("runs") or {}:
                found.setdefault(name, str(record.get("grid")))
    return found


def build_results(plan: _Plan, stale: list[dict], progress: bool = True):
    """``results.csv`` of the runs of the grid that finished with their current inputs (with
    the Slurm job that ran each), ``stale.csv`` of the folders left out, then
    ``results.ipynb`` executed into the grid folder and its HTML copy; (csv path, html path or
    None when no run finished)."""
    out = plan.out
    rows = []
    for r in plan.runs:
        if not is_up_to_date(plan.runs_dir, r.step(), plan.fingerprints[r.name]):
            continue
        state = _read_state(plan.runs_dir, r.step()) or {}
        rows.append({"name": r.name, "stage": r.stage, "folder": str(plan.runs_dir / r.name),
                     "axes": r.axes, "job_id": state.get("job_id")})
    csv_path = out / RESULTS_FILE
    write_results_csv(results_rows(rows), csv_path)
    write_stale_csv(stale, out / STALE_FILE)
    if not rows:
        return csv_path, None
    executed = run_notebook(RESULTS_NOTEBOOK, out / RESULTS_NOTEBOOK, {"grid_dir": str(out)},
                            progress=progress)
    return csv_path, export_html(executed, out / "results.html")


# ----------------------------------------------------------------------------- status, cancel


def grid_status(grid_file: str | Path, output: str | Path,
                slurm: Mapping[str, Any] | None = None) -> list[dict]:
    """Each run of the grid with its state: ``finished``, ``pending`` / ``running`` (with its
    Slurm job id, or pid and host), ``failed`` (with its log), ``cancelled``, ``outdated``
    (finished with other inputs), ``not started``; then the ``stale`` folders."""
    plan = _plan(grid_file, output)
    states = slurm_states(refresh=True) or {}
    rows = []
    for run in plan.runs:
        step = run.step()
        state = _read_state(plan.runs_dir, step) or {}
        record = read_lease(lease_path(plan.runs_dir, run.name)) or {}
        job = str((job_of(record) if record else None) or state.get("job_id") or "")
        log = (str(plan.out / "slurm" / f"{job}_0_log.err") if job
               else str(plan.out / "logs" / f"{run.name}.log"))
        current = state.get("fingerprint") == plan.fingerprints[run.name]
        if is_up_to_date(plan.runs_dir, step, plan.fingerprints[run.name]):
            status, detail = "finished", (f"Slurm job {job}" if job else "")
        elif record and owner_alive(record):
            slurm_state = states.get(job, "")
            status = "pending" if slurm_state.startswith("PENDING") else "running"
            detail = describe_owner(record) + (f", {slurm_state}" if slurm_state else "") \
                + (f", {record['where']}" if record.get("where") else "")
        elif state.get("status") == "cancelled":
            status, detail = "cancelled", log
        elif job and not state:  # a job that never started the run
            ended = _ended_state(job, states, plan.out)
            status = "cancelled" if ended.startswith("CANCELLED") else "failed"
            detail = f"Slurm job {job} {ended}; log: {log}"
        elif state and not current:
            status, detail = "outdated", ("finished or started with other inputs (the code, "
                                          "the grid file or a run it reads changed): the next "
                                          "run of the grid re-runs it")
        elif state:
            status, detail = "failed", f"stopped before it finished; log: {log}"
        else:
            status, detail = "not started", ""
        rows.append({"run": run.name, "status": status, "detail": detail,
                     "share": record.get("share", "") if record else ""})
    names = {run.name for run in plan.runs}  # (the grid's own outdated runs are listed above)
    rows += [{"run": s["run"], "status": "stale", "detail": s["reason"]}
             for s in stale_runs(plan) if s["run"] not in names]
    return rows


def _ended_state(job: str, states: Mapping[str, str], out: Path) -> str:
    """What became of a Slurm job that is no longer active."""
    if job in states:
        return states[job]
    try:
        return str(submitit.SlurmJob(folder=out / "slurm", job_id=job).state)
    except Exception:  # no sacct, no accounting: say what we know
        return "ENDED"


def cancel_grid(grid_file: str | Path, output: str | Path) -> list[str]:
    """Stop a campaign: cancel the Slurm job of every run of the grid that a live owner holds
    (``scancel``), end local runs of this host (their process group), and mark every run that
    has not finished ``cancelled`` (a later run of the grid resumes it from ``last.pt``).
    Returns what was done, one line per run."""
    plan = _plan(grid_file, output)
    done = []
    jobs = []
    for run in plan.runs:
        step = run.step()
        if is_up_to_date(plan.runs_dir, step, plan.fingerprints[run.name]):
            continue
        record = read_lease(lease_path(plan.runs_dir, run.name)) or {}
        if record and owner_alive(record):
            job = job_of(record)
            if job:
                jobs.append(job)
                done.append(f"{run.name}: Slurm job {job} cancelled")
            elif record.get("host") == socket.gethostname() and record.get("pid"):
                try:
                    os.killpg(int(record["pid"]), signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    os.kill(int(record["pid"]), signal.SIGTERM)
                done.append(f"{run.name}: pid {record['pid']} stopped")
            else:
                done.append(f"{run.name}: run by {describe_owner(record)}, another host: "
                            f"not stopped")
                continue
        state = _read_state(plan.runs_dir, step)
        if state is not None:  # started: a later run of the grid resumes it from last.pt
            atomic_write_json(_state_path(plan.runs_dir, step),
                              {**state, "status": "cancelled", "cancelled": time.time()})
    if jobs:
        subprocess.run(["scancel", *jobs], check=False)
    return done


def export_html(notebook_path: Path, html_path: Path) -> Path:
    """A self-contained HTML copy of an executed notebook (figures embedded as data URIs),
    written atomically."""
    import nbformat  # here: only the grid's last step needs nbconvert (about 1 s to import)
    from nbconvert import HTMLExporter  # here: as nbformat

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook_path), as_version=4))
    atomic_write_text(html_path, body)
    return html_path
