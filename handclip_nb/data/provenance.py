"""Synthetic provenance: whether a dataset root was drawn by the synthetic-hands generator.

The generator (:func:`handclip_nb.data.synthetic.generate_dataset`, and its command line) writes
``ROOT/handclip_synthetic.json`` (:data:`SYNTHETIC_PROVENANCE_FILE`) into every dataset root it
writes, 11k and HD layout alike: ``generator``, ``synthetic: true``, ``layout``, ``subjects``,
``images_per_subject``, ``seed``, ``difficulty``, ``image_size`` ([width, height]) and the other
arguments, and ``package_version``. Nothing in it depends on time or on the root's path, so two
generations with the same arguments stay byte-identical.

:func:`is_synthetic_dataset` is the one answer to "are these results on synthetic data?": true
for ``data_root: None`` (the embedded synthetic hands) and for a root holding that file. Every
stage records it as ``metrics.json``'s ``synthetic`` key, so synthetic results are never read
as results on the real datasets. No torch here: the CSV readers may ask too.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from ..runs import resolve_path

__all__ = ["SYNTHETIC_PROVENANCE_FILE", "SYNTHETIC_GENERATOR", "synthetic_provenance",
           "is_synthetic_dataset"]

#: The provenance file the synthetic generator writes into every dataset root.
SYNTHETIC_PROVENANCE_FILE = "handclip_synthetic.json"
#: Its ``generator`` value: the module that drew the data.
SYNTHETIC_GENERATOR = "handclip_nb.data.synthetic"


def synthetic_provenance(root: str | os.PathLike) -> dict[str, Any] | None:
    """The generator's record of ``root`` (``ROOT/handclip_synthetic.json``), or None when the
    root holds no such file (real data, or data of unknown origin).

    A file that is present but unreadable or not a JSON object still means the generator wrote
    there: it warns and returns ``{"synthetic": True, "unreadable": <why>}``.
    """
    path = resolve_path(root) / SYNTHETIC_PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        warnings.warn(f"{path} is unreadable ({exc}); its presence still marks the dataset as "
                      f"synthetic", stacklevel=2)
        return {"synthetic": True, "unreadable": str(exc)}
    return record


def is_synthetic_dataset(params_or_root: Mapping[str, Any] | str | os.PathLike | None) -> bool:
    """Whether the data of a run is synthetic: ``params_or_root`` is the run's parameters (its
    ``data_root`` is read) or a dataset root. ``None`` (``data_root: None``) is the embedded
    synthetic hands; a root is synthetic when it holds :data:`SYNTHETIC_PROVENANCE_FILE`."""
    root = (params_or_root["data_root"] if isinstance(params_or_root, Mapping)
            else params_or_root)
    if root is None:
        return True
    record = synthetic_provenance(Path(root))
    return record is not None and bool(record.get("synthetic", True))
