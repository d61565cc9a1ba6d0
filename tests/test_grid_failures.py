"""A grid's failures and interruptions (handclip_nb/pipeline/runner.py): a failing run is
reported with its log and stops only its dependents, a relaunched local driver waits for the
runs its killed predecessor started, failed Slurm runs cancel their dependents, and a node
without the grid's Python fails at once. Each test runs a grid of its own in its own project
folder; the Slurm ones on the one-node cluster (tests/slurm_cluster.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from handclip_nb.pipeline.cli import main
from handclip_nb.pipeline.grid import expand_grid, load_grid
from handclip_nb.pipeline.runner import run_grid

from grid_helpers import ONE_SEED, TINY, project_home, slurm_home, write_grid


@pytest.mark.notebook
def test_a_failing_run_is_reported_with_its_log_and_stops_only_its_dependents(tmp_path,
                                                                              monkeypatch):
    home = project_home(tmp_path)
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    body = {**TINY, "axes": {"weights": [None, str(tmp_path / "missing.pt")]},
            "stages": ["stage0", "stage1", "stage2"]}
    path = write_grid(tmp_path, body)
    status = main(["--grid", str(path), "--output", str(home / "grid"), "--jobs", "2",
                   "--no-progress"])
    assert status == 1
    summary = run_grid(path, home / "grid", jobs=1, progress=False, results=False)
    failed = {n for n in summary.failed}
    assert failed == {"stage0-missing.pt", "stage1-missing.pt"}, summary.describe()
    assert summary.not_run == {"stage2-missing.pt": "stage1-missing.pt"}
    assert len(summary.skipped) == 3  # the other combination finished the first time
    log = Path(summary.failed["stage0-missing.pt"].split("log: ")[1])
    assert "missing.pt" in log.read_text() and "WeightsNotFoundError" in log.read_text()


def _runs_started(log_dir: Path, name: str) -> int:
    """How many times a run's notebook was executed (its worker prints one line each)."""
    log = log_dir / f"{name}.log"
    return log.read_text().count(f"[grid] {name}: ") if log.is_file() else 0


