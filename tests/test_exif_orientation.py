"""Phone photos: the EXIF orientation policy (``exif_orientation``) and HEIC photos.

A phone stores a portrait photo as landscape pixels and an EXIF tag saying "turn 90 degrees".
Every reader opens images through one opener (``data/image_files.py``) whose policy is a
parameter: ``exif`` turns the photo upright, ``ignore`` reads the pixels as stored (the
literature's loaders, so 11k and HD numbers stay comparable). ``auto`` is ``exif`` for custom
datasets and the search, ``ignore`` for 11k and HD. The tests build small JPEGs whose pixels are
stored landscape with tag 6 ("rotate 90 degrees clockwise to display") and a red block in the
stored top-left corner: upright, the block is at the top right.
"""
from __future__ import annotations

import ast
import csv
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handclip_nb.backbone_specs import PreprocessConfig
from handclip_nb.data import image_files
from handclip_nb.data.custom import read_custom
from handclip_nb.data.datasets import ImageListDataset, build_protocol
from handclip_nb.data.handinfo import DataError, HANDINFO_COLUMNS
from handclip_nb.data.image_files import HeifSupportMissing, open_image
from handclip_nb.data.images import (DRAFT_MARGIN, DecodeCache, DecodeGeometry, ImageSource,
                                     decode_image, decode_resized, image_source)
from handclip_nb.evaluate import gallery as G
from handclip_nb.evaluate.features import extract_features
from handclip_nb.models.backbones import build_backbone
from handclip_nb.params import SCHEMA, ParamError, resolve_params

PACKAGE = Path(__file__).resolve().parents[1] / "handclip_nb"

#: EXIF orientation 6: the stored pixels are shown turned 90 degrees clockwise.
ROTATE_90_CW = 6
#: (height, width) of the tiny backbones' input.
TINY_INPUT = (96, 128)


def rotated_photo(path: Path, size=(160, 120), tag: int | None = ROTATE_90_CW,
                  fmt: str = "JPEG") -> Path:
    """Landscape pixels ``size`` = (width, height), grey with a red block in the stored top-left
    corner and a blue bar along the stored bottom edge, carrying EXIF orientation ``tag``."""
    w, h = size
    pixels = np.full((h, w, 3), 128, dtype=np.uint8)
    pixels[: h // 3, : w // 4] = (230, 20, 20)
    pixels[-h // 8:, :] = (20, 20, 230)
    im = Image.fromarray(pixels)
    exif = Image.Exif()
    if tag is not None:
        exif[0x0112] = tag
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, exif=exif, quality=95)
    return path


def red_corner(image) -> str:
    """Which corner the red block is in: 'top-left', 'top-right', 'bottom-left' or
    'bottom-right' (its centroid against the picture's centre; letterbox bars are not red)."""
    a = np.asarray(image).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)
    assert red.any(), "no red block in the picture"
    ys, xs = np.nonzero(red)
    vertical = "top" if ys.mean() < a.shape[0] / 2 else "bottom"
    horizontal = "left" if xs.mean() < a.shape[1] / 2 else "right"
    return f"{vertical}-{horizontal}"


def geometry(orientation: str, size=TINY_INPUT, reduced=True, resize_mode="pad"):
    return DecodeGeometry.from_preprocess(
        PreprocessConfig(image_size=size, resize_mode=resize_mode), reduced, orientation)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """160x120 stored, tag 6: upright it is 120 wide and 160 tall, red block top right."""
    return rotated_photo(tmp_path_factory.mktemp("exif") / "portrait.jpg")


@pytest.fixture(scope="module")
def large_photo(tmp_path_factory) -> Path:
    """1600x1200 stored (the 11k size), tag 6: where reduced-scale decoding applies."""
    return rotated_photo(tmp_path_factory.mktemp("exif_large") / "portrait.jpg", (1600, 1200))


