"""Evaluation across runs: the run-folder loader (stage 0/2/3), in-domain re-evaluation that
reproduces each run's own metrics, cross-aspect and cross-dataset tests, flip TTA and
re-ranking, tables (CSV, markdown), figures, the evaluation run's metrics.json, clear errors,
the ``runs`` parameter, and the notebook through papermill.

The runs are tiny (tiny-vit, one epoch, 12 synthetic people) and built once per module."""
import json
import shutil

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from builders import run_params

from handclip_nb.data import build_protocol
from handclip_nb import viz
from handclip_nb.evaluate import compare, evaluate_backbone, metrics_record, tables, tsne
from handclip_nb.run_loader import RunInfo, load_run
from handclip_nb.runs import RunFolderError
from handclip_nb.evaluate.reranking import rerank_features
from handclip_nb.models import build_backbone
from handclip_nb.params import ParamError, resolve_params
from handclip_nb.runs import METRIC_NAMES, finish_run, read_metrics, start_run

COMMON = dict(batch_size=32)
TRAIN = dict(epochs=1, p_ids=4, k_images=2, milestones=[1])


@pytest.fixture(scope="module")
def runs(synthetic_11k, tmp_path_factory):
    """Finished stage-0, stage-2 and stage-3 run folders (and the trained models), plus an
    unfinished one, all trained on 11k dorsal_r."""
    from handclip_nb.train.stage1 import train_stage1
    from handclip_nb.train.stage2 import evaluate_model, load_stage1_prompts, train_stage2
    from handclip_nb.train.stage3 import evaluate_stage3, train_stage3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")

    def finished(stage, extra, make):
        p = run_params(stage, root / stage, synthetic_11k, **{**COMMON, **extra})
        run = start_run(p)
        protocol = build_protocol(p)
        protocol.write_manifest(run.output_dir / "splits.json")
        bb = build_backbone("tiny-vit", image_size=p.image_size, seed=p.seed)
        model, results, trained_by = make(p, protocol, bb)
        finish_run(run, metrics_record(stage, p, protocol, results, bb, trained_by=trained_by))
        return model

    out = {"root": root}
    out["stage0_backbone"] = finished("stage0", {}, lambda p, pr, bb: (
        bb, evaluate_backbone(bb, pr, p), None))
    p1 = run_params("stage1", root / "stage1", synthetic_11k, epochs=1, **COMMON)
    start_run(p1)
    bb1 = build_backbone("tiny-vit", image_size=p1.image_size, seed=0)
    train_stage1(p1, p1.output_dir, build_protocol(p1), bb1, progress=False)

    def stage2(p, protocol, bb):
        r = train_stage2(p, p.output_dir, protocol, bb, load_stage1_prompts(p1.output_dir, bb, protocol),
                         progress=False)
        return r.model, evaluate_model(r.model, protocol, p), "stage-2 fine-tuning"

    def stage3(p, protocol, bb):
        r = train_stage3(p, p.output_dir, protocol, bb, progress=False)
        return r.model, evaluate_stage3(r.model, protocol, p), "PromptSG training"

    out["stage2_model"] = finished("stage2", {**TRAIN, "stage1_dir": p1.output_dir}, stage2)
    out["stage3_model"] = finished("stage3", TRAIN, stage3)
    start_run(run_params("stage0", root / "unfinished", synthetic_11k, **COMMON))
    torch.set_num_threads(threads)
    return out


def _eval_params(data_root, **kw):
    return run_params("evaluation", None, data_root, **{**COMMON, **kw})


# ----------------------------------------------------------------------------- loader


