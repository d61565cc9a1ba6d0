"""The one-node Slurm cluster (tests/slurm_cluster.py) runs submitit jobs the way the experiment
grid will: a result comes back, a run the scheduler kills mid-training is requeued and resumes
from its progress instead of starting over, and a run that fails is reported with its log.

The jobs' callables live in this module, which the job's Python cannot import (pytest puts
tests/ on its own sys.path only), so cloudpickle sends them by value.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle  # a dependency of submitit
import pytest
import submitit

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]


def _executor(cluster, folder: Path, **params):
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params.setdefault("timeout_min", 5)
    executor.update_parameters(slurm_partition=cluster.partition, cpus_per_task=1, **params)
    return executor


def _wait_for(predicate, timeout: float, what: str, cluster) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n"
                        f"{cluster.run('squeue', check=False)}\n{cluster.log_tails(15)}")
        time.sleep(0.1)


# --- the jobs' callables -----------------------------------------------------------------------

def add(a: int, b: int) -> dict:
    return {"sum": a + b, "restart": os.environ.get("SLURM_RESTART_COUNT"),
            "conf": os.environ.get("SLURM_CONF"), "job_id": os.environ.get("SLURM_JOB_ID")}


def train_with_progress_file(progress: str, steps: int, step_s: float) -> dict:
    """A training stand-in that saves its progress after every step and resumes from it."""
    path = Path(progress)
    state = json.loads(path.read_text()) if path.exists() else {"step": 0, "attempts": []}
    state["attempts"].append({"restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                              "from_step": state["step"], "done_steps": []})
    path.write_text(json.dumps(state))
    while state["step"] < steps:
        time.sleep(step_s)
        state["step"] += 1
        state["attempts"][-1]["done_steps"].append(state["step"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)
    return state


class TrainUntilTimeLimit(submitit.helpers.Checkpointable):
    """First attempt: trains until the scheduler's time-limit signal (submitit's USR2 handler
    calls ``checkpoint``, which pickles this instance with its progress, and requeues the job);
    the requeued attempt starts from the pickled ``step`` and finishes a few more steps."""

    def __init__(self) -> None:
        self.step = 0
        self.attempts: list[dict] = []

    def __call__(self, finish_steps: int, step_s: float, give_up_s: float) -> dict:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self.attempts.append({"restart": restart, "from_step": self.step})
        target = self.step + finish_steps if restart else None
        give_up = time.monotonic() + give_up_s
        while target is None or self.step < target:
            if time.monotonic() > give_up:
                raise RuntimeError(f"no time-limit signal within {give_up_s} s")
            time.sleep(step_s)
            self.step += 1
        return {"step": self.step, "attempts": self.attempts}


def fail_with_value_error(tag: str) -> None:
    print(f"about to fail: {tag}", file=sys.stderr, flush=True)
    raise ValueError(f"bad learning rate for {tag}")


def die_without_result() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# --- tests -------------------------------------------------------------------------------------

def test_cluster_is_up_and_clients_find_it(slurm_cluster):
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf)
    assert slurm_cluster.node_state() == "idle"
    assert slurm_cluster.run("sinfo", "-h", "-o", "%P").strip() == slurm_cluster.partition + "*"


def test_submitit_job_returns_its_result(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path).submit(add, 2, 40)
    result = job.result()
    assert result["sum"] == 42
    assert result["job_id"] == job.job_id
    assert result["conf"] == str(slurm_cluster.conf)  # sbatch exported the submitter's env
    assert result["restart"] is None  # first (and only) run: no SLURM_RESTART_COUNT
    assert job.paths.stdout.is_file() and job.paths.folder == tmp_path


def test_job_killed_by_scheduler_is_requeued_and_resumes(slurm_cluster, tmp_path):
    """``scontrol requeue`` kills the running job (SIGTERM, SIGKILL after KillWait) and puts it
    back in the queue, as a preemption with PreemptMode=REQUEUE or a node failure would; the
    second run (SLURM_RESTART_COUNT=1) continues from the progress saved by the first.

    submitit ignores SIGTERM, so the first run trains on until the SIGKILL (about 4-5 s here):
    the steps are sized so that it is still running then."""
    progress = tmp_path / "progress.json"
    steps = 40
    job = _executor(slurm_cluster, tmp_path / "jobs").submit(
        train_with_progress_file, str(progress), steps, 0.25)

    def step() -> int:
        try:
            return json.loads(progress.read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    _wait_for(lambda: step() >= 4, 60, "the first run to reach step 4", slurm_cluster)
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    killed_at = step()
    _wait_for(lambda: "PENDING" in slurm_cluster.run("squeue", "-h", "-j", job.job_id, "-o", "%T"),
              30, "the requeued job to wait in the queue", slurm_cluster)
    stopped_at = step()
    assert stopped_at < steps, "the first run finished before the scheduler killed it"

    state = job.result()
    assert [a["restart"] for a in state["attempts"]] == [0, 1]
    first, second = state["attempts"]
    assert second["from_step"] == stopped_at >= killed_at >= 4  # resumed, not from zero
    assert state["step"] == steps
    assert second["done_steps"] == list(range(second["from_step"] + 1, steps + 1))
    # every step ran once, except at most the one in flight when the job was killed
    assert len(first["done_steps"]) + len(second["done_steps"]) == steps
    assert "DUE TO JOB REQUEUE" in job.stderr()


def test_checkpointable_job_hitting_its_time_limit_is_requeued_and_resumes(slurm_cluster,
                                                                           tmp_path):
    """The scheduler sends USR2 ``signal_delay_s`` before the 1-minute time limit; submitit
    checkpoints the Checkpointable and requeues it, and the second run goes on from the
    checkpointed step.

    slurmctld checks time limits every 30 s and signals at the first check within
    ``signal_delay_s`` + 30 s of the limit, so with 20 s the signal comes 10-40 s into the run
    (with 50 s it could come in the first second, before submitit's handler is installed)."""
    executor = _executor(slurm_cluster, tmp_path, timeout_min=1, slurm_signal_delay_s=20)
    job = executor.submit(TrainUntilTimeLimit(), 5, 0.2, 90)
    state = job.result()
    restarts = [a["restart"] for a in state["attempts"]]
    assert restarts == [0, 1], state
    assert state["attempts"][1]["from_step"] >= 10  # trained 10+ s before the signal
    assert state["step"] == state["attempts"][1]["from_step"] + 5
    assert "Caught signal SIGUSR2" in job.stderr()
    assert "Requeued job" in job.stdout()  # submitit's INFO lines go to stdout


def test_failing_job_is_reported_with_its_log(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path).submit(fail_with_value_error, "run-7")
    error = job.exception()
    assert isinstance(error, submitit.core.utils.FailedJobError)
    assert "ValueError: bad learning rate for run-7" in str(error)
    stderr = Path(job.paths.stderr)
    assert stderr.is_file() and stderr.parent == tmp_path
    text = stderr.read_text()
    assert "about to fail: run-7" in text and "ValueError: bad learning rate" in text


def test_job_dying_without_a_result_is_reported_through_the_scheduler_state(slurm_cluster,
                                                                             tmp_path):
    """No result pickle: submitit learns the end from ``sacct`` (the cluster's stand-in). Its
    own polling backs off (2, 4, 8, 16 s ... after the last submission); ``done(force_check=True)``
    asks at once. Without a result file submitit then waits ``_results_timeout_s`` (15 s, for
    slow shared file systems) before it reports the failure: cut short here."""
    job = _executor(slurm_cluster, tmp_path).submit(die_without_result)
    job._results_timeout_s = 1
    deadline = time.monotonic() + 60
    while not job.done(force_check=True):
        assert time.monotonic() < deadline, slurm_cluster.log_tails(15)
        time.sleep(1)
    assert job.state == "FAILED"
    error = job.exception()
    assert isinstance(error, submitit.core.utils.UncompletedJobError)
    assert "has not produced any output" in str(error) and "task 0: Killed" in str(error)
    assert "task 0: Killed" in Path(job.paths.stderr).read_text()
