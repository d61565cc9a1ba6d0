"""What this process may use of the machine, read from its environment: the cores it may run
on, and its share of a GPU's memory when several runs share one. Plain ``os``, no torch: the
grid's driver and its per-run worker processes need these and nothing of torch, so they start
without paying its import (``handclip_nb.device`` re-exports them for everything else)."""
from __future__ import annotations

import os

__all__ = ["CPU_SHARE_ENV", "GPU_SHARE_ENV", "available_cpus", "gpu_memory_share"]


#: Environment variable with this process's share of its GPU's memory (a fraction in (0, 1]),
#: set by the grid's executors for each of K runs that share one GPU (``--runs-per-gpu K``,
#: ``--slurm-runs-per-job K``: ``1/K``). Every CUDA device this process resolves is capped at
#: that fraction (``torch.cuda.set_per_process_memory_fraction``), so one run that grows
#: (a larger batch, an evaluation) fails with an out-of-memory error of its own instead of
#: taking the memory its neighbours were promised.
GPU_SHARE_ENV = "HANDCLIP_GPU_MEMORY_FRACTION"


def gpu_memory_share() -> float | None:
    """This process's share of its GPU's memory (``HANDCLIP_GPU_MEMORY_FRACTION``), or None
    when it has the whole GPU (unset or empty)."""
    text = os.environ.get(GPU_SHARE_ENV, "").strip()
    if not text:
        return None
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"{GPU_SHARE_ENV}={text!r}: expected this process's share of its "
                         f"GPU's memory, a number in (0, 1] (1/K for K runs on one GPU); unset "
                         f"it to give the process the whole GPU")
    return share


#: Environment variable with this process's share of the cores, set by the grid's local
#: executor for each of the runs it starts side by side, so that their loader workers together
#: fit the machine instead of each taking every core.
CPU_SHARE_ENV = "HANDCLIP_CPUS"


def available_cpus() -> int:
    """Cores this process may run on: its affinity mask (e.g. a Slurm or container limit),
    not the machine's total, and at most its share (``HANDCLIP_CPUS``) when runs share the
    machine."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        cpus = max(1, os.cpu_count() or 1)
    share = os.environ.get(CPU_SHARE_ENV, "").strip()
    if share.isdigit() and int(share) > 0:
        cpus = min(cpus, int(share))
    return cpus