def test_load_run_rebuilds_each_stage(runs, one_thread):
    x = torch.randn(3, 3, 96, 128)
    s0 = load_run(runs["root"] / "stage0", device="cpu")
    assert s0.info.stage == "stage0" and s0.model is None and s0.info.trained_on == "zero-shot"
    with torch.no_grad():
        assert torch.allclose(s0.embed(x),
                              runs["stage0_backbone"].encode_image(x).global_embedding)

    s2 = load_run(runs["root"] / "stage2", device="cpu")
    assert s2.info.stage == "stage2" and s2.info.trained_on == "11k/dorsal_r"
    assert "stage-2" in s2.info.backbone_display and "untrained" in s2.info.backbone_display
    with torch.no_grad():
        assert torch.allclose(s2.embed(x), runs["stage2_model"].embed(x), atol=1e-5)
        # it is not simply the backbone: the fine-tuned encoder and the head are loaded
        assert not torch.allclose(s2.embed(x)[:, -64:], s0.embed(x), atol=1e-3)

    s3 = load_run(runs["root"] / "stage3", device="cpu")
    assert s3.info.prompt_mode == "simplified" and s3.model.aspect == "dorsal_r"
    with torch.no_grad():
        assert torch.allclose(s3.embed(x), runs["stage3_model"].embed(x), atol=1e-5)
    assert s2.cache_tag and s3.cache_tag and s2.cache_tag != s3.cache_tag
    assert s3.info.params["image_size"] == [96, 128]


def test_in_domain_reevaluation_reproduces_each_runs_own_metrics(runs, synthetic_11k,
                                                                  one_thread):
    folders = [runs["root"] / s for s in ("stage0", "stage2", "stage3")]
    params = _eval_params(synthetic_11k, runs=[str(f) for f in folders])
    evaluations = compare.evaluate_runs(params)
    assert [e.name for e in evaluations] == ["stage0", "stage2", "stage3"]
    for e, folder in zip(evaluations, folders):
        recorded = read_metrics(folder)["test"]
        for m in METRIC_NAMES:
            np.testing.assert_allclose(e.summary[m]["per_split"], recorded[m]["per_split"],
                                       atol=1e-6, err_msg=f"{e.name} {m}")
        record = e.record()
        assert record["same_protocol_as_run"] is True and record["cross_domain"] is False
        assert record["tested_on"] == "11k/dorsal_r" and record["gallery_mode"] == "all"
    assert evaluations[1].seen_test_people == 0 and evaluations[0].seen_test_people is None


def test_cross_aspect_evaluation(runs, synthetic_11k, one_thread):
    """Trained on dorsal_r, tested on palmar_l with its own gallery only."""
    params = _eval_params(synthetic_11k, aspect="palmar_l", gallery_mode="aspect",
                          runs=[str(runs["root"] / "stage0"), str(runs["root"] / "stage3")])
    s0, s3 = compare.evaluate_runs(params)
    assert s3.info.trained_on == "11k/dorsal_r" and s3.tested_on == "11k/palmar_l"
    assert s3.cross_domain and not s0.cross_domain
    assert s3.record()["same_protocol_as_run"] is False
    protocol = s3.protocol
    assert {protocol.items[i].aspect for s in protocol.test for i in (*s.query, *s.gallery)} \
        == {"palmar_l"}
    assert len(s3.test.splits) == 2 and len(protocol.test[0].gallery) == 6  # 6 test people
    for m in METRIC_NAMES:
        assert 0 <= s3.summary[m]["mean"] <= 100
    assert s3.seen_test_people == 0  # the synthetic people split the same way in every aspect


def test_seen_test_people_counts_training_people_in_the_test_set(runs, synthetic_11k,
                                                                 tmp_path):
    protocol = build_protocol(_eval_params(synthetic_11k))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "splits.json").write_text(json.dumps(
        {"train_people": [*protocol.test_people[:2], "someone else"]}))
    info = RunInfo(name="r", folder=str(folder), stage="stage2",
                           params={"dataset": "11k", "aspect": "dorsal_l"}, recorded=None,
                           backbone_display="x")
    assert compare._seen_test_people(info, protocol) == 2
    hd_info = RunInfo(**{**info.__dict__, "params": {"dataset": "hd"}})
    assert compare._seen_test_people(hd_info, protocol) == 0


