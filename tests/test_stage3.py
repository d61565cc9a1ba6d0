"""PromptSG (stage 3) end to end on synthetic hands: training, warm start, attention summary,
resume, rebuilding a finished run, and the attention source the attention notebook uses."""
import numpy as np
import pytest
import torch
from builders import run_params

from handclip_nb.attention import ModelAttentionSource, attention_summary
from handclip_nb.data import build_protocol
from handclip_nb.evaluate import evaluate_backbone
from handclip_nb.models import build_backbone
from handclip_nb.run_loader import load_run
from handclip_nb.runs import RunFolderError, start_run
from handclip_nb.train.stage3 import evaluate_stage3, train_stage3

pytestmark = pytest.mark.slow


def _p3(hands, out, **kw):
    base = dict(epochs=30, lr=3e-3, lr_new=3e-3, milestones=[24], p_ids=8, k_images=4,
                id_weight=0.25, supcon_weight=0.1, random_erasing=0.0)
    return run_params("stage3", out, hands, **{**base, **kw})


@pytest.mark.parametrize("backbone", ["tiny-rn", "tiny-vit"])
def test_promptsg_beats_zero_shot_and_text_shapes_attention(hands, tmp_path, backbone):
    p = _p3(hands, tmp_path / "s3", backbone=backbone, epochs=60, milestones=[48],
            random_erasing=0.5 if backbone == "tiny-vit" else 0.0)
    protocol = build_protocol(p)
    bb = build_backbone(backbone, image_size=p.image_size, seed=0)
    zero = evaluate_backbone(bb, protocol, p)["test"]
    result = train_stage3(p, p.output_dir, protocol, bb, progress=False)
    losses = [h["loss"]["loss"] for h in result.fit.history]
    assert losses[-1] < losses[0]
    trained = evaluate_stage3(result.model, protocol, p)["test"]
    z, t = zero.summary["mAP"]["mean"], trained.summary["mAP"]["mean"]
    print(backbone, "zero-shot", z, "stage3", t)
    # measured on this data (seed 0, 60 epochs), with per-draw augmentation seeds
    # (data/datasets.py::augmentation_seed): tiny-rn 18.2 -> 29.5, tiny-vit 7.9 -> 15.6 mAP
    # (per-image seeds, a repeated draw augmented like its first: 29.0 and 11.7; before
    # per-image seeds, with other crops: 32.2 and 14.3)
    assert t > z + 3.0
    att = attention_summary(result.model, protocol, p, limit=20)
    assert 0 < att["mean_entropy"] <= att["max_entropy"] + 1e-6
    assert att["prompt_sensitivity"] > 1e-4  # the text changes where the model looks


def test_warm_start_from_stage2_and_refusal(hands, tmp_path):
    from handclip_nb.train.stage1 import train_stage1
    from handclip_nb.train.stage2 import load_stage1_prompts, train_stage2

    common = dict(num_splits=1)
    p1 = run_params("stage1", tmp_path / "s1", hands, epochs=1, **common)
    protocol = build_protocol(p1)
    bb = build_backbone("tiny-vit", image_size=p1.image_size, seed=0)
    start_run(p1)
    train_stage1(p1, p1.output_dir, protocol, bb, progress=False)
    p2 = run_params("stage2", tmp_path / "s2", hands, epochs=1, p_ids=4, k_images=2,
                    milestones=[1], stage1_dir=p1.output_dir, **common)
    bb2 = build_backbone("tiny-vit", image_size=p2.image_size, seed=0)
    start_run(p2)
    s2 = train_stage2(p2, p2.output_dir, protocol, bb2,
                      load_stage1_prompts(p1.output_dir, bb2, protocol),
                      progress=False)
    p3 = _p3(hands, tmp_path / "s3", epochs=0, init_from=str(tmp_path / "s2"))
    bb3 = build_backbone("tiny-vit", image_size=p3.image_size, seed=0)
    r3 = train_stage3(p3, p3.output_dir, protocol, bb3, progress=False)
    assert r3.warm_started_from.endswith("best.pt")
    for k, v in s2.model.backbone.visual.state_dict().items():
        assert torch.equal(v, r3.model.backbone.visual.state_dict()[k]), k
    bb_rn = build_backbone("tiny-rn", image_size=p3.image_size, seed=0)
    with pytest.raises(ValueError, match="is a tiny-vit run.*'tiny-rn'"):
        train_stage3(_p3(hands, tmp_path / "s3rn", backbone="tiny-rn", epochs=0,
                         init_from=str(tmp_path / "s2")), tmp_path / "s3rn", protocol, bb_rn,
                     progress=False)
    with pytest.raises(FileNotFoundError, match="(?s)init_from=.*does not exist.*notebooks/stage2"):
        train_stage3(_p3(hands, tmp_path / "x", epochs=0, init_from=str(tmp_path / "none")),
                     tmp_path / "x", protocol, bb3, progress=False)


