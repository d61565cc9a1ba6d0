"""Readers for the two datasets' metadata: 11k Hands (``HandInfo.csv``) and HD (file names).

Both readers return a list of :class:`HandImage` records; nothing is copied or decoded here.
Malformed input fails with the file and line number (11k) or the offending file name (HD).
:func:`csv_rows` is the CSV layer they share with the custom dataset's ``labels.csv``
(``data/custom.py``): UTF-8 with or without BOM, rows that span lines reported from where they
begin.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..constants import ASPECT_NAMES, HD_ASPECT

__all__ = [
    "HandImage",
    "DataError",
    "ASPECT_NAMES",
    "HANDINFO_COLUMNS",
    "IMAGE_SUFFIXES",
    "csv_rows",
    "read_handinfo",
    "read_hd",
    "HD_MAIN_FOLDER",
    "HD_DISTRACTOR_FOLDER",
    "HD_DISTRACTOR_PREFIX",
]

HANDINFO_COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish",
                    "aspectOfHand", "imageName", "irregularities")
HD_MAIN_FOLDER = "1-501"
HD_DISTRACTOR_FOLDER = "502-712"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Dataset content that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class HandImage:
    """One image of the dataset.  ``path`` is relative to the dataset root."""

    path: str
    person: str  # 11k: id stripped; HD: the name's id number, "d<number>" for a distractor
    aspect: str  # 11k: dorsal_r | dorsal_l | palmar_r | palmar_l; HD: dorsal
    accessories: int = 0
    nail_polish: int = 0
    age: int | None = None
    gender: str | None = None
    skin_color: str | None = None
    irregularities: int = 0
    distractor: bool = False  # HD 502-712: gallery-only, never matches a query
    #: custom ``labels.csv`` only: train | test | query | gallery as the file names it;
    #: None = the protocol decides (11k, HD, and custom datasets without a split column)
    split: str | None = None


def _int_field(value: str, column: str, where: str, allowed: tuple[int, ...] | None = None) -> int:
    try:
        out = int(value.strip())
    except ValueError:
        raise DataError(f"{where}: column {column!r} must be an integer, got {value!r}") from None
    if allowed is not None and out not in allowed:
        raise DataError(f"{where}: column {column!r} must be one of {allowed}, got {out}")
    return out


def csv_rows(csv_path: Path, encoding_fix: str) -> Iterator[tuple[str, list[str]]]:
    """``(where, cells)`` for every non-blank row of a CSV file, the header first.

    ``where`` is ``path:line`` (``path:first-last (...)`` for a quoted row over several lines).
    Text that is not UTF-8 and unparseable CSV (an unclosed quote) raise :class:`DataError`
    naming the line; ``encoding_fix`` is appended to the first.  An empty file yields nothing.
    """
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # binary garbage, UTF-16, Latin-1 ...
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{csv_path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                        f"{exc.start}); {encoding_fix}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        first = reader.line_num + 1  # a quoted field may span lines: report where the row began
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. an unclosed quote swallowing the rest of the file
            raise DataError(f"{csv_path}:{first}: not valid CSV ({exc}); "
                            f"check the quotes on this line") from None
        line = reader.line_num
        where = f"{csv_path}:{first}" + (f"-{line} (one quoted row over several lines)"
                                         if line > first else "")
        if not row or all(not c.strip() for c in row):
            continue  # blank line
        yield where, row


def read_handinfo(csv_path: str | os.PathLike, images_dir: str = "Hands") -> list[HandImage]:
    """Parse an 11k ``HandInfo.csv`` (all 9 columns, ids stripped).

    Raises :class:`DataError` naming ``file:line`` for a wrong column count, an unknown aspect,
    a non-numeric flag or an empty id; ``FileNotFoundError`` if the file is missing.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"{csv_path} not found: an 11k data_root must contain HandInfo.csv and Hands/ "
            f"(download 11k Hands from https://sites.google.com/view/11khands, or leave "
            f"data_root=None for the embedded synthetic hands)"
        )
    records: list[HandImage] = []
    rows = csv_rows(csv_path, "HandInfo.csv must be the dataset's UTF-8 CSV")
    try:
        _, header = next(rows)
    except StopIteration:
        raise DataError(f"{csv_path}:1: empty file, expected the header "
                        f"{','.join(HANDINFO_COLUMNS)}") from None
    header = [h.strip() for h in header]
    if tuple(header) != HANDINFO_COLUMNS:
        raise DataError(f"{csv_path}:1: header is {','.join(header)[:200]}; "
                        f"expected {','.join(HANDINFO_COLUMNS)}")
    for where, row in rows:
        if len(row) != len(HANDINFO_COLUMNS):
            raise DataError(f"{where}: expected {len(HANDINFO_COLUMNS)} columns "
                            f"({','.join(HANDINFO_COLUMNS)}), found {len(row)}: {repr(row)[:200]}")
        rec = dict(zip(HANDINFO_COLUMNS, row))
        person = rec["id"].strip()  # the real file writes one id as "1200000 "
        if not person:
            raise DataError(f"{where}: empty id")
        aspect_text = rec["aspectOfHand"].strip().lower()
        if aspect_text not in ASPECT_NAMES:
            raise DataError(f"{where}: unknown aspectOfHand {rec['aspectOfHand']!r}; "
                            f"expected one of {sorted(ASPECT_NAMES)}")
        name = rec["imageName"].strip()
        if not name or "/" in name or "\\" in name:
            raise DataError(f"{where}: bad imageName {rec['imageName']!r}")
        records.append(HandImage(
            path=f"{images_dir}/{name}",
            person=person,
            aspect=ASPECT_NAMES[aspect_text],
            accessories=_int_field(rec["accessories"], "accessories", where, (0, 1)),
            nail_polish=_int_field(rec["nailPolish"], "nailPolish", where, (0, 1)),
            age=_int_field(rec["age"], "age", where),
            gender=rec["gender"].strip(),
            skin_color=rec["skinColor"].strip(),
            irregularities=_int_field(rec["irregularities"], "irregularities", where, (0, 1)),
        ))
    if not records:
        raise DataError(f"{csv_path}: no image rows after the header")
    return records


