"""The decoded-image pipeline (``data/images.py``) and the speed settings around it.

Decoding each photo once (``decode_cache``), decoding JPEGs at reduced scale
(``reduced_jpeg_decode``), per-draw augmentation seeds, loader workers, mixed precision and
channels-last exist to make runs faster. Each test checks that one of them leaves the numbers
of a run as they were (bit for bit, or within a measured tolerance), never serves stale or torn
pixels, or stays off where it does not apply (CPU runs).
"""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import run_params
from PIL import Image
from torch import nn
from together import run_together

from handclip_nb.backbone_specs import PreprocessConfig, get_backbone_spec
from handclip_nb.data.datasets import ImageListDataset, augmentation_seed, make_loader
from handclip_nb.data.images import (DecodeCache, DecodeGeometry, ImageSource, decode_resized,
                                     image_source)
from handclip_nb.data.sampler import Draw, PKSampler, number_draws
from handclip_nb.data.synthetic import generate_dataset
from handclip_nb.data.transforms import AugmentConfig
from handclip_nb.device import AMP_DTYPES, Precision, default_num_workers
from handclip_nb.evaluate.features import extract_features
from handclip_nb.models.backbones import backbone_from_params, build_backbone
from handclip_nb.params import AMP_DTYPE_NAMES, SCHEMA
from handclip_nb.train.loop import TrainLoop, compiled, run_precision

REPO = Path(__file__).resolve().parents[1]

#: (width, height) of the real datasets' photos (11k Hands, HD).
REAL_PHOTO_SIZE = (1600, 1200)
#: (height, width) of the tiny backbones' input.
TINY_INPUT = (96, 128)
#: (height, width) of a reference-size input (ViT-B/16 at 4:3), where draft decoding matters.
REFERENCE_INPUT = (224, 288)

#: Reduced-scale decoding vs a full decode of the 16 synthetic 1600x1200 photos at 224x288
#: 'pad' (PIL 13, libjpeg-turbo; the 1/2 scale is chosen): per-photo mean |difference|
#: 0.14-0.18 grey levels ('squash': 0.15-0.20), largest single difference 2. The bounds leave
#: headroom for other libjpeg builds, yet fail if the decode policy gets coarser: DRAFT_MARGIN 1
#: (1/4 scale) gives per-photo means 0.25-0.36 and differences up to 5; a draft below the
#: output size (1/8 scale), 0.57-0.71 and up to 32.
DRAFT_MEAN_BOUND = 0.25
DRAFT_MAX_BOUND = 3

#: Run by the concurrency test (tests/together.py; argv: geometry fields, cache root, image
#: paths): released with the other child, get each image and re-read its entry for a while,
#: when the other child may be writing the same entry.
BUILD_CACHE_SCRIPT = """
import json, sys, time
import numpy as np
from handclip_nb.data.images import DecodeCache, DecodeGeometry
fields, root = json.loads(sys.argv[1]), sys.argv[2]
cache = DecodeCache(DecodeGeometry(**{**fields, "mean": tuple(fields["mean"])}), root)
ready_then_wait_for_go()
for path in sys.argv[3:]:
    image = np.array(cache.get(path))
    until = time.monotonic() + 0.03
    while time.monotonic() < until:
        assert np.array_equal(np.load(cache.entry_path(path)), image), f"torn entry of {path}"
"""


def _geometry(size=REFERENCE_INPUT, resize_mode="pad", reduced=True, **preprocess):
    return DecodeGeometry.from_preprocess(
        PreprocessConfig(image_size=size, resize_mode=resize_mode, **preprocess), reduced)


@pytest.fixture(scope="module")
def real_size_jpegs(tmp_path_factory) -> list[Path]:
    """16 synthetic photos at the real datasets' 1600x1200 (about 1.3 s)."""
    root = generate_dataset(tmp_path_factory.mktemp("real_size"), subjects=2,
                            images_per_subject=2, image_size=REAL_PHOTO_SIZE)
    return sorted((root / "Hands").glob("*.jpg"))


