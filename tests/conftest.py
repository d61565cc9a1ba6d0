"""Shared fixtures: the real 11k metadata, small synthetic datasets (generated once per session)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from session_sharing import build_once, longest_modules_first, worker_core_share

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_HANDINFO = SHARED / "data" / "11k" / "HandInfo.csv"
REAL_HD_LISTING = SHARED / "data" / "hd" / "hd_listing.csv"

# No test may reach the internet for CLIP weights: downloads are off for the whole session
# (notebook kernels and subprocesses inherit it); tests/test_weight_download.py turns them on
# against its own loopback server.
os.environ["HANDCLIP_OFFLINE"] = "1"

# No progress bars in the tests: their output is captured, and a bar's timings differ on every
# run (the goldens' kernels get the same setting from tests/golden/kernel_env.py).
os.environ["HANDCLIP_PROGRESS"] = "off"

# Headless: no display, so matplotlib picks Agg by itself here, and the notebooks' kernels keep
# their inline backend (setting MPLBACKEND would leak into them and hide the figures).


def pytest_configure(config):
    """Under ``pytest -n N`` (make test: N=2 on the 2-core machine) every worker trains and
    encodes in its own process at the same time as the others: each gets its share of the
    cores as torch's intra-op threads, since two workers of two threads each on two cores
    spend their time in barrier waits (the in-process training tests ran 3-10x slower so).
    Only this process: the kernels and subprocesses a test starts keep their own settings (an
    OMP_NUM_THREADS here would leak into them, into ``nproc`` and so into the Slurm test
    cluster's CPU count, and into Slurm jobs, changing their arithmetic)."""
    share = worker_core_share()
    if share is not None:
        import torch  # here: only in an xdist worker, which imports it for its tests anyway

        torch.set_num_threads(share)


@pytest.fixture(scope="session")
def real_handinfo() -> Path:
    if not REAL_HANDINFO.is_file():
        pytest.fail(f"{REAL_HANDINFO} is missing: CI clones the repo with ../shared beside it")
    return REAL_HANDINFO


@pytest.fixture(scope="session")
def real_hd_listing() -> Path:
    """The name-only listing (folder,filename) shaped like the real HD dataset."""
    if not REAL_HD_LISTING.is_file():
        pytest.fail(f"{REAL_HD_LISTING} is missing: CI clones the repo with ../shared beside it")
    return REAL_HD_LISTING


@pytest.fixture(scope="session")
def synthetic_11k(tmp_path_factory) -> Path:
    """12 people x 4 aspects x 5 images, default difficulty."""
    from handclip_nb.data.synthetic import generate_dataset

    return build_once(tmp_path_factory, "synthetic11k",
                      lambda root: generate_dataset(root, subjects=12, images_per_subject=5,
                                                    seed=0))


@pytest.fixture(scope="session")
def hands(tmp_path_factory) -> Path:
    """60 people x 4 aspects x 6 images (the demo's size), default difficulty: enough training
    identities (24 fit people of dorsal_r) for the behaviour tests' measured margins. Generated
    once for all workers (14 s on the 2-core machine)."""
    from handclip_nb.data.synthetic import generate_dataset

    return build_once(tmp_path_factory, "hands",
                      lambda root: generate_dataset(root, subjects=60, images_per_subject=6,
                                                    seed=0))


@pytest.fixture(scope="session")
def synthetic_hd(tmp_path_factory) -> Path:
    from handclip_nb.data.synthetic import generate_dataset

    return build_once(tmp_path_factory, "synthetichd",
                      lambda root: generate_dataset(root, subjects=10, images_per_subject=4,
                                                    seed=0, layout="hd", distractors=3))


@pytest.fixture()
def workbench_home(tmp_path, monkeypatch) -> Path:
    """A private project root: outputs/, feature cache and synthetic data go under tmp_path."""
    monkeypatch.setenv("HANDCLIP_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture()
def kernel_threads(monkeypatch):
    """The notebook kernels this test starts itself (``run_notebook``, papermill) train on this
    xdist worker's share of the cores (``OMP_NUM_THREADS``, which the kernels inherit, for the
    test's duration): under ``pytest -n 2`` the other worker keeps a core busy, and a kernel
    on two threads there spends its time in barrier waits. Not for kernels whose results a
    test compares with runs made on other thread counts; a grid slot and a Slurm job set their
    own. Outside xdist it changes nothing."""
    share = worker_core_share()
    if share is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", str(share))
        monkeypatch.setenv("MKL_NUM_THREADS", str(share))


@pytest.fixture()
def one_thread():
    """One intra-op thread for tests on tiny tensors, where threads only add barrier waits
    (badly so on a loaded 2-core CI machine); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster (tests/slurm_cluster.py), started once per session and
    stopped afterwards; ``SLURM_CONF`` points the clients (sbatch, squeue, submitit) at it while
    it runs. Skipped where Slurm is not installed, unless ``HANDCLIP_REQUIRE_SLURM=1`` (set by
    ``.ci/run``), which turns the skip into a failure."""
    from slurm_cluster import slurm_installed, start_cluster

    missing = None
    if not slurm_installed():
        missing = "Slurm is not installed (no slurmctld/slurmd/munged/sbatch)"
    elif os.geteuid() != 0:
        missing = "the one-node Slurm cluster must be started as root"
    if missing:
        if os.environ.get("HANDCLIP_REQUIRE_SLURM") == "1":
            pytest.fail(f"{missing}: apt-get install slurm-wlm munge, or run .ci/run "
                        "(HANDCLIP_REQUIRE_SLURM=1 forbids skipping)")
        pytest.skip(f"{missing}: apt-get install slurm-wlm munge, or run .ci/run")
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N`` the modules most expensive first (``longest_modules_first``; in one
    process the file order stays, which the nbval goldens need: each notebook reads the runs of
    the ones before it); tests marked ``cuda`` are skipped where torch sees no CUDA device
    (``make gpu-check`` runs them on a GPU machine)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        longest_modules_first(items)
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch  # here: only when a cuda-marked test is collected (the conftest stays cheap)

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by make gpu-check)")
    for item in marked:
        item.add_marker(skip)
