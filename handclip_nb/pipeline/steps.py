"""Steps: run the workbench's notebooks headlessly with papermill (the README's main command).

``python -m handclip_nb.pipeline --output outputs/demo`` executes the demo's steps on the
embedded default (synthetic hands, the shipped ``handclip-mini``): stage 0 (and the untrained
``tiny-vit`` as the zero-shot baseline) → stage 1 → stage 2 → stage 3 → evaluation →
attention. Each step's parameters live in ``params/demo/<step>.yaml``. The executed notebooks
and run folders go under ``--output``, and a comparison table is printed and saved as
``comparison.{csv,md}``.

Resumable and incremental (``make``-like): every step has a fingerprint of its inputs — the
notebook, its parameter file and overrides, the package's source and shipped weights, and the
fingerprints of the steps it reads. ``<output>/.pipeline/<step>.json`` records the fingerprint
and whether the step finished. A rerun skips a finished step whose fingerprint is unchanged,
resumes an interrupted training step from its ``checkpoints/last.pt`` (a step stopped by a
signal loses nothing; one killed without warning at most ``checkpoint_minutes`` of training, or
the epochs since its last ``checkpoint_every`` write), and starts over any step whose inputs changed (its old folder is removed
first, so no stale checkpoint is resumed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..evaluate.tables import comparison_table, format_table
from ..params import TRAINING, load_params_file, stage_values
from ..runs import atomic_write_json, project_root, read_metrics, resolve_path
from .kernel_stop import run_checkpoint, stop_signals_forwarded
from .leases import adopt

__all__ = ["Step", "DEMO_STEPS", "GOLDEN_STEPS", "NOTEBOOK_STAGES", "OTHER_NOTEBOOKS",
           "NOTEBOOKS_DIR", "PARAMS_DIR",
           "run_notebook", "run_pipeline", "execute_step", "execute_spec", "is_up_to_date",
           "step_parameters",
           "step_fingerprint", "code_fingerprint", "demo_table", "check_kernel"]

#: The notebooks ship beside the package in the checkout.
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
PARAMS_DIR = Path(__file__).resolve().parents[2] / "params"

#: Which stage of the parameter schema each notebook resolves (training ones accept ``resume``).
NOTEBOOK_STAGES = {
    "pretrain_mini.ipynb": "pretrain", "stage0_zeroshot.ipynb": "stage0",
    "stage1_prompt.ipynb": "stage1", "stage2_image.ipynb": "stage2", "stage3.ipynb": "stage3",
    "stage_handid.ipynb": "handid", "evaluation.ipynb": "evaluation", "attention.ipynb": "attention",
    "search.ipynb": "search",
}
#: Notebooks that are no stage of the parameter schema: the grid's results table reads a grid
#: folder (its one parameter, ``grid_dir``), not a dataset.
OTHER_NOTEBOOKS = ("results.ipynb",)


@dataclass(frozen=True)
class Step:
    name: str  # folder name under the output directory
    notebook: str  # file in notebooks/
    params_file: str | None = None  # relative to params/, papermill's -f
    parameters: dict = field(default_factory=dict)  # -p overrides
    #: parameters that name other steps' run folders: {"stage1_dir": "stage1"} or a list
    links: dict = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return NOTEBOOK_STAGES[self.notebook]

    def upstream(self) -> list[str]:
        out = []
        for target in self.links.values():
            out.extend(target if isinstance(target, (list, tuple)) else [target])
        return out


#: The demo: every stage on the embedded synthetic hands with the shipped handclip-mini, plus
#: the untrained tiny-vit's zero-shot ranking as the baseline a pretrained model must beat.
#: Stage 3 trains from the backbone (no warm start), so its numbers compare with stage 2's.
DEMO_STEPS = (
    Step("stage0", "stage0_zeroshot.ipynb", "demo/stage0.yaml"),
    Step("stage0-tiny-vit", "stage0_zeroshot.ipynb", "demo/stage0.yaml",
         {"backbone": "tiny-vit"}),
    Step("stage1", "stage1_prompt.ipynb", "demo/stage1.yaml"),
    Step("stage2", "stage2_image.ipynb", "demo/stage2.yaml", links={"stage1_dir": "stage1"}),
    Step("stage3", "stage3.ipynb", "demo/stage3.yaml"),
    Step("evaluation", "evaluation.ipynb", "demo/evaluation.yaml",
         links={"runs": ["stage0-tiny-vit", "stage0", "stage2", "stage3"]}),
    Step("attention", "attention.ipynb", "demo/attention.yaml", links={"stage3_dir": "stage3"}),
)


#: The nbval goldens (tests/golden/): every notebook once with params/smoke.yaml, in order.
GOLDEN_STEPS = (
    Step("pretrain", "pretrain_mini.ipynb", "smoke.yaml"),
    Step("stage0", "stage0_zeroshot.ipynb", "smoke.yaml"),
    Step("stage1", "stage1_prompt.ipynb", "smoke.yaml"),
    Step("stage2", "stage2_image.ipynb", "smoke.yaml", links={"stage1_dir": "stage1"}),
    Step("stage3", "stage3.ipynb", "smoke.yaml"),
    Step("evaluation", "evaluation.ipynb", "smoke.yaml",
         links={"runs": ["stage0", "stage2", "stage3"]}),
    Step("attention", "attention.ipynb", "smoke.yaml", links={"stage3_dir": "stage3"}),
)


#: How papermill ends the kernel after the last cell (nbclient's ``shutdown_kernel``). A kernel
#: that imported torch, torchvision and matplotlib spends about 2 s of CPU tearing its
#: interpreter down after a graceful shutdown request (measured on the 2-core machine: 2.4 s
#: from the last cell's end to the notebook's, against 0.2 s for a kernel that imported
#: nothing), paid by every run of a grid. Nothing a run keeps is written at exit: each cell
#: writes and closes its files (atomic writes; TensorBoard's writer is closed by the training
#: loop) and papermill has every output once the last cell is idle, so the kernel's process
#: group is killed instead (SIGINT, then SIGKILL: its loader workers go with it).
KERNEL_SHUTDOWN = "immediate"


#: How papermill and the kernel talk: Unix sockets in a folder of the run's own, not TCP ports.
#: jupyter_client picks free TCP ports by binding port 0 and letting go, and the kernel binds
#: them a moment later; a process starting at the same moment (the other run of
#: ``--runs-per-gpu 2``, another grid's job on the node, anybody's kernel) can take one in
#: between, and the kernel dies ("Address already in use", then papermill's "Kernel died
#: before replying to kernel_info") before its first cell: it failed a grid run of the test
#: suite once in nine. Socket files in a fresh 0700 folder cannot be taken by another process,
#: and nobody else on a shared node can reach the kernel through them.
KERNEL_TRANSPORT = "ipc"

#: A Unix socket's path holds at most 107 bytes; a cluster's ``$TMPDIR`` can be long.
_SOCKET_PATH_MAX = 100


def _kernel_socket_folder() -> Path:
    """A fresh folder (mode 0700) for one kernel's socket files, ``<folder>/kernel-1`` to
    ``-5``, in the temp folder, or in /tmp where that path would be too long for a socket."""
    base = tempfile.gettempdir()
    if len(base) + len("/handclip-kernel-XXXXXXXX/kernel-5") > _SOCKET_PATH_MAX:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="handclip-kernel-", dir=base))


def run_notebook(notebook: str, executed_path: Path, parameters: dict,
                 progress: bool = True, kernel: str = "python3") -> Path:
    """Execute ``notebooks/<notebook>`` with papermill in the Jupyter ``kernel``; the kernel
    runs in the project root and talks over :data:`KERNEL_TRANSPORT`."""
    import papermill as pm  # here: papermill and jupyter_client only where a notebook runs
    from traitlets.config import Config  # with papermill, which brings it

    root = project_root()
    source = NOTEBOOKS_DIR / notebook
    if not source.is_file():
        raise FileNotFoundError(f"notebook {source} not found")
    executed_path.parent.mkdir(parents=True, exist_ok=True)
    sockets = _kernel_socket_folder()
    try:
        transport = Config({"KernelManager": {"transport": KERNEL_TRANSPORT,
                                              "ip": str(sockets / "kernel")}})
        pm.execute_notebook(str(source), str(executed_path), parameters=parameters,
                            kernel_name=kernel, cwd=str(root), progress_bar=progress,
                            shutdown_kernel=KERNEL_SHUTDOWN, config=transport)
    finally:  # the kernel is gone: its socket files are left over where it was killed
        shutil.rmtree(sockets, ignore_errors=True)
    return executed_path


# ------------------------------------------------------------------------------------------------
# Fingerprints
# ------------------------------------------------------------------------------------------------


def _hash_files(paths: Sequence[Path], base: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.relative_to(base).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def code_fingerprint() -> str:
    """The package's source and the shipped weights' SHA-256 record: a change to either may
    change every result, so every step re-runs after it (conservative, never stale)."""
    pkg = Path(__file__).resolve().parents[1]
    files = [p for p in pkg.rglob("*") if p.is_file() and p.suffix in (".py", ".sha256")
             and "__pycache__" not in p.parts]
    return _hash_files(files, pkg)


def _load_params_file(name: str | None) -> dict:
    if name is None:
        return {}
    return load_params_file(PARAMS_DIR / name)


def _portable(path: Path) -> str:
    """``path`` relative to the project root when inside it: executed notebooks then hold no
    machine-specific absolute path (the nbval goldens re-run on any checkout)."""
    try:
        return path.resolve().relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return str(path)


def step_parameters(step: Step, out: Path, extra: Mapping | None = None) -> dict:
    """The papermill parameters of ``step``: its file (the step's stage section applied), its
    overrides and the command line's extras over every section, its run folder and its links
    to other steps' folders. Flat, so the notebook resolves exactly these values."""
    named = {**step.parameters, **(extra or {})}
    params = {**stage_values({**_load_params_file(step.params_file), **named}, step.stage,
                             explicit=set(named)),
              "output_dir": _portable(out / step.name)}
    for key, target in step.links.items():
        params[key] = ([_portable(out / t) for t in target] if isinstance(target, (list, tuple))
                       else _portable(out / target))
    return params


def step_fingerprint(step: Step, parameters: Mapping, upstream: Mapping[str, str],
                     code: str) -> str:
    notebook = (NOTEBOOKS_DIR / step.notebook).read_bytes()
    record = {"notebook": hashlib.sha256(notebook).hexdigest(), "parameters": parameters,
              "upstream": {name: upstream[name] for name in step.upstream()}, "code": code}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _state_path(out: Path, step: Step) -> Path:
    return out / ".pipeline" / f"{step.name}.json"


def _read_state(out: Path, step: Step) -> dict | None:
    path = _state_path(out, step)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: ``status`` values of a run's state file; a run whose state says ``running`` or ``cancelled``
#: with unchanged inputs resumes from its ``last.pt``.
RESUMABLE = ("running", "cancelled")


def execute_step(out: Path, step: Step, params: dict, fingerprint: str,
                 progress: bool = True, force: bool = False, lease_token: str | None = None,
                 grid: str | None = None, kernel: str = "python3") -> dict:
    """Run one step into ``out/<step.name>`` unless its recorded state says it is done with the
    same ``fingerprint`` (see the module docstring): skip it, resume it from
    ``checkpoints/last.pt``, or start it afresh. Returns ``{"status": "skipped" | "resumed" |
    "finished", "seconds"}``. Safe to call again after a kill at any point (a Slurm requeue).

    The step's lease (:mod:`.leases`) is held while it runs: the one its grid driver claimed
    (``lease_token``), or one taken here. A step whose lease a live owner holds is not touched
    (:class:`~.leases.LeaseHeld`)."""
    if not force and is_up_to_date(out, step, fingerprint):
        return {"status": "skipped", "seconds": 0.0}
    job_id = os.environ.get("SLURM_JOB_ID") or None
    lease = adopt(out, step.name, lease_token, fingerprint=fingerprint, grid=grid,
                  job_id=job_id)
    lease.start_heartbeat()
    finished = False
    try:
        if not force and is_up_to_date(out, step, fingerprint):  # its owner finished it
            finished = True
            return {"status": "skipped", "seconds": 0.0}
        run_dir = out / step.name
        state = _read_state(out, step)
        same_inputs = state is not None and state.get("fingerprint") == fingerprint
        resume = not force and same_inputs and state.get("status") in RESUMABLE
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # inputs changed (or forced): never resume stale state
        params = dict(params)
        if resume and step.stage in TRAINING:
            params["resume"] = True
        where = {"host": socket.gethostname(), "job_id": job_id}
        atomic_write_json(_state_path(out, step), {"fingerprint": fingerprint,
                                                   "status": "running",
                                                   "started": time.time(), **where})
        started = time.time()
        run_notebook(step.notebook, out / f"{step.name}.ipynb", params, progress=progress,
                     kernel=kernel)
        seconds = time.time() - started
        atomic_write_json(_state_path(out, step), {"fingerprint": fingerprint, "status": "done",
                                                   "seconds": round(seconds, 1),
                                                   "resumed": resume, **where})
        finished = True
        return {"status": "resumed" if resume else "finished", "seconds": seconds}
    finally:
        # a Slurm job keeps its lease when it fails: Slurm says when the job has ended (a job
        # requeued at its time limit must stay the owner while it waits in the queue)
        if finished or job_id is None:
            lease.release()
        else:
            lease.stop_heartbeat()


def is_up_to_date(out: Path, step: Step, fingerprint: str) -> bool:
    """Whether ``step`` finished in ``out`` with these inputs: its state says done with this
    ``fingerprint`` and its ``metrics.json`` exists (the one skip rule of the demo and grid)."""
    state = _read_state(out, step) or {}
    return (state.get("fingerprint") == fingerprint and state.get("status") == "done"
            and (out / step.name / "metrics.json").is_file())


def check_kernel(kernel: str) -> None:
    """Stop early, naming this node and the fix, when the Jupyter ``kernel`` the notebooks run
    in is not installed here or its Python is missing (a node without the driver's venv)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # here: jobs only

    host = socket.gethostname()
    fix = (f"install it there ({sys.executable} -m ipykernel install --sys-prefix --name "
           f"{kernel}) or name an installed kernel with --slurm-kernel NAME or the grid "
           f"file's slurm: {{kernel: NAME}}")
    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(kernel)
    except NoSuchKernel:
        found = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise RuntimeError(f"node {host}: no Jupyter kernel named {kernel!r} for "
                           f"{sys.executable} (kernels found: {found}); {fix}") from None
    program = spec.argv[0] if spec.argv else ""
    if program and os.path.isabs(program) and not os.access(program, os.X_OK):
        raise RuntimeError(f"node {host}: Jupyter kernel {kernel!r} runs {program}, which does "
                           f"not exist on this node; {fix}")


def execute_spec(spec: Mapping, attempt: int = 0) -> dict:
    """:func:`execute_step` from a JSON-able spec (``out``, ``name``, ``notebook``, ``params``,
    ``links``, ``fingerprint``, and optionally ``lease``, ``grid``, ``kernel``): what a grid's
    worker process or Slurm job runs."""
    step = Step(spec["name"], spec["notebook"], None, dict(spec["params"]),
                links=dict(spec.get("links") or {}))
    kernel = spec.get("kernel") or "python3"
    check_kernel(kernel)
    if attempt:
        print(f"[grid] {step.name}: attempt {attempt + 1} (requeued by the scheduler)")
    # a scheduler's stop signal reaches the kernel that trains, and the job waits for its
    # last.pt before it requeues or ends (pipeline/kernel_stop.py says why)
    with stop_signals_forwarded(run_checkpoint(spec)):
        result = execute_step(Path(spec["out"]), step, dict(spec["params"]),
                              spec["fingerprint"], progress=False,
                              lease_token=spec.get("lease"), grid=spec.get("grid"),
                              kernel=kernel)
    print(f"[grid] {step.name}: {result['status']} in {result['seconds']:.1f} s")
    return {**result, "attempt": attempt}


def run_pipeline(output: str | Path, steps: Sequence[Step] = DEMO_STEPS,
                 extra: Mapping | None = None, progress: bool = True,
                 force: bool = False) -> list[Path]:
    """Run ``steps`` in order, skipping finished ones whose inputs did not change (see the
    module docstring); ``force`` re-runs everything. Returns the run folders."""
    out = resolve_path(output)
    names = [s.name for s in steps]
    for step in steps:
        missing = [u for u in step.upstream() if u not in names[:names.index(step.name)]]
        if missing:
            raise ValueError(f"step {step.name!r} reads {missing}, which do not run before it")
    code = code_fingerprint()
    fingerprints: dict[str, str] = {}
    run_dirs = []
    for step in steps:
        run_dir = out / step.name
        params = step_parameters(step, out, extra)
        fp = step_fingerprint(step, params, fingerprints, code)
        fingerprints[step.name] = fp
        run_dirs.append(run_dir)
        result = execute_step(out, step, params, fp, progress=progress, force=force)
        if result["status"] == "skipped":
            print(f"[pipeline] {step.name}: up to date, skipped")
        else:
            print(f"[pipeline] {step.name}: {'resumed, ' if result['status'] == 'resumed' else ''}"
                  f"{result['seconds']:.1f} s -> {run_dir}")
    return run_dirs


def demo_table(run_dirs: Sequence[Path]):
    """The comparison table of the runs that rank hands (their own ``metrics.json``)."""
    ranked = [d for d in run_dirs
              if (d / "metrics.json").is_file()
              and read_metrics(d)["stage"] in ("stage0", "stage2", "stage3", "handid")]
    table = comparison_table(ranked)
    return table, format_table(table)