def test_cross_dataset_evaluation_on_hd_with_distractors(runs, synthetic_hd, one_thread):
    params = _eval_params(synthetic_hd, dataset="hd",
                          runs=[str(runs["root"] / "stage2"), str(runs["root"] / "stage3")])
    s2, s3 = compare.evaluate_runs(params)
    assert s2.tested_on == "hd" and s2.info.trained_on == "11k/dorsal_r" and s2.cross_domain
    sizes = s2.protocol.sizes()
    distractors = sum(it.distractor for it in s2.protocol.items)
    assert distractors > 0 and sizes["gallery_per_split"] == sizes["test_ids"] + distractors
    assert s3.settings["prompt_mode"] == "simplified"
    assert s2.seen_test_people == 0
    assert s3.summary["mAP"]["mean"] > 0


def test_flip_tta_and_rerank_change_the_ranking_as_configured(runs, synthetic_11k, one_thread):
    folder = str(runs["root"] / "stage2")
    plain = compare.evaluate_runs(_eval_params(synthetic_11k, runs=[folder]))[0]
    flip = compare.evaluate_runs(_eval_params(synthetic_11k, runs=[folder], flip_tta=True))[0]
    assert flip.settings["flip_tta"] and not torch.allclose(flip.features, plain.features)
    reranked = compare.evaluate_runs(_eval_params(synthetic_11k, runs=[folder], rerank=True,
                                                  rerank_k1=5, rerank_k2=2,
                                                  rerank_lambda=0.5))[0]
    assert reranked.settings["rerank"] == {"k1": 5, "k2": 2, "lambda_value": 0.5}
    first = reranked.test.splits[0]
    q = plain.features[[plain.row_of[i] for i in first.split.query]]
    g = plain.features[[plain.row_of[i] for i in first.split.gallery]]
    np.testing.assert_allclose(first.distmat, rerank_features(q, g, k1=5, k2=2,
                                                              lambda_value=0.5), atol=1e-6)
    table = tables.comparison_table([plain, reranked])
    assert list(table["rerank"]) == ["off", "k1=5 k2=2 λ=0.5"]


def test_default_runs_are_zero_shot_plus_finished_default_folders(runs, synthetic_11k,
                                                                  workbench_home, one_thread):
    params = _eval_params(synthetic_11k)
    only = compare.evaluate_runs(params)
    assert [e.name for e in only] == ["zero-shot tiny-vit"] and only[0].info.folder is None
    target = workbench_home / "outputs" / "stage2-11k-dorsal_r-tiny-vit-seed0"
    shutil.copytree(runs["root"] / "stage2", target)
    both = compare.evaluate_runs(params)
    assert [e.name for e in both] == ["zero-shot tiny-vit", target.name]
    np.testing.assert_allclose(both[0].summary["mAP"]["per_split"],
                               read_metrics(runs["root"] / "stage0")["test"]["mAP"]["per_split"])


# ----------------------------------------------------------------------------- tables, figures


def test_comparison_table_from_metrics_json_csv_and_markdown(runs, tmp_path):
    folders = [runs["root"] / "stage0", runs["root"] / "stage2"]
    table = tables.comparison_table(folders)
    assert list(table.index) == ["stage0", "stage2"]
    assert list(table["trained_on"]) == ["zero-shot", "11k/dorsal_r"]
    for m in METRIC_NAMES:
        recorded = read_metrics(folders[1])["test"][m]
        assert table.loc["stage2", f"{m}_mean"] == pytest.approx(recorded["mean"], abs=1e-4)
        assert table.loc["stage2", f"{m}_std"] == pytest.approx(recorded["std"], abs=1e-4)
    shown = tables.format_table(table)
    r = read_metrics(folders[1])["test"]["mAP"]
    assert shown.loc["stage2", "mAP"] == f"{r['mean']:.2f} ± {r['std']:.2f}"
    r = read_metrics(folders[1])["test"]["mAP_mbanet"]
    assert shown.loc["stage2", "mAP (MBA-Net)"] == f"{r['mean']:.2f} ± {r['std']:.2f}"
    assert shown.loc["stage0", "seen_test_people"] == "–"

    paths = tables.write_tables(table, tmp_path / "out")
    back = pd.read_csv(paths["csv"], index_col="run")
    for column in ("mAP_mean", "mAP_std", "mAP_mbanet_mean", "mAP_mbanet_std"):
        np.testing.assert_allclose(back[column], table[column])
    md = paths["md"].read_text().splitlines()
    assert md[0].startswith("| run | stage |") and "| mAP | mAP (MBA-Net) |" in md[0]
    assert md[2].startswith("| stage0 | stage0 |") and "±" in md[3]
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic: no temp files left


