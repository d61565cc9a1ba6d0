"""Taking turns on something several processes may build at once: a downloaded checkpoint,
a generated dataset. Two grid runs, a notebook and a test, or two people's jobs on one shared
cache can all start the same build at the same moment.

:func:`take_turn` holds an advisory lock (``fcntl.flock`` on a lock file beside the thing
built) while the caller checks whether the thing exists and builds it if not, so it is built
once and the others wait, then find it. Correctness never rests on the lock alone: every
builder writes into a temporary name of its own and renames it into place atomically, so a
file system without locks (some NFS mounts) or a platform without ``fcntl`` only makes the
build happen more than once. :func:`build_folder_in_turn` is that whole pattern for a folder
(the embedded synthetic hands, each part of the pretraining population, the tests' session
builds).
"""
from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:  # POSIX; elsewhere nobody waits, and the atomic renames keep the result correct
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["take_turn", "build_folder_in_turn"]


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


def build_folder_in_turn(folder: Path, is_built: Callable[[Path], bool],
                         build: Callable[[Path], None], waiting_for: str | None = None) -> Path:
    """Make ``folder`` with ``build(tmp)`` unless ``is_built(folder)``, one process at a time:
    the builders take turns on ``.<folder>.lock`` beside it, the first builds into
    ``.<folder>.tmp<pid>`` and renames it into place; the others wait, then find it built. A
    folder there that is not built (other settings, a half-removed one) is replaced; a built
    one never is, so where the file system has no locks the copy renamed first stays and a
    reader never finds the folder missing."""
    if is_built(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with take_turn(folder.with_name(f".{folder.name}.lock"), waiting_for or f"generating {folder}"):
        if is_built(folder):  # by the process this one waited for
            return folder
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # this process's leftover from a killed build
        build(tmp)
        if folder.exists() and not is_built(folder):
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # no locks here, and another process renamed its identical copy first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
