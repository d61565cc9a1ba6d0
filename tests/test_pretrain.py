"""handclip-mini: captions from the generator, CLIP pretraining, the shipped weights and card."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from together import run_together

from handclip_nb.backbone_specs import HANDCLIP_MINI_NAME, get_backbone_spec
from handclip_nb.data.captioned import (EVALUATED_SEEDS, PRETRAIN_ID_OFFSET, CaptionedImages,
                                        build_pretraining_data, check_disjoint,
                                        distinct_person_batches, pretraining_data)
from handclip_nb.data.captions import caption_variant, read_captions
from handclip_nb.data.handinfo import DataError, read_handinfo
from handclip_nb.data.synthetic import (ASPECTS, caption_for, caption_phrases, image_seed,
                                        make_person, render_image, render_photo)
from handclip_nb.evaluate.probes import PROBES, attribute_probes, retrieval_metrics
from handclip_nb.losses import clip_contrastive_loss
from handclip_nb.models.backbones import build_backbone
from handclip_nb.models.weight_files import IncompatibleWeightsError
from handclip_nb.params import ParamError, resolve_params
from handclip_nb.train.model_card import (card_params, compare_with_card, export_mini_weights,
                                          file_sha256, read_card)
from handclip_nb.train.pretrain import new_mini_backbone, prepare_pretraining, pretrain_mini


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def _person_with(predicate, seed=0, limit=400):
    for n in range(limit):
        p = make_person(n, seed)
        if predicate(p):
            return p
    raise AssertionError("no such person in the first people")


def test_caption_names_view_side_gender_skin_and_polish():
    p = _person_with(lambda p: p.nail_polish is not None and p.gender == "female")
    cap = caption_for(p, "dorsal right")
    assert cap.startswith("a photo of the dorsal side of a woman's right hand, ")
    assert f"{p.skin_color} skin" in cap and f"{p.nail_polish} nail polish" in cap
    palm = caption_for(p, "palmar left")
    assert palm.startswith("a photo of the palm side of a woman's left hand")
    assert "nail" not in palm  # nails are drawn on the dorsal side only


def test_caption_lists_exactly_the_visible_marks():
    p = _person_with(lambda p: {m.surface for m in p.marks} == {"dorsal", "palmar"})
    for view, aspect in (("dorsal", "dorsal right"), ("palmar", "palmar right")):
        phrases = caption_phrases(p, aspect)
        shown = {m.describe() for m in p.visible_marks(view)}
        hidden = {m.describe() for m in p.marks} - shown
        assert shown <= set(phrases)
        assert not (hidden & set(phrases))


@pytest.mark.parametrize("accessory, words", [("ring", "ring on the"), ("bracelet", "bracelet"),
                                              ("watch", "wristwatch")])
def test_caption_describes_the_accessory_drawn(accessory, words):
    p = make_person(3, 0)
    seed = image_seed(0, 3, 0, 1)
    img, cap = render_photo(p, "dorsal right", seed, accessory=accessory)
    assert words in cap
    assert cap.count(",") >= 3
    # render_photo draws exactly what render_image draws (captioning changed no pixel)
    np.testing.assert_array_equal(np.asarray(img),
                                  np.asarray(render_image(p, "dorsal right", seed,
                                                          accessory=accessory)))
    plain = caption_for(p, "dorsal right")  # no accessory: no accessory phrase
    assert not any(w in plain for w in ("gold", "silver", "wristwatch"))


def test_generated_11k_dataset_has_a_caption_per_handinfo_row(synthetic_11k):
    records = read_handinfo(synthetic_11k / "HandInfo.csv")
    captions = read_captions(synthetic_11k)
    assert [r.path for r in records] == list(captions)  # same images, same order
    for r in records:
        view = "dorsal side" if r.aspect.startswith("dorsal") else "palm side"
        side = "right" if r.aspect.endswith("_r") else "left"
        cap = captions[r.path]
        assert cap.startswith(f"a photo of the {view} of a ")
        assert f" {side} hand" in cap and f"{r.skin_color} skin" in cap
        assert (("gold" in cap or "silver" in cap or "wristwatch" in cap)
                == bool(r.accessories))


def test_generated_hd_dataset_has_captions(synthetic_hd):
    captions = read_captions(synthetic_hd)
    images = sorted(p.relative_to(synthetic_hd).as_posix()
                    for p in (synthetic_hd / "Original Images").rglob("*.jpg"))
    assert sorted(captions) == images
    assert all(c.startswith("a photo of the dorsal side of a") for c in captions.values())


def test_captions_fit_the_clip_context():
    import clip.clip

    longest = max(len(clip.clip._tokenizer.encode(caption_for(make_person(n, 5), a, "a silver "
                                                                "ring on the middle finger"))) + 2
                  for n in range(200) for a in ASPECTS)
    assert longest <= 77


@pytest.mark.parametrize("content, message", [
    ("path,text\n", ":1: header must be 'image,caption'"),
    ("image,caption\nHands/a.jpg\n", ":2: expected 2 columns"),
    ("image,caption\nHands/a.jpg,x\nHands/a.jpg,y\n", ":3: image 'Hands/a.jpg' is captioned twice"),
    ("image,caption\nHands/a.jpg,  \n", ":2: empty image path or caption"),
    ("image,caption\n", "no caption rows"),
])
def test_read_captions_names_file_and_line(tmp_path, content, message):
    (tmp_path / "captions.csv").write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_captions(tmp_path)


def test_read_captions_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.csv not found.*synthetic"):
        read_captions(tmp_path)


def test_caption_variant_keeps_the_view_and_a_subset_of_attributes():
    cap = "a photo of the dorsal side of a man's left hand, dark skin, long fingers, a wristwatch"
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        v = caption_variant(cap, rng, drop=0.5)
        head, *rest = v.split(", ")
        assert head == "a photo of the dorsal side of a man's left hand"
        assert set(rest) <= {"dark skin", "long fingers", "a wristwatch"}
        assert len(rest) == len(set(rest))
        seen.add(v)
    assert len(seen) > 5  # shuffled and dropped, not one fixed sentence
    assert caption_variant(cap, np.random.default_rng(1), 0.0).count(",") == 3  # nothing dropped


# --------------------------------------------------------------------------------------------
# Objective and batches
# --------------------------------------------------------------------------------------------

def _reference_clip_loss(img, txt, scale):
    img = img / img.norm(dim=1, keepdim=True)
    txt = txt / txt.norm(dim=1, keepdim=True)
    n = img.shape[0]
    total = 0.0
    for i in range(n):  # image i against every text, then text i against every image
        li = [scale * float(img[i] @ txt[j]) for j in range(n)]
        lt = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -li[i] + np.log(np.sum(np.exp(li)))
        total += -lt[i] + np.log(np.sum(np.exp(lt)))
    return total / (2 * n)


@pytest.mark.parametrize("n, d, scale", [(2, 3, 1.0), (5, 8, 14.3), (9, 4, 100.0)])
def test_clip_contrastive_loss_matches_the_slow_reference(n, d, scale):
    g = torch.Generator().manual_seed(n)
    img, txt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g,
                                                                              dtype=torch.float64)
    got = float(clip_contrastive_loss(img, txt, scale))
    assert got == pytest.approx(_reference_clip_loss(img, txt, scale), rel=1e-9)


def test_clip_contrastive_loss_trains_the_temperature_and_checks_inputs():
    log_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07)))
    img = torch.randn(6, 4)
    loss = clip_contrastive_loss(img, img + 0.01 * torch.randn(6, 4), log_scale.exp())
    loss.backward()
    assert log_scale.grad is not None and float(log_scale.grad) < 0  # matched pairs: sharpen
    with pytest.raises(TypeError, match="log"):
        clip_contrastive_loss(img, img, log_scale)
    with pytest.raises(ValueError, match="pair up row by row"):
        clip_contrastive_loss(img, img[:5], 10.0)


def test_distinct_person_batches_never_repeat_a_person():
    people = np.repeat(np.arange(30), 7).astype(str)  # 30 people x 7 photos
    rng = np.random.default_rng(0)
    batches = distinct_person_batches(people, 8, rng)
    used = np.concatenate(batches)
    assert len(set(used.tolist())) == len(used)  # no photo twice in an epoch
    assert len(used) >= 0.9 * len(people)
    for b in batches:
        assert len(set(people[b])) == len(b) and 4 <= len(b) <= 8
    with pytest.raises(ValueError, match="batch_size"):
        distinct_person_batches(people, 1, rng)


def test_pretraining_refuses_evaluated_seeds():
    with pytest.raises(ValueError, match="pretrain_seed 0 is a seed evaluated datasets use"):
        check_disjoint(0, 10, 5)
    # the demo's and the tests' datasets use seeds in the refused range and small person numbers
    assert resolve_params(stage="stage0").synthetic_seed in EVALUATED_SEEDS
    assert resolve_params(stage="pretrain").pretrain_seed not in EVALUATED_SEEDS
    assert PRETRAIN_ID_OFFSET > 10 * 712  # above every evaluated person number


def test_pretrain_stage_parameters():
    p = resolve_params(stage="pretrain")
    assert p.backbone == HANDCLIP_MINI_NAME
    assert p.output_dir == "outputs/pretrain-handclip-mini-seed0"
    with pytest.raises(ParamError, match="parameter 'vision_layers'"):
        resolve_params(stage="pretrain", vision_layers=0)
    with pytest.raises(ValueError, match="trains 'handclip-mini'"):
        prepare_pretraining(resolve_params(stage="pretrain", backbone="tiny-vit"))


# --------------------------------------------------------------------------------------------
# Training behaviour (tiny model, a few epochs)
# --------------------------------------------------------------------------------------------

TINY = dict(vision_arch="rn", vision_width=8, vision_layers=1, text_width=64, text_layers=1,
            embed_dim=64)


@pytest.fixture(scope="module")
def tiny_pretraining(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = build_pretraining_data(root, people=32, images_per_person=2,
                                  heldout_people=8, seed=104729)
    preprocess = get_backbone_spec(HANDCLIP_MINI_NAME).preprocess((96, 128))
    train = CaptionedImages(data.train_root, preprocess, progress=False)
    heldout = CaptionedImages(data.heldout_root, preprocess, progress=False)
    return root, data, train, heldout


def test_pretraining_data_is_disjoint_and_generated_once(tiny_pretraining):
    root, data, train, heldout = tiny_pretraining
    assert not set(train.people) & set(heldout.people)
    assert min(int(p) for p in train.people) == PRETRAIN_ID_OFFSET
    stamp = (data.train_root / "HandInfo.csv").stat().st_mtime_ns
    again = build_pretraining_data(root, people=32, images_per_person=2,
                                   heldout_people=8, seed=104729)
    assert again == data and (data.train_root / "HandInfo.csv").stat().st_mtime_ns == stamp


def _files(root) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_heldout_part_alone_is_the_heldout_part_of_the_whole(tiny_pretraining, tmp_path):
    """Re-measuring a card builds only the held-out people: file for file the set the whole
    population's build made, and no training part beside it."""
    _, data, _, _ = tiny_pretraining
    alone = build_pretraining_data(tmp_path / "alone", people=32, images_per_person=2,
                                   heldout_people=8, seed=104729, parts=("heldout",))
    assert not alone.train_root.exists()
    assert _files(alone.heldout_root) == _files(data.heldout_root)
    with pytest.raises(ValueError, match=r"unknown pretraining part\(s\) \['test'\]"):
        build_pretraining_data(tmp_path / "x", people=32, images_per_person=2,
                               heldout_people=8, seed=104729, parts=("test",))