@pytest.fixture(scope="module")
def small_jpegs(tmp_path_factory) -> list[Path]:
    """16 synthetic 160x120 photos (the embedded dataset's size)."""
    root = generate_dataset(tmp_path_factory.mktemp("small"), subjects=2, images_per_subject=2)
    return sorted((root / "Hands").glob("*.jpg"))


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, small_jpegs, real_size_jpegs) -> list[Path]:
    """Two small PNGs and one real-size PNG (large enough for a reduced decode to matter)."""
    folder = tmp_path_factory.mktemp("png")
    out = []
    for jpeg in small_jpegs[:2] + real_size_jpegs[:1]:
        with Image.open(jpeg) as im:
            im.save(folder / f"{jpeg.stem}.png")
        out.append(folder / f"{jpeg.stem}.png")
    return out


# --- 1. the cache changes nothing ---------------------------------------------------------------


@pytest.mark.parametrize("reduced", [True, False], ids=["reduced-decode", "full-decode"])
def test_cache_on_and_off_give_identical_pixels(real_size_jpegs, small_jpegs, pngs, tmp_path,
                                                 reduced):
    """Guards against a cache that stores anything but what ``decode_resized`` returns for the
    source's own geometry (a default geometry, the other decode policy, a lossy format): the
    evaluation tensors must be equal bit for bit, when an entry is built and when it is read."""
    preprocess = PreprocessConfig(image_size=TINY_INPUT)
    cached = ImageSource(preprocess, cache=True, reduced_jpeg_decode=reduced,
                         cache_root=tmp_path)
    uncached = ImageSource(preprocess, cache=False, reduced_jpeg_decode=reduced)
    for path in real_size_jpegs[:4] + small_jpegs[:2] + pngs:
        expected = uncached(path)
        built = cached(path)
        assert cached.cache.entry_path(path).is_file()
        read = cached(path)
        assert torch.equal(built, expected), f"{path.name}: built entry differs from a decode"
        assert torch.equal(read, expected), f"{path.name}: stored entry differs from a decode"


def test_features_are_identical_with_the_cache_and_a_warm_cache_decodes_nothing(
        real_size_jpegs, small_jpegs, tmp_path, monkeypatch, one_thread):
    """Guards the promise that ``decode_cache`` changes no metric (features equal, tolerance 0)
    and that it pays: a cold cache decodes each image once (the loader reads what ``prepare``
    built), a warm one decodes nothing."""
    backbone = build_backbone("tiny-vit", image_size=TINY_INPUT, seed=0)
    preprocess = backbone.preprocess_config()
    paths = [str(p) for p in real_size_jpegs[:6] + small_jpegs[:6]]
    without_cache = extract_features(backbone, paths, ImageSource(preprocess, cache=False),
                                     batch_size=4)
    decoded = []

    def counting_decode(path, geometry):
        decoded.append(path)
        return decode_resized(path, geometry)

    monkeypatch.setattr("handclip_nb.data.images.decode_resized", counting_decode)
    source = ImageSource(preprocess, cache=True, cache_root=tmp_path)
    cold = extract_features(backbone, paths, source, batch_size=4)
    assert sorted(decoded) == sorted(paths)
    decoded.clear()
    warm = extract_features(backbone, paths, source, batch_size=4)
    assert decoded == []
    assert source.prepare(paths, progress=False).built == 0
    assert torch.equal(cold, without_cache)
    assert torch.equal(warm, without_cache)


# --- 2. never stale -----------------------------------------------------------------------------


def test_a_rewritten_file_is_decoded_again(tmp_path):
    """Guards against an entry keyed on the path (or path and size) alone: a photo rewritten in
    place with other pixels, the same length and a new modification time must be decoded
    again."""
    path = tmp_path / "hand.bmp"  # uncompressed: the same dimensions give the same length
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    geometry = _geometry(TINY_INPUT)
    cache = DecodeCache(geometry, tmp_path / "cache")
    first = np.array(cache.get(path))
    before = path.stat()
    Image.fromarray(255 - noise).save(path)
    later = before.st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(later, later))
    assert path.stat().st_size == before.st_size  # only the modification time tells them apart
    fresh = cache.get(path)
    assert not np.array_equal(fresh, first)
    assert np.array_equal(fresh, decode_resized(path, geometry))


