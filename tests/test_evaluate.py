"""Feature extraction (flip TTA, cache) and multi-split summaries."""
import os

import numpy as np
import pytest
import torch

from handclip_nb.backbone_specs import PreprocessConfig
from handclip_nb.data import build_transform
from handclip_nb.evaluate import extract_features, summarise
from handclip_nb.evaluate.protocol_eval import evaluate_splits
from handclip_nb.models import build_backbone


@pytest.fixture(scope="module")
def images(synthetic_11k):
    paths = sorted(str(p) for p in (synthetic_11k / "Hands").glob("*.jpg"))[:12]
    return paths


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny-vit", image_size=(96, 128), seed=0)


def _counting(backbone):
    calls = {"n": 0}
    original = backbone.encode_image

    def encode(x):
        calls["n"] += x.shape[0]
        return original(x).global_embedding

    return calls, encode


def test_features_are_l2_normalised_and_match_the_backbone(backbone, images):
    tf = build_transform(PreprocessConfig((96, 128)))
    f = extract_features(backbone, images, tf, batch_size=5)
    assert f.shape == (12, backbone.embed_dim)
    assert torch.allclose(f.norm(dim=1), torch.ones(12), atol=1e-5)
    from PIL import Image

    x = torch.stack([tf(Image.open(p)) for p in images[:3]])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(backbone.encode_image(x).global_embedding, dim=1)
    assert torch.allclose(f[:3], ref, atol=1e-5)


def test_flip_tta_averages_the_image_and_its_mirror(backbone, images):
    tf = build_transform(PreprocessConfig((96, 128)))
    from PIL import Image

    x = torch.stack([tf(Image.open(p)) for p in images[:4]])
    with torch.no_grad():
        a = backbone.encode_image(x).global_embedding
        b = backbone.encode_image(torch.flip(x, dims=[3])).global_embedding
    expected = torch.nn.functional.normalize(a + b, dim=1)
    got = extract_features(backbone, images[:4], tf, flip=True)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, extract_features(backbone, images[:4], tf), atol=1e-3)


def test_cache_hit_skips_encoding_and_changes_invalidate(backbone, images, tmp_path):
    tf = build_transform(PreprocessConfig((96, 128)))
    cache = tmp_path / "cache"
    first = extract_features(backbone, images, tf, cache_dir=cache)
    assert len(os.listdir(cache)) == 1
    # a cached result must come back without touching the model
    backbone_encode = backbone.encode_image
    backbone.encode_image = lambda x: (_ for _ in ()).throw(AssertionError("re-encoded"))
    try:
        again = extract_features(backbone, images, tf, cache_dir=cache)
    finally:
        backbone.encode_image = backbone_encode
    assert torch.equal(first, again)
    # other transform, flip flag, or a different model: new entries
    extract_features(backbone, images,
                     build_transform(PreprocessConfig((96, 128), resize_mode="squash")),
                     cache_dir=cache)
    extract_features(backbone, images, tf, cache_dir=cache, flip=True)
    other = build_backbone("tiny-vit", image_size=(96, 128), seed=1)
    extract_features(other, images, tf, cache_dir=cache)
    assert len(os.listdir(cache)) == 4


def test_cache_notices_a_changed_image_and_survives_corruption(backbone, images, tmp_path):
    import shutil

    tf = build_transform(PreprocessConfig((96, 128)))
    local = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for src, dst in zip(images, local):
        shutil.copy(src, dst)
    cache = tmp_path / "cache"
    before = extract_features(backbone, local, tf, cache_dir=cache)
    shutil.copy(images[5], local[0])  # same name, other content
    after = extract_features(backbone, local, tf, cache_dir=cache)
    assert not torch.allclose(before[0], after[0])
    for entry in cache.iterdir():
        entry.write_bytes(b"garbage")
    assert torch.allclose(extract_features(backbone, local, tf, cache_dir=cache), after)


def test_summarise_mean_std_per_split():
    per_split = [{"rank1": 50.0, "rank5": 60.0, "rank10": 70.0, "mAP": 40.0, "mINP": 30.0},
                 {"rank1": 70.0, "rank5": 80.0, "rank10": 90.0, "mAP": 60.0, "mINP": 50.0}]
    s = summarise(per_split)
    assert s["rank1"] == {"mean": 60.0, "std": pytest.approx(np.std([50, 70], ddof=1)),
                          "per_split": [50.0, 70.0]}
    assert summarise(per_split[:1])["mAP"]["std"] == 0.0


def test_evaluate_splits_on_perfect_features():
    """Features equal to one-hot identities rank every true match first: 100 % everywhere."""
    from handclip_nb.data.handinfo import HandImage
    from handclip_nb.data.protocols import build_11k_protocol

    records = [HandImage(path=f"Hands/{p}_{k}.jpg", person=f"{p:07d}", aspect="dorsal_r")
               for p in range(8) for k in range(4)]
    protocol = build_11k_protocol(records, "dorsal_r", num_splits=3)
    feats = torch.nn.functional.one_hot(torch.as_tensor(protocol.identities), 8).float()
    res = evaluate_splits(feats, {i: i for i in range(len(protocol.items))}, protocol,
                          protocol.test, "test")
    for name, entry in res.summary.items():
        assert entry["mean"] == 100.0 and len(entry["per_split"]) == 3, name
