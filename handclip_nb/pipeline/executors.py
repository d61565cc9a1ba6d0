"""Where a grid's runs execute: here, N at a time (``local``), or as Slurm jobs (``slurm``).

Both run one grid run through the same function, :func:`~.steps.execute_step` (skip a finished
run, resume an interrupted one from ``checkpoints/last.pt``, start a changed one afresh), so a
run means the same thing wherever it ran.

* ``local``: each run is a child process (``python -m handclip_nb.pipeline --run-step
  SPEC``), its output in ``DIR/logs/<run>.log``. The machine's cores are split between the
  ``--jobs`` slots (``OMP_NUM_THREADS``); with GPUs, each slot gets one
  (``CUDA_VISIBLE_DEVICES``).
* ``slurm``: each run is a job submitted through submitit, its logs in
  ``DIR/slurm/<job id>_0_log.{out,err}``. A :class:`GridJob` is checkpointable: when the job
  reaches its time limit (or is pre-empted) submitit requeues it, and when the scheduler
  requeues it (``scontrol requeue``, node failure) Slurm starts it again; either way the rerun
  resumes the notebook from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import submitit

from ..device import available_cpus
from .steps import execute_spec

__all__ = ["LocalExecutor", "SlurmExecutor", "GridJob", "EXECUTORS", "time_minutes"]

EXECUTORS = ("local", "slurm")

#: Slurm job states of a job that will still run (again): a requeued job passes through these.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED",
                           "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING",
                           "STAGE_OUT"})


@dataclass
class LocalHandle:
    name: str
    process: subprocess.Popen
    log: Path
    slot: int
    job_id: str = ""

    def done(self) -> bool:
        return self.process.poll() is not None

    def ok(self) -> bool:
        return self.process.returncode == 0

    def failure(self) -> str:
        return f"exit status {self.process.returncode}"


class LocalExecutor:
    """Runs ``jobs`` runs at a time on this machine, each in its own process."""

    name = "local"

    def __init__(self, output: Path, jobs: int = 1, gpus: int | None = None,
                 threads: int | None = None):
        self.output, self.jobs = Path(output), max(1, int(jobs))
        # CPU results depend on the thread count (the order of float reductions), and a long
        # training run amplifies the last bits: pin `threads` to compare runs made with
        # different --jobs bit for bit
        self.threads = int(threads) if threads else max(1, available_cpus() // self.jobs)
        self.gpus = _cuda_count() if gpus is None else int(gpus)
        self.free = list(range(self.jobs))

    @property
    def capacity(self) -> int:
        return self.jobs

    def describe(self) -> str:
        gpus = f", GPU {'per slot' if self.gpus else 'none'}" if self.gpus else ""
        return f"local, {self.jobs} at a time, {self.threads} thread(s) each{gpus}"

    def start(self, spec: Mapping[str, Any]) -> LocalHandle:
        slot = self.free.pop(0)
        name = spec["name"]
        spec_path = self.output / ".grid" / f"{name}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=1, default=str))
        log = self.output / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        with open(log, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "handclip_nb.pipeline",
                                        "--run-step", str(spec_path)],
                                       stdout=out, stderr=subprocess.STDOUT, env=env)
        return LocalHandle(name=name, process=process, log=log, slot=slot)

    def release(self, handle: LocalHandle) -> None:
        self.free.append(handle.slot)
        self.free.sort()


class GridJob(submitit.helpers.Checkpointable):
    """One grid run as a Slurm job. Checkpointable: at the time limit submitit requeues it
    (``checkpoint`` resubmits this same object), and the rerun resumes from the notebook's
    ``last.pt`` through :func:`execute_spec`."""

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = dict(spec)

    def __call__(self) -> dict:
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # the notebook's kernel inherits it: torch uses the cores Slurm granted
            os.environ.setdefault("OMP_NUM_THREADS", cpus)
        return execute_spec(self.spec, attempt=int(os.environ.get("SLURM_RESTART_COUNT", 0)))


@dataclass
class SlurmHandle:
    name: str
    job: Any  # submitit.Job
    log: Path
    slot: int = 0

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def done(self) -> bool:
        if not self.job.done():
            return False
        # submitit calls a job done once a result file exists, but a job requeued by the
        # scheduler leaves the killed attempt's error (its notebook kernel died) while Slurm
        # runs it again: the job is done only when Slurm no longer holds it as active
        state = self.job.watcher.get_state(self.job_id, mode="force")
        return state.split(" ")[0].upper() not in ACTIVE_STATES

    def ok(self) -> bool:
        return self.job.exception() is None

    def failure(self) -> str:
        exc = self.job.exception()
        last = str(exc).strip().splitlines()[-1] if exc is not None and str(exc).strip() else ""
        return f"Slurm job {self.job_id} {self.job.state}: {last}"[:300]


def time_minutes(value: Any) -> int:
    """Slurm's time limit as minutes: an int (minutes) or "[D-]HH:MM[:SS]"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(1, int(value))
    text = str(value).strip()
    try:
        if text.isdigit():
            return max(1, int(text))
        days = 0
        if "-" in text:
            d, text = text.split("-", 1)
            days = int(d)
        parts = [int(p) for p in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError(text)
    except ValueError:
        raise ValueError(f"slurm time {value!r}: expected minutes or [D-]HH:MM[:SS]") from None
    h, m, s = (parts + [0])[:3]
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


class SlurmExecutor:
    """Submits each run as a Slurm job through submitit (``DIR/slurm/`` holds its files)."""

    name = "slurm"

    def __init__(self, output: Path, settings: Mapping[str, Any], jobs: int | None = None):
        self.output = Path(output)
        self.settings = dict(settings)
        self.jobs = int(jobs) if jobs else 10**6  # Slurm queues what it cannot run yet
        # a job may reach its time limit (or be pre-empted) up to 10 times, each time requeued
        self.executor = submitit.AutoExecutor(folder=self.output / "slurm", cluster="slurm",
                                              slurm_max_num_timeout=10)
        # the signal comes this long before the limit: slurmctld checks limits every 30 s
        params: dict[str, Any] = {"timeout_min": time_minutes(self.settings.get("time", 60)),
                                  "slurm_signal_delay_s": 20}
        if self.settings.get("partition"):
            params["slurm_partition"] = str(self.settings["partition"])
        if self.settings.get("gpus"):
            params["gpus_per_node"] = int(self.settings["gpus"])
        if self.settings.get("mem"):
            params["slurm_mem"] = str(self.settings["mem"])
        if self.settings.get("cpus"):
            params["cpus_per_task"] = int(self.settings["cpus"])
        self.executor.update_parameters(**params)

    @property
    def capacity(self) -> int:
        return self.jobs

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.settings.items()) or "cluster defaults"
        return f"slurm ({shown})"

    def start(self, spec: Mapping[str, Any]) -> SlurmHandle:
        self.executor.update_parameters(name=f"handclip-{spec['name']}")
        job = self.executor.submit(GridJob(spec))
        return SlurmHandle(name=spec["name"], job=job, log=Path(job.paths.stderr))

    def release(self, handle: SlurmHandle) -> None:
        pass


def _cuda_count() -> int:
    try:
        import torch  # here: the grid's scheduler otherwise never needs torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