def test_each_decode_setting_has_its_own_entries(real_size_jpegs, tmp_path):
    """Guards against a geometry key that misses a field: with every variant built into one
    cache folder, each must still get its own pixels, not a same-shaped entry of another
    resize mode, interpolation, fill colour or decode policy."""
    variants = {
        "base": _geometry(),
        "input size": _geometry((192, 256)),
        "resize mode": _geometry(resize_mode="squash"),
        "interpolation": _geometry(interpolation="bilinear"),
        "fill colour": _geometry(mean=(0.5, 0.5, 0.5)),
        "full decode": _geometry(reduced=False),
    }
    keys = {name: g.key for name, g in variants.items()}
    assert len(set(keys.values())) == len(keys), keys
    path = real_size_jpegs[0]
    expected = {name: decode_resized(path, g) for name, g in variants.items()}
    for name in variants:  # each variant really gives other pixels than the base
        assert name == "base" or not np.array_equal(expected[name], expected["base"]), name
    caches = {name: DecodeCache(g, tmp_path) for name, g in variants.items()}
    for _ in ("build", "read"):
        for name, cache in caches.items():
            assert np.array_equal(cache.get(path), expected[name]), f"stale entry for {name}"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other shape"])
def test_a_damaged_entry_is_decoded_again(small_jpegs, tmp_path, damage):
    """Guards against serving (or crashing on) an entry damaged by something else: a
    non-``.npy`` file, a torn one, one of another shape. The entry is rebuilt."""
    geometry = _geometry(TINY_INPUT)
    cache = DecodeCache(geometry, tmp_path)
    path = small_jpegs[0]
    expected = decode_resized(path, geometry)
    cache.get(path)
    entry = cache.entry_path(path)
    if damage == "garbage":
        entry.write_bytes(b"this is not an npy file")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    else:
        np.save(entry, np.zeros((48, 64, 3), dtype=np.uint8))
    assert np.array_equal(cache.get(path), expected)
    assert np.array_equal(np.load(entry), expected)  # rewritten, not only worked around


# --- 3. atomic writes ---------------------------------------------------------------------------


def test_two_processes_building_one_cache_at_once(real_size_jpegs, tmp_path):
    """Guards against torn entries when two runs fill the same cache at the same moment (it is
    shared by runs and processes): both start together on the same 8 photos in the same order
    and re-read each entry while the other may be writing it (an in-place write fails this in
    3 runs of 3); afterwards every entry loads whole and equals a decode, no temp file left."""
    geometry = _geometry(reduced=False)  # full decodes: slower, so the two overlap longer
    paths = [str(p) for p in real_size_jpegs[:8]]
    root = tmp_path / "cache"
    fields = json.dumps(dataclasses.asdict(geometry))
    run_together(BUILD_CACHE_SCRIPT, [[fields, str(root), *paths]] * 2, tmp_path / "flags",
                 cwd=REPO)
    cache = DecodeCache(geometry, root)
    for path in paths:
        entry = np.load(cache.entry_path(path))
        assert entry.shape == geometry.shape
        assert np.array_equal(entry, decode_resized(path, geometry)), path
    assert len(list(cache.folder.rglob("*.npy"))) == len(paths)
    assert list(root.rglob("*.tmp")) == []


def test_a_failed_write_leaves_no_entry(small_jpegs, tmp_path, monkeypatch):
    """Guards against writing an entry in place (a crash or a full disk mid-write would leave a
    partial entry for every later run), against leaving the temp file behind, and against a
    failed write stopping the run (it warns and serves the decoded pixels)."""
    geometry = _geometry(TINY_INPUT)
    cache = DecodeCache(geometry, tmp_path)
    path = small_jpegs[0]

    def save_then_fail(file, array, **kwargs):
        file.write(b"\x93NUMPY partial header")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.warns(UserWarning, match="No space left.*decode_cache: false"):
        served = cache.get(path)  # the decoded pixels, uncached: a full disk never stops a run
    monkeypatch.undo()
    assert np.array_equal(served, decode_resized(path, geometry))
    assert not cache.entry_path(path).exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert np.array_equal(cache.get(path), decode_resized(path, geometry))


