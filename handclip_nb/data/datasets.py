"""Torch datasets over protocol indices, and the loader for a run's data."""
from __future__ import annotations

import hashlib
import operator
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..device import default_num_workers, resolve_device
from ..locks import build_folder_in_turn
from ..params import ParamError, held_out_fraction, holds_out_val_images
from ..runs import project_root, resolve_path
from .image_files import open_image
from .images import ImageSource
from .custom import build_custom_protocol, custom_source_hash, read_custom
from .handinfo import DataError, read_handinfo, read_hd
from .protocols import (Protocol, build_11k_protocol, build_hd_protocol, hold_out_val_images,
                        verify_images)
from .sampler import Draw
from .synthetic import generate_dataset

__all__ = ["ImageListDataset", "augmentation_seed", "make_loader", "build_protocol",
           "default_synthetic_root", "ensure_synthetic"]


def augmentation_seed(seed: int, epoch: int, index: int, occurrence: int = 0) -> int:
    """The 64-bit seed of the augmentation of the ``occurrence``-th repeat (0: the first draw)
    of item ``index`` in ``epoch`` of a run seeded ``seed``: a function of these four numbers
    alone. A first draw keeps the seed of (seed, epoch, index) that every draw had before
    repeated draws were numbered, so an epoch without repeats augments as it did then."""
    if occurrence < 0:
        raise ValueError(f"occurrence counts the earlier draws of an item, so it is >= 0; got "
                         f"{occurrence}")
    entropy = [int(seed), int(epoch), int(index)] + ([int(occurrence)] if occurrence else [])
    state = np.random.SeedSequence(entropy).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class ImageListDataset(Dataset):
    """Images by absolute path with an integer label each; returns (tensor, label, position).

    ``transform`` is an :class:`~handclip_nb.data.images.ImageSource` (path -> tensor: decode
    once, then the tensor steps; what the stages use, with the run's EXIF orientation policy) or
    a plain transform of a PIL image, which gets the fully decoded file, turned as
    ``orientation`` says (:func:`~handclip_nb.data.image_files.open_image`).

    Items are indices, or :class:`~handclip_nb.data.sampler.Draw` (index, occurrence) pairs
    from a sampler that can draw an index more than once per epoch
    (:class:`~handclip_nb.data.sampler.PKSampler`). With ``seed`` set, the random draws of the
    transform (crop, erasing, jitter, flip) for the ``k``-th draw of item ``i`` in epoch ``e``
    come from a generator seeded by :func:`augmentation_seed` (seed, e, i, k) alone, so a
    training run sees the same augmented images whatever the number of loader workers (which
    item lands in which worker process no longer matters) and after a resume, and an item drawn
    twice in one epoch (P×K sampling with replacement) gets two independent augmentations. A
    plain index is a first draw: a sampler that repeats plain indices repeats their
    augmentation. Call :meth:`set_epoch` before each epoch's iteration (worker processes receive
    a copy of the dataset when an epoch's iteration starts, so the loader must not keep
    persistent workers).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int],
                 transform: ImageSource | Callable[[Image.Image], object],
                 seed: int | None = None, orientation: str = "ignore"):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), list(labels), transform
        self.orientation = orientation
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int):
        if isinstance(self.transform, ImageSource):
            return self.transform(self.paths[i])
        return self.transform(open_image(self.paths[i], self.orientation))

    def __getitem__(self, item: int | Draw):
        index, occurrence = _index_and_occurrence(item)
        if self.seed is None:
            return self._load(index), int(self.labels[index]), index
        with torch.random.fork_rng(devices=[]):  # leave the caller's generator untouched
            # the CPU generator only: torch.manual_seed would also reseed (and initialise) CUDA
            torch.default_generator.manual_seed(
                augmentation_seed(self.seed, self.epoch, index, occurrence))
            return self._load(index), int(self.labels[index]), index


def _index_and_occurrence(item) -> tuple[int, int]:
    """(index, occurrence) of a dataset item: a :class:`Draw`, or a plain index (a first draw)."""
    if isinstance(item, Draw):
        return int(item.index), int(item.occurrence)
    try:
        return operator.index(item), 0
    except TypeError:
        raise TypeError(f"ImageListDataset items are integer indices or sampler.Draw(index, "
                        f"occurrence); got {type(item).__name__} {item!r}") from None


def make_loader(dataset: Dataset, device: str | torch.device, num_workers: int | None = None,
                **kwargs) -> DataLoader:
    """The one way the stages build a DataLoader for ``device``.

    ``num_workers=None`` derives the worker count from the machine
    (:func:`~handclip_nb.device.default_num_workers`); on CUDA batches go to pinned memory so
    that the copy to the GPU (``.to(device, non_blocking=True)``) overlaps the next batch.
    Workers are not persistent: each epoch's workers get the dataset as it is at the start of
    the epoch (its epoch number, for :class:`ImageListDataset`'s per-item seeds); forking them
    costs milliseconds per epoch.
    """
    dev = resolve_device(device)
    workers = default_num_workers(dev) if num_workers is None else int(num_workers)
    extra = {"prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(dataset, num_workers=workers, pin_memory=dev.type == "cuda", **extra,
                      **kwargs)


def default_synthetic_root(params: Mapping) -> Path:
    """Where the embedded synthetic dataset for these parameters lives (one per settings)."""
    name = (f"synthetic-{params['dataset']}-{params['synthetic_subjects']}x"
            f"{params['synthetic_images']}-d{params['synthetic_difficulty']:g}"
            f"-seed{params['synthetic_seed']}")
    photo = params.get("synthetic_photo_size")
    if photo is not None:  # the default size keeps its old folder name
        name += f"-{photo[1]}x{photo[0]}"
    return project_root() / "outputs" / "data" / name


def ensure_synthetic(root: Path, subjects: int, images: int, difficulty: float, seed: int,
                     layout: str = "11k", photo_size: Sequence[int] | None = None) -> Path:
    """Generate the embedded synthetic dataset once. Processes that start together (a grid's
    runs, a notebook beside a test) take turns (``locks.build_folder_in_turn``): one generates
    into a temp folder and renames it into place, the others wait and find it, and nobody
    reads a half-written dataset. ``photo_size`` is [height, width] (None: the generator's
    small default)."""
    marker = "HandInfo.csv" if layout == "11k" else "Original Images"
    size = {} if photo_size is None else {"image_size": (int(photo_size[1]), int(photo_size[0]))}
    return build_folder_in_turn(
        root, lambda folder: (folder / marker).exists(),
        lambda tmp: generate_dataset(tmp, subjects=subjects, images_per_subject=images,
                                     seed=seed, difficulty=difficulty, layout=layout, **size))


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_protocol(params: Mapping, verify: bool = True) -> Protocol:
    """Read the dataset named by ``params`` and build its protocol (no images are decoded).

    ``data_root=None`` uses the embedded synthetic hands (11k layout, or HD layout for
    ``dataset="hd"``), generated on first use under ``outputs/data/``; ``dataset="custom"``
    (the user's own photos, ``data/custom.py``) has no synthetic stand-in and needs a
    ``data_root``.  Every random choice of
    the protocol comes from ``params["split_seed"]``, never from the training ``seed``.  With
    ``verify`` every image the protocol references is checked up front; all problems are
    reported together.  ``selection='best_accuracy'`` (CLIP-HandID's) takes every training
    identity's val image out of the fit set (:func:`~.protocols.hold_out_val_images`).
    """
    protocol = _read_protocol(params, verify)
    return hold_out_val_images(protocol) if holds_out_val_images(params) else protocol


def _read_protocol(params: Mapping, verify: bool) -> Protocol:
    dataset = params["dataset"]
    root = params["data_root"]
    if root is None and dataset == "custom":
        raise ParamError("dataset 'custom' needs data_root: the folder holding one folder of "
                         "images per person, or labels.csv (docs/protocols.md#custom-datasets); "
                         "data_root=None means the embedded synthetic hands, which are 11k or "
                         "hd")
    if root is None:
        root = ensure_synthetic(default_synthetic_root(params),
                                params["synthetic_subjects"], params["synthetic_images"],
                                params["synthetic_difficulty"], params["synthetic_seed"],
                                layout="11k" if dataset == "11k" else "hd",
                                photo_size=params.get("synthetic_photo_size"))
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
    elif dataset == "custom":
        # read_custom checks every image itself (all problems in one error), so no verify below
        records = read_custom(root, check_images=verify)
        return build_custom_protocol(records, params["aspect"], root=root,
                                     seed=params["split_seed"], num_splits=params["num_splits"],
                                     gallery_mode=params["gallery_mode"],
                                     val_fraction=held_out_fraction(params),
                                     source_hash=custom_source_hash(root, records))
    else:  # the parameter schema already refuses this
        raise ValueError(f"unknown dataset {dataset!r}; valid: 11k, hd, custom")
    if verify:
        verify_images(root, protocol.items)
    return protocol