def test_figures_are_created(runs, synthetic_11k, one_thread):

    params = _eval_params(synthetic_11k, runs=[str(runs["root"] / s)
                                               for s in ("stage0", "stage2")])
    evaluations = compare.evaluate_runs(params)
    figures = {
        "cmc": viz.plot_cmc(compare.cmc_curves(evaluations)),
        "splits": viz.plot_split_boxes(tables.split_values(evaluations)),
        "tsne": viz.plot_tsne(tsne.tsne_by_run(evaluations, max_ids=4, seed=0)),
        **viz.failure_figures(evaluations, k=3, n_queries=2),
    }
    assert set(figures) == {"cmc", "splits", "tsne", "failures_stage0", "failures_stage2"}
    for fig in figures.values():
        assert isinstance(fig, matplotlib.figure.Figure)
    assert len(figures["cmc"].axes[0].lines) == 2
    assert len(figures["splits"].axes) == 3  # rank1, mAP, mINP
    assert len(figures["tsne"].axes) == 2
    points = tsne.tsne_points(evaluations[0], max_ids=4, seed=0)
    protocol, split = evaluations[0].protocol, evaluations[0].protocol.test[0]
    expected = [i for i in (*split.query, *split.gallery)
                if protocol.items[i].person in set(points["person"])
                and protocol.items[i].aspect == "dorsal_r"]  # the "all" gallery's others left out
    assert points["points"].shape == (len(expected), 2)
    assert points["gallery"].sum() == 4 and len(set(points["person"])) == 4
    assert viz.failure_figures(evaluations, n_queries=0) == {}
    values = tables.split_values(evaluations)
    assert len(values) == 2 * len(METRIC_NAMES) * 2  # runs x metrics x splits
    for fig in figures.values():
        plt.close(fig)


def test_evaluation_record_is_a_valid_metrics_json(runs, synthetic_11k, tmp_path, one_thread):
    params = _eval_params(synthetic_11k, output_dir=str(tmp_path / "eval"),
                          runs=[str(runs["root"] / s) for s in ("stage2", "stage0")])
    run = start_run(params)
    protocol = build_protocol(params)
    evaluations = compare.evaluate_runs(params, protocol)
    written = tables.write_tables(tables.comparison_table(evaluations), run.output_dir)
    finish_run(run, compare.evaluation_record(params, protocol, evaluations, written))
    m = read_metrics(tmp_path / "eval")
    assert m["stage"] == "evaluation" and m["primary_run"] == "stage2"
    assert m["test"] == evaluations[0].summary and m["tables"] == {"csv": "comparison.csv",
                                                                  "md": "comparison.md"}
    assert [r["run"] for r in m["runs"]] == ["stage2", "stage0"]
    assert m["runs"][0]["recorded_test_mean"]["mAP"] == pytest.approx(
        evaluations[0].summary["mAP"]["mean"])
    # an evaluation folder in a table expands into its runs
    table = tables.comparison_table([tmp_path / "eval"])
    assert list(table.index) == ["stage2", "stage0"]
    with pytest.raises(ValueError, match="no evaluated runs"):
        compare.evaluation_record(params, protocol, [])


def _without_mbanet(folder):
    """Rewrite ``folder``'s metrics.json as a run written before mAP_mbanet was recorded."""
    path = folder / "metrics.json"
    m = json.loads(path.read_text())
    for record in [m, *m.get("runs", [])]:
        record["test"].pop("mAP_mbanet")
        record.get("val", {}).pop("mAP_mbanet", None)
        (record.get("recorded_test_mean") or {}).pop("mAP_mbanet", None)
    path.write_text(json.dumps(m))