#: Run by the concurrency test (tests/together.py; argv: the population's root, the folder
#: where each generate_dataset call leaves a mark): released with the other child, build the
#: population.
BUILD_PRETRAINING_SCRIPT = """
import sys
from pathlib import Path
import handclip_nb.data.captioned as captioned
root = Path(sys.argv[1])
count_calls(captioned, "generate_dataset", sys.argv[2],
            lambda me, **kw: f"generated-{me}-{kw['id_offset']}")
ready_then_wait_for_go()
captioned.build_pretraining_data(root, people=16, images_per_person=2, heldout_people=4,
                                 seed=104729)
"""


def test_two_processes_building_one_population_generate_it_once(tmp_path):
    """Guards against two runs that start together (a grid's runs, a notebook beside a test)
    both generating into one population: they take turns on each part's lock, so each part is
    generated once, the other process waits and finds it, and no temporary folder is left."""
    root, marks = tmp_path / "population", tmp_path / "marks"
    marks.mkdir()
    run_together(BUILD_PRETRAINING_SCRIPT, [[str(root), str(marks)]] * 2, tmp_path / "flags")
    generated = sorted(p.name.split("-", 2)[2] for p in marks.glob("generated-*"))
    assert generated == [str(PRETRAIN_ID_OFFSET), str(PRETRAIN_ID_OFFSET + 16)], generated
    assert sorted(p.name for p in root.iterdir()) == [".heldout.lock", ".train.lock",
                                                     "heldout", "train"]
    assert len(read_handinfo(root / "train" / "HandInfo.csv")) == 16 * 2 * len(ASPECTS)


