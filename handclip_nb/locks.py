"""Taking turns on something several processes may build at once: a downloaded checkpoint,
a generated dataset. Two grid runs, a notebook and a test, or two people's jobs on one shared
cache can all start the same build at the same moment.

:func:`take_turn` holds an advisory lock (``fcntl.flock`` on a lock file beside the thing
built) while the caller checks whether the thing exists and builds it if not, so it is built
once and the others wait, then find it. Correctness never rests on the lock alone: every
builder writes into a temporary name of its own and renames it into place atomically, so a
file system without locks (some NFS mounts) or a platform without ``fcntl`` only makes the
build happen more than once.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:  # POSIX; elsewhere nobody waits, and the atomic renames keep the result correct
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["take_turn"]


@contextmanager
def take_turn(lock_path: Path, waiting_for: str) -> Iterator[bool]:
    """Hold the advisory lock ``lock_path`` (created if missing); yields whether it is held
    (False where the file system has no locks). ``waiting_for`` completes the line printed
    while another process holds it: ``waiting for another process that is <waiting_for>``."""
    if fcntl is None:
        yield False
        return
    try:
        # read-only: flock needs no write access, so every user of a shared cache can take
        # turns on a lock file another user created
        fh = os.fdopen(os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o666), "rb")
    except OSError:  # e.g. a read-only folder: the build itself fails clearly later
        yield False
        return
    with fh:
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that is {waiting_for} ...",
                      file=sys.stderr, flush=True)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on an NFS mount without a lock daemon
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
