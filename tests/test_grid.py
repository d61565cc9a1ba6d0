"""The experiment grid (handclip_nb/pipeline/grid.py, executors.py, runner.py): the grid file,
its expansion into linked runs, the local executor with --jobs 2 on an empty outputs/, reruns
that skip, failures that are reported, and the same grid through a one-node Slurm cluster
(tests/slurm_cluster.py) with a job requeued by the scheduler mid-training."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
import yaml

from handclip_nb.pipeline import executors
from handclip_nb.pipeline.cli import main
from handclip_nb.pipeline.executors import time_minutes
from handclip_nb.pipeline.grid import GridError, expand_grid, load_grid
from handclip_nb.pipeline.runner import run_grid

REPO = Path(__file__).resolve().parents[1]
METRIC_COLUMNS = ["rank1_mean", "rank5_mean", "rank10_mean", "mAP_mean", "mAP_mbanet_mean",
                  "mINP_mean", "rank1_std", "mAP_std"]

#: A grid that runs in seconds per run: untrained tiny-vit (its zero-shot ranking depends on
#: the seed that initialises it), 12 synthetic people, stages 0-2.
TINY = {
    "params": {"backbone": "tiny-vit", "num_splits": 2, "batch_size": 32,
               "synthetic_subjects": 12, "synthetic_images": 4, "image_size": [64, 96],
               "stage1": {"epochs": 2, "lr": 1.0e-2, "warmup_epochs": 1},
               "stage2": {"epochs": 2, "lr": 3.0e-3, "warmup_epochs": 1, "milestones": [1],
                          "p_ids": 4, "k_images": 2}},
    "axes": {"seed": [0, 1]},
    "stages": ["stage0", "stage1", "stage2"],
}


def _grid(tmp_path: Path, body: dict, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# --------------------------------------------------------------------------- the grid file


@pytest.mark.parametrize("name, runs, stage0", [("smoke", 7, 1), ("demo", 14, 2),
                                                ("clipfh-11k", 80, 8), ("clipfh-hd", 20, 2)])
def test_shipped_grids_expand_and_validate(name, runs, stage0):
    """Every shipped grid validates, and a pretrained backbone's zero-shot run is shared by the
    seeds (it does not depend on them): 11k = 4 aspects x 2 backbones zero-shot + 3 x 24."""
    expanded = expand_grid(load_grid(REPO / "params" / "grids" / f"{name}.yaml"))
    assert len(expanded) == runs
    assert sum(r.stage == "stage0" for r in expanded) == stage0
    names = [r.name for r in expanded]
    assert len(set(names)) == len(names)
    for run in expanded:
        if run.stage == "stage2":  # each stage 2 reads its own combination's stage 1
            assert run.links == {"stage1_dir": run.name.replace("stage2", "stage1", 1)}


def test_clipfh_runs_start_from_their_backbone_and_aspect_reference_file():
    runs = expand_grid(load_grid(REPO / "params" / "grids" / "clipfh-11k.yaml"))
    run = next(r for r in runs if r.name == "stage2-palmar_l-rn50-seed2")
    reference = yaml.safe_load((REPO / "params" / "rn50-palmar_l.yaml").read_text())
    assert run.values["stage2"] == reference["stage2"] and run.values["seed"] == 2


def test_untrained_zero_shot_depends_on_the_seed_and_order_is_by_dependency(tmp_path):
    runs = expand_grid(load_grid(_grid(tmp_path, TINY)))
    assert [r.name for r in runs] == ["stage0-seed0", "stage0-seed1", "stage1-seed0",
                                      "stage1-seed1", "stage2-seed0", "stage2-seed1"]


@pytest.mark.parametrize("change, message", [
    ({"axes": {"sed": [0]}}, "axis 'sed' is not a parameter"),
    ({"axes": {"seed": []}}, "axis 'seed' needs a non-empty list"),
    ({"axes": {"seed": [0, 0]}}, "lists a value twice"),
    ({"stages": ["stage2"]}, "stage2 reads stage 1's prompts: add stage1"),
    ({"stages": ["stage9"]}, "unknown stage"),
    ({"base": "params/{backbone}.yaml"}, "names ['backbone'], which are not axes"),
    ({"axes": {"lr": [-1.0]}}, "combination {'lr': -1.0} for stage0"),
    ({"colour": 1}, "unknown key(s) ['colour']"),
])
def test_bad_grid_files_are_refused_before_anything_runs(tmp_path, change, message):
    body = {**TINY, **change}
    with pytest.raises(GridError) as info:
        expand_grid(load_grid(_grid(tmp_path, body)))
    assert message in str(info.value) and "tiny.yaml" in str(info.value)


def test_slurm_time_limits():
    assert time_minutes(90) == 90
    assert time_minutes("04:00:00") == 240
    assert time_minutes("1-00:30") == 1470
    with pytest.raises(ValueError, match="HH:MM"):
        time_minutes("soon")


# --------------------------------------------------------------------------- running


def _metrics(csv: Path) -> pd.DataFrame:
    table = pd.read_csv(csv).set_index("run").sort_index()
    return table[METRIC_COLUMNS]


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The tiny grid with --jobs 2 on an empty project folder: the two seeds' runs start
    together and share the embedded dataset, the decoded-image and feature caches."""
    home = tmp_path_factory.mktemp("grid-home")
    (home / "handclip_nb").mkdir()
    (home / "notebooks").mkdir()
    path = _grid(home, TINY)
    mp = pytest.MonkeyPatch()
    mp.setenv("HANDCLIP_HOME", str(home))
    try:
        started = time.time()
        summary = run_grid(path, home / "grid", jobs=2, progress=False)
        seconds = time.time() - started
    finally:
        mp.undo()
    return {"home": home, "grid": path, "summary": summary, "seconds": seconds}


