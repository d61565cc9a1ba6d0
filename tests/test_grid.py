"""The experiment grid (handclip_nb/pipeline/grid.py, executors.py, runner.py): the grid file,
its expansion into linked runs, the local executor with --jobs 2 on an empty outputs/, reruns
that skip, and the same grid through a one-node Slurm cluster (tests/slurm_cluster.py): one
driver, a relaunched driver, a detached campaign. Failures are in test_grid_failures.py and
runs interrupted on Slurm in test_grid_requeue.py (separate modules, so that pytest -n 2 runs
them beside this one)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from handclip_nb.pipeline import executors
from handclip_nb.pipeline.cli import main
from handclip_nb.pipeline.executors import time_minutes
from handclip_nb.pipeline.grid import GridError, expand_grid, load_grid
from handclip_nb.pipeline.runner import run_grid

from grid_helpers import (METRIC_COLUMNS, ONE_SEED, TINY, grid_metrics, project_home,
                          seed0_metrics, slurm_home, submissions, write_grid)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the grid file


@pytest.mark.parametrize("name, runs, stage0", [("smoke", 7, 1), ("demo", 18, 2),
                                                ("clipfh-11k", 104, 8), ("clipfh-hd", 26, 2),
                                                ("ablation", 7, 1),
                                                ("clip-handid-ablation", 17, 1)])
def test_shipped_grids_expand_and_validate(name, runs, stage0):
    """Every shipped grid validates, and a pretrained backbone's zero-shot run is shared by the
    seeds (it does not depend on them): 11k = 4 aspects x 2 backbones zero-shot + 3 x 32
    (stages 1-3 and CLIP-HandID)."""
    expanded = expand_grid(load_grid(REPO / "params" / "grids" / f"{name}.yaml"))
    assert len(expanded) == runs
    assert sum(r.stage == "stage0" for r in expanded) == stage0
    names = [r.name for r in expanded]
    assert len(set(names)) == len(names)
    by_name = {r.name: r for r in expanded}
    for run in expanded:
        if run.stage == "stage2":  # each stage 2 reads its own combination's stage 1
            linked = by_name[run.links["stage1_dir"]]
            assert linked.stage == "stage1" and linked.axes.items() <= run.axes.items()


@pytest.mark.parametrize("name", ["clipfh-11k", "clipfh-hd"])
def test_the_clipfh_grids_let_cudnn_pick_its_fastest_kernels(name):
    """The campaign grids trade bit-repeatability on the GPU for cuDNN's autotuned kernels
    (docs/methods.md, "deterministic"): every trained run gets deterministic false."""
    for run in expand_grid(load_grid(REPO / "params" / "grids" / f"{name}.yaml")):
        if run.stage != "stage0":
            assert run.values["deterministic"] is False, run.name


def test_clipfh_runs_start_from_their_backbone_and_aspect_reference_file():
    runs = expand_grid(load_grid(REPO / "params" / "grids" / "clipfh-11k.yaml"))
    run = next(r for r in runs if r.name == "stage2-palmar_l-rn50-seed2")
    reference = yaml.safe_load((REPO / "params" / "rn50-palmar_l.yaml").read_text())
    # flat values: the reference file's stage-2 section applied, no sections left
    assert {k: run.values[k] for k in reference["stage2"]} == reference["stage2"]
    assert not any(k in run.values for k in ("stage1", "stage2", "stage3"))
    assert run.values["seed"] == 2 and run.values["backbone"] == "rn50"


def test_untrained_zero_shot_depends_on_the_seed_and_order_is_by_dependency(tmp_path):
    runs = expand_grid(load_grid(write_grid(tmp_path, TINY)))
    assert [r.name for r in runs] == ["stage0-seed0", "stage0-seed1", "stage1-seed0",
                                      "stage1-seed1", "stage2-seed0", "stage2-seed1"]


@pytest.mark.parametrize("change, message", [
    ({"axes": {"sed": [0]}}, "axis 'sed' is not a parameter"),
    ({"axes": {"seed": []}}, "axis 'seed' needs a non-empty list"),
    ({"axes": {"seed": [0, 0]}}, "lists a value twice"),
    ({"stages": ["stage2"]}, "stage2 reads stage 1's prompts: add stage1"),
    ({"stages": ["stage9"]}, "unknown stage"),
    ({"base": "params/{backbone}.yaml"}, "names ['backbone'], which are not axes"),
    ({"axes": {"num_splits": [0]}}, "combination {'num_splits': 0} for stage0"),
    ({"colour": 1}, "unknown key(s) ['colour']"),
    # the grid's own stage1/stage2 sections set lr: an lr axis would train identical runs
    ({"axes": {"lr": [1e-3, 1e-2]}}, "axis 'lr' is also set by tiny.yaml params, section "
                                     "'stage1' (key stage1.lr: 0.01)"),
    ({"slurm": {"job-name": "x"}}, "'job-name' is set by the grid itself"),
    ({"slurm": {"dependency": "afterok:1"}}, "'dependency' is set by the grid itself"),
    ({"slurm": {"bad key": 1}}, "'bad key' is not an sbatch option name"),
    ({"slurm": ["gpu"]}, "slurm must be a mapping of sbatch option"),
    # base as a mapping: one recipe per stage (method)
    ({"base": ["params/smoke.yaml"]}, "base must be a params file path or a mapping of stage"),
    ({"base": {"stage9": "params/smoke.yaml", "default": None}},
     "base: unknown key(s) ['stage9']; its keys are the stages of the grid"),
    ({"base": {"default": None, "stage3": "params/smoke.yaml"}},
     "base gives a file for ['stage3'], which the grid does not run: add it to stages or "
     "remove base.stage3"),
    ({"base": {"stage2": "params/smoke.yaml"}},
     "base gives no file for ['stage0', 'stage1']: add stage0: <file>, stage1: <file> or "
     "default: <file> to base (null: no base file)"),
    ({"base": {"default": 3}}, "base.default must be a params file path or null"),
    ({"base": {"default": None, "stage2": "params/{backbone}.yaml"}},
     "base.stage2 'params/{backbone}.yaml' names ['backbone'], which are not axes"),
    ({"base": {"default": None, "stage2": "params/nothere.yaml"}},
     "base params/nothere.yaml (for stage2) does not exist (looked in"),
])
def test_bad_grid_files_are_refused_before_anything_runs(tmp_path, change, message):
    body = {**TINY, **change}
    with pytest.raises(GridError) as info:
        expand_grid(load_grid(write_grid(tmp_path, body)))
    assert message in str(info.value) and "tiny.yaml" in str(info.value)


def test_grid_values_beat_the_base_files_sections_and_reach_the_notebook_flat(tmp_path):
    """An axis and a common value of the grid's params beat the base file's stage sections
    (as -p beats a -f file's); the grid's own sections merge over the base file's name by name;
    each run's papermill values are flat, so the notebook resolves what the grid planned."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"backbone": "tiny-vit",
                                    "stage2": {"triplet_weight": 0.5, "epochs": 7, "lr": 0.1}}))
    body = {"base": str(base), "params": {"epochs": 2, "stage2": {"lr": 0.2}},
            "axes": {"triplet_weight": [0.0, 1.0]}, "stages": ["stage0", "stage1", "stage2"]}
    runs = {r.name: r for r in expand_grid(load_grid(write_grid(tmp_path, body)))}
    assert sorted(n for n in runs if n.startswith("stage2")) == [
        "stage2-triplet_weight0.0", "stage2-triplet_weight1.0"]
    values = runs["stage2-triplet_weight1.0"].values
    assert (values["triplet_weight"], values["epochs"], values["lr"]) == (1.0, 2, 0.2)
    assert not any(k.startswith("stage") and isinstance(v, dict) for k, v in values.items())
    assert runs["stage1"].values["epochs"] == 2


