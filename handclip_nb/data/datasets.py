"""Torch datasets over protocol indices, and the loader for a run's data."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from PIL import Image
from torch.utils.data import Dataset

from ..params import held_out_fraction
from ..runs import project_root, resolve_path
from .handinfo import DataError, read_handinfo, read_hd
from .protocols import Protocol, build_11k_protocol, build_hd_protocol, verify_images
from .synthetic import generate_dataset

__all__ = ["ImageListDataset", "build_protocol", "default_synthetic_root", "ensure_synthetic"]


class ImageListDataset(Dataset):
    """Images by absolute path with an integer label each; returns (tensor, label, position)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int],
                 transform: Callable[[Image.Image], object]):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        return self.transform(img), int(self.labels[i]), i


def default_synthetic_root(params: Mapping) -> Path:
    """Where the embedded synthetic dataset for these parameters lives (one per settings)."""
    name = (f"synthetic-{params['dataset']}-{params['synthetic_subjects']}x"
            f"{params['synthetic_images']}-d{params['synthetic_difficulty']:g}"
            f"-seed{params['synthetic_seed']}")
    return project_root() / "outputs" / "data" / name


def ensure_synthetic(root: Path, subjects: int, images: int, difficulty: float, seed: int,
                     layout: str = "11k") -> Path:
    """Generate the embedded synthetic dataset once (into a temp folder, then rename)."""
    marker = "HandInfo.csv" if layout == "11k" else "Original Images"
    if (root / marker).exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    generate_dataset(tmp, subjects=subjects, images_per_subject=images, seed=seed,
                     difficulty=difficulty, layout=layout)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_protocol(params: Mapping, verify: bool = True) -> Protocol:
    """Read the dataset named by ``params`` and build its protocol (no images are decoded).

    ``data_root=None`` uses the embedded synthetic hands (11k layout, or HD layout for
    ``dataset="hd"``), generated on first use under ``outputs/data/``.  Every random choice of
    the protocol comes from ``params["split_seed"]``, never from the training ``seed``.  With
    ``verify`` every image the protocol references is checked up front; all problems are
    reported together.
    """
    dataset = params["dataset"]
    root = params["data_root"]
    if root is None:
        root = ensure_synthetic(default_synthetic_root(params),
                                params["synthetic_subjects"], params["synthetic_images"],
                                params["synthetic_difficulty"], params["synthetic_seed"],
                                layout="11k" if dataset == "11k" else "hd")
    root = resolve_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} is not a folder; set data_root to the dataset "
                                f"folder, or None for the embedded synthetic hands")
    if dataset == "11k":
        csv_path = root / "HandInfo.csv"
        records = read_handinfo(csv_path)
        try:
            protocol = build_11k_protocol(records, params["aspect"], root=root,
                                          seed=params["split_seed"],
                                          num_splits=params["num_splits"],
                                          gallery_mode=params["gallery_mode"],
                                          val_fraction=held_out_fraction(params),
                                          source_hash=_file_hash(csv_path))
        except DataError as exc:  # too few people/images for the protocol: name the file
            raise DataError(f"{csv_path}: {exc}") from None
    elif dataset == "hd":
        records = read_hd(root)
        listing = "\n".join(r.path for r in records).encode()
        try:
            protocol = build_hd_protocol(records, root=root, seed=params["split_seed"],
                                         num_splits=params["num_splits"],
                                         val_fraction=held_out_fraction(params),
                                         source_hash=hashlib.sha256(listing).hexdigest())
        except DataError as exc:
            raise DataError(f"{root / 'Original Images'}: {exc}") from None
    else:  # the parameter schema already refuses this
        raise ValueError(f"unknown dataset {dataset!r}; valid: 11k, hd")
    if verify:
        verify_images(root, protocol.items)
    return protocol
