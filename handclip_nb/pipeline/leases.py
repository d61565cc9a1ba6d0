"""One owner per run folder: a lease beside the run's state, taken atomically.

``<runs>/.pipeline/<run>.lease`` is a JSON record::

    {"token", "run", "grid", "fingerprint", "host", "pid", "job_id", "claimed", "heartbeat"}

A grid driver *claims* a run before it starts it (``os.link`` of a complete temp file: exactly
one process can create the lease, and a reader never sees half of it) and hands the lease's
``token`` to the process that runs it, which *adopts* the lease (records its own host, pid and
Slurm job id) and *beats* it every ``HEARTBEAT_S`` seconds while it runs. Whoever finds the
lease held by a live owner never starts that run: a second grid process, a second grid file
writing into the same ``--output``, or a driver relaunched after it died.

Liveness, checked by :func:`owner_alive`:

* a lease with a Slurm ``job_id`` lives while Slurm holds the job as active (pending in the
  queue, running, requeued: ``squeue``), whatever its heartbeat: a pending job has no process
  that could beat. A driver names the job after the lease (``job_name``, with the lease's
  token) before it submits, so a job submitted by a driver killed before it could record the
  id is still found by its name;
* any other lease lives while its heartbeat is younger than ``STALE_AFTER_S`` and, on this
  host, while its pid exists.

A lease whose owner is dead is taken over (:func:`claim` renames it away, so of two processes
taking over at once one wins) and the run resumes from its ``last.pt``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Lease", "LeaseHeld", "lease_path", "read_lease", "claim", "adopt", "owner_alive",
           "describe_owner", "slurm_states", "active_job_named", "job_of", "ACTIVE_STATES", "HEARTBEAT_S", "STALE_AFTER_S"]

#: Seconds between two heartbeats of a running owner (``HANDCLIP_LEASE_HEARTBEAT_S``).
HEARTBEAT_S = float(os.environ.get("HANDCLIP_LEASE_HEARTBEAT_S", 10))
#: A lease without a Slurm job whose heartbeat is older than this is dead
#: (``HANDCLIP_LEASE_STALE_S``): several missed beats, so a busy file system does not kill it.
STALE_AFTER_S = float(os.environ.get("HANDCLIP_LEASE_STALE_S", 6 * HEARTBEAT_S))

#: Slurm job states of a job that will still run (again): a requeued job passes through these.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED",
                           "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING",
                           "STAGE_OUT"})


class LeaseHeld(RuntimeError):
    """The run is owned by a live process or Slurm job (``record``)."""

    def __init__(self, record: Mapping[str, Any]):
        self.record = dict(record)
        super().__init__(f"run {record.get('run')!r} is owned by {describe_owner(record)}")


def lease_path(runs_dir: Path, run: str) -> Path:
    return Path(runs_dir) / ".pipeline" / f"{run}.lease"


def read_lease(path: Path) -> dict | None:
    """The lease record at ``path``, or None when there is none (or it cannot be read)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def job_of(record: Mapping[str, Any]) -> str | None:
    """The Slurm job that owns a lease: recorded, or found by the job name the driver gave it
    before it was submitted."""
    if record.get("job_id"):
        return str(record["job_id"])
    return active_job_named(record["job_name"]) if record.get("job_name") else None


def describe_owner(record: Mapping[str, Any]) -> str:
    job = f"Slurm job {record['job_id']}" if record.get("job_id") else None
    proc = f"pid {record.get('pid')} on {record.get('host')}"
    grid = f" (grid {record['grid']})" if record.get("grid") else ""
    return (f"{job}, {proc}" if job else proc) + grid


# ----------------------------------------------------------------------------- Slurm


_SQUEUE_CACHE: dict[str, Any] = {"at": -1e9, "states": None, "names": None}
_SQUEUE_TTL_S = 1.0


def _squeue(refresh: bool) -> None:
    now = time.monotonic()
    if not refresh and now - _SQUEUE_CACHE["at"] < _SQUEUE_TTL_S:
        return
    states = names = None
    try:
        done = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True,
                              text=True, timeout=60)
        if done.returncode == 0:
            rows = [line.split(None, 2) for line in done.stdout.splitlines()]
            states = {r[0]: r[1].upper() for r in rows if len(r) >= 2}
            names = {r[2]: r[0] for r in rows if len(r) == 3 and r[1].upper() in ACTIVE_STATES}
    except (OSError, subprocess.SubprocessError):
        pass
    _SQUEUE_CACHE.update(at=now, states=states, names=names)


def slurm_states(refresh: bool = False) -> dict[str, str] | None:
    """Every job Slurm still holds, ``{job id: state}`` (one ``squeue`` call, cached for a
    second); None where there is no Slurm (no ``squeue``, or it fails)."""
    _squeue(refresh)
    return _SQUEUE_CACHE["states"]


def active_job_named(name: str) -> str | None:
    """The id of an active Slurm job called ``name`` (None: none, or no Slurm)."""
    _squeue(False)
    found = (_SQUEUE_CACHE["names"] or {}).get(name)
    if found is None:  # submitted since the cached answer? ask again before saying no
        _squeue(True)
        found = (_SQUEUE_CACHE["names"] or {}).get(name)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError):
        return True  # it exists (another user's), or we cannot tell: assume alive
    return True