@pytest.fixture()
def heif_registry():
    """Forget whether pillow-heif was found, before and after the test."""
    image_files.heif_support.cache_clear()
    yield
    image_files.heif_support.cache_clear()


# --- 1. the one opener --------------------------------------------------------------------------


def test_the_opener_turns_a_tagged_photo_upright_only_under_exif(photo):
    """Guards against an opener that ignores the EXIF tag (PIL's ``Image.open`` alone) or
    applies it under ``ignore``."""
    upright = open_image(photo, "exif")
    stored = open_image(photo, "ignore")
    assert upright.mode == stored.mode == "RGB"
    assert upright.size == (120, 160) and red_corner(upright) == "top-right"
    assert stored.size == (160, 120) and red_corner(stored) == "top-left"


@pytest.mark.parametrize("tag", [None, 1])
def test_a_photo_without_rotation_is_the_same_under_both_policies(tmp_path, tag):
    path = rotated_photo(tmp_path / "landscape.jpg", tag=tag)
    assert np.array_equal(np.asarray(open_image(path, "exif")),
                          np.asarray(open_image(path, "ignore")))


def test_a_png_with_an_orientation_tag_is_turned_too(tmp_path):
    path = rotated_photo(tmp_path / "portrait.png", fmt="PNG")
    assert red_corner(open_image(path, "exif")) == "top-right"
    assert red_corner(open_image(path, "ignore")) == "top-left"


def test_an_unresolved_or_unknown_policy_is_refused(photo):
    for policy in ("auto", "upright", ""):
        with pytest.raises(ValueError, match="exif, ignore"):
            open_image(photo, policy)
        with pytest.raises(ValueError, match="exif, ignore"):
            geometry(policy)


def test_no_module_opens_an_image_file_but_the_opener():
    """Guards the one way to open an image: any other ``Image.open`` in the package would read
    a phone photo sideways (and a HEIC not at all) whatever the policy says."""
    others = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "image_files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "open" and \
                    isinstance(node.value, ast.Name) and node.value.id == "Image":
                others.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not others, f"Image.open outside data/image_files.py: {others}"


# --- 2. the decoded-image pipeline and its caches ---------------------------------------------


def test_decoding_follows_the_policy(photo):
    """The model's pixels: upright under ``exif``, as stored under ``ignore`` (in the letterboxed
    input, where the block keeps its corner)."""
    assert red_corner(decode_resized(photo, geometry("exif"))) == "top-right"
    assert red_corner(decode_resized(photo, geometry("ignore"))) == "top-left"
    # a portrait photo letterboxed into a landscape input: bars left and right, none above
    upright = decode_resized(photo, geometry("exif"))
    fill = upright[0, 0]
    assert (upright[:, 0] == fill).all() and not (upright[0] == fill).all()


def test_the_decoded_image_cache_keeps_each_policy_apart(photo, tmp_path):
    """Guards against a cache key without the policy: a photo cached sideways must never be
    served to a run that turns it upright (nor the reverse), in either build order."""
    exif, ignore = geometry("exif"), geometry("ignore")
    assert exif.key != ignore.key
    caches = {"exif": DecodeCache(exif, tmp_path), "ignore": DecodeCache(ignore, tmp_path)}
    assert caches["exif"].entry_path(photo) != caches["ignore"].entry_path(photo)
    expected = {"exif": "top-right", "ignore": "top-left"}
    for _ in ("build", "read"):
        for order in (("ignore", "exif"), ("exif", "ignore")):
            for name in order:
                assert red_corner(caches[name].get(photo)) == expected[name], name
    assert caches["exif"].entry_path(photo).is_file()
    assert caches["ignore"].entry_path(photo).is_file()