@pytest.mark.notebook
def test_local_grid_with_two_jobs_runs_everything_once(local_grid):
    summary, home = local_grid["summary"], local_grid["home"]
    assert summary.ok, summary.describe()
    assert sorted(summary.finished) == sorted(r.name for r in expand_grid(load_grid(
        local_grid["grid"])))
    table = pd.read_csv(summary.results_csv)
    assert len(table) == 6 and set(table["stage"]) == {"stage0", "stage1", "stage2"}
    assert table[METRIC_COLUMNS].notna().all().all()
    # generated once, atomically: one dataset folder, no temp folders or torn cache entries left
    data = sorted(p.name for p in (home / "outputs" / "data").iterdir())
    assert len(data) == 1 and ".tmp" not in data[0], data
    assert not list((home / "outputs").rglob("*.tmp"))
    assert summary.results_html.is_file()
    html = summary.results_html.read_text()
    assert "data:image/png;base64" in html
    # every training stage wrote its curves for TensorBoard
    assert list((home / "grid" / "runs" / "stage2-seed0" / "tensorboard").glob("events.*"))


@pytest.mark.notebook
def test_a_rerun_skips_finished_runs_and_reruns_only_what_changed(local_grid, tmp_path,
                                                                  monkeypatch):
    home = local_grid["home"]
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    again = run_grid(local_grid["grid"], home / "grid", jobs=2, progress=False)
    assert len(again.skipped) == 6 and not again.finished
    changed = {**TINY, "params": {**TINY["params"],
                                  "stage2": {**TINY["params"]["stage2"], "epochs": 1}}}
    path = _grid(tmp_path, changed)
    third = run_grid(path, home / "grid", jobs=2, progress=False, results=False)
    assert sorted(third.finished) == ["stage2-seed0", "stage2-seed1"]
    assert len(third.skipped) == 4


@pytest.mark.notebook
def test_a_failing_run_is_reported_with_its_log_and_stops_only_its_dependents(tmp_path,
                                                                              monkeypatch):
    home = tmp_path / "home"
    (home / "handclip_nb").mkdir(parents=True)
    (home / "notebooks").mkdir()
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    body = {**TINY, "axes": {"weights": [None, str(tmp_path / "missing.pt")]},
            "stages": ["stage0", "stage1", "stage2"]}
    path = _grid(tmp_path, body)
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


# --------------------------------------------------------------------------- Slurm


