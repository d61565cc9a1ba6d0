"""Several runs on one GPU (handclip_nb/pipeline/executors.py: plan_slots, LocalExecutor's
runs_per_gpu, GridJobGroup; handclip_nb/device.py: HANDCLIP_GPU_MEMORY_FRACTION): the slots and
their environments, the refusals with the numbers, the per-process memory cap, and two runs side
by side on this CPU ending with the metrics of the same runs run alone."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from handclip_nb import device
from handclip_nb.pipeline import executors
from handclip_nb.pipeline.cli import main
from handclip_nb.pipeline.executors import GridJobGroup, LocalExecutor, SlurmExecutor
from handclip_nb.pipeline.runner import (GridSummary, _groups, _plan, run_grid,
                                         running_per_device)

from grid_helpers import project_home

#: Two training runs that finish in seconds: stage 1 of the untrained tiny-vit on 12
#: synthetic people, seeds 0 and 1, bit-repeatable (deterministic, one thread each).
PAIR = {
    "params": {"backbone": "tiny-vit", "num_splits": 2, "batch_size": 32,
               "synthetic_subjects": 12, "synthetic_images": 4, "image_size": [64, 96],
               "deterministic": True,
               "stage1": {"epochs": 2, "lr": 1.0e-2, "warmup_epochs": 1}},
    "axes": {"seed": [0, 1]},
    "stages": ["stage1"],
}


# --------------------------------------------------------------------------- slots


def test_two_gpus_with_two_runs_each_make_four_slots_two_per_gpu(tmp_path, monkeypatch):
    """gpus 2,3 and --runs-per-gpu 2: 4 slots, each GPU in two of them, each slot capped at
    half its GPU's memory and given a quarter of the 16 cores; the summary says so."""
    monkeypatch.setattr(executors, "available_cpus", lambda: 16)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    engine = LocalExecutor(tmp_path, runs_per_gpu=2)
    assert engine.capacity == 4 and engine.threads == 4
    envs = [engine.environment(slot) for slot in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3", "2", "3"]
    assert {e[device.GPU_SHARE_ENV] for e in envs} == {"0.5"}
    assert {e[device.CPU_SHARE_ENV] for e in envs} == {"4"}
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"4"}
    assert engine.layout() == [
        "GPU 2: 2 run(s) at a time (slot(s) 0, 2), each capped at 1/2 of its memory, "
        "4 core(s) each",
        "GPU 3: 2 run(s) at a time (slot(s) 1, 3), each capped at 1/2 of its memory, "
        "4 core(s) each"]
    # one run per GPU: the whole GPU, no cap (and none inherited from the driver's environment)
    monkeypatch.setenv(device.GPU_SHARE_ENV, "0.25")
    alone = LocalExecutor(tmp_path, runs_per_gpu=1)
    assert alone.capacity == 2
    assert all(device.GPU_SHARE_ENV not in alone.environment(s) for s in range(2))