def _recipes(tmp_path: Path) -> tuple[Path, Path]:
    """Two recipe files: ``a.yaml`` for every stage, ``b-<aspect>.yaml`` another method's
    (stage 3's) recipe per aspect, whose stage2 section must not reach a stage-2 run."""
    common = {"backbone": "tiny-vit", "synthetic_subjects": 12, "synthetic_images": 4,
              "image_size": [64, 96], "num_splits": 2}
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({**common, "stage2": {"lr": 0.1, "epochs": 3},
                                 "stage3": {"lr": 0.5, "epochs": 3}}))
    for aspect, lr in (("dorsal_r", 0.7), ("dorsal_l", 0.9)):
        (tmp_path / f"b-{aspect}.yaml").write_text(yaml.safe_dump(
            {**common, "stage2": {"lr": 123.0}, "stage3": {"lr": lr, "epochs": 5}}))
    return a, tmp_path / "b-{aspect}.yaml"


def test_each_stage_starts_from_its_own_base_file(tmp_path):
    """A grid holds several methods with their own recipes: stage 3 reads its own file (per
    aspect), the other stages the default file; identities and names stay unique, and the
    stages whose recipe did not change keep their identity."""
    a, b = _recipes(tmp_path)
    axes = {"aspect": ["dorsal_r", "dorsal_l"], "seed": [0, 1]}
    stages = ["stage0", "stage1", "stage2", "stage3"]
    body = {"base": {"default": str(a), "stage3": str(b)}, "axes": axes, "stages": stages}
    grid = load_grid(write_grid(tmp_path, body, "methods"))
    assert grid.base == {"stage0": str(a), "stage1": str(a), "stage2": str(a), "stage3": str(b)}
    runs = {r.name: r for r in expand_grid(grid)}
    assert len(runs) == 4 * 4  # untrained tiny-vit: every stage depends on aspect and seed
    for aspect, lr in (("dorsal_r", 0.7), ("dorsal_l", 0.9)):
        for seed in (0, 1):
            stage3 = runs[f"stage3-{aspect}-seed{seed}"].values
            assert (stage3["lr"], stage3["epochs"]) == (lr, 5)
            stage2 = runs[f"stage2-{aspect}-seed{seed}"].values
            assert (stage2["lr"], stage2["epochs"]) == (0.1, 3)  # not b's stage2 section
    keys = [r.key for r in runs.values()]
    assert len(set(keys)) == len(keys) and len(set(runs)) == len(runs)

    one = {r.name: r for r in expand_grid(load_grid(write_grid(
        tmp_path, {"base": str(a), "axes": axes, "stages": stages}, "one")))}
    assert one.keys() == runs.keys()
    for name, run in one.items():
        assert (run.key == runs[name].key) == (run.stage != "stage3"), name
    assert one["stage3-dorsal_r-seed0"].values["lr"] == 0.5


