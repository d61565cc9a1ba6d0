"""Tests of the synthetic hands generator (handclip_nb.data.synthetic).

Layout/format, determinism, mirror geometry, accessory cap, HD layout, CLI, argument errors, and a
re-ID difficulty check: an untrained baseline is well above chance but far from solved, and a tiny
conv net trained on half of the identities clearly beats it on the other half.
"""

from __future__ import annotations

import csv
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from together import run_together

from handclip_nb.data import synthetic as syn
from handclip_nb.data.synthetic import (
    ACCESSORIES,
    ASPECTS,
    HANDINFO_HEADER,
    RENDER_CAP,
    accessory_plan,
    generate_dataset,
    image_seed,
    make_person,
    render_image,
)

REPO = Path(__file__).resolve().parents[1]
REAL_HEADER = "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities"
ROW_RE = re.compile(
    r'^"(\d{7})",(\d+),"(male|female)","(very fair|fair|medium|dark)",([01]),([01]),'
    r'"(dorsal right|dorsal left|palmar right|palmar left)","(Hand_\d{7}\.jpg)",0$'
)


def read_rows(root: Path) -> list[dict]:
    with open(root / "HandInfo.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------------------
# Layout and CSV format
# ------------------------------------------------------------------------------------------------


def test_11k_layout_and_csv_format(tmp_path):
    n, k = 3, 3
    root = generate_dataset(tmp_path / "ds", n, k, seed=0)
    assert root == tmp_path / "ds"
    raw = (root / "HandInfo.csv").read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[0].decode() == REAL_HEADER == ",".join(HANDINFO_HEADER)
    assert lines[-1] == b"" and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF like the real file
    body = [ln.decode() for ln in lines[1:-1]]
    assert len(body) == n * len(ASPECTS) * k
    matches = [ROW_RE.match(ln) for ln in body]
    assert all(matches), [ln for ln, m in zip(body, matches) if not m][:3]

    rows = read_rows(root)
    assert all(len(r) == 9 for r in rows)
    ids = sorted({r["id"] for r in rows})
    assert ids == ["0000000", "0000001", "0000002"]
    for pid in ids:
        mine = [r for r in rows if r["id"] == pid]
        for aspect in ASPECTS:
            assert sum(r["aspectOfHand"] == aspect for r in mine) == k
        # per-person metadata (incl. the nail polish flag) is stable across all images
        for col in ("age", "gender", "skinColor", "nailPolish"):
            assert len({r[col] for r in mine}) == 1, col
    names = [r["imageName"] for r in rows]
    assert len(set(names)) == len(names)
    assert names[0] == "Hand_0000001.jpg"
    assert sorted(p.name for p in (root / "Hands").iterdir()) == sorted(names)
    for name in names:
        with Image.open(root / "Hands" / name) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (160, 120)


def test_custom_size_and_id_offset(tmp_path):
    root = generate_dataset(tmp_path, 2, 2, seed=1, image_size=(96, 64), id_offset=1234)
    rows = read_rows(root)
    assert sorted({r["id"] for r in rows}) == ["0001234", "0001235"]
    with Image.open(root / "Hands" / rows[0]["imageName"]) as im:
        assert im.size == (96, 64)
    # a different id offset is a disjoint population of people
    a = make_person(1234, seed=1)
    assert a == make_person(1234, seed=1) and a != make_person(0, seed=1)


def test_person_attributes_are_describable():
    people = [make_person(i, seed=0) for i in range(30)]
    for p in people:
        assert p.skin_color in syn.SKIN_COLORS and p.gender in ("male", "female")
        assert p.skin_tone_name == f"{p.skin_color} skin"
        assert p.nail_polish is None or p.nail_polish in syn.NAIL_POLISH_COLORS
        assert p.nail_polish_flag == int(p.nail_polish is not None)
        assert p.marks and all(isinstance(m.describe(), str) for m in p.marks)
        assert all(isinstance(s, str) and s for s in p.describe())
    phrases = {m.describe() for p in people for m in p.marks}
    assert any(re.fullmatch(r"(mole|freckles|scar|tattoo dots) on the .+", s) for s in phrases)
    assert any(p.nail_polish for p in people)  # some people wear polish
    assert len({p.skin_rgb for p in people}) == len(people)  # individual skin tones


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_pixels(tmp_path):
    a = generate_dataset(tmp_path / "a", 3, 2, seed=7)
    b = generate_dataset(tmp_path / "b", 3, 2, seed=7)
    c = generate_dataset(tmp_path / "c", 3, 2, seed=8)
    assert (a / "HandInfo.csv").read_bytes() == (b / "HandInfo.csv").read_bytes()
    names = [r["imageName"] for r in read_rows(a)]
    for name in names:
        assert np.array_equal(pixels(a / "Hands" / name), pixels(b / "Hands" / name))
    differ = [not np.array_equal(pixels(a / "Hands" / n), pixels(c / "Hands" / n)) for n in names]
    assert all(differ)


def test_images_per_subject_does_not_change_people(tmp_path):
    a = generate_dataset(tmp_path / "a", 2, 2, seed=3, accessory_rate=0.0)
    b = generate_dataset(tmp_path / "b", 2, 3, seed=3, accessory_rate=0.0)
    ra, rb = read_rows(a), read_rows(b)
    meta = lambda r: (r["id"], r["age"], r["gender"], r["skinColor"], r["nailPolish"])  # noqa: E731
    assert {meta(r) for r in ra} == {meta(r) for r in rb}
    for pid in ("0000000", "0000001"):
        for aspect in ASPECTS:
            fa = [r["imageName"] for r in ra if r["id"] == pid and r["aspectOfHand"] == aspect]
            fb = [r["imageName"] for r in rb if r["id"] == pid and r["aspectOfHand"] == aspect]
            for na, nb in zip(fa, fb):  # image k of a person/aspect is the same photo
                assert np.array_equal(pixels(a / "Hands" / na), pixels(b / "Hands" / nb))


# ------------------------------------------------------------------------------------------------
# Mirror geometry and views
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [0, 5, 11])
def test_left_hand_is_mirror_of_right_hand(number):
    person = make_person(number, seed=2)
    for view in ("dorsal", "palmar"):
        for s in (1, 99):
            right = np.asarray(render_image(person, f"{view} right", s, noise=False), np.int16)
            left = np.asarray(render_image(person, f"{view} left", s, noise=False), np.int16)
            assert np.array_equal(left, right[:, ::-1])  # exact without sensor noise
            noisy = np.asarray(render_image(person, f"{view} left", s), np.int16)
            assert np.abs(noisy - right[:, ::-1]).mean() < 6.0  # only noise apart
            assert np.abs(left - right).mean() > 3.0  # and not symmetric by itself
    dorsal = np.asarray(render_image(person, "dorsal right", 1, noise=False), np.int16)
    palmar = np.asarray(render_image(person, "palmar right", 1, noise=False), np.int16)
    assert np.abs(dorsal - palmar).mean() > 2.0  # the two views look different