def test_without_a_gpu_the_cpu_is_the_one_device(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "available_cpus", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    engine = LocalExecutor(tmp_path, runs_per_gpu=2)
    assert engine.capacity == 2 and engine.threads == 4
    env = engine.environment(1)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and device.GPU_SHARE_ENV not in env
    assert engine.layout() == ["CPU: 2 run(s) at a time (slot(s) 0, 1), 4 core(s) each"]


@pytest.mark.parametrize("kwargs, message", [
    ({"runs_per_gpu": 0}, "--runs-per-gpu must be >= 1, got 0"),
    ({"runs_per_gpu": 5}, r"--runs-per-gpu 5 makes 10 runs at once \(5 per GPU x 2 GPUs\), but "
                          r"this process may use 6 core\(s\).*Use --runs-per-gpu 3 or fewer"),
    ({"runs_per_gpu": 2, "jobs": 3}, r"--jobs 3 and --runs-per-gpu 2 on 2 GPU\(s\) \(4 runs at a "
                                     r"time\) disagree"),
    ({"runs_per_gpu": 3, "run_memory_gib": 30},
     r"--runs-per-gpu 3: 3 runs on GPU 0 x 30 GiB per run = 90 GiB, more than its 80.0 GiB\. "
     r"Use --runs-per-gpu 2 or fewer"),
])
def test_a_k_that_cannot_fit_is_refused_with_the_numbers(tmp_path, monkeypatch, kwargs,
                                                          message):
    monkeypatch.setattr(executors, "available_cpus", lambda: 6)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(executors, "gpu_memory_gib", lambda devices: {d: 80.0 for d in devices})
    with pytest.raises(ValueError, match=message):
        LocalExecutor(tmp_path, **kwargs)
    # the same K with memory to spare is fine
    if "run_memory_gib" in kwargs:
        assert LocalExecutor(tmp_path, runs_per_gpu=2, run_memory_gib=30).capacity == 4


def test_a_slurm_job_cannot_hold_more_runs_than_its_cpus(tmp_path):
    with pytest.raises(ValueError, match=r"--slurm-runs-per-job 4 with 2 CPU\(s\) per job.*"
                                         r"--slurm-runs-per-job 2 or fewer, or --slurm-cpus 4"):
        SlurmExecutor(tmp_path, {"cpus": 2}, runs_per_job=4)
    with pytest.raises(ValueError, match="--slurm-runs-per-job must be >= 1, got 0"):
        SlurmExecutor(tmp_path, {}, runs_per_job=0)
    engine = SlurmExecutor(tmp_path, {"cpus": 8, "gpus": 1}, runs_per_job=4)
    assert engine.capacity == 4 * engine.jobs
    assert engine.layout() == ["Slurm: up to 4 runs per job on its GPU(s), each capped at 1/4 "
                               "of the GPU's memory, 2 core(s) each"]


def test_inside_a_job_the_runs_share_its_gpu_and_granted_cores(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    group = GridJobGroup([{"name": f"r{i}"} for i in range(4)])
    slots = group.slots()
    assert [(s.device, s.threads, s.memory_fraction) for s in slots] == [("0", 2, 0.25)] * 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    with pytest.raises(ValueError, match=r"--slurm-runs-per-job 4 makes 4 runs at once.*3 "
                                         r"core\(s\)"):
        group.slots()


def test_the_cli_refuses_bad_ks_early(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump(PAIR))
    for argv, message in ((["--runs-per-gpu", "0"], "--runs-per-gpu must be >= 1, got 0"),
                          (["--slurm-runs-per-job", "0"], "--slurm-runs-per-job must be >= 1"),
                          (["--run-memory-gib", "0"], "--run-memory-gib must be > 0"),
                          (["--executor", "slurm", "--runs-per-gpu", "2"],
                           "--runs-per-gpu is for --executor local"),
                          (["--slurm-runs-per-job", "2"], "--slurm-runs-per-job is for "
                                                          "--executor slurm")):
        with pytest.raises(SystemExit):
            main(["--grid", str(grid), "--output", str(tmp_path / "out"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_a_slurm_job_never_holds_a_run_and_a_run_it_reads(tmp_path):
    """``_groups``: K runs to a job, in order; a dependent starts a new job."""

    class Run:
        def __init__(self, name, up=()):
            self.name, self._up = name, list(up)

        def upstream(self):
            return self._up

    class Engine:
        runs_per_job = 2

    items = [(Run("a"), None, {}), (Run("b"), None, {}), (Run("c"), None, {}),
             (Run("d", ["c"]), None, {}), (Run("e"), None, {})]
    groups = [[r.name for r, _, _ in g] for g in _groups(Engine(), items)]
    assert groups == [["a", "b"], ["c"], ["d", "e"]]
    assert [[r.name for r, _, _ in g] for g in _groups(object(), items)] == [[n] for n in "abcde"]


def test_status_counts_the_running_runs_on_each_gpu():
    rows = [{"run": "a", "status": "running", "share": "GPU 2"},
            {"run": "b", "status": "running", "share": "GPU 2"},
            {"run": "c", "status": "running", "share": "GPU 3"},
            {"run": "d", "status": "finished", "share": ""}]
    assert running_per_device(rows) == "GPU 2: 2 runs, GPU 3: 1 run"
    summary = GridSummary(output=Path("x"), layout=["GPU 2: 2 run(s) at a time"])
    assert "[grid]   GPU 2: 2 run(s) at a time" in summary.describe()


# --------------------------------------------------------------------------- the memory cap


def test_the_memory_share_caps_every_cuda_device_once(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda share, index: calls.append((share, index)))
    monkeypatch.setattr(device, "_SHARED_DEVICES", set())
    monkeypatch.delenv(device.GPU_SHARE_ENV, raising=False)
    device.resolve_device("cuda")
    assert calls == []  # no share: the whole GPU
    monkeypatch.setenv(device.GPU_SHARE_ENV, "0.25")
    for name in ("cuda", "auto", "cuda:0", "cuda:1"):
        assert device.resolve_device(name).type == "cuda"
    assert calls == [(0.25, 0), (0.25, 1)]
    for bad in ("0", "1.5", "half"):
        monkeypatch.setenv(device.GPU_SHARE_ENV, bad)
        monkeypatch.setattr(device, "_SHARED_DEVICES", set())
        with pytest.raises(ValueError, match=f"HANDCLIP_GPU_MEMORY_FRACTION='{bad}': expected "
                                             r"this process's share .* in \(0, 1\]"):
            device.resolve_device("cuda")


# --------------------------------------------------------------------------- side by side


#: metrics.json fields that record when and how long, not what: left out of the comparison
CLOCK_FIELDS = frozenset({"seconds", "seconds_per_epoch", "started", "finished"})


def _without_clocks(value):
    if isinstance(value, dict):
        return {k: _without_clocks(v) for k, v in value.items() if k not in CLOCK_FIELDS}
    if isinstance(value, list):
        return [_without_clocks(v) for v in value]
    return value


def _run_metrics(runs_dir: Path) -> dict:
    """Each run's metrics.json, every figure (losses per epoch, validation, test metrics)."""
    return {path.parent.name: _without_clocks(json.loads(path.read_text()))
            for path in sorted(runs_dir.glob("*/metrics.json"))}


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The two runs one after the other, one thread each: the reference."""
    home = project_home(tmp_path_factory.mktemp("alone"))
    grid = home / "pair.yaml"
    grid.write_text(yaml.safe_dump(PAIR))
    patch = pytest.MonkeyPatch()
    patch.setenv("HANDCLIP_HOME", str(home))
    try:
        started = time.time()
        summary = run_grid(grid, home / "alone", jobs=1, threads=1, progress=False,
                           results=False)
        seconds = time.time() - started
    finally:
        patch.undo()
    assert summary.ok, summary.describe()
    return {"home": home, "grid": grid, "seconds": seconds,
            "metrics": _run_metrics(home / "alone" / "runs")}


@pytest.mark.notebook
def test_two_runs_side_by_side_give_the_metrics_of_each_run_alone(alone, tmp_path, monkeypatch):
    """--runs-per-gpu 2 on this CPU (one thread each, as two runs on 2 cores get) against the
    same two runs one after the other with one thread: metrics.json equal, every figure;
    then the same two runs as one Slurm job's group (GridJobGroup, called here), and a
    requeued group: the finished run is skipped, the interrupted one resumes."""
    home, grid, alone_s = alone["home"], alone["grid"], alone["seconds"]
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    started = time.time()
    side = run_grid(grid, home / "side", runs_per_gpu=2, threads=1, progress=False,
                    results=False)
    side_s = time.time() - started
    assert side.ok, side.describe()
    assert sorted(side.finished) == ["stage1-seed0", "stage1-seed1"]
    assert side.layout == ["CPU: 2 run(s) at a time (slot(s) 0, 1), 1 core(s) each"]
    assert set(side.placement.values()) == {"slot 0, CPU, 1 core(s)", "slot 1, CPU, 1 core(s)"}
    reference = alone["metrics"]
    assert len(reference) == 2 and _run_metrics(home / "side" / "runs") == reference
    print(f"\n[runs-per-gpu] 2 runs alone {alone_s:.1f} s, side by side {side_s:.1f} s "
          f"(ratio {side_s / alone_s:.2f})")

    # one Slurm job's worth: the group runs both specs as its workers, each with its own log
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")  # one core each, as above
    plan = _plan(grid, home / "group")
    plan.runs_dir.mkdir(parents=True)
    specs = [plan.specs[r.name] for r in plan.runs]
    result = GridJobGroup(specs)()
    assert result["runs"] == {"stage1-seed0": 0, "stage1-seed1": 0}
    assert _run_metrics(plan.runs_dir) == reference
    logs = home / "group" / "logs"
    assert "stage1-seed1: finished" in (logs / "stage1-seed1.log").read_text()
    # requeued after seed 1 was interrupted: seed 0 is skipped, seed 1 resumes from last.pt
    state = plan.runs_dir / ".pipeline" / "stage1-seed1.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "status": "running"}))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert GridJobGroup(specs)()["runs"] == {"stage1-seed0": 0, "stage1-seed1": 0}
    assert "stage1-seed0: skipped" in (logs / "stage1-seed0.log").read_text()
    assert "stage1-seed1: resumed" in (logs / "stage1-seed1.log").read_text()
    assert _run_metrics(plan.runs_dir) == reference


@pytest.mark.slurm
@pytest.mark.notebook
def test_one_slurm_job_runs_both_runs_with_their_own_logs_and_results(slurm_cluster, alone,
                                                                      monkeypatch):
    """--slurm-runs-per-job 2 on the one-node cluster: one job (one submission), two runs
    side by side in it on its 2 CPUs, each with its own log and the metrics of the run alone."""
    home = alone["home"]
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    out = home / "slurm-pair"
    summary = run_grid(alone["grid"], out, executor="slurm", slurm={"time": 10, "cpus": 2},
                       slurm_runs_per_job=2, progress=False, results=False)
    assert summary.ok, summary.describe()
    assert sorted(summary.finished) == ["stage1-seed0", "stage1-seed1"]
    assert len(list((out / "slurm").glob("*_submitted.pkl"))) == 1
    jobs = {where.split(",")[0] for where in summary.placement.values()}
    assert len(jobs) == 1 and next(iter(jobs)).startswith("Slurm job ")
    assert "Slurm: up to 2 runs per job" in summary.describe()
    for name in ("stage1-seed0", "stage1-seed1"):
        assert f"[grid] {name}: finished" in (out / "logs" / f"{name}.log").read_text()
    assert _run_metrics(out / "runs") == alone["metrics"]


def test_at_submitits_signal_the_job_passes_it_to_its_runs_then_requeues(tmp_path):
    """GridJobGroup.checkpoint: every worker still running gets the signal (a worker that
    catches it, as a run saving its checkpoint would, writes a mark and ends), the job waits
    for it, and the same group is resubmitted (submitit's DelayedSubmission)."""
    import pickle
    import signal
    import subprocess
    import sys

    import submitit

    mark = tmp_path / "signalled"
    worker = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time, pathlib\n"
        f"def stop(*_): pathlib.Path({str(mark)!r}).write_text('saved'); sys.exit(0)\n"
        f"signal.signal(signal.{submitit.JobEnvironment._usr_sig().name}, stop)\n"
        f"pathlib.Path({str(mark)!r} + '.ready').write_text('')\n"
        "time.sleep(60)\n")])
    deadline = time.time() + 30
    while not Path(f"{mark}.ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    group = GridJobGroup([{"name": "a"}, {"name": "b"}])
    group._workers = [worker]
    started = time.time()
    resubmission = group.checkpoint()
    assert worker.poll() == 0 and mark.read_text() == "saved"
    assert time.time() - started < GridJobGroup.FORWARD_WAIT_S
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    assert resubmission.function.names == ["a", "b"]
    # what submitit pickles for the requeued job holds no processes of this attempt
    assert pickle.loads(pickle.dumps(resubmission.function))._workers == []
    assert signal.SIGUSR2 == submitit.JobEnvironment._usr_sig()


def test_detach_puts_k_runs_in_a_job_and_each_job_waits_for_what_its_runs_read(tmp_path,
                                                                               monkeypatch):
    """--detach with --slurm-runs-per-job 2 (submission faked): jobs of at most 2 runs, a run
    never in its stage 1's job, every job after the jobs of what its runs read, and every
    lease naming its job."""
    from handclip_nb.pipeline import runner
    from handclip_nb.pipeline.leases import lease_path, read_lease

    body = {**PAIR, "axes": {"seed": [0, 1, 2]}, "stages": ["stage1", "stage2"],
            "params": {**PAIR["params"], "stage2": {"epochs": 1, "p_ids": 4, "k_images": 2}}}
    grid = tmp_path / "six.yaml"
    grid.write_text(yaml.safe_dump(body))
    plan = _plan(grid, tmp_path / "out")
    plan.runs_dir.mkdir(parents=True)
    engine = SlurmExecutor(tmp_path / "out", {"cpus": 2}, runs_per_job=2)
    submitted = []

    class Handle:
        def __init__(self, name, job_id):
            self.name, self.job_id, self.where = name, job_id, ""

    def start_group(specs, after=()):
        submitted.append(([s["name"] for s in specs], list(after)))
        return [Handle(s["name"], str(len(submitted))) for s in specs]

    monkeypatch.setattr(engine, "start_group", start_group)
    monkeypatch.setattr(engine, "start", lambda spec, after=(): start_group([spec], after)[0])
    summary = GridSummary(output=plan.out)
    runner._submit_all(plan, engine, summary)
    assert submitted == [(["stage1-seed0", "stage1-seed1"], []),
                         (["stage1-seed2", "stage2-seed0"], ["1"]),
                         (["stage2-seed1", "stage2-seed2"], ["1", "2"])]
    assert summary.submitted == {"stage1-seed0": "1", "stage1-seed1": "1", "stage1-seed2": "2",
                                 "stage2-seed0": "2", "stage2-seed1": "3", "stage2-seed2": "3"}
    for name, job in summary.submitted.items():
        record = read_lease(lease_path(plan.runs_dir, name))
        assert record["job_id"] == job and record["job_name"].endswith("-and-1")
