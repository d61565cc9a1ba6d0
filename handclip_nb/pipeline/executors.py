"""Where a grid's runs execute: here, N at a time (``local``), or as Slurm jobs (``slurm``).

Both run one grid run through the same function, :func:`~.steps.execute_spec` (skip a finished
run, resume an interrupted one from ``checkpoints/last.pt``, start a changed one afresh, and
hold the run's lease while it runs: :mod:`.leases`), so a run means the same thing wherever
it ran.

* ``local``: each run is a child process (``python -m handclip_nb.pipeline --run-step
  SPEC``) in a session of its own (a driver that dies leaves it running; a relaunched driver
  finds its lease and waits for it), its output in ``DIR/logs/<run>.log``. The runs share the
  machine in ``slots`` (:func:`plan_slots`): each slot gets its share of the cores
  (``OMP_NUM_THREADS`` and ``HANDCLIP_CPUS``, which also bounds its loader workers) and, with
  GPUs, one of the devices the user made visible (``CUDA_VISIBLE_DEVICES`` as inherited, e.g.
  ``2,3``; slots go round them, so several slots may share one GPU) and its share of that
  GPU's memory (``HANDCLIP_GPU_MEMORY_FRACTION``, 1 / the runs on it). ``runs_per_gpu=K``
  (``--runs-per-gpu K``) makes K slots per GPU (K with no GPU: the CPU is the one device); a
  K that cannot fit (more runs than cores, or K x ``run_memory_gib`` over the GPU's memory)
  is refused with the numbers before anything starts.
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
  ``--detach`` submits a whole grid at once. ``runs_per_job=K`` (``--slurm-runs-per-job K``)
  puts K runs that can start together into one job (:class:`GridJobGroup`), which runs them
  side by side on its GPU as K worker processes, each with its own lease, log
  (``DIR/logs/<run>.log``), result and share of the job's cores and GPU memory, exactly as
  K local slots (docs/contracts.md, "Several runs on one GPU").
"""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import submitit

from ..host import CPU_SHARE_ENV, GPU_SHARE_ENV, available_cpus
from .grid import SLURM_KEYS
from .leases import ACTIVE_STATES, describe_owner, job_of, owner_alive, read_lease
from .steps import execute_spec

__all__ = ["LocalExecutor", "SlurmExecutor", "GridJob", "GridJobGroup", "WatchHandle",
           "EXECUTORS", "Slot", "plan_slots", "slot_environment", "time_minutes",
           "visible_gpus", "gpu_memory_gib", "DEFAULT_KERNEL"]

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
    where: str = ""  # the slot and its GPU, for the summary and the lease


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


@dataclass(frozen=True)
class Slot:
    """Where one of the runs that share a machine (or a Slurm job) runs: its cores, its GPU
    (None: the CPU) and its share of that GPU's memory (None: the whole GPU)."""

    index: int
    threads: int
    device: str | None
    memory_fraction: float | None
    runs_on_device: int

    def describe(self) -> str:
        if self.device is None:
            return f"slot {self.index}, CPU, {self.threads} core(s)"
        share = (f", 1/{self.runs_on_device} of its memory" if self.memory_fraction is not None
                 else "")
        return f"slot {self.index}, GPU {self.device}{share}, {self.threads} core(s)"