def test_photos_vary_and_render_is_pure():
    person = make_person(3, seed=0)
    a = np.asarray(render_image(person, "dorsal right", 10))
    assert np.array_equal(a, np.asarray(render_image(person, "dorsal right", 10)))
    b = np.asarray(render_image(person, "dorsal right", 11))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2.0
    for kind in ACCESSORIES:  # accessories change the photo, nothing else
        c = np.asarray(render_image(person, "dorsal right", 10, accessory=kind))
        assert c.shape == a.shape and not np.array_equal(a, c)
    assert image_seed(0, 1, "dorsal right", 0) != image_seed(0, 1, "dorsal left", 0)


# ------------------------------------------------------------------------------------------------
# Accessories
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_accessories_never_exceed_k_minus_2(k):
    for rate in (0.1, 0.5, 1.0):
        for number in range(40):
            for aspect in ASPECTS:
                plan = accessory_plan(0, number, aspect, k, rate)
                assert len(plan) == k
                assert sum(p is not None for p in plan) <= k - 2
                assert all(p is None or p in ACCESSORIES for p in plan)
    assert sum(p is not None for p in accessory_plan(0, 1, 0, k, 1.0)) == k - 2
    assert all(p is None for p in accessory_plan(0, 1, 0, k, 0.0))


def test_accessory_flags_in_csv(tmp_path):
    k = 4
    rows = read_rows(generate_dataset(tmp_path / "all", 3, k, seed=0, accessory_rate=1.0))
    for pid in {r["id"] for r in rows}:
        for aspect in ASPECTS:
            flags = [int(r["accessories"]) for r in rows if r["id"] == pid
                     and r["aspectOfHand"] == aspect]
            assert sum(flags) == k - 2 and len(flags) == k
    # default rate: modest share of accessories over a population
    plans = [p for n in range(200) for a in ASPECTS for p in accessory_plan(0, n, a, 6, 0.1)]
    share = sum(p is not None for p in plans) / len(plans)
    assert 0.06 < share < 0.14