def test_a_null_base_entry_means_no_base_file_for_that_stage(tmp_path):
    a, _ = _recipes(tmp_path)
    body = {**TINY, "base": {"default": str(a), "stage1": None}}
    runs = {r.name: r for r in expand_grid(load_grid(write_grid(tmp_path, body)))}
    assert runs["stage2-seed0"].values["lr"] == TINY["params"]["stage2"]["lr"]  # params beat a
    assert runs["stage0-seed0"].values["synthetic_subjects"] == 12  # from a.yaml
    assert runs["stage1-seed0"].values["synthetic_subjects"] == 12  # TINY's params, no base
    body["params"] = {k: v for k, v in TINY["params"].items() if k != "synthetic_subjects"}
    with pytest.raises(GridError) as info:
        expand_grid(load_grid(write_grid(tmp_path, body)))
    # stage 1 has no base file now: its synthetic_subjects is the default, a.yaml's is 12
    assert ("stage2 (" + str(a) + ") has synthetic_subjects=12 but the stage1 run it reads "
            "(stage1_dir, from no base file) has synthetic_subjects=") in str(info.value)
    assert "tiny.yaml" in str(info.value) and "give both stages' base files the same" in str(
        info.value)


def test_an_axis_the_grids_own_section_also_sets_is_refused(tmp_path):
    body = {"params": {"backbone": "tiny-vit", "stage2": {"triplet_weight": 0.5}},
            "axes": {"triplet_weight": [0.0, 1.0]}, "stages": ["stage0", "stage1", "stage2"]}
    with pytest.raises(GridError) as info:
        load_grid(write_grid(tmp_path, body))
    assert ("axis 'triplet_weight' is also set by tiny.yaml params, section 'stage2' "
            "(key stage2.triplet_weight: 0.5)") in str(info.value)
    body["params"] = {"backbone": "tiny-vit", "epochs": 3, "stage2": {"epochs": 4}}
    body["axes"] = {"seed": [0]}
    with pytest.raises(GridError, match="'epochs' is set at the top level"):
        load_grid(write_grid(tmp_path, body))