@pytest.mark.slow
def test_pretraining_lowers_the_loss_and_improves_retrieval(tiny_pretraining, tmp_path,
                                                           one_thread):
    _, _, train, heldout = tiny_pretraining
    params = resolve_params(stage="pretrain", epochs=12, lr=2e-3, batch_size=32,
                            warmup_epochs=1, eval_every=4, **TINY)
    result = pretrain_mini(params, tmp_path / "run", train, heldout)
    losses = [h["loss"]["loss"] for h in result.fit.history]
    # chance level is ln(32) = 3.47; the tiny model starts above it and must end well below
    assert losses[-1] < losses[0] - 0.5 and losses[-1] < np.log(32) - 0.3, losses
    before, after = result.retrieval_before, result.retrieval_after  # held-out people
    assert after["t2i_mAP"] > before["t2i_mAP"] + 5, (after, before)
    assert after["i2t_mAP"] > before["i2t_mAP"], (after, before)
    assert result.backbone.pretrained and "synthetic" in result.backbone.display_name
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_export_fp16_roundtrip_and_sha256(tiny_pretraining, tmp_path):
    _, _, train, _ = tiny_pretraining
    params = resolve_params(stage="pretrain", **TINY)
    bb = new_mini_backbone(params).eval()  # eval: BatchNorm uses its running stats
    path, digest = export_mini_weights(bb, tmp_path / "mini.pt")
    assert (tmp_path / "mini.sha256").read_text().split() == [digest, "mini.pt"]
    assert digest == file_sha256(path)
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert {t.dtype for t in sd.values() if t.is_floating_point()} == {torch.float16}
    # a handclip-mini file with its own (smaller) architecture loads under the registry name
    loaded = build_backbone(HANDCLIP_MINI_NAME, weights=path, image_size=(96, 128))
    assert loaded.pretrained and loaded.arch["vision_width"] == 8
    x = train.images(slice(0, 4))
    with torch.no_grad():
        a = bb.encode_image(x).global_embedding
        b = loaded.encode_image(x).global_embedding
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999  # fp16 rounding only


