"""Run folders: atomic writes, provenance, the metrics.json schema."""
import json
import os

import pytest
import yaml

from handclip_nb import runs
from handclip_nb.params import resolve_params


def _metrics(value=50.0):
    block = {k: {"mean": value, "std": 0.0, "per_split": [value]} for k in runs.METRIC_NAMES}
    return {"stage": "stage0", "dataset": "11k", "aspect": "dorsal_r", "backbone": "tiny-vit",
            "num_splits": 1, "test": block,
            "data": {k: 1 for k in runs.REQUIRED_DATA_KEYS}}


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "x.json"
    runs.atomic_write_json(p, {"a": 1})
    runs.atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert os.listdir(p.parent) == ["x.json"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    p = tmp_path / "x.json"
    runs.atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        runs.atomic_write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_start_and_finish_run_record_provenance(workbench_home):
    params = resolve_params(seed=5)
    run = runs.start_run(params)
    assert run.output_dir == workbench_home / params.output_dir
    record = yaml.safe_load((run.output_dir / "params.yaml").read_text())
    assert record["params"]["seed"] == 5
    assert record["environment"]["packages"]["torch"]
    assert "git_commit" in record["environment"]
    assert not run.metrics_path.exists()
    runs.finish_run(run, _metrics())
    m = runs.read_metrics(run.output_dir)
    assert m["provenance"]["seed"] == 5 and "git_commit" in m["provenance"]
    assert m["seconds"] >= 0


def test_a_run_records_the_torch_thread_count_it_computed_with(workbench_home, one_thread):
    """Results differ in their last digits between thread counts: params.yaml says which."""
    run = runs.start_run(resolve_params(seed=1))
    record = yaml.safe_load((run.output_dir / "params.yaml").read_text())
    assert record["environment"]["torch_threads"] == 1


def test_restarting_a_run_removes_the_stale_metrics(workbench_home):
    params = resolve_params()
    run = runs.start_run(params)
    runs.finish_run(run, _metrics())
    runs.start_run(params)
    with pytest.raises(FileNotFoundError, match="has not finished"):
        runs.read_metrics(run.output_dir)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda m: m.pop("data"), "lack"),
    (lambda m: m["test"].pop("mINP"), "mINP"),
    (lambda m: m["test"].pop("mAP_mbanet"), "mAP_mbanet.*MBA-Net's trapezoid"),
    (lambda m: m["test"]["mAP_mbanet"].pop("per_split"), "mAP_mbanet must hold"),
    (lambda m: m["test"]["mAP_mbanet"].update(per_split=[101.0]), "percentage"),
    (lambda m: m["test"]["rank1"].update(mean=0.9 * 200), "percentage"),
    (lambda m: m["data"].pop("queries_per_split"), "queries_per_split"),
])
def test_metrics_schema_is_enforced(workbench_home, mutate, fragment):
    run = runs.start_run(resolve_params())
    m = _metrics()
    mutate(m)
    with pytest.raises(ValueError, match=fragment):
        runs.finish_run(run, m)
    assert not run.metrics_path.exists()


def test_metric_names_hold_both_aps_beside_each_other():
    assert runs.METRIC_NAMES == ("rank1", "rank5", "rank10", "mAP", "mAP_mbanet", "mINP")


def test_project_root_prefers_env(workbench_home):
    assert runs.project_root() == workbench_home
    assert runs.resolve_path("outputs/x") == workbench_home / "outputs" / "x"
    assert runs.resolve_path("/abs") == runs.Path("/abs")


def test_atomic_write_uses_normal_file_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        p = runs.atomic_write_text(tmp_path / "m.json", "{}")
    finally:
        os.umask(mask)
    assert (p.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600


@pytest.fixture
def cudnn_flags():
    """Restore cuDNN's global flags after a test that sets them."""
    import torch

    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield torch.backends.cudnn
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_deterministic_parameter_sets_the_cudnn_kernels(workbench_home, cudnn_flags,
                                                            deterministic):
    """deterministic=True (the default): cuDNN's deterministic kernels, no autotuning;
    False: benchmark mode (the fastest kernel per shape). Recorded in params.yaml, part of the
    run's identity (it changes a GPU run's bits)."""
    from handclip_nb.params import SCHEMA, run_identity

    cudnn_flags.benchmark, cudnn_flags.deterministic = deterministic, not deterministic
    params = resolve_params(stage="stage2", deterministic=deterministic)
    run = runs.start_run(params)
    assert cudnn_flags.deterministic is deterministic
    assert cudnn_flags.benchmark is (not deterministic)
    record = yaml.safe_load((run.output_dir / "params.yaml").read_text())
    assert record["params"]["deterministic"] is deterministic
    assert run_identity(params)["deterministic"] is deterministic
    assert SCHEMA["deterministic"].default_for("stage2") is True


def test_the_training_stages_seed_with_the_deterministic_parameter(cudnn_flags):
    """A stage re-seeds at its start (seed_run): the run's choice holds even when an earlier
    run in the same kernel chose otherwise."""
    cudnn_flags.benchmark, cudnn_flags.deterministic = False, True
    runs.seed_run({"seed": 3, "deterministic": False})
    assert cudnn_flags.benchmark and not cudnn_flags.deterministic
    runs.seed_run({"seed": 3})  # a mapping without it: the default, deterministic
    assert not cudnn_flags.benchmark and cudnn_flags.deterministic