#: ``<id>_<rest>``: the id is the part before the first ``_``; the rest is the camera's own file
#: name on the real data (``552_IMG_7278``, ``239_31 (0)``) or an image number (``<id>_<n>``, the
#: synthetic layout).
_HD_NAME = re.compile(r"^(\d+)_(.*\S.*)$")
#: prefix of a distractor's ``person``: ``502-712`` reuses id numbers of ``1-501``, so distractor
#: 552 is person ``d552``, never person ``552`` (MBA-Net adds 1000 to the label instead)
HD_DISTRACTOR_PREFIX = "d"


def read_hd(root: str | os.PathLike) -> list[HandImage]:
    """Scan the HD layout ``Original Images/1-501`` and ``502-712``.

    Labels come from the file names ``<id>_<rest>.<ext>`` (the part before the first ``_``;
    extensions in any case), never from folder enumeration order (the earlier implementation's
    0 % rank-1 bug, docs/mistakes.md #9).  Images of ``502-712`` are distractors: their
    ``person`` is ``d<id>`` (:data:`HD_DISTRACTOR_PREFIX`), a separate identity even where the
    number also occurs in ``1-501``, as it does on the real data.  Every malformed name of both
    folders is reported in one :class:`DataError`.
    """
    base = Path(root) / "Original Images"
    main = base / HD_MAIN_FOLDER
    if not main.is_dir():
        raise FileNotFoundError(
            f"{main} not found: an HD data_root must contain 'Original Images/{HD_MAIN_FOLDER}' "
            f"(and optionally '{HD_DISTRACTOR_FOLDER}')"
        )
    records: list[HandImage] = []
    problems: list[str] = []
    for folder, distractor in ((main, False), (base / HD_DISTRACTOR_FOLDER, True)):
        if not folder.is_dir():
            continue
        bad = []
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.suffix.lower() not in IMAGE_SUFFIXES:
                continue  # Thumbs.db, .DS_Store ...
            m = _HD_NAME.match(entry.stem)
            if not m:
                bad.append(entry.name)
                continue
            number = str(int(m.group(1)))
            records.append(HandImage(
                path=f"Original Images/{folder.name}/{entry.name}",
                person=HD_DISTRACTOR_PREFIX + number if distractor else number,
                aspect=HD_ASPECT,
                distractor=distractor,
            ))
        if bad:
            problems.append(f"{folder}: {len(bad)} image name(s) not of the form "
                            f"<id>_<name>.<ext> (a number, '_', then the rest), "
                            f"e.g. {bad[:5]}")
    if problems:
        raise DataError("; ".join(problems)
                        + ". HD labels come from the file name's part before the first '_'; "
                          "rename or remove these files")
    if not any(not r.distractor for r in records):
        raise DataError(f"{main}: no images named <id>_<name>.jpg")
    return records