@pytest.mark.notebook
def test_a_relaunched_local_driver_waits_for_the_runs_its_predecessor_started(tmp_path):
    """The driver is killed (SIGKILL) while its runs train; their processes live on and keep
    their leases. The relaunched driver starts none of them again: it waits for them, then
    runs the rest, and every run executes exactly once. One seed: with --jobs 2 its stage 0 and
    stage 1 run side by side, and stage 2 is left for the relaunched driver."""
    home = project_home(tmp_path)
    body = {**ONE_SEED, "params": {**TINY["params"], "stage1": {**TINY["params"]["stage1"],
                                                                "epochs": 12}}}
    path = write_grid(tmp_path, body)
    out = home / "grid"
    env = {**os.environ, "HANDCLIP_HOME": str(home)}
    cmd = [sys.executable, "-m", "handclip_nb.pipeline", "--grid", str(path), "--output",
           str(out), "--jobs", "2", "--no-progress"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 300
    leases_dir = out / "runs" / ".pipeline"

    def adopted() -> bool:
        """A stage-1 run's process has taken over its lease from the driver (kill the driver
        before that and the run never started: nobody to wait for)."""
        for path in leases_dir.glob("stage1-seed*.lease"):
            try:
                if json.loads(path.read_text()).get("pid") not in (None, first.pid):
                    return True
            except ValueError:  # being replaced at this instant
                pass
        return False

    while time.time() < deadline and not adopted():
        time.sleep(0.2)
    assert adopted(), first.communicate(timeout=5)[0]
    first.kill()
    first.wait()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "waiting for it" in second.stdout
    for run in expand_grid(load_grid(path)):
        assert _runs_started(out / "logs", run.name) == 1, run.name
    assert len(pd.read_csv(out / "results.csv")) == 3
    assert not list(leases_dir.glob("*.lease"))  # every owner released its run


@pytest.mark.slurm
@pytest.mark.notebook
def test_detached_dependents_of_a_failed_run_are_cancelled_and_cancel_stops_a_campaign(
        slurm_cluster, tmp_path, monkeypatch):
    """Stage 1 fails (missing weights): Slurm cancels the stage-2 job that waits for it instead
    of leaving it pending for ever. A second campaign is stopped with --cancel."""
    home, _ = slurm_home(tmp_path)
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    body = {**TINY, "axes": {"seed": [0]},
            "params": {**TINY["params"], "stage1": {**TINY["params"]["stage1"],
                                                    "weights": str(tmp_path / "missing.pt")}}}
    path = write_grid(tmp_path, body)
    from handclip_nb.pipeline.runner import cancel_grid, grid_status

    summary = run_grid(path, home / "grid", executor="slurm", slurm={"time": 10, "cpus": 1},
                       progress=False, detach=True)
    assert len(summary.submitted) == 3
    deadline = time.time() + 240
    while time.time() < deadline:
        statuses = {r["run"]: r["status"] for r in grid_status(path, home / "grid")}
        if not set(statuses.values()) & {"pending", "running"}:
            break
        time.sleep(2)
    assert statuses == {"stage0-seed0": "finished", "stage1-seed0": "failed",
                        "stage2-seed0": "cancelled"}, statuses
    # a long campaign, cancelled while its jobs wait and run
    long = {**TINY, "axes": {"seed": [0]},
            "params": {**TINY["params"], "stage1": {**TINY["params"]["stage1"], "epochs": 60}}}
    path = write_grid(tmp_path, long, name="long")
    run_grid(path, home / "long", executor="slurm", slurm={"time": 10, "cpus": 1},
             progress=False, detach=True)
    lines = cancel_grid(path, home / "long")
    assert len(lines) == 3 and all("cancelled" in line for line in lines), lines
    deadline = time.time() + 60
    while time.time() < deadline:
        statuses = {r["run"]: r["status"] for r in grid_status(path, home / "long")}
        if set(statuses.values()) <= {"cancelled", "finished"}:
            break
        time.sleep(1)
    assert set(statuses.values()) <= {"cancelled", "finished"}, statuses
    assert "cancelled" in statuses.values()


@pytest.mark.slurm
@pytest.mark.notebook
def test_a_node_without_the_grids_python_fails_at_once_with_its_name(slurm_cluster, tmp_path,
                                                                     monkeypatch):
    home, _ = slurm_home(tmp_path)
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    path = write_grid(tmp_path, {**TINY, "axes": {"seed": [0]}, "stages": ["stage0"]})
    summary = run_grid(path, home / "grid", executor="slurm", progress=False, results=False,
                       slurm={"time": 5, "cpus": 1, "python": "/opt/nowhere/bin/python"})
    assert list(summary.failed) == ["stage0-seed0"]
    log = Path(summary.failed["stage0-seed0"].split("log: ")[1]).read_text()
    assert "has no Python at /opt/nowhere/bin/python" in log and "--slurm-python" in log



def test_a_failed_slurm_job_is_asked_for_its_exception_once():
    """submitit waits up to 15 s for the result file of a job that wrote none (killed,
    cancelled, no Python on the node) on every ``job.exception()``; the runner asks a failed
    handle ``ok()`` and ``failure()`` twice, which must cost one wait, not three."""
    from handclip_nb.pipeline.executors import SlurmHandle

    class FailedJob:
        job_id, state, calls = "42", "FAILED", 0

        def exception(self):
            FailedJob.calls += 1
            return RuntimeError("Job 42 has not produced any output (state: FAILED)")

    handle = SlurmHandle(name="stage0-seed0", job=FailedJob(), log=Path("42_0_log.err"))
    assert not handle.ok()
    assert "has not produced any output" in handle.failure()
    assert handle.failure() == handle.failure()
    assert FailedJob.calls == 1