# ------------------------------------------------------------------------------------------------
# HD layout
# ------------------------------------------------------------------------------------------------


def test_hd_layout(tmp_path):
    root = generate_dataset(tmp_path / "hd", 5, 3, seed=0, layout="hd")
    main = root / "Original Images" / "1-501"
    extra = root / "Original Images" / "502-712"
    assert sorted(p.name for p in main.iterdir()) == sorted(
        f"{i}_{n}.jpg" for i in range(1, 6) for n in range(1, 4))
    assert sorted(p.name for p in extra.iterdir()) == sorted(  # default max(2, 5 // 4) = 2
        f"{i}_{n}.jpg" for i in (502, 503) for n in range(1, 4))
    assert not (root / "HandInfo.csv").exists() and not (root / "Hands").exists()
    with Image.open(main / "1_1.jpg") as im:
        assert im.format == "JPEG" and im.size == (160, 120)

    root = generate_dataset(tmp_path / "hd2", 12, 2, seed=0, layout="hd", distractors=4)
    names = [p.name for p in (root / "Original Images" / "502-712").iterdir()]
    assert sorted({int(n.split("_")[0]) for n in names}) == [502, 503, 504, 505]
    main_names = [p.name for p in (root / "Original Images" / "1-501").iterdir()]
    assert "12_2.jpg" in main_names and "012_2.jpg" not in main_names  # no zero padding


def test_rerun_removes_stale_images(tmp_path):
    generate_dataset(tmp_path, 3, 3, seed=0)
    root = generate_dataset(tmp_path, 2, 2, seed=0)
    assert len(list((root / "Hands").iterdir())) == len(read_rows(root)) == 2 * 4 * 2