def test_image_sources_of_the_two_policies_differ_in_their_cache_keys(photo, tmp_path):
    """Guards against a feature-cache key or gallery-index key that misses the policy: both
    key on the image source's description, and a feature cached for the sideways photo must
    not be returned for the upright one."""
    preprocess = PreprocessConfig(image_size=TINY_INPUT)
    exif = ImageSource(preprocess, cache=True, cache_root=tmp_path / "decoded",
                       orientation="exif")
    ignore = ImageSource(preprocess, cache=True, cache_root=tmp_path / "decoded",
                         orientation="ignore")
    assert repr(exif) != repr(ignore)
    backbone = build_backbone("tiny-vit", image_size=TINY_INPUT, seed=0)
    paths = [str(photo)]
    sideways = extract_features(backbone, paths, ignore, cache_dir=tmp_path / "features")
    upright = extract_features(backbone, paths, exif, cache_dir=tmp_path / "features")
    fresh = extract_features(backbone, paths, ImageSource(preprocess, cache=False,
                                                          orientation="exif"))
    assert len(list((tmp_path / "features").glob("*.pt"))) == 2
    assert torch.equal(upright, fresh)
    assert not torch.allclose(upright, sideways)


def test_image_source_takes_the_policy_from_the_run_parameters(photo):
    """Guards against ``image_source`` ignoring ``exif_orientation``; parameters recorded
    before it existed read as stored; unresolved ``auto`` follows the dataset and stage."""
    preprocess = PreprocessConfig(image_size=TINY_INPUT)
    cases = [({"exif_orientation": "exif"}, "exif"), ({"exif_orientation": "ignore"}, "ignore"),
             ({}, "ignore"), ({"exif_orientation": "auto", "dataset": "custom"}, "exif"),
             ({"exif_orientation": "auto", "dataset": "11k", "stage": "search"}, "exif"),
             ({"exif_orientation": "auto", "dataset": "hd", "stage": "stage2"}, "ignore")]
    for params, policy in cases:
        source = image_source(preprocess, {**params, "decode_cache": False})
        assert source.geometry.orientation == policy, params
    upright = image_source(preprocess, {"exif_orientation": "exif", "decode_cache": False})
    assert red_corner(upright.decode(photo)) == "top-right"


def test_a_dataset_of_plain_transforms_reads_with_its_policy(photo):
    for policy, corner in (("exif", "top-right"), ("ignore", "top-left")):
        data = ImageListDataset([str(photo)], [0], transform=np.asarray, orientation=policy)
        assert red_corner(data[0][0]) == corner


# --- 3. reduced-scale decoding sizes the picture after turning it -----------------------------


@pytest.mark.parametrize("size,resize_mode", [((90, 180), "squash"), ((90, 180), "pad"),
                                              ((224, 288), "pad")],
                         ids=["wide-squash", "wide-pad", "reference-pad"])
