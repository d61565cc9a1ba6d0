"""The captioned pretraining population of handclip-mini: generated once, loaded into memory.

What is here: the population's guards (:data:`PRETRAIN_ID_OFFSET`, :data:`EVALUATED_SEEDS`,
:func:`check_disjoint`: disjoint in seed and identity from every evaluated dataset), its
generation (:func:`build_pretraining_data`, and :func:`pretraining_data` /
:func:`pretraining_data_root` for a parameter set), the in-memory image store
(:class:`CaptionedImages`) and the distinct-person batch plan
(:func:`distinct_person_batches`). Training lives in :mod:`handclip_nb.train.pretrain`, the
measurements on these images in :mod:`handclip_nb.evaluate.probes`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..backbone_specs import PreprocessConfig
from ..locks import build_folder_in_turn
from ..progress import tqdm
from ..runs import atomic_write_json, project_root, resolve_path
from .captions import read_captions
from .handinfo import read_handinfo
from .image_files import open_image
from .synthetic import generate_dataset
from .transforms import build_transform

__all__ = ["PRETRAIN_ID_OFFSET", "EVALUATED_SEEDS", "check_disjoint", "PretrainData",
           "PRETRAIN_PARTS", "build_pretraining_data", "CaptionedImages",
           "distinct_person_batches", "pretraining_data_root", "pretraining_data"]

#: First person number of the pretraining population (evaluated datasets stay far below it).
PRETRAIN_ID_OFFSET = 5_000_000
#: ``synthetic_seed`` values the demo, smoke runs and tests evaluate on; pretraining refuses them.
EVALUATED_SEEDS = range(0, 100)


def check_disjoint(pretrain_seed: int, people: int, heldout: int) -> None:
    """Refuse a pretraining population that could overlap an evaluated dataset."""
    if int(pretrain_seed) in EVALUATED_SEEDS:
        raise ValueError(
            f"pretrain_seed {pretrain_seed} is a seed evaluated datasets use "
            f"({EVALUATED_SEEDS.start}-{EVALUATED_SEEDS.stop - 1}); pick a seed outside that "
            f"range (the default is 104729) so pretraining never sees evaluated people")
    if PRETRAIN_ID_OFFSET + people + heldout > 10_000_000:
        raise ValueError("pretrain_people + pretrain_heldout is too large for 7-digit ids")


@dataclass(frozen=True)
class PretrainData:
    train_root: Path
    heldout_root: Path


#: The two parts of the population: what :func:`build_pretraining_data` can build.
PRETRAIN_PARTS = ("train", "heldout")


def build_pretraining_data(root: str | os.PathLike, people: int, images_per_person: int,
                           heldout_people: int, seed: int, difficulty: float = 0.5,
                           accessory_rate: float = 0.3,
                           parts: tuple[str, ...] = PRETRAIN_PARTS) -> PretrainData:
    """Generate (once) the captioned pretraining and held-out sets under ``root``.

    11k layout with ``captions.csv``; train people are numbers ``PRETRAIN_ID_OFFSET + i``,
    held-out people follow them. Each part is its own folder with a ``settings.json`` marker:
    a rerun with the same settings skips it, different settings regenerate it. ``parts``
    builds only some of them (re-measuring a card reads only the held-out people; the two are
    generated independently, so the held-out set is the same file for file either way).

    Two processes may build the same population at once (two runs of a grid, a notebook and
    a test): they take turns on a lock beside each part (``.<part>.lock``, :mod:`..locks`), so
    it is generated once and the other finds it. The part is generated into a temporary
    folder beside it and renamed into place with its marker inside, so nobody ever reads a
    half-written part, with or without working locks.
    """
    check_disjoint(seed, people, heldout_people)
    unknown = sorted(set(parts) - set(PRETRAIN_PARTS))
    if unknown:
        raise ValueError(f"unknown pretraining part(s) {unknown}; the parts are {PRETRAIN_PARTS}")
    root = resolve_path(root)
    settings = {"people": int(people), "images_per_person": int(images_per_person),
                "heldout_people": int(heldout_people), "seed": int(seed),
                "difficulty": float(difficulty), "accessory_rate": float(accessory_rate),
                "id_offset": PRETRAIN_ID_OFFSET, "format": 2}
    data = PretrainData(root / "train", root / "heldout")
    people_of = {"train": (data.train_root, int(people), PRETRAIN_ID_OFFSET),
                 "heldout": (data.heldout_root, int(heldout_people),
                             PRETRAIN_ID_OFFSET + int(people))}
    for part in parts:
        folder, subjects, id_offset = people_of[part]
        _build_part(folder, {**settings, "part": part}, dict(
            subjects=subjects, id_offset=id_offset, images_per_subject=int(images_per_person),
            seed=int(seed), difficulty=float(difficulty), accessory_rate=float(accessory_rate)))
    return data


def _build_part(folder: Path, settings: dict, generate: dict) -> None:
    """One part, once; a part with other settings, or a format-1 part without its own
    marker, is replaced."""
    def build(tmp: Path) -> None:
        generate_dataset(tmp, **generate)
        atomic_write_json(tmp / "settings.json", settings)

    build_folder_in_turn(folder, lambda f: _built_with(f, settings), build)


def _built_with(folder: Path, settings: dict) -> bool:
    try:
        return json.loads((folder / "settings.json").read_text()) == settings
    except (OSError, ValueError):  # missing, or a folder being replaced right now
        return False


class CaptionedImages:
    """Every image of an 11k-layout root, letterboxed once into memory (uint8), with captions.

    Decoding and resizing once is what makes CPU pretraining fit its budget: an epoch then
    costs only the model. ``records`` are the HandInfo rows (the probes' ground truth),
    ``people`` their identities (for distinct-person batches), ``captions`` the rows' captions
    from ``captions.csv`` (``with_captions=False`` for data without one, e.g. the real 11k
    Hands, where only the attribute probes apply).

    ``preprocess`` is the preprocessing of the model the images are for
    (``backbone.preprocess_config()``, or ``get_backbone_spec(name).preprocess(size)`` before the
    model exists): images are resized by it, and :meth:`images` normalises with its mean and std.
    """

    def __init__(self, root: str | os.PathLike, preprocess: PreprocessConfig,
                 with_captions: bool = True, progress: bool = True):
        self.root = resolve_path(root)
        self.records = read_handinfo(self.root / "HandInfo.csv")
        if with_captions:
            captions = read_captions(self.root)
            missing = [r.path for r in self.records if r.path not in captions]
            if missing:
                raise ValueError(f"{self.root / 'captions.csv'} has no caption for "
                                 f"{len(missing)} images, e.g. {missing[0]!r}")
            self.captions = [captions[r.path] for r in self.records]
        else:
            self.captions = [""] * len(self.records)
        self.people = np.asarray([r.person for r in self.records])
        transform = build_transform(preprocess, train=False)
        self._mean = torch.tensor(preprocess.mean).view(3, 1, 1)
        self._std = torch.tensor(preprocess.std).view(3, 1, 1)
        pixels = []
        for r in tqdm(self.records, desc=f"loading {self.root.name}", disable=not progress):
            # synthetic photos carry no EXIF orientation: read as stored, like 11k
            x = transform(open_image(self.root / r.path, "ignore"))  # normalised float tensor
            pixels.append(torch.round((x * self._std + self._mean) * 255).clamp(0, 255)
                          .to(torch.uint8))
        self.pixels = torch.stack(pixels)

    def __len__(self) -> int:
        return len(self.records)

    def images(self, index) -> torch.Tensor:
        """Normalised float images for ``index`` (what the backbone expects)."""
        return (self.pixels[index].float() / 255.0 - self._mean) / self._std


def distinct_person_batches(people: np.ndarray, batch_size: int,
                            rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches in which no person appears twice.

    Rounds take one random not-yet-used photo of every person (people in random order); each
    round is cut into batches, and a round's tail shorter than half a batch is dropped (a few
    photos per epoch, different ones each epoch).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {batch_size}")
    by_person: dict[str, list[int]] = {}
    for i, p in enumerate(people):
        by_person.setdefault(str(p), []).append(i)
    queues = {p: list(rng.permutation(ix)) for p, ix in by_person.items()}
    batches: list[np.ndarray] = []
    while any(queues.values()):
        names = [p for p in queues if queues[p]]
        order = rng.permutation(len(names))
        picked = np.asarray([queues[names[j]].pop() for j in order])
        # a tail below half a batch is dropped; "a batch" is at most the people available
        min_size = max(2, min(batch_size, len(by_person)) // 2)
        for start in range(0, len(picked), batch_size):
            chunk = picked[start:start + batch_size]
            if len(chunk) >= min_size:
                batches.append(chunk)
    return batches


def pretraining_data_root(params: Mapping) -> Path:
    """Where the captioned pretraining population for these parameters lives."""
    name = (f"pretrain-seed{params['pretrain_seed']}-{params['pretrain_people']}x"
            f"{params['pretrain_images']}-h{params['pretrain_heldout']}"
            f"-a{params['pretrain_accessory_rate']:g}")
    return project_root() / "outputs" / "data" / name


def pretraining_data(params: Mapping, parts: tuple[str, ...] = PRETRAIN_PARTS) -> PretrainData:
    """The captioned pretraining and held-out sets the parameters describe (generated once;
    ``parts``: only those, as :func:`build_pretraining_data`)."""
    return build_pretraining_data(pretraining_data_root(params), params["pretrain_people"],
                                  params["pretrain_images"], params["pretrain_heldout"],
                                  params["pretrain_seed"],
                                  accessory_rate=params["pretrain_accessory_rate"], parts=parts)