# --- 4. reduced-scale JPEG decoding -------------------------------------------------------------


def test_reduced_jpeg_decode_stays_within_a_measured_tolerance_of_a_full_decode(
        real_size_jpegs):
    """Guards the documented tolerance of ``reduced_jpeg_decode`` (see DRAFT_MEAN_BOUND: a
    coarser DCT scale or a smaller margin breaks it) and that the reduction is in effect on
    real-size photos at all."""
    reduced, full = _geometry(reduced=True), _geometry(reduced=False)
    diffs = [np.abs(decode_resized(p, reduced).astype(np.int16)
                    - decode_resized(p, full).astype(np.int16)) for p in real_size_jpegs]
    means = [float(d.mean()) for d in diffs]
    peak = int(max(d.max() for d in diffs))
    measured = (f"reduced vs full decode of {len(diffs)} 1600x1200 photos at 224x288 pad: "
                f"mean |diff| {np.mean(means):.3f} (photos {min(means):.3f}-{max(means):.3f}), "
                f"max {peak} grey levels")
    assert min(means) > 0, f"the reduced decode did nothing; {measured}"
    assert max(means) < DRAFT_MEAN_BOUND and peak <= DRAFT_MAX_BOUND, measured


def test_small_jpegs_and_pngs_are_decoded_in_full(small_jpegs, pngs):
    """Guards against reducing an image that has no scale to spare (a 160x120 photo for a
    224x288 input) or one that is not a JPEG: the two decode policies must agree exactly."""
    reduced, full = _geometry(reduced=True), _geometry(reduced=False)
    for path in small_jpegs[:2] + pngs:
        assert np.array_equal(decode_resized(path, reduced), decode_resized(path, full)), path


# --- 5. the tensor steps refuse an image of another size ----------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_an_image_source_refuses_an_image_at_another_size(train):
    """Guards against pixels resized for another input reaching the tensor steps silently."""
    source = ImageSource(PreprocessConfig(image_size=TINY_INPUT), train=train, cache=False)
    with pytest.raises(ValueError, match=r"decoded image is 120x160 .*expects 96x128"):
        source.transform(Image.new("RGB", (160, 120)))
    assert source.transform(Image.new("RGB", (128, 96))).shape == (3, *TINY_INPUT)


# --- 6. per-draw augmentation seeds -------------------------------------------------------------


@pytest.fixture()
def augmented_hands(small_jpegs, tmp_path) -> ImageListDataset:
    """8 small photos through a training ImageSource (crop, jitter, erasing), seed 3; labels
    0, 0, 0, 1, 1, 2, 2, 2: every identity has fewer than K = 4 images."""
    source = ImageSource(PreprocessConfig(image_size=TINY_INPUT), train=True,
                         augment=AugmentConfig(), cache=True, cache_root=tmp_path)
    paths = [str(p) for p in small_jpegs[:8]]
    source.prepare(paths, progress=False)
    return ImageListDataset(paths, [0, 0, 0, 1, 1, 2, 2, 2], source, seed=3)


#: One epoch's draws in a fixed order: item 3 drawn twice, as P×K sampling can.
FIXED_DRAWS = number_draws([[3, 0, 5, 3, 1, 7, 2, 6]])[0]


def _augmented_items(dataset, workers, epoch, global_seed, draws=FIXED_DRAWS):
    """The images of one epoch's ``draws`` (in order)."""
    dataset.set_epoch(epoch)
    torch.manual_seed(global_seed)
    loader = make_loader(dataset, "cpu", num_workers=workers, batch_size=4, sampler=draws)
    return [image for images, _, _ in loader for image in images]


