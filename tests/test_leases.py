"""One owner per run folder (handclip_nb/pipeline/leases.py): a lease is created by exactly one
of many processes, a live owner keeps it (its heartbeat, its pid, or Slurm holding its job),
a dead one is taken over, and the process that runs a run adopts its driver's lease or refuses
to touch a folder that someone else owns."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handclip_nb.pipeline import leases
from handclip_nb.pipeline.leases import LeaseHeld, adopt, claim, lease_path, owner_alive, read_lease


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _dead_lease(folder: Path, run: str) -> Path:
    """A lease of this host whose process has ended, with a fresh heartbeat."""
    path = lease_path(folder, run)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"token": "old", "run": run, "host": socket.gethostname(),
                                "pid": _dead_pid(), "heartbeat": time.time()}))
    return path


def test_a_second_claim_meets_the_live_owner(tmp_path):
    lease = claim(tmp_path, "stage2-seed0", grid="a.yaml", fingerprint="f1")
    assert read_lease(lease_path(tmp_path, "stage2-seed0"))["token"] == lease.token
    with pytest.raises(LeaseHeld) as info:
        claim(tmp_path, "stage2-seed0", grid="b.yaml", fingerprint="f2")
    assert info.value.record["fingerprint"] == "f1"
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(info.value)
    lease.release()
    assert read_lease(lease_path(tmp_path, "stage2-seed0")) is None
    claim(tmp_path, "stage2-seed0").release()  # free again


def test_a_lease_whose_process_died_is_taken_over(tmp_path):
    path = _dead_lease(tmp_path, "run")
    lease = claim(tmp_path, "run")
    assert lease.token != "old" and read_lease(path)["pid"] == os.getpid()
    assert not list(path.parent.glob("*.dead-*"))  # the dead lease is gone, not piled up


def test_a_lease_without_heartbeat_is_dead_and_one_that_beats_lives(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "STALE_AFTER_S", 0.5)
    lease = claim(tmp_path, "run")
    lease.start_heartbeat(every=0.1)
    time.sleep(1.0)
    assert owner_alive(read_lease(lease.path))  # beats every 0.1 s
    lease.stop_heartbeat()
    time.sleep(0.7)
    record = read_lease(lease.path)
    assert not owner_alive({**record, "host": "another-host"})  # silent too long
    other = {**record, "host": "another-host", "heartbeat": time.time()}
    assert owner_alive(other)  # another host's fresh heartbeat: its pid cannot be checked


def test_a_slurm_owner_lives_while_slurm_holds_its_job(tmp_path, monkeypatch):
    """A queued job has no process that beats: Slurm's word decides."""
    record = {"token": "t", "run": "r", "host": "login1", "pid": 1, "job_id": "77",
              "heartbeat": 0.0}
    monkeypatch.setattr(leases, "slurm_states", lambda refresh=False: {"77": "PENDING"})
    assert owner_alive(record)
    monkeypatch.setattr(leases, "slurm_states", lambda refresh=False: {"77": "REQUEUED"})
    assert owner_alive(record)
    monkeypatch.setattr(leases, "slurm_states", lambda refresh=False: {"77": "FAILED"})
    assert not owner_alive(record)
    monkeypatch.setattr(leases, "slurm_states", lambda refresh=False: {})  # purged
    assert not owner_alive(record)


def _claim_when_told(args) -> str:
    """Claim ``run`` as soon as the barrier file appears; hold the lease a moment."""
    folder, run, barrier_file = args
    while not Path(barrier_file).exists():
        time.sleep(0.001)
    try:
        lease = claim(Path(folder), run, fingerprint="f")
    except LeaseHeld:
        return "held"
    time.sleep(0.5)  # stay alive while the others try
    return lease.token


def _race(folder: Path, run: str) -> list[str]:
    go = folder / "go"
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pending = pool.map_async(_claim_when_told, [(str(folder), run, str(go))] * 8)
        time.sleep(0.3)
        go.touch()
        return pending.get(timeout=60)


def test_of_many_processes_claiming_at_once_exactly_one_wins(tmp_path):
    outcomes = _race(tmp_path, "shared")
    assert len([o for o in outcomes if o != "held"]) == 1, outcomes


def test_of_many_processes_taking_over_a_dead_lease_exactly_one_wins(tmp_path):
    _dead_lease(tmp_path, "dead")
    outcomes = _race(tmp_path, "dead")
    assert len([o for o in outcomes if o != "held"]) == 1, outcomes


def test_the_runner_adopts_its_drivers_lease_and_refuses_anyone_elses(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "slurm_states", lambda refresh=False: {"123": "RUNNING"})
    driver = claim(tmp_path, "run", grid="g.yaml", fingerprint="f")
    worker = adopt(tmp_path, "run", driver.token, job_id="123")
    record = read_lease(driver.path)
    assert record["token"] == driver.token and record["job_id"] == "123"
    with pytest.raises(LeaseHeld, match="Slurm job 123"):
        adopt(tmp_path, "run", "some-other-token")
    worker.release()
    # a token whose lease is gone (released, or removed by hand): the run claims a new one
    fresh = adopt(tmp_path, "run", driver.token)
    assert fresh.token != driver.token
    fresh.release()


def test_a_rerun_inside_the_same_slurm_job_takes_over_its_ended_process(tmp_path, monkeypatch):
    """A step that failed in an interactive allocation keeps its lease (Slurm holds the job);
    run again in that allocation, it is not refused by its own ended process."""
    monkeypatch.setattr(leases, "slurm_states", lambda refresh=False: {"55": "RUNNING"})
    record = {"token": "t", "run": "r", "host": socket.gethostname(), "pid": _dead_pid(),
              "job_id": "55", "heartbeat": 0.0}
    monkeypatch.setenv("SLURM_JOB_ID", "56")
    assert owner_alive(record)  # another job's lease: Slurm's word
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    assert not owner_alive(record)
    assert owner_alive({**record, "pid": os.getpid()})
