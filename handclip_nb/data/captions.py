"""Image captions beside a dataset: ``ROOT/captions.csv`` with columns ``image,caption``.

``image`` is the path relative to the dataset root (``Hands/Hand_0000001.jpg`` for 11k,
``Original Images/1-501/1_1.jpg`` for HD), so the file sits next to a dataset without changing
its own layout. The synthetic generator writes it for every dataset it draws
(:func:`handclip_nb.data.synthetic.caption_for`); for real data a person can write one by hand.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .handinfo import DataError

__all__ = ["CAPTIONS_FILE", "read_captions", "caption_head_and_attributes", "caption_variant"]

CAPTIONS_FILE = "captions.csv"
_HEADER = ("image", "caption")


def read_captions(root: str | os.PathLike) -> dict[str, str]:
    """``{relative image path: caption}`` from ``root/captions.csv``.

    Errors name the file and line: a missing file (with how to make one), a wrong header, a row
    without two columns, an empty caption or a repeated image.
    """
    path = Path(root) / CAPTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: captioned pretraining needs an `image,caption` file beside the "
            f"images (the synthetic generator writes it: python -m handclip_nb.data.synthetic "
            f"--root {root} ...)")
    out: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _HEADER:
            raise DataError(f"{path}:1: header must be 'image,caption', got {header!r}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"{where}: expected 2 columns (image,caption), found {len(row)}")
            image, caption = row[0].strip(), row[1].strip()
            if not image or not caption:
                raise DataError(f"{where}: empty image path or caption")
            if image in out:
                raise DataError(f"{where}: image {image!r} is captioned twice")
            out[image] = caption
    if not out:
        raise DataError(f"{path}: no caption rows after the header")
    return out


def caption_head_and_attributes(caption: str) -> tuple[str, list[str]]:
    """Split "view phrase, attribute, attribute, ..." into the view phrase and the attributes."""
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    return (parts[0] if parts else ""), parts[1:]


def caption_variant(caption: str, rng, drop: float) -> str:
    """A training-time variant: the view phrase, then the attributes shuffled, each kept with
    probability ``1 - drop`` (so a short text like "a hand, red nail polish" still finds the
    images it describes: CLIP learns from partial descriptions, not one fixed sentence)."""
    head, attributes = caption_head_and_attributes(caption)
    kept = [a for a in attributes if rng.random() >= drop]
    order = rng.permutation(len(kept)) if kept else []
    return ", ".join([head, *[kept[i] for i in order]])