def owner_alive(record: Mapping[str, Any]) -> bool:
    """Whether the owner of a lease still runs (or will run) its run: see the module
    docstring."""
    job = record.get("job_id") or (active_job_named(record["job_name"])
                                   if record.get("job_name") else None)
    if job:
        states = slurm_states()
        if states is not None and str(job) not in states:  # newer than the cached answer?
            states = slurm_states(refresh=True)
        if states is not None:
            state = states.get(str(job))
            if state is not None:
                if (str(job) == os.environ.get("SLURM_JOB_ID")
                        and record.get("host") == socket.gethostname() and record.get("pid")
                        and not _pid_alive(record["pid"])):
                    # this very job, whose process that ran the run has ended: a rerun inside
                    # the same allocation (its owner is gone, though Slurm holds the job)
                    return False
                return state.split()[0] in ACTIVE_STATES
            # Slurm no longer holds the job (it ended and was purged): its process is gone too
            return False
    if time.time() - float(record.get("heartbeat", 0)) > STALE_AFTER_S:
        return False
    if record.get("host") == socket.gethostname() and record.get("pid"):
        return _pid_alive(record["pid"])
    return True


# ----------------------------------------------------------------------------- the lease


def _write_new(path: Path, record: Mapping[str, Any]) -> bool:
    """Create ``path`` holding ``record`` only if it does not exist: a complete temp file
    linked into place (atomic; readers never see a partial lease). False when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Lease:
    """A lease this process holds (its ``token``); see the module docstring."""

    path: Path
    record: dict
    _beating: threading.Event | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def token(self) -> str:
        return self.record["token"]

    def still_mine(self) -> bool:
        current = read_lease(self.path)
        return current is not None and current.get("token") == self.token

    def update(self, **fields: Any) -> bool:
        """Rewrite the lease with ``fields`` (atomically), if it is still ours."""
        if not self.still_mine():
            return False
        self.record.update(fields)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self.record, sort_keys=True))
        os.replace(tmp, self.path)
        return True

    def beat(self) -> bool:
        return self.update(heartbeat=time.time())

    def start_heartbeat(self, every: float | None = None) -> None:
        """Beat in a daemon thread until :meth:`release` (or the process ends)."""
        if self._thread is not None:
            return
        self._beating = threading.Event()
        interval = HEARTBEAT_S if every is None else every

        def loop() -> None:
            while not self._beating.wait(interval):
                try:
                    if not self.beat():
                        return  # taken over by someone else: stop beating for it
                except OSError:
                    pass  # a full or flaky disk: try again at the next beat

        self._thread = threading.Thread(target=loop, name=f"lease-{self.record.get('run')}",
                                        daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._beating is not None:
            self._beating.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = self._beating = None

    def release(self) -> None:
        """Stop beating and remove the lease, if it is still ours."""
        self.stop_heartbeat()
        if self.still_mine():
            self.path.unlink(missing_ok=True)


def _record(run: str, **info: Any) -> dict:
    now = time.time()
    return {"token": uuid.uuid4().hex, "run": run, "host": socket.gethostname(),
            "pid": os.getpid(), "job_id": None, "claimed": now, "heartbeat": now, **info}


def claim(runs_dir: Path, run: str, **info: Any) -> Lease:
    """Take the lease of ``run`` for this process, taking over one whose owner is dead;
    raises :class:`LeaseHeld` when a live owner holds it. ``info``: ``grid``, ``fingerprint``,
    ``job_id``, ... recorded in the lease."""
    path = lease_path(runs_dir, run)
    for _ in range(20):
        record = _record(run, **info)
        if _write_new(path, record):
            return Lease(path, record)
        current = read_lease(path)
        if current is None:  # removed (released) between the two calls: try again
            time.sleep(0.05)
            continue
        if owner_alive(current):
            raise LeaseHeld(current)
        # a dead owner: move its lease away; of two processes doing this at once, one moves
        # the dead lease and the other finds nothing (or a new live lease) at the next try
        grave = path.with_name(f".{path.name}.dead-{uuid.uuid4().hex}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            continue
        moved = read_lease(grave)
        if moved is not None and moved.get("token") != current.get("token"):
            # we moved a lease claimed after our read: put it back (it is alive)
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
        grave.unlink(missing_ok=True)
    raise LeaseHeld(read_lease(path) or {"run": run})


def adopt(runs_dir: Path, run: str, token: str | None, **info: Any) -> Lease:
    """The process that runs ``run`` takes over the lease its driver claimed (``token``),
    recording its own host, pid and ``info`` (the Slurm job id). Without a token (a run started
    by hand) it claims the lease itself. Raises :class:`LeaseHeld` when the lease belongs to
    someone else: this process must not touch the run folder."""
    path = lease_path(runs_dir, run)
    if token:
        current = read_lease(path)
        if current is not None and current.get("token") == token:
            lease = Lease(path, current)
            lease.update(host=socket.gethostname(), pid=os.getpid(), heartbeat=time.time(),
                         **info)
            return lease
        if current is not None and owner_alive(current):
            raise LeaseHeld(current)
    return claim(runs_dir, run, **info)
