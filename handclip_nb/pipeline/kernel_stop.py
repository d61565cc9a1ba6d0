"""Pass a scheduler's stop signal from a grid job's process to the notebook kernel that trains,
and wait until the kernel has written its ``last.pt``.

Why the job process must take part: the training loop (``train/loop.py``) checkpoints on
SIGUSR2 and SIGTERM in the kernel, where it runs, and papermill starts the kernel in a session
of its own. Slurm delivers a job's signals to every process of the job step (the kernel
included: ``proctrack`` follows descendants), but submitit's handler in the job process answers
the same SIGUSR2 by requeueing the job and exiting at once; the kernel's parent poller
(ipykernel) then ends the kernel within a second, and the requeue's SIGKILL follows: the
checkpoint would race both. :func:`stop_signals_forwarded` (around the notebook's execution in
``steps.execute_spec``, the job process's code) puts a handler before submitit's (and before
the default SIGTERM of a local grid worker, whose ``stop`` signals only the worker's process
group): :func:`forward_stop_signal` sends the signal to the kernel itself and returns once the
kernel renamed a new ``last.pt`` into place, the kernel is gone (it was not training:
evaluation, or a stage without a loop, ends on the signal as before), or ``timeout`` passed;
then the handler that was there before runs (submitit requeues, a worker ends).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from ..runs import LAST_CHECKPOINT

__all__ = ["child_processes", "forward_stop_signal", "run_checkpoint", "stop_signals_forwarded",
           "STOP_WAIT_S", "STOP_SIGNALS"]

#: The signals the training loop checkpoints on (``train.loop.STOP_SIGNALS``; not imported
#: from there: the grid's command line runs without torch).
STOP_SIGNALS = ("SIGUSR2", "SIGTERM")

#: How long the job waits for the kernel's checkpoint by default: inside submitit's
#: ``slurm_signal_delay_s`` (the signal's lead on the time limit, 120 s in ``SlurmExecutor``)
#: with a margin. A ViT-B/16 stage-2 last.pt (1.03 GB) took 6.5 s to write on a loaded 2-core
#: CPU machine (benchmarks/bench_checkpoints.py); a shared cluster filesystem at 20-50 MB/s
#: needs 20-50 s, hence the room. The wait ends as soon as the checkpoint is in place.
STOP_WAIT_S = 90.0


def child_processes(parent: int | None = None) -> list[int]:
    """The pids whose parent is ``parent`` (this process), from ``/proc`` (Linux)."""
    parent = os.getpid() if parent is None else int(parent)
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == parent:
            children.append(int(entry.name))
    return sorted(children)


def run_checkpoint(spec: Mapping) -> Path:
    """The ``last.pt`` of the run a grid job's ``spec`` executes (``<out>/<name>/``)."""
    return Path(spec["out"]) / str(spec["name"]) / LAST_CHECKPOINT


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has ended


def forward_stop_signal(signum: int, checkpoint: str | os.PathLike,
                        timeout: float = STOP_WAIT_S, kernels: list[int] | None = None) -> str:
    """Send ``signum`` to ``kernels`` (default: this process's children) and wait until
    ``checkpoint`` is newer than the signal, every kernel has ended, or ``timeout`` seconds
    passed. Returns what happened, as one line for the job's log."""
    checkpoint = Path(checkpoint)
    kernels = child_processes() if kernels is None else list(kernels)
    sent = time.time()
    for pid in kernels:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    name = signal.Signals(signum).name
    if not kernels:
        return f"{name}: no kernel process to pass it to"
    while time.time() - sent < timeout:
        try:
            if checkpoint.stat().st_mtime >= sent - 1e-3:
                return (f"{name} passed to {len(kernels)} process(es); {checkpoint} written "
                        f"{time.time() - sent:.1f} s later")
        except FileNotFoundError:
            pass
        if not any(_alive(pid) for pid in kernels):
            return f"{name} passed to {len(kernels)} process(es); they ended without a checkpoint"
        time.sleep(0.05)
    return f"{name} passed to {len(kernels)} process(es); no checkpoint within {timeout:g} s"


@contextmanager
def stop_signals_forwarded(checkpoint: str | os.PathLike,
                           timeout: float = STOP_WAIT_S) -> Iterator[None]:
    """While entered (main thread only), :data:`STOP_SIGNALS` are first passed to this process's
    children (the notebook kernel) with :func:`forward_stop_signal`, then handled as before:
    the previous Python handler is called, a default action is taken (SIGTERM ends the
    process), an ignored signal stays ignored. The previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}

    def forward_then_as_before(signum, frame):
        print(f"[grid] {forward_stop_signal(signum, checkpoint, timeout)}", flush=True)
        before = previous.get(signum, signal.SIG_DFL)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for name in STOP_SIGNALS:
        signum = getattr(signal, name, None)  # Windows has no SIGUSR2
        if signum is not None:
            previous[signum] = signal.signal(signum, forward_then_as_before)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