def test_augmentation_depends_on_seed_epoch_item_and_draw_only(augmented_hands):
    """Guards against augmentation drawn from the worker's or the caller's generator: the same
    epoch must give the same images with 0 and 2 loader workers (and any global seed), another
    epoch other images; an item's second draw gets an augmentation of its own, and a plain
    index is its first draw."""
    in_process = _augmented_items(augmented_hands, workers=0, epoch=0, global_seed=0)
    two_workers = _augmented_items(augmented_hands, workers=2, epoch=0, global_seed=1)
    next_epoch = _augmented_items(augmented_hands, workers=0, epoch=1, global_seed=0)
    assert all(torch.equal(a, b) for a, b in zip(in_process, two_workers, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(in_process, next_epoch, strict=True))
    assert FIXED_DRAWS[3] == Draw(3, 1)
    assert not torch.equal(in_process[0], in_process[3])
    plain = _augmented_items(augmented_hands, workers=0, epoch=0, global_seed=0,
                             draws=[d.index for d in FIXED_DRAWS])
    assert torch.equal(plain[0], in_process[0]) and torch.equal(plain[3], in_process[0])


def test_first_draws_keep_the_seed_of_seed_epoch_and_image():
    """An epoch that draws no image twice augments exactly as before draws were numbered (the
    seed of (seed, epoch, image)); each later draw of an image has a seed of its own."""
    def before(seed, epoch, index):  # the rule every draw followed before
        state = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
        return int(state[0]) << 32 | int(state[1])

    for seed, epoch, index in [(0, 0, 0), (3, 7, 5), (1, 29, 1234)]:
        assert augmentation_seed(seed, epoch, index) == before(seed, epoch, index)
        assert augmentation_seed(seed, epoch, index, occurrence=0) == before(seed, epoch, index)
    seeds = {augmentation_seed(3, e, i, k) for e in range(3) for i in range(8) for k in range(4)}
    assert len(seeds) == 3 * 8 * 4
    with pytest.raises(ValueError, match="occurrence counts the earlier draws"):
        augmentation_seed(0, 0, 0, occurrence=-1)
    with pytest.raises(TypeError, match=r"integer indices or sampler.Draw"):
        ImageListDataset(["a.jpg"], [0], np.asarray, seed=0)[0.0]


def _pk_epoch(dataset, sampler, epoch, workers):
    """One epoch of P×K batches: [(images, item indices)]."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    loader = make_loader(dataset, "cpu", num_workers=workers, batch_sampler=sampler)
    return [(images, indices.tolist()) for images, _, indices in loader]


def _same_batches(a, b):
    return len(a) == len(b) and all(ia == ib and torch.equal(xa, xb)
                                    for (xa, ia), (xb, ib) in zip(a, b))


def test_pk_batches_augment_each_repeated_draw_on_its_own(augmented_hands):
    """Issue 19, item 9: an identity with fewer than K images is drawn with replacement, and
    its repeated images were augmented identically (seeded by (seed, epoch, image) only): a
    positive pair at distance 0. Every draw of a batch must be a distinct tensor, and the
    batches must still be the same with 0 and 2 workers, on a second run, and for an epoch
    run fresh (as after a resume) and after the epochs before it."""
    dataset, sampler = augmented_hands, PKSampler(augmented_hands.labels, p=2, k=4, seed=3)
    first = _pk_epoch(dataset, sampler, epoch=1, workers=0)
    repeats = 0
    for images, indices in first:
        repeats += len(indices) - len(set(indices))
        for a in range(len(indices)):
            for b in range(a + 1, len(indices)):
                assert not torch.equal(images[a], images[b]), (indices[a], indices[b])
    assert repeats > 0  # the draws above include repeated images
    fresh_sampler = PKSampler(dataset.labels, p=2, k=4, seed=3)
    assert _same_batches(first, _pk_epoch(dataset, fresh_sampler, epoch=1, workers=2))
    _pk_epoch(dataset, fresh_sampler, epoch=0, workers=0)  # an uninterrupted run's epoch 0
    assert _same_batches(first, _pk_epoch(dataset, fresh_sampler, epoch=1, workers=0))
    assert not _same_batches(first, _pk_epoch(dataset, sampler, epoch=2, workers=0))


def test_augmentation_seeds_leave_the_global_generator_untouched(augmented_hands):
    """Guards against seeding the global generator per item, which would make every later
    draw of the training process (dropout, sampler) repeat with the data."""
    before = torch.random.get_rng_state()
    items = [augmented_hands[i] for i in range(len(augmented_hands))]
    assert len(items) == 8
    assert torch.equal(torch.random.get_rng_state(), before)


# --- 7. precision -------------------------------------------------------------------------------


def test_precision_resolves_to_mixed_precision_on_cuda_only():
    """Guards that a CPU run trains in fp32 whatever ``amp`` says, that only fp16 gets a
    gradient scaler (bf16 has fp32's range) and that an unknown dtype is refused by name."""
    for dtype in AMP_DTYPES:
        assert not Precision.resolve(True, dtype, "cpu").enabled
    assert not run_precision({"amp": True, "amp_dtype": "float16"}, "cpu").enabled
    assert Precision("cuda", True, torch.float16).needs_scaler
    assert not Precision("cuda", True, torch.bfloat16).needs_scaler
    assert not Precision("cuda", False, torch.float16).needs_scaler
    with pytest.raises(ValueError, match="unknown amp_dtype 'half'.*float16, bfloat16"):
        Precision.resolve(True, "half", "cpu")


def test_a_bf16_precision_trains_on_cpu_with_fp32_master_weights(tmp_path, one_thread):
    """Guards against TrainLoop ignoring an explicit ``precision`` (the forward must run in
    bf16), against casting the weights themselves (they stay fp32, with fp32 gradients) and
    against a gradient scaler for bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    forward_dtypes = set()

    def step(batch):
        logits = model(batch[0])
        forward_dtypes.add(logits.dtype)
        return {"loss": nn.functional.cross_entropy(logits, batch[1])}

    def batches(epoch):
        return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]

    loop = TrainLoop(stage="toy", output_dir=tmp_path, modules={"model": model},
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     scheduler=None, step=step, batches=batches, meta={"arch": "toy"},
                     precision=Precision("cpu", enabled=True, dtype=torch.bfloat16),
                     progress=False)
    assert not loop.scaler.is_enabled()
    losses = [h["loss"]["loss"] for h in loop.fit(6).history]
    assert forward_dtypes == {torch.bfloat16}
    assert losses[-1] < 0.8 * losses[0], losses
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name


def test_shipped_fp16_weights_train_as_fp32_under_bf16_autocast(one_thread):
    """Guards against the shipped fp16 file (handclip-mini) leaving fp16 parameters, which an
    optimiser step would round away, and against autocast changing the weights' dtype."""
    shipped = get_backbone_spec("handclip-mini").weights_file
    stored = torch.load(shipped, weights_only=True)["state_dict"]
    assert any(t.dtype == torch.float16 for t in stored.values())  # the file really is fp16
    backbone = build_backbone("handclip-mini").train()
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    images = torch.randn(2, 3, *backbone.image_size, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(backbone.parameters(), lr=1e-3)
    with Precision("cpu", enabled=True, dtype=torch.bfloat16).autocast():
        embedding = backbone.encode_image(images).global_embedding
    assert embedding.dtype == torch.bfloat16
    embedding.float().pow(2).mean().backward()
    optimizer.step()
    for name, param in backbone.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.grad is None or param.grad.dtype == torch.float32, name


# --- 8. loader workers --------------------------------------------------------------------------


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 0), (4, 0), (5, 1), (8, 2), (16, 4)])
def test_cpu_runs_load_in_process_up_to_four_cores_then_with_a_quarter(monkeypatch, cpus,
                                                                        workers):
    """Guards against workers competing with the model's own arithmetic on a small CPU."""
    monkeypatch.setattr("handclip_nb.device.available_cpus", lambda: cpus)
    assert default_num_workers("cpu") == workers