def test_any_sbatch_option_reaches_submitit(tmp_path, monkeypatch):
    """A grid file's slurm mapping and --slurm-option pass any sbatch option through; the
    five named ones keep their submitit names."""
    monkeypatch.setattr(executors.submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    grid = load_grid(write_grid(tmp_path, {**TINY, "slurm": {"account": "proj42", "qos": "high",
                                                        "time": "01:00:00", "gpus": 1}}))
    from handclip_nb.pipeline.grid import slurm_settings

    settings = slurm_settings(grid, {"constraint": "a100", "reservation": "mine", "gpus": None})
    engine = executors.SlurmExecutor(tmp_path, settings)
    params = engine.executor._executor.parameters
    assert params["additional_parameters"] == {"account": "proj42", "qos": "high",
                                               "constraint": "a100", "reservation": "mine"}
    assert params["time"] == 60 and params["gpus_per_node"] == 1
    with pytest.raises(ValueError, match="'output' is set by the grid itself"):
        slurm_settings(grid, {"output": "/tmp/x"})


def test_a_slurm_time_shorter_than_the_checkpoint_lead_is_refused(tmp_path, monkeypatch):
    """The job is signalled SLURM_SIGNAL_DELAY_S before its limit: a limit inside twice that
    would leave it checkpointing instead of training."""
    monkeypatch.setattr(executors.submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    with pytest.raises(ValueError, match=r"slurm time 3 min: .* 120 s before .* --slurm-time 4"):
        executors.SlurmExecutor(tmp_path, {"time": 3})
    engine = executors.SlurmExecutor(tmp_path, {"time": 4})
    assert engine.executor._executor.parameters["signal_delay_s"] == 120


def test_slurm_time_limits():
    assert time_minutes(90) == 90
    assert time_minutes("04:00:00") == 240
    assert time_minutes("1-00:30") == 1470
    with pytest.raises(ValueError, match="HH:MM"):
        time_minutes("soon")


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The tiny grid with --jobs 2 on an empty project folder: the two seeds' runs start
    together and share the embedded dataset, the decoded-image and feature caches. Its
    ``one_seed`` grid file (the seed-0 runs alone) is what the Slurm tests run and compare with
    these runs' seed-0 metrics."""
    home = project_home(tmp_path_factory.mktemp("grid"))
    path = write_grid(home, TINY)
    mp = pytest.MonkeyPatch()
    mp.setenv("HANDCLIP_HOME", str(home))
    try:
        started = time.time()
        summary = run_grid(path, home / "grid", jobs=2, progress=False)
        seconds = time.time() - started
    finally:
        mp.undo()
    return {"home": home, "grid": path, "summary": summary, "seconds": seconds,
            "one_seed": write_grid(home, ONE_SEED, name="tiny-seed0")}


@pytest.mark.notebook
def test_local_grid_with_two_jobs_runs_everything_once(local_grid):
    summary, home = local_grid["summary"], local_grid["home"]
    assert summary.ok, summary.describe()
    assert sorted(summary.finished) == sorted(r.name for r in expand_grid(load_grid(
        local_grid["grid"])))
    table = pd.read_csv(summary.results_csv)
    assert len(table) == 6 and set(table["stage"]) == {"stage0", "stage1", "stage2"}
    assert table[METRIC_COLUMNS].notna().all().all()
    # generated once, atomically: one dataset folder (and the lock its builders took turns
    # on), no temp folders or torn cache entries left
    data = sorted(p.name for p in (home / "outputs" / "data").iterdir())
    folders = [name for name in data if not name.endswith(".lock")]
    assert len(folders) == 1 and ".tmp" not in folders[0], data
    assert data == [f".{folders[0]}.lock", folders[0]], data
    assert not list((home / "outputs").rglob("*.tmp"))
    assert summary.results_html.is_file()
    html = summary.results_html.read_text()
    assert "data:image/png;base64" in html
    # every training stage wrote its curves for TensorBoard
    assert list((home / "grid" / "runs" / "stage2-seed0" / "tensorboard").glob("events.*"))


@pytest.mark.notebook
def test_a_rerun_skips_finished_runs_and_reruns_only_what_changed(local_grid, tmp_path,
                                                                  monkeypatch):
    home, grid_file = local_grid["home"], local_grid["grid"]
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    again = run_grid(grid_file, home / "grid", jobs=2, progress=False)
    assert len(again.skipped) == 6 and not again.finished
    changed = {**TINY, "params": {**TINY["params"],
                                  "stage2": {**TINY["params"]["stage2"], "epochs": 1}}}
    # another grid file with same-named runs of other settings may not share the folder ...
    other = write_grid(tmp_path, changed)
    with pytest.raises(GridError, match=r"also holds grid .*tiny.yaml, whose run 'stage2-seed0' "
                                        r"\(2 clashing run\(s\) in all\) has other settings"):
        run_grid(other, home / "grid", jobs=2, progress=False, results=False)
    assert len(list((home / "grid" / "runs").glob("stage2-seed*/metrics.json"))) == 2
    # ... while the grid file itself, edited, re-runs what changed
    original = grid_file.read_text()
    try:
        grid_file.write_text(yaml.safe_dump(changed))
        third = run_grid(grid_file, home / "grid", jobs=2, progress=False, results=False)
    finally:
        grid_file.write_text(original)
    assert sorted(third.finished) == ["stage2-seed0", "stage2-seed1"]
    assert len(third.skipped) == 4


# --------------------------------------------------------------------------- Slurm


@pytest.mark.slurm
@pytest.mark.notebook
def test_the_grid_through_slurm_gives_the_local_metrics(slurm_cluster, local_grid,
                                                        monkeypatch):
    home = local_grid["home"]
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    summary = run_grid(local_grid["one_seed"], home / "slurm-grid", executor="slurm",
                       slurm={"time": 10, "cpus": 1}, progress=False)
    assert summary.ok, summary.describe()
    assert len(summary.finished) == 3
    jobs = sorted((home / "slurm-grid" / "slurm").glob("*_submitted.pkl"))
    assert len(jobs) == 3
    pd.testing.assert_frame_equal(grid_metrics(summary.results_csv),
                                  seed0_metrics(local_grid["summary"].results_csv))


def test_the_grid_driver_and_its_run_workers_start_without_importing_torch():
    """The driver (``python -m handclip_nb.pipeline``) and each run's worker process import
    the pipeline and papermill only; torch (2 s of every start on the 2-core machine) is the
    notebook kernel's to import."""
    code = ("import sys, handclip_nb.pipeline.cli, papermill; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert done.stdout.strip() == "[]", done.stdout


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


# --------------------------------------------------------------------------- campaign scale


def test_local_slots_use_the_gpus_the_user_made_visible_and_split_the_cores(tmp_path,
                                                                           monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,3 and --jobs 4: the slots go round GPUs 2 and 3 (not 0 and 1),
    and each slot's loader workers see its share of the cores, not the machine's."""
    monkeypatch.setattr(executors, "available_cpus", lambda: 16)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    engine = executors.LocalExecutor(tmp_path, jobs=4)
    envs = [engine.environment(slot) for slot in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3", "2", "3"]
    assert {e["HANDCLIP_CPUS"] for e in envs} == {"4"} and engine.threads == 4
    assert "GPUs 2,3" in engine.describe()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the user hid every GPU: none is given back
    hidden = executors.LocalExecutor(tmp_path, jobs=2)
    assert hidden.gpus == 0 and hidden.environment(1)["CUDA_VISIBLE_DEVICES"] == ""


def test_a_runs_share_of_the_cores_bounds_its_loader_workers(monkeypatch):
    from handclip_nb import device, host

    monkeypatch.setattr(host.os, "sched_getaffinity", lambda _: set(range(32)))
    monkeypatch.delenv("HANDCLIP_CPUS", raising=False)
    assert device.available_cpus() == 32 and device.default_num_workers("cpu") == 8
    monkeypatch.setenv("HANDCLIP_CPUS", "4")  # one of 8 runs side by side
    assert device.available_cpus() == 4 and device.default_num_workers("cpu") == 0


def test_a_missing_kernel_stops_the_run_naming_the_node_and_the_fix():
    from handclip_nb.pipeline.steps import check_kernel

    check_kernel("python3")  # installed by make install
    with pytest.raises(RuntimeError) as info:
        check_kernel("no-such-kernel")
    text = str(info.value)
    assert f"node {socket.gethostname()}: no Jupyter kernel named 'no-such-kernel'" in text
    assert "ipykernel install" in text and "--slurm-kernel" in text


def test_the_job_script_checks_the_nodes_python_first(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(executors.python_check("/no/such/venv/bin/python") + "\necho reached\n")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 3 and "reached" not in done.stdout
    assert (f"node {socket.gethostname()} has no Python at /no/such/venv/bin/python"
            in done.stderr) and "--slurm-python" in done.stderr
    script.write_text(executors.python_check(sys.executable) + "\necho reached\n")
    assert subprocess.run(["bash", str(script)], capture_output=True,
                          text=True).stdout == "reached\n"


@pytest.mark.notebook
def test_results_table_only_current_runs_and_list_the_stale_ones(local_grid, tmp_path,
                                                                  monkeypatch):
    """Stage 1's settings change and stage 1 then fails: the stage-2 folders still hold
    metrics from the old stage 1, which must not be tabled (listed as stale instead), and
    neither may a folder of a run the grid file no longer has."""
    home = tmp_path / "home"
    shutil.copytree(local_grid["home"], home, symlinks=True)
    shutil.rmtree(home / "grid" / ".grids")  # the copy is this test's own grid folder
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    shutil.copytree(home / "grid" / "runs" / "stage0-seed1", home / "grid" / "runs" / "stage0-old")
    changed = {**TINY, "params": {**TINY["params"],
                                  "stage1": {**TINY["params"]["stage1"],
                                             "weights": str(tmp_path / "missing.pt")}}}
    summary = run_grid(write_grid(tmp_path, changed), home / "grid", jobs=1, progress=False)
    assert set(summary.failed) == {"stage1-seed0", "stage1-seed1"}
    assert set(summary.not_run) == {"stage2-seed0", "stage2-seed1"}
    table = pd.read_csv(summary.results_csv)
    assert sorted(table["run"]) == ["stage0-seed0", "stage0-seed1"]
    stale = pd.read_csv(home / "grid" / "stale.csv").set_index("run")["reason"]
    assert set(stale.index) == {"stage2-seed0", "stage2-seed1", "stage0-old"}
    assert "with other inputs" in stale["stage2-seed0"] and "not a run of" in stale["stage0-old"]
    assert "stale (not tabled) stage2-seed0" in summary.describe()
    assert table["git_commit"].notna().all()
    from handclip_nb.pipeline.runner import grid_status

    status = grid_status(write_grid(tmp_path, changed), home / "grid")
    assert [r["run"] for r in status].count("stage2-seed0") == 1  # once, not again as stale
    states = {r["run"]: r["status"] for r in status}
    assert states == {"stage0-seed0": "finished", "stage0-seed1": "finished",
                      "stage1-seed0": "failed", "stage1-seed1": "failed",
                      "stage2-seed0": "outdated", "stage2-seed1": "outdated",
                      "stage0-old": "stale"}, states


# --------------------------------------------------------------------------- Slurm campaigns


@pytest.mark.slurm
@pytest.mark.notebook
def test_a_slurm_driver_killed_mid_grid_and_relaunched_submits_nothing_twice(
        slurm_cluster, local_grid, tmp_path):
    """SIGKILL the driver while its jobs run; the relaunched driver finds them (their leases
    name the jobs), waits for them and submits only what was never submitted: one submission
    per run, and the results of an uninterrupted run."""
    home, env = slurm_home(tmp_path)
    out = home / "grid"
    cmd = [sys.executable, "-m", "handclip_nb.pipeline", "--grid", str(local_grid["one_seed"]),
           "--output", str(out), "--executor", "slurm", "--slurm-time", "10",
           "--slurm-cpus", "1", "--no-progress"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    # the driver has submitted stage 1 once it says so: its lease names the job a moment
    # earlier, and may name it earlier still when the job starts at once and adopts the lease
    # itself (that race killed the driver before it printed the line this test asserts)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while (time.time() < deadline and first.poll() is None
           and not any("start stage1" in line for line in list(lines))):
        time.sleep(0.05)
    first.kill()
    first.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert "start stage1" in output, output
    submitted_before = submissions(out)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert "waiting for it" in second.stdout
    assert submitted_before >= 2 and submissions(out) == 3  # stage 0 and 1 had no wait
    pd.testing.assert_frame_equal(grid_metrics(out / "results.csv"),
                                  seed0_metrics(local_grid["summary"].results_csv))


@pytest.mark.slurm
@pytest.mark.notebook
def test_a_detached_grid_runs_without_its_driver(slurm_cluster, local_grid, tmp_path,
                                                 monkeypatch):
    """--detach submits all three runs at once with afterok dependencies and exits; --status
    follows them; running the command again collects the same results as a local run."""
    home, env = slurm_home(tmp_path)
    monkeypatch.setenv("HANDCLIP_HOME", str(home))
    out = home / "grid"
    grid = local_grid["one_seed"]
    base = ["--grid", str(grid), "--output", str(out), "--executor", "slurm",
            "--slurm-time", "10", "--slurm-cpus", "1", "--no-progress"]
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "handclip_nb.pipeline", *base, "--detach"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted 3 Slurm job(s) with dependencies" in done.stdout
    assert time.time() - started < 60  # it did not wait for the runs
    assert submissions(out) == 3
    from handclip_nb.pipeline.runner import grid_status

    statuses = {r["run"]: r["status"] for r in grid_status(grid, out)}
    assert set(statuses.values()) <= {"pending", "running", "finished"}, statuses
    assert statuses["stage2-seed0"] == "pending"  # waits for its stage 1
    deadline = time.time() + 420
    while time.time() < deadline:
        statuses = {r["run"]: r["status"] for r in grid_status(grid, out)}
        if set(statuses.values()) == {"finished"}:
            break
        assert not set(statuses.values()) & {"failed", "cancelled"}, statuses
        time.sleep(2)
    assert set(statuses.values()) == {"finished"}, statuses
    status = subprocess.run([sys.executable, "-m", "handclip_nb.pipeline", *base, "--status"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.count("finished") == 3, status.stdout
    collected = run_grid(grid, out, executor="slurm", slurm={"time": 10, "cpus": 1},
                         progress=False)
    assert len(collected.skipped) == 3 and submissions(out) == 3
    pd.testing.assert_frame_equal(grid_metrics(collected.results_csv),
                                  seed0_metrics(local_grid["summary"].results_csv))


