"""Custom datasets (``dataset: custom``): the user's own hand photos, without writing code.

Layouts of ``data_root`` (docs/protocols.md#custom-datasets):

* **Folders**: one folder per person, ``<root>/<person>/<image>``, or with aspect folders,
  ``<root>/<person>/<aspect>/<image>``.  The folder name is the person.  Images are
  ``.jpg .jpeg .png .bmp .tif .tiff .webp .heic .heif`` in any case (HEIC/HEIF, iPhone photos,
  through the optional package pillow-heif: without it they are refused with the fix); other
  files (``Thumbs.db``, notes) and hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are
  skipped.  Every person uses the same layout: all flat, or all with aspect folders.
* **labels.csv** at the root, columns ``image,person`` and optionally ``aspect`` and ``split``
  (header names in any case, in any order); ``image`` is a path relative to the root (``/`` or
  ``\\``).  When ``labels.csv`` exists it alone says what the dataset is: the folders are not
  scanned, and images it does not name are not used.

Decisions:

* **Aspects.**  An aspect (folder or ``aspect`` cell) must be one of the four 11k aspects, as
  the short name or the ``HandInfo.csv`` phrase in any case (``dorsal_r``, ``Dorsal Right``,
  ``dorsal-right``).  Free names (``front``, ``session2``) are refused because the ``aspect``
  parameter selects among those four and the prompts of stages 1 and 3 put the aspect's phrase
  in the text ("A photo of a X X X X dorsal right hand.", ``models/prompts.aspect_phrase``): a
  folder name there would be a word CLIP was never shown for a hand view.  A dataset with
  aspects follows 11k exactly: ``aspect`` selects the queried aspect, identities are distinct
  per aspect, ``gallery_mode: all`` merges the other aspects' test galleries (MBA-Net).  A
  dataset without aspects is one aspect: the ``aspect`` parameter names it (set it to what the
  photos show; it is the word the prompts use), and both gallery modes are the same.
* **Split.**  Without a ``split`` column (and always for folders) the protocol is 11k's
  (:func:`~handclip_nb.data.protocols.build_aspect_protocol`): sorted people, the first ⌈n/2⌉
  train, ``num_splits`` Monte-Carlo query/gallery splits with one gallery image per test person,
  ``val_fraction`` of the training people held out for model selection, all drawn from
  ``split_seed``.  A ``split`` column fixes more, in one of two vocabularies:

  - ``train``/``test``: the file names the halves (per person); the query/gallery splits are
    still drawn, ``num_splits`` of them.
  - ``train``/``query``/``gallery``: the file names every image's role, so there is one test
    split and nothing to draw: ``num_splits`` is ignored and the protocol (``splits.json``,
    ``metrics.json``) records ``num_splits: 1``, its std over splits 0.  ``split_seed`` still
    draws the model-selection people and MBA-Net's val images from the training people.
    A person with gallery images but no query is a distractor; a query person needs a gallery
    image of the same aspect; a person may have several gallery images.

  Every row names its split or the column is absent: a partly filled column, ``test`` mixed
  with ``query``/``gallery``, or one person on both the training and the test side is refused.
* **Images per person.**  Every person needs at least 2 images in each aspect they appear in,
  training people too: whether a person lands in the test half depends on every other name,
  and which training people are held out for model selection (where they need a query and a
  gallery image, like a test person) on ``split_seed``, so a rule for everyone is the only one
  a user can check while collecting photos.  Exceptions follow from the fixed split: gallery-
  only people (distractors) may have one image.
* **Errors.**  Every problem of the layout is collected and raised in one :class:`DataError`,
  one line each, naming the folder, file or ``labels.csv:line`` and the fix; unreadable images
  are found with the same header check as ``protocols.verify_images``.  Only an unreadable
  ``labels.csv`` itself (not UTF-8, an unclosed quote) stops the reading at once.
* **source_hash**: the SHA-256 of ``labels.csv``'s bytes, or of the folder listing (every
  image's ``<person>/[<aspect>/]<name>``); like HD's it changes when a file is added, removed,
  renamed or moved to another person, not when an image is overwritten in place.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..constants import ASPECT_NAMES, ASPECTS
from .handinfo import IMAGE_SUFFIXES, DataError, HandImage, csv_rows
from .image_files import HEIF_SUFFIXES, HeifSupportMissing
from .protocols import (Protocol, build_aspect_protocol, build_fixed_split_protocol,
                        find_image_problems, person_sort_key)

__all__ = [
    "LABELS_FILE",
    "LABEL_COLUMNS",
    "REQUIRED_LABEL_COLUMNS",
    "CUSTOM_IMAGE_SUFFIXES",
    "HALVES_SPLITS",
    "FIXED_SPLITS",
    "NO_ASPECT",
    "custom_aspect",
    "read_custom",
    "custom_source_hash",
    "build_custom_protocol",
]

LABELS_FILE = "labels.csv"
#: every column ``labels.csv`` may have; any other is refused (a typo must not be ignored)
LABEL_COLUMNS = ("image", "person", "aspect", "split")
REQUIRED_LABEL_COLUMNS = ("image", "person")
CUSTOM_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".webp", *HEIF_SUFFIXES)
#: ``split`` values naming the halves only (the query/gallery splits are drawn) ...
HALVES_SPLITS = ("train", "test")
#: ... or every image's role (one fixed test split)
FIXED_SPLITS = ("train", "query", "gallery")
#: aspect of the records of a dataset without aspects, until the protocol names it
NO_ASPECT = ""
_LAYOUT_DOC = "docs/protocols.md#custom-datasets"
_ASPECT_CHOICES = ", ".join(ASPECTS) + " (or 'dorsal right', ... in any case)"
_MAX_LISTED = 50


def custom_aspect(name: str) -> str | None:
    """The short aspect name of a folder name or ``aspect`` cell, None when it is not one."""
    key = name.strip().lower()
    if key in ASPECTS:
        return key
    return ASPECT_NAMES.get(" ".join(key.replace("_", " ").replace("-", " ").split()))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in CUSTOM_IMAGE_SUFFIXES


@dataclass
class _Reading:
    """What the reader found: records, where each came from, and every problem."""

    root: Path
    csv_path: Path | None  # labels.csv, None for the folder layout
    records: list[HandImage] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # image path, or labels.csv:line
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, what and the fix)

    def problem(self, where: str | os.PathLike, what: str) -> None:
        self.problems.append((str(where), what))

    def ref(self, origin: str) -> str:
        """``origin`` inside a message about another place: ``line 7`` for a labels.csv row."""
        prefix = f"{self.csv_path}:"
        return f"line {origin[len(prefix):]}" if self.csv_path and origin.startswith(prefix) \
            else origin

    def add(self, record: HandImage, origin: str) -> None:
        self.records.append(record)
        self.origins.append(origin)

    def keep(self, indices: set[int]) -> None:
        self.records = [r for i, r in enumerate(self.records) if i in indices]
        self.origins = [o for i, o in enumerate(self.origins) if i in indices]

    def raise_problems(self) -> None:
        if not self.problems:
            return
        # in the order of the places: folder by folder, labels.csv line by line
        ordered = sorted(self.problems, key=lambda p: _place_key(p[0]))
        listed = ordered[:_MAX_LISTED]
        more = len(ordered) - len(listed)
        raise DataError(
            f"custom dataset at {self.root}: {len(ordered)} problem(s); nothing was run. "
            f"Fix them all and run again:\n"
            + "\n".join(f"  - {where}: {what}" for where, what in listed)
            + (f"\n  ... and {more} more" if more else "")
            + f"\nThe layout rules: {_LAYOUT_DOC}")


_LINE = re.compile(r"^(.*):(\d+)(?:-\d+ .*)?$")


def _place_key(where: str) -> tuple[str, int]:
    m = _LINE.match(where)
    return (m.group(1), int(m.group(2))) if m else (where, 0)


# ------------------------------------------------------------------------------- folders
def _listing(folder: Path) -> tuple[list[str], list[Path]]:
    """Image names and sub-folders of ``folder`` (hidden entries and other files skipped)."""
    images, folders = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            folders.append(entry)
        elif _is_image(entry.name):
            images.append(entry.name)
    return images, folders


def _read_folders(reading: _Reading) -> None:
    root = reading.root
    images_at_root, person_dirs = _listing(root)
    for name in images_at_root:
        reading.problem(root / name, "an image directly under data_root has no person; move "
                                     "it into <data_root>/<person>/")
    if not person_dirs:
        reading.problem(root, f"no person folders and no {LABELS_FILE}; put each person's "
                              f"images in <data_root>/<person>/, or list them in {LABELS_FILE}")
        return
    flat, with_aspects = [], []
    unknown_aspects: dict[str, list[Path]] = {}
    for person_dir in person_dirs:
        person = person_dir.name
        images, sub_dirs = _listing(person_dir)
        if images and sub_dirs:
            reading.problem(person_dir, f"holds {len(images)} image(s) and the folder(s) "
                                        f"{[d.name for d in sub_dirs][:5]}; put all of this "
                                        f"person's images either directly in it or in aspect "
                                        f"folders ({', '.join(ASPECTS)})")
            continue
        if not images and not sub_dirs:
            reading.problem(person_dir, f"empty person folder: no image "
                                        f"({' '.join(CUSTOM_IMAGE_SUFFIXES)}); add this person's "
                                        f"images or remove the folder")
            continue
        if images:
            flat.append(person)
            for name in images:
                reading.add(HandImage(path=f"{person}/{name}", person=person, aspect=NO_ASPECT),
                            str(person_dir / name))
            continue
        with_aspects.append(person)
        seen: dict[str, str] = {}
        for aspect_dir in sub_dirs:
            aspect = custom_aspect(aspect_dir.name)
            if aspect is None:
                unknown_aspects.setdefault(aspect_dir.name, []).append(aspect_dir)
                continue
            if aspect in seen:
                reading.problem(aspect_dir, f"aspect {aspect} again (also {seen[aspect]!r}); "
                                            f"merge the two folders")
                continue
            seen[aspect] = aspect_dir.name
            aspect_images, deeper = _listing(aspect_dir)
            if deeper:
                reading.problem(aspect_dir, f"holds the folder(s) {[d.name for d in deeper][:5]}: "
                                            f"nested too deep; images go in "
                                            f"<data_root>/<person>/<aspect>/<image>")
            elif not aspect_images:
                reading.problem(aspect_dir, "empty aspect folder: no image; add this person's "
                                            "images of the aspect or remove the folder")
            for name in aspect_images:
                reading.add(HandImage(path=f"{person}/{aspect_dir.name}/{name}", person=person,
                                      aspect=aspect), str(aspect_dir / name))
    for name, dirs in unknown_aspects.items():
        reading.problem(dirs[0], f"unknown aspect folder {name!r}"
                                 + (f" (and in {len(dirs) - 1} more person folder(s))"
                                    if len(dirs) > 1 else "")
                                 + f"; name aspect folders {_ASPECT_CHOICES}, or put the images "
                                   f"directly in the person folder when the dataset has no "
                                   f"aspects")
    if flat and with_aspects:
        reading.problem(root, f"{len(flat)} person folder(s) hold images directly (e.g. "
                              f"{flat[:3]}) and {len(with_aspects)} hold aspect folders (e.g. "
                              f"{with_aspects[:3]}); use one layout for every person")


# ------------------------------------------------------------------------------- labels.csv
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:/")


def _image_path(text: str) -> tuple[str | None, str | None]:
    """(the normalised path relative to the root, None) or (None, what is wrong with it)."""
    raw = text.strip().replace("\\", "/")
    if not raw:
        return None, "empty image path; every row names its image, relative to data_root"
    if raw.startswith("/") or _WINDOWS_DRIVE.match(raw):
        return None, f"absolute image path {text!r}; write it relative to data_root"
    path = posixpath.normpath(raw)
    if path == ".." or path.startswith("../"):
        return None, f"image path {text!r} leaves data_root; keep the images under data_root"
    if not _is_image(posixpath.basename(path)):
        return None, (f"{text!r} is not an image file name (extensions "
                      f"{' '.join(CUSTOM_IMAGE_SUFFIXES)}, any case)")
    return path, None


def _read_labels(reading: _Reading, csv_path: Path) -> None:
    rows = csv_rows(csv_path, f"save {LABELS_FILE} as UTF-8 CSV")
    try:
        header_at, header = next(rows)
    except StopIteration:
        reading.problem(f"{csv_path}:1", "empty file; expected the header image,person and "
                                         "optionally aspect, split")
        return
    columns = [h.strip().lower() for h in header]
    unknown = [h for h, c in zip(header, columns) if c not in LABEL_COLUMNS]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    missing = [c for c in REQUIRED_LABEL_COLUMNS if c not in columns]
    for name in unknown:
        reading.problem(header_at, f"unknown column {name.strip()!r}; the columns are image and "
                                   f"person (required), aspect and split (optional): rename or "
                                   f"remove it")
    for name in repeated:
        reading.problem(header_at, f"column {name!r} appears {columns.count(name)} times; keep one")
    for name in missing:
        reading.problem(header_at, f"no {name!r} column; the header needs image and person")
    if missing or repeated:
        return  # the rows cannot be read without knowing which cell is which
    col = {name: columns.index(name) for name in LABEL_COLUMNS if name in columns}
    first_row_of: dict[str, str] = {}
    for where, row in rows:
        if len(row) != len(columns):
            reading.problem(where, f"{len(row)} cell(s), the header has {len(columns)} "
                                   f"({','.join(columns)})")
            continue
        cells = {name: row[i].strip() for name, i in col.items()}
        wrong = []
        path, path_problem = _image_path(cells["image"])
        if path_problem:
            wrong.append(path_problem)
        if not cells["person"]:
            wrong.append("empty person; every row names the person in its image")
        aspect = NO_ASPECT
        if "aspect" in col:
            aspect = custom_aspect(cells["aspect"]) if cells["aspect"] else None
            if aspect is None:
                wrong.append(f"aspect {cells['aspect']!r} is not one of {_ASPECT_CHOICES}"
                             if cells["aspect"] else
                             "empty aspect; with an aspect column every row names its aspect "
                             "(or remove the column: a dataset without aspects is one aspect)")
        split = None
        if "split" in col:
            split = cells["split"].lower()
            if split not in (*HALVES_SPLITS, *FIXED_SPLITS):
                wrong.append(f"split {cells['split']!r} is not one of train, test, query, gallery"
                             if split else
                             "empty split; with a split column every row names its split "
                             "(train/test, or train/query/gallery), or remove the column to "
                             "let the protocol choose")
        if path is not None and path in first_row_of:
            wrong.append(f"image {path!r} listed again (first at "
                         f"{reading.ref(first_row_of[path])}); remove one row")
        elif path is not None:
            first_row_of[path] = where
            if not (reading.root / path).is_file():
                wrong.append(f"image {cells['image']!r} not found ({reading.root / path}); "
                             f"correct the path (relative to data_root) or remove the row")
        if wrong:
            for what in wrong:
                reading.problem(where, what)
            continue
        reading.add(HandImage(path=path, person=cells["person"], aspect=aspect, split=split),
                    where)
    if not first_row_of and not reading.problems:
        reading.problem(csv_path, "no image rows after the header")


# ------------------------------------------------------------------------------- whole dataset
def _check_images_decode(reading: _Reading) -> None:
    _, unreadable = find_image_problems(reading.root, reading.records)
    for i, why in unreadable:
        # a labels.csv row is named by its line: name the image too; a folder's origin is it
        image = f"image {reading.root / reading.records[i].path} " if reading.csv_path else ""
        if why == HeifSupportMissing.reason:  # the fix is to read it, not to remove it
            reading.problem(reading.origins[i], f"{image}cannot be read: {why}")
        else:
            reading.problem(reading.origins[i],
                            f"{image}does not open as an image ({why}); replace or remove it")
    reading.keep(set(range(len(reading.records))) - {i for i, _ in unreadable})


def _check_splits(reading: _Reading, csv_path: Path) -> None:
    """A split column names either the halves or every image's role, and a person's side."""
    by_value: dict[str, list[str]] = {}
    for r, origin in zip(reading.records, reading.origins):
        by_value.setdefault(r.split, []).append(origin)
    if not by_value or set(by_value) == {None}:
        return  # no split column, or no usable row (each one is reported already)
    if "test" in by_value and ("query" in by_value or "gallery" in by_value):
        fixed = by_value.get("query", []) + by_value.get("gallery", [])
        reading.problem(csv_path, f"the split column mixes 'test' (e.g. "
                                  f"{reading.ref(by_value['test'][0])}) with 'query'/'gallery' "
                                  f"(e.g. {reading.ref(fixed[0])}); use train/test "
                                  f"(the protocol draws the query/gallery splits) or "
                                  f"train/query/gallery (one fixed test split), not both")
    if "train" not in by_value:
        reading.problem(csv_path, "no row has split 'train'; name the training people")
    if not set(by_value) & {"test", "query"}:
        reading.problem(csv_path, "no row has split 'test' or 'query'; name the test people")
    sides: dict[str, dict[str, list[str]]] = {}
    for r, origin in zip(reading.records, reading.origins):
        side = "training" if r.split == "train" else "test"
        sides.setdefault(r.person, {}).setdefault(side, []).append(origin)
    for person in sorted(sides, key=person_sort_key):
        if len(sides[person]) == 2:
            train_rows, test_rows = sides[person]["training"], sides[person]["test"]
            reading.problem(test_rows[0],
                            f"person {person!r} is on the test side here and on the training "
                            f"side at {', '.join(map(reading.ref, train_rows[:3]))}"
                            f"{' ...' if len(train_rows) > 3 else ''}; a test person must never be "
                            f"trained on: give all of this person's rows one side")


def _check_counts(reading: _Reading) -> None:
    """At least 2 images per person and aspect (gallery-only people of a fixed split: 1), and
    a gallery image for every query person (see the module docstring)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(reading.records):
        groups.setdefault((r.person, r.aspect), []).append(i)
    for (person, aspect), idx in sorted(groups.items(),
                                        key=lambda kv: (person_sort_key(kv[0][0]), kv[0][1])):
        splits = {reading.records[i].split for i in idx}
        in_aspect = f" of aspect {aspect}" if aspect else ""
        # labels.csv: the row; folders: the person's (aspect) folder, not one image
        where = (reading.origins[idx[0]] if reading.csv_path
                 else os.path.dirname(reading.origins[idx[0]]))
        if splits <= {"query", "gallery"}:  # fixed split: the roles are named
            if "query" in splits and "gallery" not in splits:
                reading.problem(where, f"person {person!r} has query images{in_aspect} but no "
                                       f"gallery image{in_aspect} to match them; add one")
            continue
        if len(idx) < 2:
            reading.problem(where, f"person {person!r} has only 1 usable image{in_aspect}; "
                                    f"the protocol needs 2 per person and aspect (a query and a "
                                    f"gallery image, for a test person and for a training person "
                                    f"held out for model selection): add an image or remove "
                                    f"the person")