def _finished_metrics(stage, values):
    block = {k: {"mean": v, "std": 1.0, "per_split": [v - 1.0, v + 1.0]}
             for k, v in values.items()}
    return {"stage": stage, "dataset": "11k", "aspect": "dorsal_r", "backbone": "tiny-vit",
            "num_splits": 2, "test": block, "ap_mode": "standard",
            "data": {k: 1 for k in ("train_ids", "train_images", "test_ids", "test_images",
                                    "queries_per_split", "gallery_per_split")}}


def test_tables_read_run_folders_written_before_mbanet_map(tmp_path):
    """A metrics.json without ``mAP_mbanet`` (older runs) still gives a row: NaN numbers,
    ``not recorded`` in the formatted view, no per-split rows; newer runs keep both APs."""
    new = {"rank1": 60.0, "rank5": 80.0, "rank10": 90.0, "mAP": 50.0, "mAP_mbanet": 40.0,
           "mINP": 30.0}
    old = {k: v for k, v in new.items() if k != "mAP_mbanet"}
    for name, values in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(_finished_metrics("stage2",
                                                                                   values)))
    table = tables.comparison_table([tmp_path / "old", tmp_path / "new"])
    assert np.isnan(table.loc["old", "mAP_mbanet_mean"]) and np.isnan(
        table.loc["old", "mAP_mbanet_std"])
    assert table.loc["new", "mAP_mbanet_mean"] == 40.0 and table.loc["old", "mAP_mean"] == 50.0
    shown = tables.format_table(table)
    assert shown.loc["old", "mAP (MBA-Net)"] == "not recorded"
    assert shown.loc["new", "mAP (MBA-Net)"] == "40.00 ± 1.00"
    assert shown.loc["old", "mAP"] == "50.00 ± 1.00"
    paths = tables.write_tables(table, tmp_path / "out")
    back = pd.read_csv(paths["csv"], index_col="run")
    assert np.isnan(back.loc["old", "mAP_mbanet_mean"]) and back.loc["new", "mAP_mbanet_mean"] == 40
    assert "not recorded" in paths["md"].read_text()
    values = tables.split_values([tmp_path / "old", tmp_path / "new"])
    assert len(values[values["run"] == "old"]) == 2 * len(old)
    assert len(values[values["run"] == "new"]) == 2 * len(new)
    shown = viz.metrics_table({"old": _finished_metrics("stage2", old)["test"],
                               "new": _finished_metrics("stage2", new)["test"]})
    assert list(shown.columns) == ["rank1", "rank5", "rank10", "mAP", "mAP (MBA-Net)", "mINP"]
    assert shown.loc["old", "mAP (MBA-Net)"] == "not recorded"


def test_evaluation_reads_run_folders_written_before_mbanet_map(runs, synthetic_11k, tmp_path,
                                                                one_thread):
    """An older stage-2 folder (and an older evaluation folder) is evaluated and tabled; the
    re-evaluation records both APs, the recorded means simply lack mAP_mbanet."""
    old = tmp_path / "old-stage2"
    shutil.copytree(runs["root"] / "stage2", old)
    _without_mbanet(old)
    params = _eval_params(synthetic_11k, output_dir=str(tmp_path / "eval"), runs=[str(old)])
    run = start_run(params)
    protocol = build_protocol(params)
    (evaluation,) = compare.evaluate_runs(params, protocol)
    assert set(evaluation.summary) == set(METRIC_NAMES)
    record = evaluation.record()
    assert "mAP_mbanet" not in record["recorded_test_mean"]
    assert record["recorded_test_mean"]["mAP"] == pytest.approx(evaluation.summary["mAP"]["mean"])
    finish_run(run, compare.evaluation_record(params, protocol, [evaluation]))
    _without_mbanet(tmp_path / "eval")  # an evaluation folder written before the change
    table = tables.comparison_table([tmp_path / "eval", old])
    assert table["mAP_mbanet_mean"].isna().all() and not table["mAP_mean"].isna().any()
    assert set(tables.format_table(table)["mAP (MBA-Net)"]) == {"not recorded"}


# ----------------------------------------------------------------------------- errors


