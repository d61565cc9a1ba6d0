"""Evaluation protocols as index manifests (docs/protocols.md).

11k (MBA-Net): per aspect, drop ``accessories == 1`` images, sort the stripped ids, the first
⌈n/2⌉ are training identities and the rest test identities; one random image per training
identity is MBA-Net's "val" image; ``num_splits`` Monte-Carlo splits of the test identities put
one random image per identity in the gallery and the rest in the queries.  ``gallery_mode="all"``
merges the four aspects' galleries of the same split (identities stay distinct per aspect).

HD: ids of ``1-501`` sorted numerically, the first ⌈n/2⌉ train, the rest test (on the real data
the first 251 of 502 ids, which are MBA-Net's "id <= 447"); every gallery also gets all
``502-712`` images as distractors, identities of their own (person ``d<id>``).

Custom datasets (``data/custom.py``) reuse the 11k protocol (:func:`build_aspect_protocol`
with ``dataset="custom"``), optionally with the training/test halves named by the user
(``halves``), or one fixed split the user names image by image
(:func:`build_fixed_split_protocol`).

Model selection never sees a test identity: ``val_fraction`` of the *training* identities are
held out and get their own query/gallery split (:attr:`Protocol.selection`); the rest is the
fit set that training uses.

All randomness comes from ``numpy.random.default_rng`` streams keyed by (split seed, purpose,
split, aspect), so adding splits leaves the earlier ones unchanged, and the gallery drawn for an
aspect in split *s* is the same whichever aspect is being queried.  The split seed is the
``split_seed`` parameter, independent of the training ``seed``: runs that share it (and the
data) share ``splits.json`` byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import UnidentifiedImageError

from ..constants import ASPECT_NAMES
from ..runs import atomic_write_json
from .handinfo import DataError, HandImage
from .image_files import HeifSupportMissing, open_file

__all__ = ["Split", "Protocol", "build_11k_protocol", "hold_out_val_images", "build_aspect_protocol",
           "build_fixed_split_protocol", "build_hd_protocol", "sorted_halves", "person_sort_key",
           "find_image_problems", "verify_images", "load_manifest"]

_ASPECT_ORDER = tuple(ASPECT_NAMES.values())
_PURPOSE = {"val_image": 1, "selection_ids": 2, "selection_split": 3, "test_split": 4}


def _rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _PURPOSE[purpose], *map(int, keys)])


@dataclass(frozen=True)
class Split:
    """Indices into :attr:`Protocol.items`."""

    query: tuple[int, ...]
    gallery: tuple[int, ...]


@dataclass
class Protocol:
    dataset: str
    aspect: str
    gallery_mode: str
    seed: int  # the split seed (parameter ``split_seed``), never the training seed
    num_splits: int
    val_fraction: float
    root: str
    items: list[HandImage]
    #: integer identity of every item for ranking; people are distinct per aspect
    identities: list[int]
    train_people: list[str]  # all training identities (incl. the model-selection hold-out)
    test_people: list[str]
    fit: list[int]  # training images of the non-held-out training identities
    fit_labels: list[int]  # 0..num_classes-1, in sorted order of fit identities
    #: MBA-Net: one image per training identity; kept in ``fit`` unless ``val_held_out``
    val_images: list[int]
    selection: Split | None
    selection_people: list[str]
    test: list[Split]
    source_hash: str = ""
    extra: dict = field(default_factory=dict)
    #: the val images are out of ``fit`` (:func:`hold_out_val_images`; CLIP-HandID's selection)
    val_held_out: bool = False

    # ---------------------------------------------------------------- derived views
    @property
    def num_classes(self) -> int:
        return len(set(self.fit_labels))

    @property
    def fit_people(self) -> list[str]:
        """The person behind each training label: ``fit_people[label]``."""
        held = set(self.selection_people)
        return [p for p in self.train_people if p not in held]

    def paths(self, indices: Iterable[int] | None = None) -> list[str]:
        idx = range(len(self.items)) if indices is None else indices
        return [os.path.join(self.root, self.items[i].path) for i in idx]

    def ids_of(self, indices: Sequence[int]) -> np.ndarray:
        return np.asarray([self.identities[i] for i in indices], dtype=np.int64)

    def sizes(self) -> dict[str, int]:
        """The protocol sizes recorded under ``metrics["data"]`` (docs/contracts.md)."""
        train_set, test_set = set(self.train_people), set(self.test_people)
        train_images = sum(1 for it in self._aspect_items() if it.person in train_set)
        test_images = sum(1 for it in self._aspect_items() if it.person in test_set)
        first = self.test[0]
        return {
            "train_ids": len(self.train_people),
            "train_images": train_images,
            "fit_ids": len(set(self.fit_labels)),
            "fit_images": len(self.fit),
            "selection_ids": len(self.selection_people),
            "test_ids": len(self.test_people),
            "test_images": test_images,
            "queries_per_split": len(first.query),
            "gallery_per_split": len(first.gallery),
            # identities in the gallery: HD adds the distractors' (251 + 213 on the real data)
            "gallery_classes_per_split": len({self.identities[i] for i in first.gallery}),
        }

    def _aspect_items(self) -> list[HandImage]:
        return [it for it in self.items
                if it.aspect == self.aspect and not it.distractor and not it.accessories]

    # ---------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        body = {
            "dataset": self.dataset, "aspect": self.aspect, "gallery_mode": self.gallery_mode,
            "seed": self.seed, "num_splits": self.num_splits, "val_fraction": self.val_fraction,
            "source_hash": self.source_hash,
            "items": [[it.path, it.person, it.aspect, int(it.distractor)] for it in self.items],
            "identities": list(self.identities),
            "train_people": self.train_people, "test_people": self.test_people,
            "selection_people": self.selection_people,
            "fit": self.fit, "fit_labels": self.fit_labels, "val_images": self.val_images,
            "selection": None if self.selection is None else
            {"query": list(self.selection.query), "gallery": list(self.selection.gallery)},
            "test": [{"query": list(s.query), "gallery": list(s.gallery)} for s in self.test],
        }
        body["content_hash"] = _hash_json(body)
        body["test_hash"] = self.test_hash()
        body["sizes"] = self.sizes()
        return body

    def test_hash(self) -> str:
        """Hash of what the test measures: the test splits and the images they index. Runs of
        different stages or selection policies hold out different training identities (their
        ``content_hash`` differs) but, sharing ``split_seed`` and data, share this."""
        used = sorted({i for s in self.test for i in (*s.query, *s.gallery)})
        return _hash_json({
            "dataset": self.dataset, "aspect": self.aspect, "gallery_mode": self.gallery_mode,
            "source_hash": self.source_hash,
            "items": {i: [self.items[i].path, self.identities[i]] for i in used},
            "test": [{"query": list(s.query), "gallery": list(s.gallery)} for s in self.test]})

    def write_manifest(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.manifest())


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def load_manifest(path: str | os.PathLike) -> dict:
    """Read a manifest and check its content hash (a hand-edited manifest is refused)."""
    data = json.loads(Path(path).read_text())
    body = {k: v for k, v in data.items() if k not in ("content_hash", "test_hash", "sizes")}
    if _hash_json(body) != data.get("content_hash"):
        raise DataError(f"{path}: content hash mismatch; the manifest was modified")
    return data


def person_sort_key(person: str):
    """The order of identities: numeric where the name is a number (11k ids are zero-padded
    7-digit strings, HD ids plain numbers), then the other names alphabetically."""
    return (0, int(person), person) if person.isdigit() else (1, 0, person)


def sorted_halves(records: Iterable[HandImage]) -> tuple[list[str], list[str]]:
    """MBA-Net's halves: the sorted people of ``records``, the first ⌈n/2⌉ train, the rest test."""
    ordered = sorted({r.person for r in records}, key=person_sort_key)
    n_train = math.ceil(len(ordered) / 2)
    return ordered[:n_train], ordered[n_train:]