@pytest.mark.parametrize("cpus, workers", [(2, 1), (6, 5), (16, 8)])
def test_cuda_runs_load_on_every_core_but_one_up_to_eight(monkeypatch, cpus, workers):
    """Guards against a GPU starved by too few loader workers (or a machine swamped by too
    many)."""
    monkeypatch.setattr("handclip_nb.device.available_cpus", lambda: cpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_num_workers("cuda") == workers


def test_make_loader_pins_memory_only_for_cuda_and_resolves_the_workers(monkeypatch):
    """Guards against pinned memory on a CPU run (a wasted copy) and against a loader that
    ignores the resolved (or the explicitly given) worker count."""
    monkeypatch.setattr("handclip_nb.device.available_cpus", lambda: 3)
    items = list(range(10))
    cpu = make_loader(items, "cpu", batch_size=2)
    assert (cpu.num_workers, cpu.pin_memory) == (0, False)
    assert make_loader(items, "cpu", num_workers=1, batch_size=2).num_workers == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = make_loader(items, "cuda", batch_size=2)
    assert (cuda.num_workers, cuda.pin_memory) == (2, True)


# --- 9. compile and channels-last ---------------------------------------------------------------


def test_compile_off_returns_the_module_itself():
    """Guards against wrapping the model when ``compile`` is off (checkpoints, optimisers and
    evaluation must see the module itself) and a wrapper that does not share its weights."""
    module = nn.Linear(2, 2)
    assert compiled(module, False) is module
    wrapper = compiled(module, True)  # compiles lazily, on the first call: cheap here
    assert wrapper is not module
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in module.parameters()]