def read_custom(root: str | os.PathLike, check_images: bool = True) -> list[HandImage]:
    """Read a custom dataset (``labels.csv`` if present, else the folders; module docstring).

    Every problem is collected and raised in one :class:`DataError`; with ``check_images``
    every image's header is read too (the check of ``protocols.verify_images``).  A dataset
    without aspects returns records with ``aspect == NO_ASPECT``: the protocol names it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} is not a folder; a custom data_root holds one "
                                f"folder per person or {LABELS_FILE} ({_LAYOUT_DOC})")
    csv_path = root / LABELS_FILE
    reading = _Reading(root, csv_path if csv_path.is_file() else None)
    if reading.csv_path:
        _read_labels(reading, csv_path)
    else:
        _read_folders(reading)
    if check_images:
        _check_images_decode(reading)
    if reading.csv_path:
        _check_splits(reading, csv_path)
    _check_counts(reading)
    reading.raise_problems()
    return reading.records


def custom_source_hash(root: str | os.PathLike, records: Sequence[HandImage]) -> str:
    """SHA-256 of ``labels.csv`` if the dataset has one, else of the records' paths."""
    csv_path = Path(root) / LABELS_FILE
    if csv_path.is_file():
        return hashlib.sha256(csv_path.read_bytes()).hexdigest()
    return hashlib.sha256("\n".join(r.path for r in records).encode()).hexdigest()


