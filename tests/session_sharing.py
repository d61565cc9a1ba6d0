"""How the test session shares work between pytest-xdist workers (make test runs 2): inputs
built once for all workers (``build_once``) and the order the workers take the modules in
(``longest_modules_first``). A module of its own, not conftest.py, so that tests can import it
by a name no other conftest.py shares (tests/golden/ has one too)."""
from __future__ import annotations

import os
from pathlib import Path


def worker_core_share() -> int | None:
    """This xdist worker's share of the cores (``pytest -n N``: the cores over N; 1 on the
    2-core machine with 2 workers), or None outside xdist (one process has them all)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    from handclip_nb.host import available_cpus

    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    return max(1, available_cpus() // workers)


def shared_session_dir(tmp_path_factory) -> Path:
    """The folder every process of this test session sees: the session's base temp folder,
    or under ``pytest -n N`` (pytest-xdist) the folder above the workers' own ones."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test session for all xdist workers together, the way the
    package builds what processes share (``handclip_nb.locks.build_folder_in_turn``): the first
    worker builds into a temp folder and renames it into place; the others wait on the lock and
    get the finished folder. Only for read-only inputs (datasets): a test that changes what it
    is given must copy it first."""
    from handclip_nb.locks import build_folder_in_turn

    return build_folder_in_turn(shared_session_dir(tmp_path_factory) / name, Path.is_dir, build,
                                f"building the session's {name}")


#: A module's rough cost in seconds per test, by its most expensive marker: what orders the
#: modules for pytest -n N (``longest_modules_first``). Measured on the 2-core machine: a
#: Slurm test runs a grid or requeues a job (20-170 s), a notebook test starts kernels (8-70 s),
#: a slow test trains in this process (5-40 s), the rest take well under a second.
MODULE_COST_S = {"slurm": 60.0, "notebook": 15.0, "browser": 20.0, "slow": 10.0}


def longest_modules_first(items: list) -> None:
    """Reorder the modules (each kept whole and in file order) most expensive first. With
    ``--dist loadscope --no-loadscope-reorder`` the workers take modules in this order, so the
    long grid and Slurm modules start at once instead of last (xdist's own reorder sorts by
    test count, which put the two-test, four-minute requeue module at the end alone)."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def cost(tests: list) -> float:
        return sum(max([MODULE_COST_S[m.name] for m in item.iter_markers()
                        if m.name in MODULE_COST_S], default=0.2) for item in tests)

    ordered = sorted(modules.values(), key=cost, reverse=True)  # stable: ties keep file order
    items[:] = [item for tests in ordered for item in tests]