# ------------------------------------------------------------------------------------------------
# Arguments and CLI
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(subjects=1), r"subjects must be an integer >= 2"),
        (dict(images_per_subject=1), r"images_per_subject must be an integer >= 2"),
        (dict(layout="coco"), r"layout must be one of \['11k', 'hd'\]"),
        (dict(image_size=(0, 120)), r"image_size"),
        (dict(image_size=(160, -1)), r"image_size"),
        (dict(difficulty=1.5), r"difficulty must be in \[0, 1\]"),
        (dict(seed=-1), r"seed must be"),
        (dict(accessory_rate=2.0), r"accessory_rate must be in \[0, 1\]"),
        (dict(id_offset=-3), r"id_offset"),
        (dict(layout="hd", subjects=600), r"subjects must be an integer in \[2, 501\]"),
        (dict(layout="hd", distractors=300), r"distractors must be an integer in \[0, 211\]"),
        (dict(distractors=3), r"distractors only applies to layout 'hd'"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, match):
    args = dict(root=tmp_path, subjects=2, images_per_subject=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_dataset(**args)
    assert not (tmp_path / "Hands").exists()  # validated before anything is written


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "handclip_nb.data.synthetic", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_writes_dataset_and_summary(tmp_path):
    out = _cli("--root", tmp_path / "cli", "--subjects", 2, "--images-per-subject", 2,
               "--seed", 5, "--width", 80, "--height", 60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "wrote 16 images" in lines[0] and re.search(r"\d+\.\d s", lines[0])
    rows = read_rows(tmp_path / "cli")
    assert len(rows) == 16
    with Image.open(tmp_path / "cli" / "Hands" / rows[-1]["imageName"]) as im:
        assert im.size == (80, 60)
    # the CLI and the API agree byte for byte
    api = generate_dataset(tmp_path / "api", 2, 2, seed=5, image_size=(80, 60))
    assert (api / "HandInfo.csv").read_bytes() == (tmp_path / "cli" / "HandInfo.csv").read_bytes()

    out = _cli("--root", tmp_path / "hd", "--subjects", 4, "--images-per-subject", 2,
               "--layout", "hd", "--distractors", 3)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "hd" / "Original Images" / "502-712").iterdir())) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subjects", "1", "--images-per-subject", "4"], "--subjects must be >= 2"),
        (["--subjects", "4", "--images-per-subject", "1"], "--images-per-subject must be >= 2"),
        (["--subjects", "4", "--images-per-subject", "4", "--layout", "xx"], "invalid choice"),
        (["--subjects", "4", "--images-per-subject", "4", "--width", "0"], "--width must be >= 16"),
        (["--subjects", "4", "--images-per-subject", "4", "--difficulty", "2"],
         "--difficulty must be in [0, 1]"),
        (["--subjects", "4"], "--images-per-subject"),
    ],
)
def test_cli_bad_arguments(tmp_path, args, message):
    out = _cli("--root", tmp_path / "bad", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# Real-size photos (--photo-size): drawn at RENDER_CAP, upscaled, noise at full resolution
# ------------------------------------------------------------------------------------------------

# sha256 of the pixels of three photos at and below the cap, as rendered before real-size photos
# existed: a change here changes every default synthetic dataset (and the golden notebooks).
DEFAULT_PIXELS_SHA256 = "07a85cda9e574755d7af8affdf80cf9bd1a526277130c302cee6503928f163f4"


def test_default_size_pixels_are_unchanged():
    h = hashlib.sha256()
    for number, aspect, s, kw in [(0, "dorsal right", 1, {}),
                                  (1, "palmar left", 2, {"accessory": "watch"}),
                                  (2, "dorsal left", 3, {"size": RENDER_CAP})]:
        h.update(np.asarray(render_image(make_person(number, seed=0), aspect, s, **kw)).tobytes())
    assert h.hexdigest() == DEFAULT_PIXELS_SHA256


def test_above_the_cap_is_the_capped_drawing_upscaled_and_still_mirrored():
    person = make_person(4, seed=1)
    big_size = (2 * RENDER_CAP[0], 2 * RENDER_CAP[1])
    for view in ("dorsal", "palmar"):
        right = np.asarray(render_image(person, f"{view} right", 5, size=big_size, noise=False),
                           np.int16)
        left = np.asarray(render_image(person, f"{view} left", 5, size=big_size, noise=False),
                          np.int16)
        assert right.shape == (big_size[1], big_size[0], 3)
        assert np.array_equal(left, right[:, ::-1])  # exact mirror before noise
        noisy = np.asarray(render_image(person, f"{view} left", 5, size=big_size), np.int16)
        assert 1.0 < np.abs(noisy - left).mean() < 6.0  # full-resolution noise, nothing else
    small = np.asarray(render_image(person, "palmar right", 5, size=RENDER_CAP, noise=False),
                       np.int16)
    down = Image.fromarray(right.astype(np.uint8)).resize(RENDER_CAP, Image.Resampling.BOX)
    assert np.abs(np.asarray(down, np.int16) - small).mean() < 3.0  # the same picture, upscaled


def test_cli_photo_size_writes_real_size_jpegs_deterministically(tmp_path):
    out = _cli("--root", tmp_path / "cli", "--subjects", 2, "--images-per-subject", 2,
               "--seed", 3, "--photo-size", "1600x1200")
    assert out.returncode == 0, out.stderr
    assert "wrote 16 images of 1600x1200" in out.stdout
    rows = read_rows(tmp_path / "cli")
    assert len(rows) == 16
    sizes = []
    for r in rows:
        path = tmp_path / "cli" / "Hands" / r["imageName"]
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (1600, 1200)
        sizes.append(path.stat().st_size)
    assert 80_000 < min(sizes) and max(sizes) < 800_000, sizes  # camera-like, not flat or raw
    # the API with image_size writes the same bytes (and a second run the same again)
    api = generate_dataset(tmp_path / "api", 2, 2, seed=3, image_size=(1600, 1200))
    for name in ["HandInfo.csv", "captions.csv", *(f"Hands/{r['imageName']}" for r in rows)]:
        assert (api / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name

    out = _cli("--root", tmp_path / "hd", "--subjects", 2, "--images-per-subject", 2,
               "--layout", "hd", "--photo-size", "1600\u00d71200", "--width", 1600)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "hd" / "Original Images").glob("*/*.jpg"))
    assert len(files) == 8
    for path in files:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (1600, 1200)