@pytest.mark.slurm
@pytest.mark.notebook
def test_the_grid_through_slurm_gives_the_local_metrics(slurm_cluster, local_grid,
                                                        monkeypatch):
    home = local_grid["home"]
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    summary = run_grid(local_grid["grid"], home / "slurm-grid", executor="slurm",
                       slurm={"time": 10, "cpus": 1}, progress=False)
    assert summary.ok, summary.describe()
    assert len(summary.finished) == 6
    jobs = sorted((home / "slurm-grid" / "slurm").glob("*_submitted.pkl"))
    assert len(jobs) == 6
    pd.testing.assert_frame_equal(_metrics(summary.results_csv),
                                  _metrics(local_grid["summary"].results_csv))


@pytest.mark.slurm
@pytest.mark.notebook
def test_a_job_requeued_by_the_scheduler_resumes_from_its_checkpoint(slurm_cluster, tmp_path,
                                                                      monkeypatch):
    """scontrol requeue kills the stage-2 job after its first epoch; Slurm starts it again and
    the notebook resumes from checkpoints/last.pt, ending with the metrics of a run that was
    never interrupted."""
    home = tmp_path / "home"
    (home / "handclip_nb").mkdir(parents=True)
    (home / "notebooks").mkdir()
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    body = {**TINY, "axes": {"seed": [0]},
            "params": {**TINY["params"], "stage2": {**TINY["params"]["stage2"], "epochs": 40}}}
    path = _grid(tmp_path, body)
    out = home / "grid"
    proc = subprocess.Popen([sys.executable, "-m", "handclip_nb.pipeline", "--grid", str(path),
                             "--output", str(out), "--executor", "slurm", "--slurm-time", "10",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    last = out / "runs" / "stage2-seed0" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.is_file(), "stage 2 never wrote its first checkpoint"
    job_id = _job_of(out, "stage2-seed0")
    slurm_cluster.run("scontrol", "requeue", job_id)
    output, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, output
    assert "3 finished (1 of them resumed)" in output, output
    log = Path(next((out / "slurm").glob(f"{job_id}_0_log.out"))).read_text()
    assert "attempt 2 (requeued by the scheduler)" in log, log[-2000:]
    executed = (out / "runs" / "stage2-seed0.ipynb").read_text()
    assert "resuming stage2 from" in executed
    # the interrupted run ends where an uninterrupted one does
    local = run_grid(path, home / "local", jobs=1, progress=False)
    pd.testing.assert_frame_equal(_metrics(out / "results.csv"), _metrics(local.results_csv))


def _job_of(out: Path, run: str) -> str:
    """The Slurm job id of a grid run, from submitit's pickled submissions."""
    for _ in range(100):
        for pkl in (out / "slurm").glob("*_submitted.pkl"):
            try:
                with open(pkl, "rb") as f:
                    name = cloudpickle.load(f).function.spec["name"]
            except Exception:  # a pickle still being written: try again
                continue
            if name == run:
                return pkl.name.split("_")[0]
        time.sleep(0.2)
    raise AssertionError(f"no Slurm job for {run}")


def test_grid_cli_needs_an_output(capsys):
    with pytest.raises(SystemExit):
        main(["--grid", "params/grids/smoke.yaml"])
    assert "--grid needs --output" in capsys.readouterr().err


def test_grid_and_base_files_are_found_from_another_folder(tmp_path, monkeypatch):
    """A shipped grid named relative to the checkout works from any folder and with
    $HANDCLIP_HOME elsewhere (its base params file too); a missing one names where it looked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HANDCLIP_HOME", str(tmp_path))
    assert len(expand_grid(load_grid("params/grids/smoke.yaml"))) == 7
    with pytest.raises(GridError, match=r"nothere.yaml does not exist \(looked in .*tmp"):
        load_grid("params/grids/nothere.yaml")


def test_local_threads_split_the_cores_or_are_pinned(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "available_cpus", lambda: 8)
    assert executors.LocalExecutor(tmp_path, jobs=2).threads == 4
    assert executors.LocalExecutor(tmp_path, jobs=3).threads == 2
    assert executors.LocalExecutor(tmp_path, jobs=2, threads=1).threads == 1
