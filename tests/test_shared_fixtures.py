"""The test suite's own machinery for pytest -n N (tests/session_sharing.py, tests/conftest.py):
inputs built once for all workers, the modules handed out most expensive first, and each
worker's share of the cores."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import session_sharing


class _Factory:
    """tmp_path_factory's one method that build_once uses."""

    def __init__(self, base: Path):
        self.base = base

    def getbasetemp(self) -> Path:
        return self.base


def test_build_once_builds_one_folder_for_every_caller(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        folder.mkdir()
        (folder / "data.txt").write_text("built")

    first = session_sharing.build_once(_Factory(tmp_path), "inputs", build)
    second = session_sharing.build_once(_Factory(tmp_path), "inputs", build)
    assert first == second == tmp_path / "inputs"
    assert len(calls) == 1 and (first / "data.txt").read_text() == "built"
    assert not list(tmp_path.glob("inputs.tmp*"))  # built aside, renamed into place


def test_xdist_workers_share_the_folder_above_their_own(tmp_path, monkeypatch):
    worker = tmp_path / "popen-gw1"
    worker.mkdir()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert session_sharing.shared_session_dir(_Factory(worker)) == tmp_path
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert session_sharing.shared_session_dir(_Factory(worker)) == worker


def test_two_processes_building_at_once_build_once(tmp_path):
    """Two processes ask for the same input together: one builds (slowly), the other waits
    on the lock and reads the finished folder; the builder ran once."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import session_sharing\n"
        "from pathlib import Path\n"
        "class F:\n"
        "    def getbasetemp(self): return Path(sys.argv[2])\n"
        "def build(folder):\n"
        "    folder.mkdir(); time.sleep(1.0)\n"
        "    with open(Path(sys.argv[2]) / 'builds.log', 'a') as f: f.write('x')\n"
        "    (folder / 'done').write_text('ok')\n"
        "print((session_sharing.build_once(F(), 'inputs', build) / 'done').read_text())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    tests_dir = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, tests_dir, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outputs == ["ok", "ok"]
    assert (tmp_path / "builds.log").read_text() == "x"


def _item(module: str, name: str, *markers: str):
    return SimpleNamespace(nodeid=f"tests/{module}.py::{name}",
                           iter_markers=lambda: [SimpleNamespace(name=m) for m in markers])


def test_modules_are_handed_out_most_expensive_first_whole_and_in_order():
    items = [_item("test_a", "one"), _item("test_a", "two"),
             _item("test_b", "nb", "notebook"),
             _item("test_c", "plain"), _item("test_c", "cluster", "slurm", "notebook"),
             _item("test_d", "plain")]
    session_sharing.longest_modules_first(items)
    assert [i.nodeid for i in items] == [
        "tests/test_c.py::plain", "tests/test_c.py::cluster",  # 60.2 s
        "tests/test_b.py::nb",                                # 15 s
        "tests/test_a.py::one", "tests/test_a.py::two",       # 0.4 s
        "tests/test_d.py::plain"]                             # 0.2 s: ties keep file order


def test_an_xdist_worker_trains_on_its_share_of_the_cores():
    """make test runs 2 workers: each worker's torch uses its share of the cores (the in-process
    training tests ran 3-10x slower with 2 threads per worker on 2 cores)."""
    import torch

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        pytest.skip("not under pytest -n N (make test runs it there)")
    assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // int(workers))


def test_kernels_a_test_starts_get_the_workers_share_of_the_cores(kernel_threads):
    """A kernel started under the kernel_threads fixture (a child process, as papermill's
    kernel is) trains on the worker's share of the cores, not on every core."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        pytest.skip("not under pytest -n N (make test runs it there)")
    threads = subprocess.run([sys.executable, "-c",
                              "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True).stdout
    assert int(threads) == max(1, len(os.sched_getaffinity(0)) // int(workers))