class _Killed(Exception):
    pass


def test_stage3_resume_matches_uninterrupted_and_run_rebuilds(hands, tmp_path, workbench_home):
    def run(out, callbacks=(), resume=False):
        # last.pt every epoch: the kill below gives no warning (no stop signal)
        p = _p3(hands, out, epochs=3, milestones=[2], resume=resume, checkpoint_every=1)
        protocol = build_protocol(p)
        bb = build_backbone("tiny-vit", image_size=p.image_size, seed=0)
        r = train_stage3(p, p.output_dir, protocol, bb, callbacks=callbacks, progress=False)
        return p, protocol, r, evaluate_stage3(r.model, protocol, p)["test"].summary

    _, _, full, m_full = run(tmp_path / "a")

    def kill(record):
        if record["epoch"] == 1:
            raise _Killed()

    with pytest.raises(_Killed):
        run(tmp_path / "b", callbacks=[kill])
    _, _, resumed, m_resumed = run(tmp_path / "b", resume=True)
    assert resumed.fit.resumed_from == 1
    assert {k: v["per_split"] for k, v in m_resumed.items()} == \
        {k: v["per_split"] for k, v in m_full.items()}

    # a finished run folder (params.yaml + best.pt) rebuilds the same model
    p = _p3(hands, tmp_path / "c", epochs=2, milestones=[1])
    start_run(p)
    protocol = build_protocol(p)
    bb = build_backbone("tiny-vit", image_size=p.image_size, seed=0)
    model = train_stage3(p, p.output_dir, protocol, bb, progress=False).model
    loaded = load_run(p.output_dir, device="cpu", require_finished=False, stages=("stage3",))
    params2, model2 = loaded.params, loaded.model
    protocol2 = build_protocol(params2)
    x = torch.randn(3, 3, *p.image_size)
    with torch.no_grad():
        assert torch.allclose(model.embed(x), model2.embed(x), atol=1e-5)
    assert protocol2.source_hash == protocol.source_hash

    source = ModelAttentionSource(model2, protocol2, params2)
    assert source.num_heads >= 1 and len(source.query_ids()) == len(protocol2.test[0].query)
    a = source.attention(0, "composed")
    assert a.shape == (source.num_heads, *model2.backbone.grid)
    assert np.allclose(a.reshape(a.shape[0], -1).sum(1), 1.0, atol=1e-4)
    matches = source.topk(0, 3, "simplified")
    assert len(matches) == 3 and matches[0].distance <= matches[1].distance
    assert source.image(0).size == (p.image_size[1], p.image_size[0])
    assert source.aggregate("simplified", limit=5).shape[0] == 5


def test_load_run_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder.*no params.yaml"):
        load_run(tmp_path, stages=("stage3",))


def test_stage3_loss_uses_the_weights_it_is_given(hands, tmp_path):
    """The recorded loss is exactly id_weight * id + triplet_weight * triplet + supcon_weight *
    supcon of its own parts: a weight hard-coded in train_stage3 (say SupCon at 0, which also
    starves the inversion network of its text signal) fails here."""
    p = _p3(hands, tmp_path / "s3", epochs=1, id_weight=0.7, triplet_weight=0.4,
            supcon_weight=0.37)
    protocol = build_protocol(p)
    bb = build_backbone("tiny-vit", image_size=p.image_size, seed=0)
    loss = train_stage3(p, p.output_dir, protocol, bb, progress=False).fit.history[0]["loss"]
    assert loss["supcon"] > 0
    expected = 0.7 * loss["id"] + 0.4 * loss["triplet"] + 0.37 * loss["supcon"]
    assert loss["loss"] == pytest.approx(expected, rel=1e-5)