def _group(indices: Iterable[int], items: Sequence[HandImage]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(items[i].person, []).append(i)
    return groups


def _one_per_person(groups: dict[str, list[int]], rng: np.random.Generator
                    ) -> tuple[list[int], list[int]]:
    """Pick one random image per person (gallery); the others are queries."""
    gallery, query = [], []
    for person in sorted(groups, key=person_sort_key):
        idx = groups[person]
        pick = int(rng.integers(len(idx)))
        gallery.append(idx[pick])
        query.extend(j for k, j in enumerate(idx) if k != pick)
    return query, gallery


def _selection(train_people: list[str], groups: dict[str, list[int]], seed: int,
               val_fraction: float, where: str) -> tuple[list[str], Split | None]:
    if val_fraction <= 0:
        return [], None
    n_hold = max(2, int(round(val_fraction * len(train_people))))
    if n_hold >= len(train_people) - 1:
        raise DataError(f"{where}: val_fraction={val_fraction} would hold out {n_hold} of "
                        f"{len(train_people)} training identities, leaving too few to train on; "
                        f"lower val_fraction or add identities")
    order = _rng(seed, "selection_ids").permutation(len(train_people))
    held = sorted((train_people[i] for i in order[:n_hold]), key=person_sort_key)
    query, gallery = _one_per_person({p: groups[p] for p in held}, _rng(seed, "selection_split"))
    if not query:
        raise DataError(f"{where}: the model-selection identities have one image each, so there "
                        f"are no validation queries; use more images per identity")
    return held, Split(tuple(query), tuple(gallery))


def _monte_carlo_splits(seed: int, num_splits: int, aspect: str,
                        test_groups_by_aspect: dict[str, dict[str, list[int]]],
                        distractor_idx: list[int], where: str) -> list[Split]:
    """``num_splits`` splits: per aspect one random gallery image per test identity; the
    queries are ``aspect``'s other images; every gallery also holds ``distractor_idx``."""
    test: list[Split] = []
    for s in range(num_splits):
        query: list[int] = []
        gallery: list[int] = []
        for a, groups in test_groups_by_aspect.items():
            a_idx = _ASPECT_ORDER.index(a) if a in _ASPECT_ORDER else 0
            q, g = _one_per_person(groups, _rng(seed, "test_split", s, a_idx))
            gallery.extend(g)
            if a == aspect:
                query = q
        gallery.extend(distractor_idx)
        if not query:
            raise DataError(f"{where}: every test identity has a single image, so there are no "
                            f"queries; the protocol needs at least 2 images per identity")
        test.append(Split(tuple(query), tuple(gallery)))
    return test


def _assemble(dataset, aspect, gallery_mode, seed, val_fraction, root, items, identity_key,
              train_people, test_people, train_idx, test, source_hash, where) -> Protocol:
    train_groups = _group(train_idx, items)
    held, selection = _selection(train_people, train_groups, seed, val_fraction, where)
    held_set = set(held)
    fit_people = [p for p in train_people if p not in held_set]
    label_of = {p: k for k, p in enumerate(fit_people)}
    fit = [i for p in fit_people for i in train_groups[p]]
    fit_labels = [label_of[items[i].person] for i in fit]
    rng_val = _rng(seed, "val_image")
    val_images = [train_groups[p][int(rng_val.integers(len(train_groups[p])))]
                  for p in train_people]

    keys = sorted({identity_key(it) for it in items})
    key_to_int = {k: n for n, k in enumerate(keys)}
    identities = [key_to_int[identity_key(it)] for it in items]
    return Protocol(dataset=dataset, aspect=aspect, gallery_mode=gallery_mode, seed=seed,
                    num_splits=len(test), val_fraction=val_fraction, root=str(root),
                    items=list(items), identities=identities, train_people=train_people,
                    test_people=test_people, fit=fit, fit_labels=fit_labels,
                    val_images=val_images, selection=selection, selection_people=held,
                    test=test, source_hash=source_hash)


def hold_out_val_images(protocol: Protocol) -> Protocol:
    """``protocol`` with every training identity's val image taken out of ``fit``: the
    validation set of CLIP-HandID's model selection (its ``prepare_train_val_test_11k_r_l.py``
    moves one random image per training identity into ``val/``; ``train_handID.py`` keeps the
    epoch with the best classification accuracy on them). Labels, identities and test splits
    are unchanged; an identity left with no training image is refused."""
    if protocol.val_held_out:
        return protocol
    val = set(protocol.val_images)
    kept = [(i, label) for i, label in zip(protocol.fit, protocol.fit_labels) if i not in val]
    lonely = sorted({label for label in protocol.fit_labels} - {label for _, label in kept})
    if lonely:
        people = [protocol.fit_people[label] for label in lonely]
        raise DataError(f"{protocol.dataset} aspect {protocol.aspect}: {len(people)} training "
                        f"identities have a single image (e.g. {people[:3]}), which "
                        f"selection='best_accuracy' holds out for validation, leaving nothing "
                        f"to train on; use selection 'last' or 'best', or add images")
    fitted = set(protocol.fit_people)  # a 'best'/'retrain' hold-out identity validates elsewhere
    return replace(protocol, fit=[i for i, _ in kept], fit_labels=[label for _, label in kept],
                   val_images=[i for i in protocol.val_images
                               if protocol.items[i].person in fitted],
                   val_held_out=True)


def build_11k_protocol(records: Sequence[HandImage], aspect: str, root: str | os.PathLike = "",
                       seed: int = 0, num_splits: int = 10, gallery_mode: str = "aspect",
                       val_fraction: float = 0.2, source_hash: str = "") -> Protocol:
    """The MBA-Net protocol on 11k records (see the module docstring)."""
    return build_aspect_protocol(records, aspect, root=root, seed=seed, num_splits=num_splits,
                                 gallery_mode=gallery_mode, val_fraction=val_fraction,
                                 source_hash=source_hash)


def _check_arguments(aspect: str, gallery_mode: str, num_splits: int = 1) -> None:
    if aspect not in _ASPECT_ORDER:
        raise ValueError(f"unknown aspect {aspect!r}; valid: {', '.join(_ASPECT_ORDER)}")
    if gallery_mode not in ("aspect", "all"):
        raise ValueError(f"unknown gallery_mode {gallery_mode!r}; valid: aspect, all")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")


def build_aspect_protocol(records: Sequence[HandImage], aspect: str,
                          root: str | os.PathLike = "", seed: int = 0, num_splits: int = 10,
                          gallery_mode: str = "aspect", val_fraction: float = 0.2,
                          source_hash: str = "", dataset: str = "11k",
                          halves: Callable[[Sequence[HandImage]], tuple[list[str], list[str]]]
                          = sorted_halves) -> Protocol:
    """The 11k (MBA-Net) protocol on records with the four 11k aspects, for any ``dataset``.

    ``halves`` cuts one aspect's records into (training people, test people), both sorted;
    MBA-Net's sorted halves unless the dataset names them itself (a custom ``labels.csv``).
    """
    _check_arguments(aspect, gallery_mode, num_splits)
    clean = [r for r in records if not r.accessories]
    per_aspect: dict[str, list[HandImage]] = {a: [] for a in _ASPECT_ORDER}
    for r in clean:
        per_aspect[r.aspect].append(r)
    mine = per_aspect[aspect]
    if not mine:
        n_all = sum(1 for r in records if r.aspect == aspect)
        raise DataError(
            f"aspect {aspect}: no images left ({n_all} rows with this aspect, all with "
            f"accessories == 1 or none at all); check data_root and aspect"
        )
    # Item order: the chosen aspect first (so its indices are stable), then the other aspects'
    # test images that "all" mode needs as cross-aspect distractors.
    items: list[HandImage] = list(mine)
    train_people, test_people = halves(mine)
    if not test_people and len(train_people) < 2:
        raise DataError(f"aspect {aspect}: only {len(train_people)} identity, so the test half is "
                        f"empty; the protocol needs at least 2 identities")
    if not test_people or not train_people:  # halves named by the dataset
        raise DataError(f"aspect {aspect}: {len(train_people)} training and {len(test_people)} "
                        f"test identities; the protocol needs at least one of each")
    train_set, test_set = set(train_people), set(test_people)
    train_idx = [i for i, it in enumerate(items) if it.person in train_set]
    test_groups = {aspect: _group((i for i, it in enumerate(items) if it.person in test_set),
                                  items)}
    if gallery_mode == "all":
        for other in _ASPECT_ORDER:
            if other == aspect or not per_aspect[other]:
                continue
            _, other_test = halves(per_aspect[other])
            other_set = set(other_test)
            start = len(items)
            items.extend(r for r in per_aspect[other] if r.person in other_set)
            test_groups[other] = _group(range(start, len(items)), items)
    where = f"{dataset} aspect {aspect}"
    test = _monte_carlo_splits(seed, num_splits, aspect, test_groups, [], where)
    return _assemble(dataset, aspect, gallery_mode, seed, val_fraction, root, items,
                     lambda it: (it.aspect, it.person), train_people, test_people, train_idx,
                     test, source_hash, where)


def build_fixed_split_protocol(records: Sequence[HandImage], aspect: str,
                               root: str | os.PathLike = "", seed: int = 0,
                               gallery_mode: str = "aspect", val_fraction: float = 0.2,
                               source_hash: str = "", dataset: str = "custom") -> Protocol:
    """One test split named image by image: every record's ``split`` is train, query or gallery.

    ``aspect``'s train images train, its query images are the queries, its gallery images the
    gallery (``gallery_mode="all"``: plus every other aspect's gallery images, identities
    distinct per aspect as on 11k).  There is nothing to draw, so the protocol has one test
    split whatever ``num_splits`` says; ``split_seed`` still draws the val images and the
    model-selection identities.  The records must be consistent (a person on one side only, a
    gallery image for every query person): ``data/custom.py`` checks that while reading.
    """
    _check_arguments(aspect, gallery_mode)
    mine = [r for r in records if r.aspect == aspect]
    others = [r for r in records if r.aspect != aspect and r.split == "gallery"]
    items = mine + (others if gallery_mode == "all" else [])
    train_people = sorted({r.person for r in mine if r.split == "train"}, key=person_sort_key)
    test_people = sorted({r.person for r in mine if r.split in ("query", "gallery")},
                         key=person_sort_key)
    where = f"{dataset} aspect {aspect}"
    if not train_people or not test_people:
        raise DataError(f"{where}: {len(train_people)} training and {len(test_people)} test "
                        f"identities; the split column must name at least one of each")
    query = tuple(i for i, it in enumerate(items) if it.aspect == aspect and it.split == "query")
    gallery = tuple(i for i, it in enumerate(items) if it.split == "gallery")
    if not query:
        raise DataError(f"{where}: no image has split 'query'")
    train_idx = [i for i, it in enumerate(items) if it.split == "train"]
    return _assemble(dataset, aspect, gallery_mode, seed, val_fraction, root, items,
                     lambda it: (it.aspect, it.person), train_people, test_people, train_idx,
                     [Split(query, gallery)], source_hash, where)


def build_hd_protocol(records: Sequence[HandImage], root: str | os.PathLike = "", seed: int = 0,
                      num_splits: int = 10, val_fraction: float = 0.2,
                      source_hash: str = "") -> Protocol:
    """The HD protocol: first ⌈n/2⌉ ids of 1-501 train, the rest test, 502-712 distractors.

    Distractors (``distractor=True``, person ``d<id>`` from :func:`read_hd`) are identities of
    their own, in every test gallery, never in a query or in training."""
    main = [r for r in records if not r.distractor]
    distract = [r for r in records if r.distractor]
    items = main + distract
    train_people, test_people = sorted_halves(main)
    if not test_people:
        raise DataError("HD: fewer than 2 identities in 1-501, so the test half is empty")
    train_set, test_set = set(train_people), set(test_people)
    train_idx = [i for i, it in enumerate(items) if not it.distractor and it.person in train_set]
    test_groups = {main[0].aspect: _group(
        (i for i, it in enumerate(items) if not it.distractor and it.person in test_set), items)}
    distractor_idx = list(range(len(main), len(items)))
    test = _monte_carlo_splits(seed, num_splits, main[0].aspect, test_groups, distractor_idx, "HD")
    return _assemble("hd", main[0].aspect, "aspect", seed, val_fraction, root, items,
                     lambda it: (it.distractor, it.person), train_people, test_people,
                     train_idx, test, source_hash, "HD")


def find_image_problems(root: str | os.PathLike, items: Sequence[HandImage],
                        check_decode: bool = True) -> tuple[list[int], list[tuple[int, str]]]:
    """Indices of ``items`` whose file is missing, and (index, exception name) of those whose
    file does not open as an image (the header is read, not the pixels; a HEIC/HEIF photo
    without pillow-heif gives the reason and the fix instead of a name)."""
    missing: list[int] = []
    unreadable: list[tuple[int, str]] = []
    for i, it in enumerate(items):
        p = os.path.join(root, it.path)
        if not os.path.isfile(p):
            missing.append(i)
            continue
        if check_decode:
            try:
                with open_file(p) as im:  # reads the header only: cheap even for 11k
                    im.size  # noqa: B018
            except HeifSupportMissing as exc:  # what is missing and the fix
                unreadable.append((i, exc.reason))
            except (UnidentifiedImageError, OSError) as exc:
                unreadable.append((i, type(exc).__name__))
    return missing, unreadable


def verify_images(root: str | os.PathLike, items: Sequence[HandImage], check_decode: bool = True,
                  max_listed: int = 20) -> None:
    """Check, before any work, that every image exists and opens; report all problems at once."""
    missing_idx, unreadable_idx = find_image_problems(root, items, check_decode)
    missing = [os.path.join(root, items[i].path) for i in missing_idx]
    unreadable = [f"{os.path.join(root, items[i].path)} ({why})" for i, why in unreadable_idx]
    if missing or unreadable:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing image(s): " + ", ".join(missing[:max_listed])
                         + (" ..." if len(missing) > max_listed else ""))
        if unreadable:
            parts.append(f"{len(unreadable)} unreadable image(s): "
                         + ", ".join(unreadable[:max_listed])
                         + (" ..." if len(unreadable) > max_listed else ""))
        raise DataError(f"dataset at {root}: " + "; ".join(parts)
                        + ". Fix data_root or restore the files; nothing was run.")
