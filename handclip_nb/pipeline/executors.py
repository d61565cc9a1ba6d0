"""Where a grid's runs execute: here, N at a time (``local``), or as Slurm jobs (``slurm``).

Both run one grid run through the same function, :func:`~.steps.execute_spec` (skip a finished
run, resume an interrupted one from ``checkpoints/last.pt``, start a changed one afresh, and
hold the run's lease while it runs: :mod:`.leases`), so a run means the same thing wherever
it ran.

* ``local``: each run is a child process (``python -m handclip_nb.pipeline --run-step
  SPEC``) in a session of its own (a driver that dies leaves it running; a relaunched driver
  finds its lease and waits for it), its output in ``DIR/logs/<run>.log``. The runs share the
  machine in ``slots``: each slot gets its share of the cores (``OMP_NUM_THREADS`` and
  ``HANDCLIP_CPUS``, which also bounds its loader workers) and, with GPUs, one of the devices
  the user made visible (``CUDA_VISIBLE_DEVICES`` as inherited, e.g. ``2,3``; slots go round
  them, so several slots may share one GPU).
* ``slurm``: each run is a job submitted through submitit, its logs in
  ``DIR/slurm/<job id>_0_log.{out,err}``. A :class:`GridJob` is checkpointable: when the job
  reaches its time limit (or is pre-empted) submitit requeues it, and when the scheduler
  requeues it (``scontrol requeue``, node failure) Slurm starts it again; either way the rerun
  resumes the notebook from its last checkpoint. Any sbatch option passes through
  (``slurm_additional_parameters``); the job script first checks that the node has the
  Python the jobs run (``python``) and the job checks its Jupyter kernel (``kernel``), each
  failing with a message that names the node and the missing path. ``start(...,
  after=[job ids])`` makes a job wait for others (``--dependency=afterok``; a job whose
  dependency failed is cancelled by Slurm, ``--kill-on-invalid-dep=yes``), which is how
  ``--detach`` submits a whole grid at once.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import submitit

from ..device import CPU_SHARE_ENV, available_cpus
from .grid import SLURM_KEYS
from .leases import ACTIVE_STATES, describe_owner, job_of, owner_alive, read_lease
from .steps import execute_spec

__all__ = ["LocalExecutor", "SlurmExecutor", "GridJob", "WatchHandle", "EXECUTORS",
           "time_minutes", "visible_gpus", "DEFAULT_KERNEL"]

EXECUTORS = ("local", "slurm")
#: The Jupyter kernel the notebooks run in unless the grid names another (``make install``
#: registers it inside the venv).
DEFAULT_KERNEL = "python3"


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

    def stop(self) -> None:
        """End the run's process and everything it started (its notebook kernel)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass
class WatchHandle:
    """A run that another live owner (a relaunched driver's predecessor, a second grid process)
    is running: this driver waits for its lease to end instead of starting it again."""

    name: str
    lease: Path
    log: Path
    job_id: str = ""
    slot: int = -1

    def done(self) -> bool:
        record = read_lease(self.lease)
        return record is None or not owner_alive(record)

    def ok(self) -> bool:
        return True  # the runner reads the run's state: done with this fingerprint, or not

    def failure(self) -> str:
        record = read_lease(self.lease) or {}
        return f"its owner ({describe_owner(record) if record else 'gone'}) stopped before it " \
               f"finished"


def visible_gpus(count: int | None = None) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them: the inherited
    list when it is set (``"2,3"`` -> ``["2", "3"]``; ``""`` -> none), else ``0..count-1``."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [d.strip() for d in inherited.split(",") if d.strip() and d.strip() != "-1"]
    count = _cuda_count() if count is None else int(count)
    return [str(i) for i in range(count)]


