"""Dataset writers: synthetic people and photos written in the 11k or HD layout.

:func:`generate_dataset` validates its arguments and writes ``Hands/`` + ``HandInfo.csv``
(11k) or ``Original Images/1-501`` + ``502-712`` (HD), with ``captions.csv`` and the provenance
file ``handclip_synthetic.json`` (:mod:`handclip_nb.data.provenance`) beside either;
:func:`accessory_plan` decides which 11k photos show a ring, bracelet or watch.
"""

from __future__ import annotations

import csv
from importlib import metadata
from pathlib import Path

import numpy as np

from ...runs import atomic_write_json
from ..captions import CAPTIONS_FILE
from ..provenance import SYNTHETIC_GENERATOR, SYNTHETIC_PROVENANCE_FILE
from .constants import (
    _STREAM_ACCESSORY,
    ACCESSORIES,
    ASPECTS,
    CAPTIONS_HEADER,
    HANDINFO_HEADER,
    LAYOUTS,
    _check_difficulty,
    _rng,
    image_seed,
)
from .people import make_person
from .render import _check_size, render_photo

__all__ = ["generate_dataset", "accessory_plan"]


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    rng_txt = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer {rng_txt}, got {value!r}")
    return int(value)


def _validate(subjects, images_per_subject, seed, difficulty, image_size, layout, accessory_rate,
              id_offset, distractors):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    _check_int("subjects", subjects, 2, 501 if layout == "hd" else None)
    _check_int("images_per_subject", images_per_subject, 2)
    _check_int("seed", seed, 0)
    _check_difficulty(difficulty)
    _check_size(image_size)
    try:
        rate_ok = 0.0 <= float(accessory_rate) <= 1.0
    except (TypeError, ValueError):
        rate_ok = False
    if not rate_ok:
        raise ValueError(f"accessory_rate must be in [0, 1], got {accessory_rate!r}")
    _check_int("id_offset", id_offset, 0, 10_000_000 - int(subjects))
    if distractors is not None:
        if layout != "hd":
            raise ValueError("distractors only applies to layout 'hd'")
        _check_int("distractors", distractors, 0, 211)


def _remove_stale(folder: Path, pattern: str, keep: set[str]) -> None:
    for p in folder.glob(pattern):
        if p.name not in keep and p.is_file():
            p.unlink()


