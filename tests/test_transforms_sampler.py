"""Transforms (CLIP normalisation everywhere, letterbox by default) and the P×K sampler."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from handclip_nb.backbone_specs import PreprocessConfig
from handclip_nb.constants import CLIP_MEAN, CLIP_STD
from handclip_nb.data.sampler import Draw, PKSampler, number_draws
from handclip_nb.data.transforms import AugmentConfig, LetterboxResize, build_transform


def _normalize_steps(tf):
    return [t for t in tf.transforms if isinstance(t, T.Normalize)]


@pytest.mark.parametrize("train", [False, True])
def test_train_and_eval_both_use_clip_normalisation(train):
    """docs/mistakes.md #2: the earlier code normalised only at evaluation."""
    tf = build_transform(PreprocessConfig((96, 128)), train=train)
    (norm,) = _normalize_steps(tf)
    assert tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD


def test_transform_comes_from_a_preprocess_config_only():
    """One way to build a transform: from the model's own config, never a bare size."""
    with pytest.raises(TypeError, match="PreprocessConfig.*backbone.preprocess_config"):
        build_transform((96, 128))
    cfg = PreprocessConfig((96, 128), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    (norm,) = _normalize_steps(build_transform(cfg))
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.25, 0.25, 0.25)


def test_normalised_mean_colour_is_zero():
    mean_rgb = tuple(int(round(255 * m)) for m in CLIP_MEAN)
    img = Image.new("RGB", (160, 120), mean_rgb)
    x = build_transform(PreprocessConfig((96, 128)))(img)
    assert x.shape == (3, 96, 128)
    assert x.abs().max() < 0.01


def test_letterbox_keeps_aspect_ratio_and_pads():
    img = Image.new("RGB", (200, 100), (255, 0, 0))  # 2:1 into a 4:3 box
    out = LetterboxResize((96, 128))(img)
    arr = np.asarray(out)
    assert out.size == (128, 96)
    red_rows = np.where((arr[:, 64, 0] > 200) & (arr[:, 64, 1] < 50))[0]
    assert len(red_rows) == 64  # 128 wide → 64 high, centred; the rest is padding
    assert red_rows[0] == 16


def test_squash_only_when_asked():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x = build_transform(PreprocessConfig((96, 128), resize_mode="squash"))(img)
    assert x.shape == (3, 96, 128)
    assert (x[0] > 1).all()  # all red: nothing padded
    with pytest.raises(ValueError, match="pad, squash"):
        build_transform(PreprocessConfig((96, 128), resize_mode="crop"))


def test_training_augmentation_has_no_flip_by_default():
    tf = build_transform(PreprocessConfig((96, 128)), train=True)
    kinds = [type(t).__name__ for t in tf.transforms]
    assert "RandomHorizontalFlip" not in kinds
    assert {"RandomCrop", "ColorJitter", "RandomErasing"} <= set(kinds)
    tf_flip = build_transform(PreprocessConfig((96, 128)), train=True,
                              augment=AugmentConfig(hflip_p=0.5))
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in tf_flip.transforms]
    torch.manual_seed(0)
    x = tf(Image.new("RGB", (160, 120), (200, 150, 120)))
    assert x.shape == (3, 96, 128)


# ---------------------------------------------------------------- P×K sampler
def _labels():
    rng = np.random.default_rng(0)
    counts = rng.integers(2, 9, size=20)  # some identities have fewer than K images
    return [lab for lab, c in enumerate(counts) for _ in range(c)]


def test_every_batch_is_p_identities_times_k_images():
    labels = _labels()
    sampler = PKSampler(labels, p=4, k=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for b in batches:
        assert len(b) == 16
        labs = [labels[d.index] for d in b]
        assert len(set(labs)) == 4
        assert all(labs.count(x) == 4 for x in set(labs))  # every anchor has K-1 positives


def test_sampler_covers_the_data_and_is_seeded_per_epoch():
    labels = _labels()
    s = PKSampler(labels, p=4, k=2, seed=1)
    seen = {d.index for b in s for d in b}
    assert len(seen) > 0.8 * len(labels)
    first = list(s)
    assert first == list(PKSampler(labels, p=4, k=2, seed=1))  # same seed, same epoch
    s.set_epoch(1)
    assert list(s) != first


def test_sampler_rejects_impossible_settings():
    with pytest.raises(ValueError, match="only 3"):
        PKSampler([0, 0, 1, 1, 2, 2], p=4, k=2)
    with pytest.raises(ValueError, match="k >= 2"):
        PKSampler([0, 0, 1, 1], p=2, k=1)


def _numbered_slowly(batches):
    """The obvious reference: a draw's occurrence is how often its index appears earlier in the
    flattened epoch."""
    flat = [i for b in batches for i in b]
    numbered, position = [], 0
    for b in batches:
        numbered.append([Draw(i, flat[:position + j].count(i)) for j, i in enumerate(b)])
        position += len(b)
    return numbered


def test_draws_are_numbered_per_index_across_the_epoch():
    batches = [[3, 0, 3, 5], [5, 3, 1, 1], [], [0, 7]]
    assert number_draws(batches) == _numbered_slowly(batches)
    assert number_draws(batches)[1] == [Draw(5, 1), Draw(3, 2), Draw(1, 0), Draw(1, 1)]
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, 12, size=8).tolist() for _ in range(10)]
    assert number_draws(batches) == _numbered_slowly(batches)


def test_sampler_numbers_the_repeated_draws_of_small_identities():
    """Guards the P×K half of independent augmentation for repeated draws: an identity with
    fewer than K images is drawn with replacement, and its repeated images must reach the
    dataset as distinct draws (the old sampler yielded bare indices, so a repeated image was
    augmented identically: a positive pair at distance 0)."""
    labels = _labels()
    sampler = PKSampler(labels, p=4, k=4, seed=0)
    batches = list(sampler)
    assert all(isinstance(d, Draw) for b in batches for d in b)
    assert batches == _numbered_slowly([[d.index for d in b] for b in batches])
    repeated = [d for b in batches for d in b if d.occurrence > 0]
    assert repeated  # identities with 2 or 3 images and K = 4
    for b in batches:
        assert len(set(b)) == len(b)  # no two draws of a batch are the same draw


def test_shuffled_batches_drop_the_last_incomplete_one_and_repeat_per_epoch():
    """CLIP-HandID's batches (train_handID.py:355-356 shuffle=True, :97-98 the incomplete last
    batch skipped): each epoch a permutation of (seed, epoch), full batches only."""
    from handclip_nb.data.sampler import ShuffledBatchSampler

    sampler = ShuffledBatchSampler(23, 5, seed=3)
    assert len(sampler) == 4
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [len(b) for b in batches] == [5] * 4
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == 20 and set(flat) <= set(range(23))
        epochs.append(flat)
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="no complete batch"):
        ShuffledBatchSampler(3, 5)


def test_resize_then_random_crop_gives_the_models_input():
    """train_resize: resize to 256 x 256, then a random 224 x 224 crop (train_handID.py:321-322),
    no padding; the flip comes after the crop."""
    pre = PreprocessConfig(image_size=(40, 48), resize_mode="squash", mean=CLIP_MEAN,
                           std=CLIP_STD)
    aug = AugmentConfig(pad=0, crop=(32, 40), erasing_p=0.0, color_jitter=0.0, hflip_p=0.5)
    transform = build_transform(pre, train=True, augment=aug)
    names = [type(t).__name__ for t in transform.transforms]
    assert names.index("RandomCrop") < names.index("RandomHorizontalFlip")
    assert "Pad" not in names
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    assert transform(image).shape == (3, 32, 40)
