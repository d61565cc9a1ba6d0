"""Feature extraction (flip TTA, cache) and multi-split summaries."""
import os

import numpy as np
import pytest
import torch

from handclip_nb.backbone_specs import PreprocessConfig
from handclip_nb.data import build_transform
from handclip_nb.device import Precision, run_precision
from handclip_nb.evaluate import extract_features, summarise
from handclip_nb.evaluate.features import feature_cache_key
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


def test_the_cache_key_holds_the_device_type_and_the_precision(images):
    """A CPU fp32 run, a GPU fp32 run, a GPU fp16 run and a GPU bf16 run (amp_dtype) never
    share features (Precision objects stand in for the GPU: the key needs no CUDA)."""
    keys = {feature_cache_key("fp", images, "tf", False, precision)
            for precision in (Precision("cpu"), Precision("cuda"),
                              Precision("cuda", enabled=True, dtype=torch.float16),
                              Precision("cuda", enabled=True, dtype=torch.bfloat16),
                              Precision("cpu", enabled=True, dtype=torch.bfloat16))}
    assert len(keys) == 5
    assert feature_cache_key("fp", images, "tf", False, Precision("cpu")) == \
        feature_cache_key("fp", images, "tf", False, Precision("cpu", dtype=torch.bfloat16))
    cpu_run = run_precision({"amp": True, "amp_dtype": "bfloat16"}, "cpu")  # CPU: fp32
    assert not cpu_run.enabled and cpu_run.name == "fp32"


def test_features_are_encoded_in_the_precision_passed_and_cached_apart(backbone, images,
                                                                       tmp_path):
    """bf16 autocast (CPU autocast stands in for a GPU's) gives the autocast forward's
    features, not fp32's; the fp32 entry of the same images is not returned for it."""
    tf = build_transform(PreprocessConfig((96, 128)))
    bf16 = Precision("cpu", enabled=True, dtype=torch.bfloat16)
    cache = tmp_path / "cache"
    fp32 = extract_features(backbone, images[:4], tf, cache_dir=cache)
    got = extract_features(backbone, images[:4], tf, cache_dir=cache, precision=bf16)
    from PIL import Image

    x = torch.stack([tf(Image.open(p)) for p in images[:4]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.normalize(backbone.encode_image(x).global_embedding.float(),
                                            dim=1)
    assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(got, fp32, atol=1e-4)  # bf16 products: a visibly other result
    assert len(os.listdir(cache)) == 2
    assert torch.equal(extract_features(backbone, images[:4], tf, cache_dir=cache,
                                        precision=bf16), got)


def test_a_precision_of_another_device_is_refused(backbone, images):
    tf = build_transform(PreprocessConfig((96, 128)))
    with pytest.raises(ValueError, match=r"extract_features on cpu with a precision for 'cuda' "
                                         r"\(fp16 autocast \+ GradScaler\); pass the precision "
                                         r"of this device: run_precision\(params, 'cpu'\)"):
        extract_features(backbone, images[:2], tf,
                         precision=Precision("cuda", enabled=True, dtype=torch.float16))


def test_evaluation_encodes_in_the_run_precision(monkeypatch):
    """evaluate_backbone (every stage's test) passes the precision of the run's parameters."""
    from handclip_nb.evaluate import protocol_eval

    seen = {}

    def spy(*args, precision=None, **kwargs):
        seen["precision"] = precision
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(protocol_eval, "extract_features", spy)
    monkeypatch.setattr(protocol_eval, "run_precision",
                        lambda params, device: ("precision of", params["amp_dtype"], device))
    monkeypatch.setattr(protocol_eval, "image_source", lambda config, params: None)
    monkeypatch.setattr(protocol_eval, "calibration_split", lambda protocol, fitted: (None, None))
    monkeypatch.setattr(protocol_eval, "needed_indices", lambda splits: [])

    class _Protocol:
        test, selection = [], None

        def paths(self, indices):
            return []

    class _Backbone:
        def preprocess_config(self):
            return None

    params = {"stage": "stage2", "amp": True, "amp_dtype": "bfloat16", "device": "cpu",
              "batch_size": 4, "flip_tta": False, "num_workers": 0}
    with pytest.raises(RuntimeError, match="stop after the call"):
        protocol_eval.evaluate_backbone(_Backbone(), _Protocol(), params)
    assert seen["precision"] == ("precision of", "bfloat16", "cpu")


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
