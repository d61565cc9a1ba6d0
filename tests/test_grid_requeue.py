"""A grid run interrupted on the one-node Slurm cluster (tests/slurm_cluster.py) ends where an
uninterrupted one does: a job the scheduler requeues mid-training, and a job sent submitit's
signal (what Slurm sends before the time limit or a pre-emption), resume from checkpoints/last.pt.
Each test compares with the same grid run locally, never interrupted, in its own project folder.
The grids are stages 1 and 2 of one seed: stage 2 reads stage 1's prompts, and stage 0 (read by
no other stage) only added two kernels to each test.
A module of its own so that pytest -n 2 runs it beside the other grid modules."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from handclip_nb.pipeline.runner import run_grid

from grid_helpers import TINY, grid_metrics, job_of, slurm_home, write_grid

pytestmark = [pytest.mark.slurm, pytest.mark.notebook]


def _uninterrupted(path: Path, home: Path) -> pd.DataFrame:
    """The metrics of the grid run locally (one run at a time, one thread as each Slurm job
    has), never interrupted."""
    summary = run_grid(path, home / "local", jobs=1, threads=1, progress=False)
    assert summary.ok, summary.describe()
    return grid_metrics(summary.results_csv)


def _start_slurm_grid(path: Path, out: Path, env: dict) -> subprocess.Popen:
    """The grid's driver on the test cluster, one CPU per job: under pytest -n 2 the other
    worker keeps a core busy, and a job training on two threads there spends its time in
    the threads' barrier waits."""
    return subprocess.Popen([sys.executable, "-m", "handclip_nb.pipeline", "--grid", str(path),
                             "--output", str(out), "--executor", "slurm", "--slurm-time", "10",
                             "--slurm-cpus", "1", "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_job_requeued_by_the_scheduler_resumes_from_its_checkpoint(slurm_cluster, tmp_path,
                                                                      monkeypatch):
    """scontrol requeue kills the stage-2 job after its first epoch; Slurm starts it again and
    the notebook resumes from checkpoints/last.pt, ending with the metrics of a run that was
    never interrupted."""
    home, env = slurm_home(tmp_path)
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    body = {**TINY, "axes": {"seed": [0]}, "stages": ["stage1", "stage2"],
            "params": {**TINY["params"], "stage2": {**TINY["params"]["stage2"], "epochs": 40,
                                                    "checkpoint_every": 1}}}
    path = write_grid(tmp_path, body)
    out = home / "grid"
    proc = _start_slurm_grid(path, out, env)
    last = out / "runs" / "stage2-seed0" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.is_file(), "stage 2 never wrote its first checkpoint"
    job_id = job_of(out, "stage2-seed0")
    slurm_cluster.run("scontrol", "requeue", job_id)
    output, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, output
    assert "2 finished (1 of them resumed)" in output, output
    log = Path(next((out / "slurm").glob(f"{job_id}_0_log.out"))).read_text()
    assert "attempt 2 (requeued by the scheduler)" in log, log[-2000:]
    executed = (out / "runs" / "stage2-seed0.ipynb").read_text()
    assert "resuming stage2 from" in executed
    # the interrupted run ends where an uninterrupted one does
    pd.testing.assert_frame_equal(grid_metrics(out / "results.csv"), _uninterrupted(path, home))


def test_a_job_sent_submitits_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path,
                                                                      monkeypatch):
    """The schema's checkpoint defaults (no periodic last.pt inside ten minutes): submitit's
    signal (USR2, what Slurm sends before the time limit or a pre-emption) reaches the job
    and the kernel that trains; the kernel writes last.pt after its current step, submitit
    requeues the job, and the next attempt resumes there and ends with the metrics of a run
    that was never interrupted."""
    home, env = slurm_home(tmp_path)
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    body = {**TINY, "axes": {"seed": [0]}, "stages": ["stage1", "stage2"],
            # 120 epochs of 2 x 2 images: the signal must find the kernel still training. At
            # 40 (2 s after the first epoch on a fast run, 51 ms an epoch) training had ended
            # before it came, and the kernel, no longer handling it, ended without last.pt
            "params": {**TINY["params"], "stage2": {**TINY["params"]["stage2"], "epochs": 120,
                                                    "p_ids": 2, "k_images": 2}}}
    path = write_grid(tmp_path, body)
    out = home / "grid"
    proc = _start_slurm_grid(path, out, env)
    run = out / "runs" / "stage2-seed0"
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    # training has begun once TensorBoard holds an epoch
    while (not list((run / "tensorboard").glob("events.*")) and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.05)
    assert list((run / "tensorboard").glob("events.*")), "stage 2 never started training"
    assert not last.is_file()  # no periodic checkpoint: the signal's is the first
    job_id = job_of(out, "stage2-seed0")
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    output, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, output
    assert "2 finished (1 of them resumed)" in output, output
    log = "".join(p.read_text() for p in (out / "slurm").glob(f"{job_id}_0_log.*"))
    # the job process passed it on to the kernel and waited for the kernel's checkpoint
    assert re.search(r"SIGUSR2 passed to \d+ process\(es\); \S*last\.pt written", log), \
        log[-3000:]
    executed = (out / "runs" / "stage2-seed0.ipynb").read_text()
    assert "resuming stage2 from" in executed
    pd.testing.assert_frame_equal(grid_metrics(out / "results.csv"), _uninterrupted(path, home))