class LocalExecutor:
    """Runs ``jobs`` runs at a time on this machine, each in its own process (a slot)."""

    name = "local"

    def __init__(self, output: Path, jobs: int = 1, gpus: int | None = None,
                 threads: int | None = None, kernel: str | None = None):
        self.output, self.jobs = Path(output), max(1, int(jobs))
        # CPU results depend on the thread count (the order of float reductions), and a long
        # training run amplifies the last bits: pin `threads` to compare runs made with
        # different --jobs bit for bit
        self.threads = int(threads) if threads else max(1, available_cpus() // self.jobs)
        self.devices = visible_gpus(gpus)
        self.gpus = len(self.devices)
        self.kernel = kernel or DEFAULT_KERNEL
        self.free = list(range(self.jobs))

    @property
    def capacity(self) -> int:
        return self.jobs

    def describe(self) -> str:
        gpus = (f", GPUs {','.join(self.devices)} ({self.slot_gpus()})" if self.gpus else "")
        return f"local, {self.jobs} at a time, {self.threads} core(s) each{gpus}"

    def slot_gpus(self) -> str:
        per = [self.device_of(slot) for slot in range(self.jobs)]
        return ", ".join(f"slot {i}: GPU {d}" for i, d in enumerate(per))

    def device_of(self, slot: int) -> str | None:
        return self.devices[slot % self.gpus] if self.gpus else None

    def environment(self, slot: int) -> dict:
        """The environment of a run in ``slot``: its cores, its GPU, unbuffered output."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads), CPU_SHARE_ENV: str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        device = self.device_of(slot)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        return env

    def start(self, spec: Mapping[str, Any], after: Sequence[str] = ()) -> LocalHandle:
        slot = self.free.pop(0)
        name = spec["name"]
        spec_path = self.output / ".grid" / f"{name}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps({**spec, "kernel": self.kernel}, indent=1, default=str))
        log = self.output / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # a session of its own: the run outlives a driver that is killed (its lease keeps
            # a relaunched driver from starting it twice), and stop() ends its kernel with it
            process = subprocess.Popen([sys.executable, "-m", "handclip_nb.pipeline",
                                        "--run-step", str(spec_path)],
                                       stdout=out, stderr=subprocess.STDOUT,
                                       env=self.environment(slot), start_new_session=True)
        return LocalHandle(name=name, process=process, log=log, slot=slot)

    def watch(self, name: str, lease: Path, record: Mapping[str, Any]) -> WatchHandle:
        return WatchHandle(name=name, lease=lease, log=self.output / "logs" / f"{name}.log",
                           job_id=str(record.get("job_id") or ""))

    def release(self, handle) -> None:
        if handle.slot >= 0:
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
            os.environ.setdefault(CPU_SHARE_ENV, cpus)
        return execute_spec(self.spec, attempt=int(os.environ.get("SLURM_RESTART_COUNT", 0)))


@dataclass
class SlurmHandle:
    name: str
    job: Any  # submitit.Job
    log: Path
    slot: int = -1

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


def python_check(python: str) -> str:
    """The job script's first line: stop with a message naming the node and the path when the
    node has no such Python (a venv that exists on the login node only)."""
    q = shlex.quote(python)
    return (f"if [ ! -x {q} ]; then echo \"handclip grid: node $(hostname) has no Python at "
            f"{python} (a venv that exists where the grid was started only?): make that path "
            f"exist on every node, or name the nodes' interpreter with --slurm-python PATH or "
            f"the grid file's slurm: {{python: PATH}}\" >&2; exit 3; fi")


class SlurmExecutor:
    """Submits each run as a Slurm job through submitit (``DIR/slurm/`` holds its files)."""

    name = "slurm"

    def __init__(self, output: Path, settings: Mapping[str, Any], jobs: int | None = None):
        self.output = Path(output)
        self.settings = dict(settings)
        self.jobs = int(jobs) if jobs else 10**6  # Slurm queues what it cannot run yet
        self.python = str(self.settings.get("python") or sys.executable)
        self.kernel = str(self.settings.get("kernel") or DEFAULT_KERNEL)
        # every other key is an sbatch option as it is: account, qos, constraint, reservation
        self.additional = {str(k): v for k, v in self.settings.items() if k not in SLURM_KEYS}
        # a job may reach its time limit (or be pre-empted) up to 10 times, each time requeued
        self.executor = submitit.AutoExecutor(folder=self.output / "slurm", cluster="slurm",
                                              slurm_max_num_timeout=10,
                                              slurm_python=shlex.quote(self.python))
        # the signal comes this long before the limit: slurmctld checks limits every 30 s
        params: dict[str, Any] = {"timeout_min": time_minutes(self.settings.get("time", 60)),
                                  "slurm_signal_delay_s": 20,
                                  "slurm_setup": [python_check(self.python)],
                                  "slurm_additional_parameters": dict(self.additional)}
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

    def start(self, spec: Mapping[str, Any], after: Sequence[str] = ()) -> SlurmHandle:
        """Submit one run; ``after``: job ids it must wait for (``afterok``; cancelled by
        Slurm when one of them fails)."""
        extra = dict(self.additional)
        if after:
            extra.update({"dependency": "afterok:" + ":".join(map(str, after)),
                          "kill-on-invalid-dep": "yes"})
        self.executor.update_parameters(name=self.job_name(spec),
                                        slurm_additional_parameters=extra)
        job = self.executor.submit(GridJob({**spec, "kernel": self.kernel}))
        return SlurmHandle(name=spec["name"], job=job, log=Path(job.paths.stderr))

    @staticmethod
    def job_name(spec: Mapping[str, Any]) -> str:
        """The run's job name, with its lease's token: a driver killed between submitting and
        recording the job id still finds the job (``leases.job_of``)."""
        token = str(spec.get("lease") or "")[:12]
        return f"handclip-{spec['name']}" + (f"-{token}" if token else "")

    def job(self, job_id: str) -> Any:
        """A job this grid submitted earlier (a relaunched driver's view of it)."""
        return submitit.SlurmJob(folder=self.output / "slurm", job_id=str(job_id))

    def watch(self, name: str, lease: Path, record: Mapping[str, Any]):
        """Wait for a run a live owner holds: its Slurm job when it has one (a job the
        previous driver submitted), else its lease."""
        job_id = job_of(record)
        if job_id:
            job = self.job(job_id)
            return SlurmHandle(name=name, job=job, log=Path(job.paths.stderr))
        return WatchHandle(name=name, lease=lease, log=self.output / "slurm")

    def release(self, handle) -> None:
        pass


def _cuda_count() -> int:
    try:
        import torch  # here: the grid's scheduler otherwise never needs torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