def test_missing_or_unfinished_run_folders_fail_clearly(runs, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RunFolderError, match=f"{missing}.*does not exist.*Fix"):
        load_run(missing)
    with pytest.raises(RunFolderError, match="no params.yaml"):
        load_run(tmp_path)
    unfinished = runs["root"] / "unfinished"
    with pytest.raises(RunFolderError) as err:
        load_run(unfinished)
    msg = str(err.value)
    assert str(unfinished) in msg and "metrics.json" in msg and "has not finished" in msg
    assert "resume true" in msg and "leave it out" in msg
    with pytest.raises(RunFolderError, match="has not finished"):
        tables.comparison_table([unfinished])
    with pytest.raises(ValueError, match="nothing to compare"):
        tables.comparison_table([])


def test_evaluate_runs_checks_every_folder_before_building_a_model(runs, synthetic_11k,
                                                                   monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("a model was built before the folders were checked")

    monkeypatch.setattr(compare, "load_run", no_build)
    params = _eval_params(synthetic_11k, runs=[str(runs["root"] / "stage2"),
                                               str(runs["root"] / "unfinished")])
    with pytest.raises(RunFolderError, match="unfinished"):
        compare.evaluate_runs(params)


def test_runs_without_an_image_model_of_their_own_are_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="stage-1 run.*zero-shot backbone"):
        compare.check_evaluable(_finished_copy(runs["root"] / "stage1", tmp_path / "s1"))
    att = _finished_copy(runs["root"] / "stage0", tmp_path / "att",
                         stage="attention", stage3_dir="outputs/s3")
    with pytest.raises(ValueError, match="attention run.*outputs/s3"):
        compare.check_evaluable(att)
    with pytest.raises(ValueError, match="attention run.*outputs/s3"):
        load_run(att)
    no_best = _finished_copy(runs["root"] / "stage2", tmp_path / "s2")
    (no_best / "checkpoints" / "best.pt").unlink()
    with pytest.raises(RunFolderError, match="checkpoints/best.pt.*epochs=0"):
        load_run(no_best)