def _named_halves(records: Sequence[HandImage]) -> tuple[list[str], list[str]]:
    """The halves ``labels.csv`` names with split train/test, each sorted."""
    train = sorted({r.person for r in records if r.split == "train"}, key=person_sort_key)
    test = sorted({r.person for r in records if r.split == "test"}, key=person_sort_key)
    return train, test


def build_custom_protocol(records: Sequence[HandImage], aspect: str,
                          root: str | os.PathLike = "", seed: int = 0, num_splits: int = 10,
                          gallery_mode: str = "aspect", val_fraction: float = 0.2,
                          source_hash: str = "") -> Protocol:
    """The protocol of :func:`read_custom`'s records (module docstring): 11k's, with the halves
    or the one test split that a ``split`` column names.  ``aspect`` selects the queried aspect,
    or names the only one of a dataset without aspects."""
    where = f"custom dataset at {root}"
    if not records:
        raise DataError(f"{where}: no images")
    aspects = {r.aspect for r in records}
    if aspects == {NO_ASPECT}:
        records = [replace(r, aspect=aspect) for r in records]
    elif NO_ASPECT in aspects:
        raise ValueError("records mix images with and without an aspect; read_custom refuses "
                         "such a dataset")
    elif aspect not in aspects:
        present = [a for a in ASPECTS if a in aspects]
        raise DataError(f"{where}: no image of aspect {aspect}; the dataset's aspects are "
                        f"{', '.join(present)}: set aspect to one of them")
    splits = {r.split for r in records}
    common = dict(root=root, seed=seed, gallery_mode=gallery_mode, val_fraction=val_fraction,
                  source_hash=source_hash, dataset="custom")
    try:
        if splits == {None}:
            return build_aspect_protocol(records, aspect, num_splits=num_splits, **common)
        if "test" in splits:
            return build_aspect_protocol(records, aspect, num_splits=num_splits,
                                         halves=_named_halves, **common)
        return build_fixed_split_protocol(records, aspect, **common)
    except DataError as exc:  # too few people or images for the protocol: name the dataset
        raise DataError(f"{root}: {exc}") from None
