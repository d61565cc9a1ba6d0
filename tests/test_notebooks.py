"""Notebooks run headless through papermill with smoke parameters; assert on what they record."""
import json

import pytest

from handclip_nb.pipeline import run_notebook
from handclip_nb.runs import METRIC_NAMES, read_metrics

#: every test here starts its kernels itself: on this worker's share of the cores
pytestmark = [pytest.mark.notebook, pytest.mark.usefixtures("kernel_threads")]

SMOKE = {"num_splits": 2, "synthetic_subjects": 12, "synthetic_images": 4, "batch_size": 32}


@pytest.mark.parametrize("backbone", ["tiny-vit", "tiny-rn"])
def test_stage0_notebook_writes_metrics(workbench_home, backbone):
    out = workbench_home / "outputs" / f"s0-{backbone}"
    executed = run_notebook("stage0_zeroshot.ipynb", workbench_home / "s0.ipynb",
                            {**SMOKE, "backbone": backbone, "output_dir": str(out)},
                            progress=False)
    m = read_metrics(out)
    assert m["stage"] == "stage0" and m["backbone"] == backbone
    assert "untrained" in m["backbone_display"] and m["pretrained"] is False
    assert m["num_splits"] == 2
    for name in METRIC_NAMES:
        entry = m["test"][name]
        assert len(entry["per_split"]) == 2 and 0 <= entry["mean"] <= 100
    assert m["test"]["rank1"]["mean"] <= m["test"]["rank5"]["mean"] <= m["test"]["rank10"]["mean"]
    d = m["data"]
    assert d["train_ids"] == 6 and d["test_ids"] == 6
    assert d["queries_per_split"] == d["test_images"] - d["test_ids"]
    assert d["gallery_per_split"] == 4 * 6  # gallery_mode=all: the 4 aspects' galleries
    assert set(m["val"]) == set(METRIC_NAMES)
    for fig in ["identities", "cmc", "retrieval"]:
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    manifest = json.loads((out / "splits.json").read_text())
    assert manifest["seed"] == 0 and manifest["content_hash"] == m["splits_hash"]
    nb = json.loads(executed.read_text())
    images = [o for c in nb["cells"] for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # figures shown inline


def test_stage0_offline_real_backbone_fails_fast_and_clearly(workbench_home, monkeypatch):
    import time

    import papermill as pm

    monkeypatch.setenv("HOME", str(workbench_home))  # no ~/.cache/clip here
    started = time.time()
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_notebook("stage0_zeroshot.ipynb", workbench_home / "s0.ipynb",
                     {**SMOKE, "backbone": "vitb16",
                      "output_dir": str(workbench_home / "outputs" / "vit")}, progress=False)
    assert time.time() - started < 60  # kernel start + data; no download retries
    msg = str(err.value)
    assert "WeightsNotFoundError" in msg and "ViT-B-16.pt" in msg
    assert not (workbench_home / "outputs" / "vit" / "metrics.json").exists()


def test_stage0_bad_parameter_fails_before_writing(workbench_home):
    import papermill as pm

    out = workbench_home / "outputs" / "bad"
    with pytest.raises(pm.PapermillExecutionError, match="parameter 'aspect'"):
        run_notebook("stage0_zeroshot.ipynb", workbench_home / "s0.ipynb",
                     {"aspect": "sideways", "output_dir": str(out)}, progress=False)
    assert not out.exists()


def test_stage1_then_stage2_notebooks_with_smoke_params(workbench_home):
    """The smoke parameter file drives both notebooks; stage 2 finds stage 1 by its folder."""
    from handclip_nb.params import load_params_file
    from handclip_nb.pipeline import NOTEBOOKS_DIR

    smoke = load_params_file(NOTEBOOKS_DIR.parent / "params" / "smoke.yaml")
    s1, s2 = workbench_home / "outputs" / "s1", workbench_home / "outputs" / "s2"
    run_notebook("stage1_prompt.ipynb", workbench_home / "s1.ipynb",
                 {**smoke, "output_dir": str(s1)}, progress=False)
    m1 = read_metrics(s1)
    assert m1["stage"] == "stage1"
    assert set(m1["prompt"]) == {"before", "after"} and "chance_mAP" in m1["prompt"]["after"]
    assert len(m1["history"]) == smoke["stage1"]["epochs"]
    assert (s1 / "prompts.pt").is_file() and (s1 / "checkpoints" / "last.pt").is_file()
    assert (s1 / "figures" / "history.png").is_file()

    run_notebook("stage2_image.ipynb", workbench_home / "s2.ipynb",
                 {**smoke, "output_dir": str(s2), "stage1_dir": str(s1)}, progress=False)
    m2 = read_metrics(s2)
    epochs = smoke["stage2"]["epochs"]
    # the default policy is the literature's: every training identity, the last epoch kept
    assert m2["stage"] == "stage2" and m2["selection"] == {
        "policy": "last", "epochs_trained": epochs, "kept_epoch": epochs}
    assert "val" not in m2 and m2["val_history"] == [] and len(m2["history"]) == epochs
    assert m2["data"].get("selection_ids", 0) == 0
    assert m2["seconds_per_epoch"] > 0
    for fig in ["history", "cmc", "retrieval"]:
        assert (s2 / "figures" / f"{fig}.png").is_file()
    assert (s2 / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("backbone", ["tiny-vit", "tiny-rn"])
def test_stage3_then_attention_notebooks(workbench_home, backbone):
    """PromptSG trains and evaluates headless; the attention notebook renders static heatmaps."""
    from handclip_nb.params import load_params_file
    from handclip_nb.pipeline import NOTEBOOKS_DIR

    smoke = load_params_file(NOTEBOOKS_DIR.parent / "params" / "smoke.yaml")
    s3, att = workbench_home / "outputs" / "s3", workbench_home / "outputs" / "att"
    run_notebook("stage3.ipynb", workbench_home / "s3.ipynb",
                 {**smoke, "backbone": backbone, "output_dir": str(s3)}, progress=False)
    m3 = read_metrics(s3)
    assert m3["stage"] == "stage3" and set(m3["test"]) == set(METRIC_NAMES)
    assert {"mean_entropy", "prompt_sensitivity"} <= set(m3["attention"])
    assert m3["attention"]["prompt_sensitivity"] > 0
    assert (s3 / "checkpoints" / "best.pt").is_file()

    executed = run_notebook("attention.ipynb", workbench_home / "att.ipynb",
                            {**smoke, "stage3_dir": str(s3), "output_dir": str(att),
                             "attention_queries": 2}, progress=False)
    m = read_metrics(att)
    assert m["stage"] == "attention" and m["test"] == m3["test"]
    pngs = sorted(p.name for p in (att / "figures").glob("*.png"))
    assert "attention_query0.png" in pngs and "attention_aggregate_simplified.png" in pngs
    assert set(m["figures"]) == set(pngs)
    nb = json.loads(executed.read_text())
    shown = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) >= 4  # the figures are inline, not only on disk
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                   for c in nb["cells"] for o in c.get("outputs", []))  # headless: no widgets