def test_a_corrupt_shipped_file_is_refused_by_its_sha256(tmp_path):
    from handclip_nb.backbone_specs import BACKBONES, BackboneSpec, register_backbone

    params = resolve_params(stage="pretrain", **TINY)
    path, _ = export_mini_weights(new_mini_backbone(params), tmp_path / "m.pt")
    spec = BackboneSpec("test-shipped", "test", arch=get_backbone_spec(HANDCLIP_MINI_NAME).arch,
                        weights_file=str(path), weights_sha256_file=str(tmp_path / "m.sha256"))
    register_backbone(spec)
    try:
        with path.open("r+b") as fh:  # flip one byte in the middle
            fh.seek(path.stat().st_size // 2)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(IncompatibleWeightsError, match="SHA-256.*corrupt, truncated or a git-lfs"):
            build_backbone("test-shipped", image_size=(96, 128))
    finally:
        del BACKBONES["test-shipped"]


def test_model_card_and_reproduction_comparison(tmp_path):
    import pandas as pd

    card = {"probe_k": 10, "probes": {"nail polish": {"precision@10": 80.0},
                                      "dark skin": {"precision@10": 50.0}}}
    now = pd.DataFrame({"precision@10": [75.0, 70.0]}, index=["nail polish", "dark skin"])
    cmp = compare_with_card(now, card, tolerance=10.0)
    assert cmp.loc["nail polish", "within"] and not cmp.loc["dark skin", "within"]
    assert cmp.loc["dark skin", "difference"] == pytest.approx(20.0)


# --------------------------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------------------------

SPEC = get_backbone_spec(HANDCLIP_MINI_NAME)


def test_shipped_weights_are_small_fp16_and_match_their_sha256():
    from pathlib import Path

    path = Path(SPEC.weights_file)
    assert path.is_file(), "handclip_mini.pt must ship with the package"
    assert path.stat().st_size <= 25 * 1024 * 1024
    digest = file_sha256(path)
    assert Path(SPEC.weights_sha256_file).read_text().split()[0] == digest
    card = read_card()
    assert card["sha256"] == digest and card["name"] == HANDCLIP_MINI_NAME
    md = path.with_suffix(".md").read_text()
    assert "Trained on synthetic hands only" in md and digest in md
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert {t.dtype for t in sd.values() if t.is_floating_point()} == {torch.float16}


def test_shipped_model_loads_offline_and_says_what_it_is(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip
    bb = build_backbone(HANDCLIP_MINI_NAME, image_size=(96, 128))
    assert bb.pretrained and "synthetic hands only" in bb.display_name
    assert bb.context_length == 77 and bb.vocab_size == 49408


@pytest.mark.slow
def test_shipped_model_reproduces_its_card_probes(one_thread):
    """Re-measure the card's held-out probes from the shipped weights (deterministic
    evaluation: only fp16 storage and float rounding differ, so 2 points is ample)."""
    card = read_card()
    params = card_params(card)
    data = pretraining_data(params, parts=("heldout",))  # the probes read only these people
    bb = build_backbone(HANDCLIP_MINI_NAME, image_size=params.image_size)
    heldout = CaptionedImages(data.heldout_root, bb.preprocess_config(), progress=False)
    probes = attribute_probes(bb, heldout, k=card["probe_k"])
    cmp = compare_with_card(probes, card, tolerance=2.0)
    assert cmp["within"].all(), cmp
    retrieval = retrieval_metrics(bb, heldout)
    assert retrieval["t2i_mAP"] == pytest.approx(card["retrieval_after"]["t2i_mAP"], abs=2.0)


@pytest.mark.slow
def test_shipped_model_ranks_hands_zero_shot_better_than_an_untrained_one(synthetic_11k,
                                                                        one_thread):
    from handclip_nb.data import build_protocol
    from handclip_nb.evaluate import evaluate_backbone

    maps = {}
    for name in (HANDCLIP_MINI_NAME, "tiny-vit"):
        p = resolve_params(stage="stage0", backbone=name, data_root=str(synthetic_11k),
                           num_splits=3, feature_cache=False)
        protocol = build_protocol(p)
        bb = build_backbone(name, image_size=p.image_size)
        res = evaluate_backbone(bb, protocol, p, cache_dir=None)  # preprocessed as bb says
        maps[name] = res["test"].summary["mAP"]["mean"]
    assert maps[HANDCLIP_MINI_NAME] > maps["tiny-vit"] + 5, maps


def test_attribute_probes_run_on_data_without_captions(synthetic_11k, tmp_path):
    import shutil

    root = tmp_path / "nocap"
    shutil.copytree(synthetic_11k, root)
    (root / "captions.csv").unlink()  # like the real 11k Hands
    params = resolve_params(stage="pretrain", **TINY)
    probes = attribute_probes(new_mini_backbone(params), root, k=5)
    assert list(probes.index) == [p.name for p in PROBES]
    row = probes.loc["palm side"]
    assert row["base_rate"] == pytest.approx(50.0) and 0 <= row["precision@5"] <= 100
    assert row["images"] == len(read_handinfo(root / "HandInfo.csv"))