def test_reduced_decoding_of_a_turned_photo_keeps_the_margin_and_the_orientation(
        large_photo, size, resize_mode):
    """Guards against a draft request sized from the stored (landscape) pixels: the DCT
    reduction must leave DRAFT_MARGIN x the resized size of the UPRIGHT picture on both axes,
    and be the largest that does (1/8 at most); the picture stays upright, with the aspect
    of a full decode."""
    reduced = decode_image(large_photo, geometry("exif", size, True, resize_mode))
    full = decode_image(large_photo, geometry("exif", size, False, resize_mode))
    assert full.size == (1200, 1600)
    assert red_corner(reduced) == red_corner(full) == "top-right"
    scale = full.width / reduced.width
    assert scale in (1, 2, 4, 8) and reduced.height * scale == full.height, (reduced.size,
                                                                             full.size)
    rw, rh = geometry("exif", size, True, resize_mode).resized_size(*full.size)
    assert reduced.width >= DRAFT_MARGIN * rw and reduced.height >= DRAFT_MARGIN * rh, (
        f"{reduced.size} leaves less than {DRAFT_MARGIN} x the resized {(rw, rh)}")
    halved = (reduced.width // 2 >= DRAFT_MARGIN * rw and
              reduced.height // 2 >= DRAFT_MARGIN * rh)
    assert scale == 8 or not halved, f"{reduced.size}: a further halving would still do"
    assert scale > 1, "the reduction is not in effect"
    # the resized pixels stay close to a full decode's (the documented tolerance's order)
    diff = np.abs(decode_resized(large_photo, geometry("exif", size, True, resize_mode))
                  .astype(int) - decode_resized(large_photo, geometry("exif", size, False,
                                                                      resize_mode)).astype(int))
    assert diff.mean() < 1.0


def test_reduced_decoding_under_ignore_is_unchanged(large_photo):
    """The stored pixels are reduced as before the policy existed (11k and HD numbers)."""
    reduced = decode_image(large_photo, geometry("ignore", (224, 288), True))
    assert reduced.size == (800, 600) and red_corner(reduced) == "top-left"


# --- 4. the parameter ----------------------------------------------------------------------------


def test_the_parameter_resolves_auto_by_dataset_and_stage(tmp_path):
    """``params.yaml`` records the concrete policy: custom data and the search turn photos
    upright, 11k and HD read them as stored; an explicit value wins; others are refused."""
    spec = SCHEMA["exif_orientation"]
    assert spec.default == "auto" and spec.choices == ("auto", "exif", "ignore")
    custom = {"dataset": "custom", "data_root": str(tmp_path)}
    assert resolve_params(custom, stage="stage2").exif_orientation == "exif"
    assert resolve_params({}, stage="stage0").exif_orientation == "ignore"
    assert resolve_params({"dataset": "hd"}, stage="evaluation").exif_orientation == "ignore"
    assert resolve_params({}, stage="search").exif_orientation == "exif"
    assert resolve_params({"exif_orientation": "exif"}, stage="stage0").exif_orientation == "exif"
    assert resolve_params({**custom, "exif_orientation": "ignore"},
                          stage="stage1").exif_orientation == "ignore"
    assert "exif_orientation" not in resolve_params({}, stage="pretrain")
    with pytest.raises(ParamError, match="exif_orientation.*auto, exif, ignore"):
        resolve_params({"exif_orientation": "rotate"}, stage="stage0")


def _eleven_k(root: Path, rotated: str) -> Path:
    """A minimal 11k layout (4 people x 2 dorsal-right photos); ``rotated`` is stored with
    tag 6, the others without a tag."""
    rows = []
    for person in range(1, 5):
        for n in range(2):
            name = f"Hand_{person}{n}.jpg"
            rotated_photo(root / "Hands" / name, tag=ROTATE_90_CW if name == rotated else None)
            rows.append([person, 20, "male", "fair", 0, 0, "dorsal right", name, 0])
    with open(root / "HandInfo.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HANDINFO_COLUMNS)
        writer.writerows(rows)
    return root


def test_custom_data_is_read_upright_and_11k_as_stored_by_default(tmp_path):
    """Guards the default ``auto``: the same tagged photo is upright in a custom dataset (the
    user's photos) and as stored in 11k (comparable with MBA-Net and CLIP-ReID), through the
    protocol and the run's image source."""
    preprocess = PreprocessConfig(image_size=TINY_INPUT)
    custom_root = tmp_path / "custom"
    for person in ("ann", "bob", "cat", "dan"):
        for n in range(2):
            rotated_photo(custom_root / person / f"{n}.jpg")
    params = resolve_params({"dataset": "custom", "data_root": str(custom_root),
                             "num_splits": 1, "decode_cache": False}, stage="stage2")
    protocol = build_protocol(params)
    source = image_source(preprocess, params)
    for path in protocol.paths():
        assert red_corner(source.decode(path)) == "top-right", path

    root = _eleven_k(tmp_path / "11k", rotated="Hand_40.jpg")
    params = resolve_params({"dataset": "11k", "data_root": str(root), "num_splits": 1,
                             "gallery_mode": "aspect", "decode_cache": False}, stage="stage2")
    protocol = build_protocol(params)
    source = image_source(preprocess, params)
    [path] = [p for p in protocol.paths() if p.endswith("Hand_40.jpg")]
    assert params.exif_orientation == "ignore"
    assert red_corner(source.decode(path)) == "top-left"


# --- 5. HEIC photos --------------------------------------------------------------------------


def _without_pillow_heif(monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif: ImportError


def test_heic_without_pillow_heif_is_refused_naming_the_file_and_the_fix(
        tmp_path, monkeypatch, heif_registry):
    """Guards against a HEIC photo failing deep inside a run with PIL's bare
    ``UnidentifiedImageError``: the opener names the file and the fix."""
    _without_pillow_heif(monkeypatch)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\0\0\0\x18ftypheic")
    with pytest.raises(HeifSupportMissing) as info:
        open_image(path, "exif")
    assert str(path) in str(info.value) and "pip install pillow-heif" in str(info.value)
    assert "convert" in str(info.value)


def test_a_custom_dataset_and_a_search_refuse_heic_early_without_pillow_heif(
        tmp_path, monkeypatch, heif_registry):
    """HEIC files are images of a custom dataset and of a search gallery (not skipped as other
    files): without pillow-heif the header check refuses them before anything runs, with the
    fix."""
    _without_pillow_heif(monkeypatch)
    root = tmp_path / "hands"
    for person in ("ann", "bob"):
        rotated_photo(root / person / "0.jpg")
        rotated_photo(root / person / "1.jpg")
    heic = root / "bob" / "IMG_0002.heic"
    heic.write_bytes(b"\0\0\0\x18ftypheic")
    with pytest.raises(DataError) as info:
        read_custom(root)
    text = str(info.value)
    assert f"{heic}: cannot be read: a HEIC/HEIF photo needs" in text
    assert "pip install pillow-heif" in text

    assert [g.name for g in G.list_images(root / "bob")] == ["0.jpg", "1.jpg", "IMG_0002.heic"]
    with pytest.raises(G.SearchError, match=r"IMG_0002\.heic \(a HEIC/HEIF photo needs the "
                                            r"package pillow-heif: pip install pillow-heif"):
        G.prepare_search({"gallery_dir": str(root), "query": str(root / "ann" / "0.jpg"),
                          "query_text": None, "run_dir": None})


def test_pillow_heif_is_registered_once_and_only_for_a_heic(tmp_path, monkeypatch,
                                                            heif_registry):
    """The opener registers pillow-heif's opener lazily, on the first HEIC/HEIF file, once."""
    calls = []
    fake = types.ModuleType("pillow_heif")
    fake.register_heif_opener = lambda: calls.append(1)
    monkeypatch.setitem(sys.modules, "pillow_heif", fake)
    jpeg = rotated_photo(tmp_path / "a.jpg")
    open_image(jpeg, "exif")
    assert calls == []
    # a JPEG under a HEIC name: PIL identifies files by their content once a plugin is there
    disguised = tmp_path / "b.heic"
    disguised.write_bytes(jpeg.read_bytes())
    for _ in range(3):
        assert red_corner(open_image(disguised, "exif")) == "top-right"
    assert calls == [1]


def test_heic_is_read_when_pillow_heif_is_installed(tmp_path, heif_registry):
    pillow_heif = pytest.importorskip("pillow_heif")
    pixels = np.full((120, 160, 3), 128, dtype=np.uint8)
    pixels[:40, :40] = (230, 20, 20)
    path = tmp_path / "IMG_0003.HEIC"
    pillow_heif.from_bytes(mode="RGB", size=(160, 120), data=pixels.tobytes()).save(
        path, quality=95)
    for policy in ("exif", "ignore"):
        im = open_image(path, policy)
        assert im.size == (160, 120) and red_corner(im) == "top-left", policy