def generate_dataset(
    root,
    subjects: int,
    images_per_subject: int,
    seed: int = 0,
    difficulty: float = 0.5,
    image_size: tuple[int, int] = (160, 120),
    layout: str = "11k",
    accessory_rate: float = 0.1,
    id_offset: int = 0,
    distractors: int | None = None,
    jpeg_quality: int = 92,
) -> Path:
    """Write a synthetic dataset under ``root`` and return ``root`` as a Path.

    ``layout="11k"``: ``root/Hands/Hand_%07d.jpg`` and ``root/HandInfo.csv``; person ids are
    ``id_offset .. id_offset+subjects-1``; ``images_per_subject`` photos per person AND aspect.
    ``accessory_rate`` is the chance that a photo shows a ring, bracelet or watch (flagged
    ``accessories=1``); at most ``images_per_subject - 2`` photos per person and aspect are
    flagged, so dropping them (MBA-Net protocol) leaves >= 2 per aspect.
    ``layout="hd"``: ``root/Original Images/1-501/<id>_<n>.jpg`` (dorsal right hands, ids
    1..subjects) and ``root/Original Images/502-712/<id>_<n>.jpg`` for ``distractors`` extra
    people (default ``max(2, subjects // 4)``); no CSV, no accessories. Person ``id`` is drawn
    as person number ``id_offset + id``.
    ``image_size`` is (width, height) of every JPEG, e.g. the real datasets' ``(1600, 1200)``;
    above :data:`~.constants.RENDER_CAP` the hand is drawn at the cap and upscaled
    (:func:`.render.render_photo`), so real-size datasets cost ~0.1 s per photo.
    Stale images of an earlier run in the same folders are removed so files and labels agree.
    ``root/handclip_synthetic.json`` records that the data is synthetic and how it was drawn
    (:func:`handclip_nb.data.is_synthetic_dataset`); it is written first, so even a root whose
    generation was interrupted is marked.
    """
    _validate(subjects, images_per_subject, seed, difficulty, image_size, layout, accessory_rate,
              id_offset, distractors)
    subjects, k_img = int(subjects), int(images_per_subject)
    seed, id_offset = int(seed), int(id_offset)
    size = _check_size(image_size)
    root = Path(root)
    m = None if layout == "11k" else (max(2, subjects // 4) if distractors is None
                                      else int(distractors))
    _write_provenance(root, layout=layout, subjects=subjects, images_per_subject=k_img,
                      seed=seed, difficulty=float(difficulty), image_size=list(size),
                      accessory_rate=float(accessory_rate) if layout == "11k" else None,
                      id_offset=id_offset, distractors=m, jpeg_quality=int(jpeg_quality))
    if layout == "11k":
        _write_11k(root, subjects, k_img, seed, float(difficulty), size, float(accessory_rate),
                   id_offset, jpeg_quality)
    else:
        _write_hd(root, subjects, k_img, seed, float(difficulty), size, id_offset, m, jpeg_quality)
    return root


def _package_version() -> str | None:
    try:
        return metadata.version("handclip-nb")
    except metadata.PackageNotFoundError:
        return None


def _write_provenance(root: Path, **settings) -> None:
    """``root/handclip_synthetic.json``: that the data is synthetic and the generator's arguments
    (``image_size`` is [width, height]); no time or path in it, so equal arguments give equal
    bytes. Atomic (temp file + rename)."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / SYNTHETIC_PROVENANCE_FILE,
                      {"generator": SYNTHETIC_GENERATOR, "synthetic": True, **settings,
                       "package_version": _package_version()})


def accessory_plan(seed: int, person_number: int, aspect: str | int, images_per_subject: int,
                   rate: float) -> list[str | None]:
    """Which photos of one person/aspect show an accessory (None = no accessory).

    Capped at ``images_per_subject - 2`` accessories (the last flagged photos are cleared).
    """
    a = ASPECTS.index(aspect) if isinstance(aspect, str) else int(aspect)
    plan: list[str | None] = []
    for k in range(images_per_subject):
        r = _rng(seed, _STREAM_ACCESSORY, person_number, a, k)
        u, kind = r.random(), ACCESSORIES[int(r.integers(len(ACCESSORIES)))]
        plan.append(kind if u < rate else None)
    excess = sum(p is not None for p in plan) - (images_per_subject - 2)
    for k in reversed(range(images_per_subject)):
        if excess <= 0:
            break
        if plan[k] is not None:
            plan[k] = None
            excess -= 1
    return plan


def _write_11k(root, subjects, k_img, seed, d, size, rate, id_offset, quality):
    hands = root / "Hands"
    hands.mkdir(parents=True, exist_ok=True)
    rows = []
    written = set()
    captions = []
    n = 0
    for i in range(subjects):
        number = id_offset + i
        person = make_person(number, seed, d)
        for a, aspect in enumerate(ASPECTS):
            plan = accessory_plan(seed, number, a, k_img, rate)
            for k in range(k_img):
                n += 1
                name = f"Hand_{n:07d}.jpg"
                img, caption = render_photo(person, aspect, image_seed(seed, number, a, k), d,
                                            size, accessory=plan[k])
                img.save(hands / name, "JPEG", quality=quality)
                written.add(name)
                captions.append((f"Hands/{name}", caption))
                rows.append([person.id, person.age, person.gender, person.skin_color,
                             int(plan[k] is not None), person.nail_polish_flag, aspect, name, 0])
    _remove_stale(hands, "Hand_*.jpg", written)
    with open(root / "HandInfo.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write(",".join(HANDINFO_HEADER) + "\r\n")
        writer = csv.writer(fh, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
        writer.writerows(rows)
    _write_captions(root, captions)


def _write_captions(root: Path, captions: list[tuple[str, str]]) -> None:
    """``root/captions.csv``: image path relative to ``root``, caption (beside the dataset's own
    files, so the 11k/HD layouts and HandInfo.csv stay exactly as the real datasets')."""
    with open(root / CAPTIONS_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CAPTIONS_HEADER)
        writer.writerows(captions)


def _write_hd(root, subjects, k_img, seed, d, size, id_offset, m, quality):
    base = root / "Original Images"
    groups = [(base / "1-501", range(1, subjects + 1)), (base / "502-712", range(502, 502 + m))]
    captions = []
    for folder, ids in groups:
        folder.mkdir(parents=True, exist_ok=True)
        written = set()
        for pid in ids:
            number = id_offset + pid
            person = make_person(number, seed, d)
            for k in range(k_img):
                name = f"{pid}_{k + 1}.jpg"
                img, caption = render_photo(person, "dorsal right", image_seed(seed, number, 0, k),
                                            d, size)
                img.save(folder / name, "JPEG", quality=quality)
                written.add(name)
                captions.append((f"Original Images/{folder.name}/{name}", caption))
        _remove_stale(folder, "*_*.jpg", written)
    _write_captions(root, captions)