def test_stage3_offline_vitb16_fails_fast(workbench_home, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("HOME", str(workbench_home))
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_notebook("stage3.ipynb", workbench_home / "s3.ipynb",
                     {**SMOKE, "backbone": "vitb16",
                      "output_dir": str(workbench_home / "outputs" / "v")}, progress=False)
    assert "WeightsNotFoundError" in str(err.value) and "ViT-B-16.pt" in str(err.value)


def test_handid_notebook_with_smoke_params(workbench_home):
    """The CLIP-HandID notebook runs headless with the smoke file's handid section (CLIP-HandID's
    selection: the best held-out accuracy) and records a finished run the run loader rebuilds."""
    from handclip_nb.params import load_params_file
    from handclip_nb.pipeline import NOTEBOOKS_DIR
    from handclip_nb.run_loader import load_run

    smoke = load_params_file(NOTEBOOKS_DIR.parent / "params" / "smoke.yaml")
    out = workbench_home / "outputs" / "handid"
    run_notebook("stage_handid.ipynb", workbench_home / "handid.ipynb",
                 {**smoke, "output_dir": str(out)}, progress=False)
    metrics = read_metrics(out)
    epochs = smoke["handid"]["epochs"]
    assert metrics["stage"] == "handid" and len(metrics["history"]) == epochs
    assert metrics["selection"]["policy"] == "best_accuracy"
    assert metrics["selection"]["best_val_metric"] == "accuracy"
    assert len(metrics["val_history"]) == epochs
    assert set(metrics["test"]) == set(METRIC_NAMES)
    for fig in ["history", "cmc", "retrieval", "roc"]:
        assert (out / "figures" / f"{fig}.png").is_file()
    assert load_run(out, stages=("handid",)).model.inversion_grad