def test_cli_without_photo_size_is_the_default_output(tmp_path):
    assert syn.main(["--root", str(tmp_path / "cli"), "--subjects", "2",
                     "--images-per-subject", "2"]) == 0
    api = generate_dataset(tmp_path / "api", 2, 2)
    names = [f"Hands/{r['imageName']}" for r in read_rows(api)]
    for name in ["HandInfo.csv", "captions.csv", *names]:
        assert (api / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    with Image.open(api / names[0]) as im:
        assert im.size == (160, 120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--photo-size", "1600"], "argument --photo-size: expected WIDTHxHEIGHT"),
        (["--photo-size", "1600x"], "such as 1600x1200, got '1600x'"),
        (["--photo-size", "wide"], "argument --photo-size: expected WIDTHxHEIGHT"),
        (["--photo-size", "1600x1200x3"], "argument --photo-size: expected WIDTHxHEIGHT"),
        (["--photo-size=-16x12"], "argument --photo-size: expected WIDTHxHEIGHT"),
        (["--photo-size", "8x120"], "--photo-size width must be >= 16, got 8"),
        (["--photo-size", "160x4"], "--photo-size height must be >= 12, got 4"),
        (["--photo-size", "1600x1200", "--width", "800"],
         "--width 800 disagrees with --photo-size 1600x1200"),
        (["--photo-size", "1600x1200", "--height", "1000"],
         "--height 1000 disagrees with --photo-size 1600x1200"),
    ],
)
def test_cli_bad_photo_size(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        syn.main(["--root", str(tmp_path / "bad"), "--subjects", "2", "--images-per-subject", "2",
                  *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# Re-ID difficulty: a real problem at the default difficulty
# ------------------------------------------------------------------------------------------------


def average_precision_per_query(sim: np.ndarray, labels: np.ndarray) -> list[float]:
    """Leave-one-out AP of every image against all the others (higher sim = closer)."""
    aps = []
    idx = np.arange(len(labels))
    for q in idx:
        others = idx != q
        order = np.argsort(-sim[q, others], kind="stable")
        match = labels[others][order] == labels[q]
        if not match.any():
            continue
        hits = np.cumsum(match)
        ranks = np.flatnonzero(match) + 1
        aps.append(float(np.mean(hits[match] / ranks)))
    return aps


def reid_map(features: np.ndarray, ids: np.ndarray, aspects: np.ndarray) -> float:
    """mAP with identities per aspect (each aspect ranked separately, like the 11k protocol)."""
    f = features.reshape(len(features), -1).astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    aps = []
    for a in np.unique(aspects):
        sel = aspects == a
        aps += average_precision_per_query(f[sel] @ f[sel].T, ids[sel])
    return float(np.mean(aps))


@pytest.mark.slow
def test_reid_is_learnable_but_not_trivial(tmp_path):
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    root = generate_dataset(tmp_path / "reid", 40, 6, seed=0)
    rows = read_rows(root)
    x = np.stack([np.asarray(Image.open(root / "Hands" / r["imageName"]).convert("RGB").reduce(2),
                             np.float32) / 255.0 for r in rows])  # 80x60
    ids = np.array([int(r["id"]) for r in rows])
    aspects = np.array([ASPECTS.index(r["aspectOfHand"]) for r in rows])
    train = ids < 20  # first half of the (sorted) identities trains, the rest is held out
    test = ~train
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    rng = np.random.default_rng(0)
    chance = np.mean([reid_map(rng.normal(size=(test.sum(), 16)), ids[test], aspects[test])
                      for _ in range(5)])
    raw = reid_map(F.avg_pool2d(x[test], 2).numpy(), ids[test], aspects[test])  # 40x30 pixels
    assert raw > 1.5 * chance, (raw, chance)  # identities are visible in the pixels ...
    assert raw < 0.7, raw  # ... but raw pixel matching is far from solving it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: ~10 s, and robust when other jobs share the cores
    try:
        torch.manual_seed(0)
        mean = x[train].mean((0, 2, 3), keepdim=True)
        std = x[train].std((0, 2, 3), keepdim=True)
        xn = (x - mean) / std

        def block(i, o, stride=1):
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        def backbone():
            return nn.Sequential(*block(3, 16, 2), *block(16, 32), nn.MaxPool2d(2),
                                 *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(64))

        net = backbone().eval()
        with torch.no_grad():
            untrained = reid_map(net(xn[test]).numpy(), ids[test], aspects[test])

        labels = ids[train] * 4 + aspects[train]  # identities per aspect, as in 11k
        y = torch.from_numpy(np.unique(labels, return_inverse=True)[1])
        head = nn.Linear(64, int(y.max()) + 1)
        model = nn.Sequential(backbone(), head)
        xt = xn[train]
        epochs, bs = 20, 64
        steps = epochs * ((len(xt) + bs - 1) // bs)
        opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), bs):
                b = perm[i:i + bs]
                dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=gen))
                xb = torch.roll(xt[b], (dy, dx), (2, 3))
                loss = F.cross_entropy(model(xb), y[b], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            trained = reid_map(model[0](xn[test]).numpy(), ids[test], aspects[test])
    finally:
        torch.set_num_threads(threads)

    print(f"chance {chance:.3f} raw-pixels {raw:.3f} untrained-net {untrained:.3f} "
          f"trained-net {trained:.3f}")
    baseline = max(raw, untrained)
    assert trained > baseline + 0.1, (trained, raw, untrained)  # learning the cues pays off
    assert trained < 0.9, trained  # and the default difficulty is not solved by a toy net


ENSURE_SYNTHETIC_SCRIPT = """
import sys
from pathlib import Path
import handclip_nb.data.datasets as datasets
root = Path(sys.argv[1])
count_calls(datasets, "generate_dataset", sys.argv[2], lambda me, **kw: f"generated-by-{me}")
ready_then_wait_for_go()
datasets.ensure_synthetic(root, subjects=4, images=2, difficulty=0.5, seed=3)
"""


def test_two_runs_starting_together_generate_the_synthetic_hands_once(tmp_path):
    """Guards against a grid's runs (or a notebook beside a test) that start together on the
    embedded synthetic hands each generating the whole dataset: they take turns on its lock,
    one generates, the other waits and finds it, and no temporary folder is left."""
    root, marks = tmp_path / "data" / "synthetic", tmp_path / "marks"
    marks.mkdir()
    run_together(ENSURE_SYNTHETIC_SCRIPT, [[str(root), str(marks)]] * 2, tmp_path / "flags")
    assert len(list(marks.glob("generated-by-*"))) == 1, sorted(marks.iterdir())
    assert sorted(p.name for p in root.parent.iterdir()) == [".synthetic.lock", "synthetic"]
    assert (root / "HandInfo.csv").is_file()


def test_a_synthetic_folder_without_its_marker_is_generated_again(tmp_path):
    """A dataset folder left without its HandInfo.csv (half removed by hand, a copy cut short)
    is replaced by a whole one; a complete one is never generated again."""
    from handclip_nb.data.datasets import ensure_synthetic

    root = tmp_path / "synthetic"
    (root / "Hands").mkdir(parents=True)
    (root / "Hands" / "leftover.jpg").write_bytes(b"")
    ensure_synthetic(root, subjects=4, images=2, difficulty=0.5, seed=3)
    assert (root / "HandInfo.csv").is_file() and not (root / "Hands" / "leftover.jpg").exists()
    made = (root / "HandInfo.csv").stat().st_mtime_ns
    ensure_synthetic(root, subjects=4, images=2, difficulty=0.5, seed=3)
    assert (root / "HandInfo.csv").stat().st_mtime_ns == made