def plan_slots(slots: int, devices: Sequence[str], cores: int, threads: int | None = None,
               runs_per_gpu: int | None = None, run_memory_gib: float | None = None,
               gpu_memory: Mapping[str, float] | None = None, what: str = "--runs-per-gpu"
               ) -> list[Slot]:
    """``slots`` runs side by side on ``cores`` cores and the GPUs ``devices``: slot ``i`` gets
    GPU ``devices[i % len(devices)]`` (so runs spread over the GPUs before they pile up on
    one), ``cores // slots`` threads (or ``threads``), and, where several slots share a GPU,
    1 / (the slots on it) of its memory. Refused with the numbers and the fix (ValueError):
    fewer cores than runs (each run's training process needs one), and K runs of
    ``run_memory_gib`` each over a GPU's memory (``gpu_memory``: GiB per device, where known).
    ``what`` names the option the message tells the user to change."""
    if slots < 1:
        raise ValueError(f"{what}: {slots} runs at a time; give at least 1")
    given = f"{what} {runs_per_gpu}" if runs_per_gpu is not None else f"{slots} runs at a time"
    gpus = len(devices)
    if threads is None:
        # a plain --jobs keeps its old leniency (one thread each, oversubscribed); several runs
        # per GPU are a promise of a share each, which a core count below the runs breaks
        if slots > cores and runs_per_gpu is not None:
            fit = cores // max(1, gpus) if runs_per_gpu is not None and gpus else cores
            raise ValueError(
                f"{given} makes {slots} runs at once ({runs_per_gpu or slots} per "
                f"{'GPU' if gpus else 'CPU'}{f' x {gpus} GPUs' if gpus > 1 else ''}), but this "
                f"process may use {cores} core(s): every run needs at least one core for its "
                f"training process. Use {what} {max(1, fit)} or fewer, or run where more cores "
                f"are granted")
        threads = max(1, cores // slots)
    per_device: dict[str | None, int] = {}
    placed = []
    for index in range(slots):
        device = devices[index % gpus] if gpus else None
        per_device[device] = per_device.get(device, 0) + 1
        placed.append(device)
    if run_memory_gib is not None and gpus:
        for device, count in per_device.items():
            total = (gpu_memory or {}).get(device)
            if total is not None and count * float(run_memory_gib) > total:
                fit = int(total // float(run_memory_gib))
                raise ValueError(
                    f"{given}: {count} runs on GPU {device} x {float(run_memory_gib):g} GiB "
                    f"per run = {count * float(run_memory_gib):g} GiB, more than its "
                    f"{total:.1f} GiB. Use {what} {max(1, fit)} or fewer, or declare what a run "
                    f"really needs with --run-memory-gib (the GPU check measures it: "
                    f"benchmarks/README.md, \"GPU check\")")
    return [Slot(index=i, threads=int(threads), device=device,
                 memory_fraction=(1.0 / per_device[device]
                                  if device is not None and per_device[device] > 1 else None),
                 runs_on_device=per_device[device])
            for i, device in enumerate(placed)]


def slot_environment(slot: Slot, base: Mapping[str, str] | None = None) -> dict:
    """The environment of a run in ``slot``: its cores, its GPU and its share of that GPU's
    memory (read by :func:`handclip_nb.device.resolve_device` in the notebook's kernel),
    unbuffered output."""
    env = {**(os.environ if base is None else base), "OMP_NUM_THREADS": str(slot.threads),
           "MKL_NUM_THREADS": str(slot.threads), CPU_SHARE_ENV: str(slot.threads),
           "PYTHONUNBUFFERED": "1"}
    env.pop(GPU_SHARE_ENV, None)  # a share inherited from elsewhere is not this slot's
    if slot.device is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.device
        if slot.memory_fraction is not None:
            env[GPU_SHARE_ENV] = repr(slot.memory_fraction)
    return env


def gpu_memory_gib(devices: Sequence[str]) -> dict[str, float]:
    """Total memory (GiB) of each of ``devices`` (``CUDA_VISIBLE_DEVICES`` names), where this
    process can see them; empty where it cannot (no CUDA here: a login node)."""
    try:
        import torch  # here: the grid's scheduler otherwise never needs torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return {}
    if not torch.cuda.is_available():
        return {}
    visible = visible_gpus()
    out = {}
    for device in devices:
        # this process's own index of the device: its position in what it sees
        index = visible.index(device) if device in visible else None
        if index is not None and index < torch.cuda.device_count():
            out[device] = torch.cuda.get_device_properties(index).total_memory / 2**30
    return out


def describe_slots(slots: Sequence[Slot]) -> list[str]:
    """One line per device: how many runs share it, in which slots (the runner's summary)."""
    by_device: dict[str | None, list[int]] = {}
    for slot in slots:
        by_device.setdefault(slot.device, []).append(slot.index)
    lines = []
    for device, indices in by_device.items():
        name = "CPU" if device is None else f"GPU {device}"
        share = (f", each capped at 1/{len(indices)} of its memory"
                 if device is not None and len(indices) > 1 else "")
        lines.append(f"{name}: {len(indices)} run(s) at a time (slot(s) "
                     f"{', '.join(map(str, indices))}){share}, "
                     f"{slots[indices[0]].threads} core(s) each")
    return lines


class LocalExecutor:
    """Runs ``jobs`` runs at a time on this machine, each in its own process (a slot); or,
    with ``runs_per_gpu=K``, K runs on each visible GPU (K on the CPU where there is none)."""

    name = "local"

    def __init__(self, output: Path, jobs: int = 1, gpus: int | None = None,
                 threads: int | None = None, kernel: str | None = None,
                 runs_per_gpu: int | None = None, run_memory_gib: float | None = None):
        self.output = Path(output)
        self.devices = visible_gpus(gpus)
        self.gpus = len(self.devices)
        self.runs_per_gpu = None if runs_per_gpu is None else int(runs_per_gpu)
        if self.runs_per_gpu is not None:
            if self.runs_per_gpu < 1:
                raise ValueError(f"--runs-per-gpu must be >= 1, got {self.runs_per_gpu}")
            slots = self.runs_per_gpu * max(1, self.gpus)
            if int(jobs) > 1 and int(jobs) != slots:
                raise ValueError(f"--jobs {jobs} and --runs-per-gpu {self.runs_per_gpu} on "
                                 f"{max(1, self.gpus)} {'GPU' if self.gpus else 'CPU'}(s) "
                                 f"({slots} runs at a time) disagree: give only one of them")
            self.jobs = slots
        else:
            self.jobs = max(1, int(jobs))
        # CPU results depend on the thread count (the order of float reductions), and a long
        # training run amplifies the last bits: pin `threads` to compare runs made with
        # different --jobs bit for bit
        memory = gpu_memory_gib(self.devices) if run_memory_gib is not None else {}
        self.slots = plan_slots(self.jobs, self.devices, available_cpus(),
                                threads=int(threads) if threads else None,
                                runs_per_gpu=self.runs_per_gpu, run_memory_gib=run_memory_gib,
                                gpu_memory=memory)
        self.threads = self.slots[0].threads
        self.kernel = kernel or DEFAULT_KERNEL
        self.free = list(range(self.jobs))

    @property
    def capacity(self) -> int:
        return self.jobs

    def describe(self) -> str:
        gpus = (f", GPUs {','.join(self.devices)} ({self.slot_gpus()})" if self.gpus else "")
        return f"local, {self.jobs} at a time, {self.threads} core(s) each{gpus}"

    def layout(self) -> list[str]:
        """How many runs share each device, for the grid's summary."""
        return describe_slots(self.slots)

    def slot_gpus(self) -> str:
        return ", ".join(f"slot {s.index}: GPU {s.device}" for s in self.slots)

    def device_of(self, slot: int) -> str | None:
        return self.slots[slot].device

    def environment(self, slot: int) -> dict:
        """The environment of a run in ``slot``: its cores, its GPU and memory share,
        unbuffered output."""
        return slot_environment(self.slots[slot])

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
        return LocalHandle(name=name, process=process, log=log, slot=slot,
                           where=self.slots[slot].describe())

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


class GridJobGroup(submitit.helpers.Checkpointable):
    """K grid runs as one Slurm job (``--slurm-runs-per-job K``): they share the job's GPU(s)
    and cores as K local slots do (:func:`plan_slots`: cores // K each, 1/K of the GPU's
    memory each), each in its own worker process (``python -m handclip_nb.pipeline --run-step
    SPEC``, the local executor's worker) with its own lease (adopted by the worker, recording
    this job's id), log (``DIR/logs/<run>.log``) and state. The job waits for all of them and
    fails, naming the failed runs and their logs, when any failed; the others' results stand.

    Requeue and resume as for :class:`GridJob`: the whole job is checkpointable; a rerun (time
    limit, pre-emption, ``scontrol requeue``) starts every worker again, and each one skips
    its run when it finished, resumes it from its ``last.pt`` when it did not. At submitit's
    signal the job forwards it to every worker still running (which handles it as a one-run
    job does) and waits for them, within the scheduler's grace time, before it requeues."""

    #: seconds the job waits for its workers after forwarding the signal: above each worker's
    #: own wait for its kernel's checkpoint (``kernel_stop.STOP_WAIT_S``, 90 s) and below the
    #: 120 s of ``slurm_signal_delay_s``, so the requeue still happens before the time limit
    FORWARD_WAIT_S = 100.0

    def __init__(self, specs: Sequence[Mapping[str, Any]], run_memory_gib: float | None = None):
        if not specs:
            raise ValueError("a GridJobGroup needs at least one run")
        self.specs = [dict(spec) for spec in specs]
        self.run_memory_gib = run_memory_gib
        self._workers: list[subprocess.Popen] = []

    def __getstate__(self):  # pickled by submitit (and again at the checkpoint): no processes
        state = dict(self.__dict__)
        state["_workers"] = []
        return state

    @property
    def names(self) -> list[str]:
        return [spec["name"] for spec in self.specs]

    def slots(self) -> list[Slot]:
        """The runs' slots on this node: the job's cores (``SLURM_CPUS_PER_TASK``, else the
        process's affinity) and GPUs (``CUDA_VISIBLE_DEVICES`` as Slurm set it)."""
        granted = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
        cores = int(granted) if granted.isdigit() and int(granted) > 0 else available_cpus()
        devices = visible_gpus()
        memory = gpu_memory_gib(devices) if self.run_memory_gib is not None else {}
        per_gpu = -(-len(self.specs) // max(1, len(devices)))
        return plan_slots(len(self.specs), devices, cores, runs_per_gpu=per_gpu,
                          run_memory_gib=self.run_memory_gib, gpu_memory=memory,
                          what="--slurm-runs-per-job")

    def __call__(self) -> dict:
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        slots = self.slots()  # refused here, before any run starts, when the K cannot fit
        if attempt:
            print(f"[grid] {', '.join(self.names)}: attempt {attempt + 1} (requeued by the "
                  f"scheduler)", flush=True)
        self._workers, logs = [], {}
        for spec, slot in zip(self.specs, slots):
            out = Path(spec["out"]).parent  # the grid folder: runs/ is its "out"
            spec_path = out / ".grid" / f"{spec['name']}.json"
            spec_path.parent.mkdir(parents=True, exist_ok=True)
            spec_path.write_text(json.dumps(spec, indent=1, default=str))
            log = logs[spec["name"]] = out / "logs" / f"{spec['name']}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[grid] {spec['name']}: {slot.describe()}; log {log}", flush=True)
            with open(log, "ab") as handle:
                self._workers.append(subprocess.Popen(
                    [sys.executable, "-m", "handclip_nb.pipeline", "--run-step", str(spec_path)],
                    stdout=handle, stderr=subprocess.STDOUT, env=slot_environment(slot)))
        codes = {name: worker.wait() for name, worker in zip(self.names, self._workers)}
        failed = {name: code for name, code in codes.items() if code != 0}
        for name, code in codes.items():
            print(f"[grid] {name}: {'finished' if not code else f'exit status {code}'}",
                  flush=True)
        if failed:
            raise RuntimeError("runs failed in this job: " + "; ".join(
                f"{name} (exit status {code}; log: {logs[name]})"
                for name, code in failed.items()))
        return {"runs": codes, "attempt": attempt}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's signal before the time limit (or a pre-emption): pass it on to every
        worker still running, give them the grace time to stop, then requeue this job."""
        signum = submitit.JobEnvironment._usr_sig()
        alive = [w for w in self._workers if w.poll() is None]
        for worker in alive:
            try:
                worker.send_signal(signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.FORWARD_WAIT_S
        for worker in alive:
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return super().checkpoint(*args, **kwargs)


@dataclass
class SlurmHandle:
    name: str
    job: Any  # submitit.Job
    log: Path
    slot: int = -1
    group: int = 1  # the runs that share the job (--slurm-runs-per-job)
    where: str = ""

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

    @cached_property
    def _job_exception(self) -> BaseException | None:
        return self.job.exception()

    def exception(self) -> BaseException | None:
        """The finished job's exception, asked of submitit once: for a job that wrote no result
        (killed, cancelled, no Python on the node) submitit waits up to 15 s for the result
        file on every call (a shared filesystem may show it late), and a failed run is asked
        three times (``ok``, then ``failure`` for the summary and the log line)."""
        return self._job_exception

    def ok(self) -> bool:
        # a shared job fails when any of its runs fails: each run's own state (done with its
        # inputs, which the runner checks) says whether it is one of them
        return self.group > 1 or self.exception() is None

    def failure(self) -> str:
        exc = self.exception()
        last = str(exc).strip().splitlines()[-1] if exc is not None and str(exc).strip() else ""
        if self.group > 1:
            return f"Slurm job {self.job_id} ({self.group} runs) {self.job.state}: {last}"[:600]
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


#: How long before its time limit a job gets submitit's signal (slurmctld checks limits every
#: 30 s, so it comes up to 30 s earlier): room for a 1 GB last.pt on a slow shared filesystem
#: (``kernel_stop.STOP_WAIT_S``) and the requeue after it.
SLURM_SIGNAL_DELAY_S = 120


class SlurmExecutor:
    """Submits each run as a Slurm job through submitit (``DIR/slurm/`` holds its files)."""

    name = "slurm"

    def __init__(self, output: Path, settings: Mapping[str, Any], jobs: int | None = None,
                 runs_per_job: int = 1, run_memory_gib: float | None = None):
        self.output = Path(output)
        self.settings = dict(settings)
        self.jobs = int(jobs) if jobs else 10**6  # Slurm queues what it cannot run yet
        self.runs_per_job = int(runs_per_job)
        self.run_memory_gib = run_memory_gib
        if self.runs_per_job < 1:
            raise ValueError(f"--slurm-runs-per-job must be >= 1, got {self.runs_per_job}")
        cpus = self.settings.get("cpus")
        if self.runs_per_job > 1 and cpus and self.runs_per_job > int(cpus):
            raise ValueError(f"--slurm-runs-per-job {self.runs_per_job} with {int(cpus)} CPU(s) "
                             f"per job (slurm cpus): every run needs at least one core for its "
                             f"training process. Use --slurm-runs-per-job {int(cpus)} or fewer, "
                             f"or --slurm-cpus {self.runs_per_job} or more")
        self.python = str(self.settings.get("python") or sys.executable)
        self.kernel = str(self.settings.get("kernel") or DEFAULT_KERNEL)
        # every other key is an sbatch option as it is: account, qos, constraint, reservation
        self.additional = {str(k): v for k, v in self.settings.items() if k not in SLURM_KEYS}
        # a job may reach its time limit (or be pre-empted) up to 10 times, each time requeued
        self.executor = submitit.AutoExecutor(folder=self.output / "slurm", cluster="slurm",
                                              slurm_max_num_timeout=10,
                                              slurm_python=shlex.quote(self.python))
        timeout_min = time_minutes(self.settings.get("time", 60))
        if timeout_min * 60 < 2 * SLURM_SIGNAL_DELAY_S:
            raise ValueError(f"slurm time {timeout_min} min: a job is told to checkpoint "
                             f"{SLURM_SIGNAL_DELAY_S} s before its time limit, which leaves it "
                             f"no time to train; give --slurm-time "
                             f"{math.ceil(2 * SLURM_SIGNAL_DELAY_S / 60)} minutes or more")
        params: dict[str, Any] = {"timeout_min": timeout_min,
                                  "slurm_signal_delay_s": SLURM_SIGNAL_DELAY_S,
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
        return self.jobs * self.runs_per_job

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.settings.items()) or "cluster defaults"
        shared = f", {self.runs_per_job} runs per job" if self.runs_per_job > 1 else ""
        return f"slurm ({shown}){shared}"

    def layout(self) -> list[str]:
        if self.runs_per_job == 1:
            return []
        cpus = self.settings.get("cpus")
        cores = (f", {int(cpus) // self.runs_per_job} core(s) each" if cpus else
                 ", the job's cores split between them")
        return [f"Slurm: up to {self.runs_per_job} runs per job on its GPU(s), each capped at "
                f"1/{self.runs_per_job} of the GPU's memory{cores}"]

    def start_group(self, specs: Sequence[Mapping[str, Any]],
                    after: Sequence[str] = ()) -> list[SlurmHandle]:
        """Submit ``specs`` (at most ``runs_per_job``) as one job (:class:`GridJobGroup`); one
        handle per run, all of that job. A single spec is submitted as a :class:`GridJob`."""
        if len(specs) == 1:
            return [self.start(specs[0], after=after)]
        if len(specs) > self.runs_per_job:
            raise ValueError(f"{len(specs)} runs for one job, more than --slurm-runs-per-job "
                             f"{self.runs_per_job}")
        self.executor.update_parameters(name=self.group_name(specs),
                                        slurm_additional_parameters=self._extra(after))
        job = self.executor.submit(GridJobGroup([{**spec, "kernel": self.kernel}
                                                 for spec in specs],
                                                run_memory_gib=self.run_memory_gib))
        logs = self.output / "logs"
        return [SlurmHandle(name=spec["name"], job=job, log=logs / f"{spec['name']}.log",
                            group=len(specs), where=f"{i + 1} of {len(specs)} runs")
                for i, spec in enumerate(specs)]

    def group_name(self, specs: Sequence[Mapping[str, Any]]) -> str:
        """A shared job's name: its first run's name and lease token (every run's lease records
        it, so a driver killed before it recorded the job id still finds the job)."""
        return f"{self.job_name(specs[0])}-and-{len(specs) - 1}"

    def _extra(self, after: Sequence[str]) -> dict:
        extra = dict(self.additional)
        if after:
            extra.update({"dependency": "afterok:" + ":".join(map(str, after)),
                          "kill-on-invalid-dep": "yes"})
        return extra

    def start(self, spec: Mapping[str, Any], after: Sequence[str] = ()) -> SlurmHandle:
        """Submit one run; ``after``: job ids it must wait for (``afterok``; cancelled by
        Slurm when one of them fails)."""
        self.executor.update_parameters(name=self.job_name(spec),
                                        slurm_additional_parameters=self._extra(after))
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