def test_channels_last_changes_a_resnets_layout_not_its_outputs(one_thread):
    """Guards against channels-last changing what a ResNet computes, or not being applied, and
    against it touching a ViT."""
    plain = build_backbone("tiny-rn", image_size=TINY_INPUT, seed=0)
    fast = build_backbone("tiny-rn", image_size=TINY_INPUT, seed=0).use_channels_last()
    conv = fast.clip.visual.conv1.weight
    assert fast.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
    assert not plain.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, *TINY_INPUT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = plain.encode_image(images), fast.encode_image(images)
    for field in ("global_embedding", "patch_tokens", "pre_projection", "intermediate"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field),
                                   rtol=1e-5, atol=1e-5, msg=field)
    vit = build_backbone("tiny-vit", image_size=TINY_INPUT, seed=0)
    assert vit.use_channels_last() is vit and not vit.channels_last
    assert vit.clip.visual.conv1.weight.is_contiguous()


def test_backbone_from_params_leaves_a_cpu_run_as_it_is():
    """Guards against applying the CUDA settings (channels-last, process-wide TF32) on a CPU."""
    params = run_params("stage0", backbone="tiny-rn", device="cpu", channels_last=True,
                        tf32=True)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        backbone = backbone_from_params(params)
        assert not backbone.channels_last
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- 10. parameters -----------------------------------------------------------------------------


def test_speed_parameters_have_their_documented_defaults():
    """Guards the documented defaults of the speed settings and keeps the schema's amp_dtype
    choices equal to what the device layer knows."""
    defaults = {"decode_cache": True, "reduced_jpeg_decode": True, "num_workers": None,
                "amp_dtype": "float16", "tf32": True, "channels_last": True, "compile": False}
    assert {name: SCHEMA[name].default for name in defaults} == defaults
    resolved = run_params("stage2")
    assert {name: resolved[name] for name in defaults} == defaults
    assert AMP_DTYPE_NAMES == tuple(AMP_DTYPES)


def test_image_source_follows_the_run_parameters(workbench_home):
    """Guards against ``image_source`` ignoring ``decode_cache`` / ``reduced_jpeg_decode``, and
    against a default cache outside the project's outputs folder."""
    preprocess = PreprocessConfig(image_size=TINY_INPUT)
    default = image_source(preprocess, {})
    assert default.geometry.reduced_jpeg_decode
    assert default.cache.root == workbench_home / "outputs" / ".decode_cache"
    assert image_source(preprocess, {"decode_cache": False}).cache is None
    full = image_source(preprocess, {"reduced_jpeg_decode": False})
    assert not full.geometry.reduced_jpeg_decode and not full.cache.geometry.reduced_jpeg_decode