def test_checkpoint_that_does_not_fit_the_run_is_refused(runs, tmp_path, one_thread):
    from handclip_nb.checkpoint import CheckpointError

    # a stage-2 folder whose params.yaml claims another backbone than its checkpoint
    other = _finished_copy(runs["root"] / "stage2", tmp_path / "s2", backbone="tiny-rn")
    with pytest.raises(CheckpointError, match="backbone: checkpoint has 'tiny-vit'"):
        load_run(other, device="cpu")
    # ... or another image size than the one it was trained at
    resized = _finished_copy(runs["root"] / "stage3", tmp_path / "s3", image_size=[64, 96])
    with pytest.raises(CheckpointError, match="'visual' state does not fit"):
        load_run(resized, device="cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "params.yaml").write_text("note: hand-written\n")
    (bare / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match="holds no resolved parameters"):
        load_run(bare)


def _finished_copy(source, target, **param_changes):
    """A copy of a run folder with a metrics.json and edited params.yaml entries."""
    import yaml

    shutil.copytree(source, target)
    record = yaml.safe_load((target / "params.yaml").read_text())
    record["params"].update(param_changes)
    (target / "params.yaml").write_text(yaml.safe_dump(record))
    if not (target / "metrics.json").exists():
        shutil.copy(source.parent / "stage0" / "metrics.json", target / "metrics.json")
    return target


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("value,expected", [
    (None, None), ([], []), ("outputs/a", ["outputs/a"]),
    ("[outputs/a, /b/c]", ["outputs/a", "/b/c"]),
    (["x", "y"], ["x", "y"]), ("[]", []), (("x",), ["x"]),
])
def test_runs_parameter_coercion(value, expected):
    assert resolve_params({"runs": value}, stage="evaluation")["runs"] == expected


@pytest.mark.parametrize("value,why", [
    (3, "expected a list of folders"), ([1, "a"], "entry 1 is not a non-empty path"),
    (["a", " "], "is not a non-empty path"), (["a", "a"], "a listed more than once"),
    ("[a, [b]", "expected a list of folders"), ({"a": 1}, "expected a list of folders"),
])
def test_runs_parameter_errors_name_the_parameter(value, why):
    with pytest.raises(ParamError, match=f"parameter 'runs'.*{why}"):
        resolve_params({"runs": value}, stage="evaluation")


def test_evaluation_parameters_are_validated_and_scoped():
    p = resolve_params({}, stage="evaluation")
    assert (p.rerank, p.rerank_k1, p.rerank_k2, p.rerank_lambda) == (False, 20, 6, 0.3)
    assert p.tsne is True and p.failure_queries == 6 and p.runs is None
    assert p.output_dir.startswith("outputs/evaluation-11k-dorsal_r-")
    with pytest.raises(ParamError, match="parameter 'rerank_lambda'.*must be <= 1"):
        resolve_params({"rerank_lambda": 1.5}, stage="evaluation")
    with pytest.raises(ParamError, match="parameter 'rerank_k1'.*must be >= 1"):
        resolve_params({"rerank_k1": 0}, stage="evaluation")
    # a shared parameter file may hold it, but only the evaluation stage takes it
    assert "runs" not in resolve_params({"runs": ["a"]}, stage="stage2")


# ----------------------------------------------------------------------------- notebook


@pytest.mark.notebook
@pytest.mark.usefixtures("kernel_threads")
def test_evaluation_notebook_standalone_with_smoke_parameters(workbench_home):
    """runs=None: the zero-shot backbone on the embedded synthetic hands, every figure."""
    from handclip_nb.pipeline import run_notebook

    out = workbench_home / "outputs" / "eval"
    executed = run_notebook("evaluation.ipynb", workbench_home / "eval.ipynb",
                            {"num_splits": 2, "synthetic_subjects": 12, "synthetic_images": 4,
                             "batch_size": 32, "backbone": "tiny-vit", "output_dir": str(out),
                             "tsne_ids": 4,
                             "failure_queries": 2}, progress=False)
    m = read_metrics(out)
    assert m["stage"] == "evaluation" and m["primary_run"] == "zero-shot tiny-vit"
    assert [r["run"] for r in m["runs"]] == ["zero-shot tiny-vit"]
    assert m["data"]["test_ids"] == 6 and len(m["test"]["mAP"]["per_split"]) == 2
    assert (out / "comparison.csv").is_file() and (out / "comparison.md").is_file()
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == ["cmc.png", "failures_zero-shot_tiny-vit.png", "roc.png", "splits.png",
                    "tsne.png"]
    assert m["figures"] == pngs
    nb = json.loads(executed.read_text())
    shown = [o for c in nb["cells"] for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert len(shown) >= 4


@pytest.mark.notebook
@pytest.mark.usefixtures("kernel_threads")
def test_evaluation_notebook_cross_aspect_with_rerank(runs, synthetic_11k, workbench_home):
    from handclip_nb.pipeline import run_notebook

    out = workbench_home / "outputs" / "eval-x"
    run_notebook("evaluation.ipynb", workbench_home / "eval.ipynb",
                 {**COMMON, "data_root": str(synthetic_11k), "aspect": "dorsal_l",
                  "runs": [str(runs["root"] / "stage0"), str(runs["root"] / "stage2")],
                  "rerank": True, "rerank_k1": 6, "tsne": False, "failure_queries": 0,
                  "output_dir": str(out)}, progress=False)
    m = read_metrics(out)
    assert [(r["run"], r["trained_on"], r["tested_on"], r["cross_domain"]) for r in m["runs"]] \
        == [("stage0", "zero-shot", "11k/dorsal_l", False),
            ("stage2", "11k/dorsal_r", "11k/dorsal_l", True)]
    assert m["rerank"] == {"k1": 6, "k2": 6, "lambda_value": 0.3}
    assert sorted(m["figures"]) == ["cmc.png", "roc.png", "splits.png"]
    csv = pd.read_csv(out / "comparison.csv", index_col="run")
    assert list(csv["rerank"]) == ["k1=6 k2=6 λ=0.3"] * 2
