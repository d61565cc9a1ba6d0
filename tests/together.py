"""Child processes that start the same build at the same moment, for the tests of what two
processes may build at once (the decode cache, the pretraining population).

Imports take a child seconds, so starting two ``Popen`` at once is not enough for them to
overlap: each child runs :data:`PRELUDE` first and calls ``ready_then_wait_for_go()`` when it
is ready to build; :func:`run_together` waits until every child is ready, then lets them all go.
A child's number is ``os.environ["TOGETHER_ME"]``; ``count_calls`` lets a child record each
call of the function that builds (a file per call), so the test can count the builds.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

PRELUDE = """
import os as _os, time as _time
from pathlib import Path as _Path


def ready_then_wait_for_go():
    flags = _Path(_os.environ["TOGETHER_FLAGS"])
    (flags / f"ready{_os.environ['TOGETHER_ME']}").touch()
    while not (flags / "go").exists():
        _time.sleep(0.001)


def count_calls(module, name, marks, mark):
    # replaces module.name by a wrapper that touches marks / mark(me, **kwargs) on every
    # call (me: this child's number), then calls the original
    real = getattr(module, name)

    def counted(*args, **kwargs):
        (_Path(marks) / mark(_os.environ["TOGETHER_ME"], **kwargs)).touch()
        return real(*args, **kwargs)

    setattr(module, name, counted)
"""


def run_together(script: str, argvs: Sequence[Sequence[str]], flags: Path,
                 cwd: Path | None = None, timeout: float = 120) -> None:
    """Run ``python -c PRELUDE + script`` once per argument list, all released at once;
    asserts that every child exits 0 (its stderr is the message where one does not)."""
    flags.mkdir(parents=True, exist_ok=True)
    children = [subprocess.Popen([sys.executable, "-c", PRELUDE + script, *argv], cwd=cwd,
                                 env={**os.environ, "TOGETHER_FLAGS": str(flags),
                                      "TOGETHER_ME": str(me)},
                                 stderr=subprocess.PIPE, text=True)
                for me, argv in enumerate(argvs)]
    try:
        deadline = time.monotonic() + timeout
        while len(list(flags.glob("ready*"))) < len(children):
            assert all(c.poll() is None for c in children), "a child died while starting"
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        (flags / "go").touch()
        for child in children:
            _, err = child.communicate(timeout=timeout)
            assert child.returncode == 0, err
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
