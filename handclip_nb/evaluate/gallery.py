"""Search your own gallery: rank a folder of hand photos for query photos or texts.

What the search notebook (``notebooks/search.ipynb``) computes, without figures:

* **Inputs** (:func:`prepare_search`): ``gallery_dir`` is a folder of images; a first-level
  subfolder names the person of every image under it (``<gallery>/<person>/...``, deeper
  folders such as aspect folders allowed), images directly in ``gallery_dir`` have no label.
  ``query`` is one image or a folder laid out the same way; ``query_text`` one text or a list.
  A query image that lies in a person folder of the gallery is that person's
  (:func:`gallery_person`), whatever the query folder's own layout.
  Every problem (missing or empty folder, a file that is not an image, an image that does not
  open, a ``run_dir`` that is not a finished stage-0/2/3 run, nothing to search for) is a
  :class:`SearchError` (or the run loader's :class:`~handclip_nb.runs.RunFolderError`) naming
  the path and the fix, raised before anything is written.
* **Model** (:func:`load_search_model`): a finished run rebuilt by
  :func:`~handclip_nb.run_loader.load_run` (it ranks with its own feature: stage 0 the global
  embedding, stage 2 the CLIP-ReID head, stage 3 PromptSG), or the zero-shot ``backbone``.
* **Index** (:func:`build_gallery_index`): the gallery's L2-normalised features, written
  atomically to ``<output_dir>/gallery_index.pt`` (loaded with ``weights_only=True``) with two
  keys: the gallery files (each file's path, size and mtime, and its person) and the model
  (backbone fingerprint over every weight, the head's cache tag, the image pipeline and
  ``flip_tta``). A later search with the same keys reuses it and encodes nothing; a changed,
  added or removed file or another model rebuilds it.
* **Ranking** (:func:`search_queries`): cosine distance ``1 - q.g`` (smaller is closer, ties by
  gallery order), the ``top_k`` nearest per query. A query image that is itself in the gallery
  (the same file) is left out of its own ranking, and its person counts as in the gallery only
  when another image of that person is there (``QueryResult.in_gallery``). **Text queries**
  rank by CLIP's joint image-text space: the backbone's ``encode_image(...).global_embedding``
  against ``encode_text(tokenize(text))``, both L2-normalised (the helpers of :mod:`.probes`).
  A fine-tuned run (stage 2/3) still projects into that space, but its fine-tuning never saw text
  for it, so its text alignment may be weaker than the zero-shot backbone's.
* **Open set** (:func:`resolve_threshold`): a finished run's ``metrics.json`` holds the
  threshold calibrated on its training identities (``open_set``, written by
  :func:`~handclip_nb.evaluate.protocol_eval.calibrate_open_set`); a gallery image is accepted
  as the query's person when its distance is <= the threshold, and a query whose best distance
  is above it has **no match in the gallery**. The ``threshold`` parameter overrides it; a
  zero-shot backbone has none unless given. Text-image distances live on another scale than
  image-image ones, so text queries are never decided.
* **Outputs**: ``rankings.csv`` (:func:`write_rankings_csv`) and the ``metrics.json`` body
  (:func:`search_record`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.custom import CUSTOM_IMAGE_SUFFIXES, read_custom
from ..data.handinfo import DataError, HandImage
from ..data.images import ImageSource
from ..data.protocols import find_image_problems
from ..models.backbones import backbone_fingerprint
from ..run_loader import LoadedRun, load_run, zero_shot_run
from ..runs import atomic_torch_save, atomic_write_text, resolve_path
from .compare import RUN_STAGES, check_evaluable
from .features import cosine_distance, extract_features
from .open_set import (FITTED, NEVER_TRAINED, far_interval, identity_pair_counts,
                       measured_text, query_gallery_split, too_few_pairs_warning)
from .probes import _embed_texts
from .verification import calibrate_threshold, far_at_threshold

__all__ = ["SearchError", "GalleryImage", "SearchInputs", "list_images", "gallery_person",
           "prepare_search", "SearchModel", "load_search_model", "model_key", "SearchCalibration",
           "calibrate_search", "Threshold", "resolve_threshold",
           "GalleryIndex", "INDEX_FILE", "INDEX_FORMAT", "gallery_files_key",
           "build_gallery_index", "RankedImage", "QueryResult", "rank_features",
           "search_queries", "RANKINGS_FILE", "RANKINGS_COLUMNS", "rankings_rows",
           "write_rankings_csv", "search_summary", "search_record", "IMAGE_SUFFIXES"]

#: Image files a gallery or query folder may hold (those of custom datasets), in any case.
IMAGE_SUFFIXES = CUSTOM_IMAGE_SUFFIXES
#: The index file in the search's output folder, and its format tag.
INDEX_FILE = "gallery_index.pt"
INDEX_FORMAT = "handclip_nb.gallery_index/1"
#: The ranking table in the search's output folder, and its columns.
RANKINGS_FILE = "rankings.csv"
RANKINGS_COLUMNS = ("query", "query_type", "query_person", "rank", "gallery_image", "person",
                    "distance", "above_threshold")


class SearchError(ValueError):
    """A search input that cannot be used; the message names it and the fix."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class GalleryImage:
    """One image of a gallery or query folder."""

    path: str  # absolute
    name: str  # relative to its folder, '/'-separated (what rankings.csv writes)
    person: str | None  # the first-level subfolder; None for an image directly in the folder


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | os.PathLike) -> list[GalleryImage]:
    """Every image under ``folder`` (hidden entries skipped), sorted by name; the first-level
    subfolder is the person."""
    root = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        person = rel.parts[0] if rel.parts else None
        for name in filenames:
            if _is_image(name):
                out.append(GalleryImage(path=str(Path(dirpath).resolve() / name),
                                        name=(rel / name).as_posix(), person=person))
    return sorted(out, key=lambda g: g.name)


@dataclass
class SearchInputs:
    """The checked inputs of a search: gallery images, query images, query texts, run."""

    gallery_root: Path
    gallery: list[GalleryImage]
    query_root: Path | None
    queries: list[GalleryImage]
    texts: list[str]
    run_dir: Path | None
    #: ``calibration_dir`` and its images (paths relative to it; ``split`` None, or query /
    #: gallery as its labels.csv names them); None without one
    calibration_root: Path | None = None
    calibration: list[HandImage] | None = None

    @property
    def gallery_people(self) -> list[str]:
        return sorted({g.person for g in self.gallery if g.person is not None})

    def describe(self) -> str:
        labelled = sum(g.person is not None for g in self.gallery)
        text = (f"gallery {self.gallery_root}: {len(self.gallery)} images, "
                f"{len(self.gallery_people)} people ({labelled} labelled images)")
        if self.queries:
            text += f"; {len(self.queries)} query image(s) from {self.query_root}"
        if self.texts:
            text += f"; {len(self.texts)} text quer{'y' if len(self.texts) == 1 else 'ies'}"
        if self.calibration:
            people = len({r.person for r in self.calibration})
            text += (f"; calibration: {len(self.calibration)} images of {people} people from "
                     f"{self.calibration_root}")
        return text + (f"; model: run {self.run_dir}" if self.run_dir else "; model: zero-shot")


_SUFFIX_LIST = " ".join(IMAGE_SUFFIXES)


def _folder(value: Any, name: str, meaning: str) -> Path:
    path = resolve_path(value)
    if not path.exists():
        raise SearchError(f"{name} {path} (given as {str(value)!r}) does not exist. Fix: set "
                          f"{name} to {meaning} (-p {name} <path>)")
    return path


def _check_readable(images: Sequence[GalleryImage], name: str, limit: int = 10) -> None:
    items = [HandImage(path=g.path, person=g.person or "", aspect="") for g in images]
    missing, unreadable = find_image_problems("", items)
    problems = [f"{images[i].path} (missing)" for i in missing]
    problems += [f"{images[i].path} ({why})" for i, why in unreadable]
    if problems:
        raise SearchError(
            f"{len(problems)} image(s) of {name} cannot be read: {', '.join(problems[:limit])}"
            f"{' ...' if len(problems) > limit else ''}. Fix: replace or remove them (the "
            f"header of every image is checked before anything runs)")


def gallery_person(path: str | os.PathLike, gallery_root: str | os.PathLike) -> str | None:
    """The person an image's place in the gallery folder names: the first-level subfolder of
    ``gallery_root`` it lies under (``<gallery>/<person>/[...]/<image>``), None for an image
    directly in the gallery folder or outside it."""
    try:
        rel = Path(os.path.realpath(path)).relative_to(os.path.realpath(gallery_root))
    except ValueError:  # not under the gallery
        return None
    return rel.parts[0] if len(rel.parts) > 1 else None


def _with_gallery_person(query: GalleryImage, gallery_root: Path) -> GalleryImage:
    """A query image inside a person folder of the gallery is that person's, whatever the
    query folder's own layout says (a query folder ``<gallery>/alice`` holds alice's images,
    and ``<gallery>/alice/dorsal/x.jpg`` is alice's, not a person "dorsal")."""
    person = gallery_person(query.path, gallery_root)
    if person is None or person == query.person:
        return query
    return GalleryImage(path=query.path, name=query.name, person=person)


def prepare_search(params: Mapping[str, Any]) -> SearchInputs:
    """Check ``gallery_dir``, ``query``, ``query_text`` and ``run_dir`` (no model is built,
    nothing is written); :class:`SearchError` (or the run loader's errors) names the fix."""
    if params.get("gallery_dir") is None:
        raise SearchError("gallery_dir is not set. Fix: set it to a folder of gallery images "
                          "(person subfolders optional: <gallery>/<person>/<image>), e.g. "
                          "-p gallery_dir /data/my_gallery")
    gallery_root = _folder(params["gallery_dir"], "gallery_dir", "a folder of gallery images")
    if not gallery_root.is_dir():
        raise SearchError(f"gallery_dir {gallery_root} is a file, not a folder. Fix: give the "
                          f"folder that holds the gallery images")
    gallery = list_images(gallery_root)
    if not gallery:
        raise SearchError(f"gallery_dir {gallery_root} holds no images ({_SUFFIX_LIST}, in any "
                          f"case; hidden files skipped). Fix: put the gallery images in it or "
                          f"in person subfolders <gallery>/<person>/<image>")
    texts = list(params.get("query_text") or [])
    query = params.get("query")
    if query is None and not texts:
        raise SearchError("nothing to search for: query and query_text are both None. Fix: set "
                          "query to an image or a folder of images (-p query photo.jpg) and/or "
                          "query_text to a text (-p query_text \"a photo of the palm side of a "
                          "woman's right hand\")")
    queries: list[GalleryImage] = []
    query_root = None
    if query is not None:
        path = _folder(query, "query", "an image file or a folder of query images")
        if path.is_dir():
            query_root, queries = path, list_images(path)
            if not queries:
                raise SearchError(f"query folder {path} holds no images ({_SUFFIX_LIST}). Fix: "
                                  f"put the query images in it, or point query at one image")
        elif not _is_image(path.name):
            raise SearchError(f"query {path} is not an image file (suffixes {_SUFFIX_LIST}). "
                              f"Fix: point query at an image or a folder of images")
        else:
            path = path.resolve()
            query_root, queries = path.parent, [GalleryImage(str(path), path.name, None)]
        queries = [_with_gallery_person(q, gallery_root) for q in queries]
    _check_readable(gallery, "gallery_dir")
    _check_readable(queries, "query")
    run_dir = None
    if params.get("run_dir") is not None:
        # a finished stage-0/2/3 run, or the loader's error naming the folder and the fix
        check_evaluable(params["run_dir"])
        run_dir = resolve_path(params["run_dir"])
    calibration_root, calibration = None, None
    if params.get("calibration_dir") is not None:
        calibration_root, calibration = _check_calibration(params["calibration_dir"],
                                                           [*gallery, *queries])
    return SearchInputs(gallery_root=gallery_root, gallery=gallery, query_root=query_root,
                        queries=queries, texts=texts, run_dir=run_dir,
                        calibration_root=calibration_root, calibration=calibration)


def _check_calibration(value: Any, searched: Sequence[GalleryImage]
                       ) -> tuple[Path, list[HandImage]]:
    """``calibration_dir``'s images: a custom-dataset layout (one folder per person, or a
    labels.csv) of at least two people, none of its files among the gallery or the queries."""
    root = _folder(value, "calibration_dir", "a folder of people no model of yours trained on "
                   "(<folder>/<person>/<image>, or a labels.csv)")
    if not root.is_dir():
        raise SearchError(f"calibration_dir {root} is a file, not a folder. Fix: give the folder "
                          f"that holds one folder per person (or a labels.csv)")
    try:
        records = read_custom(root)
    except (DataError, FileNotFoundError) as exc:
        raise SearchError(f"calibration_dir {root} cannot be read as one folder per person or a "
                          f"labels.csv (docs/protocols.md#custom-datasets): {exc}") from None
    roles = {r.split for r in records} - {None}
    if roles - {"query", "gallery"}:
        raise SearchError(f"calibration_dir {root}: labels.csv names split(s) "
                          f"{sorted(roles - {'query', 'gallery'})}, but every calibration person "
                          f"is a stranger to the model: leave the split column out (one gallery "
                          f"image per person is drawn by split_seed) or name only query and "
                          f"gallery")
    if len({r.person for r in records}) < 2:
        raise SearchError(f"calibration_dir {root} holds one person: a false accept rate needs "
                          f"pairs of two different people. Fix: add people (the more, the "
                          f"tighter the FAR's interval)")
    searched_files = {os.path.realpath(g.path) for g in searched}
    shared = sorted(r.path for r in records
                    if os.path.realpath(root / r.path) in searched_files)
    if shared:  # a threshold chosen on the searched people would flatter the search's results
        raise SearchError(f"{len(shared)} image(s) of calibration_dir are also gallery or query "
                          f"images ({', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}). "
                          f"Fix: calibrate on other people than the ones you search")
    return root, records


# ----------------------------------------------------------------------------- model


def model_key(run: LoadedRun, source: ImageSource, flip: bool) -> str:
    """What decides a gallery feature: every backbone weight (fine-tuned ones included), the
    ranking head (the run's cache tag), the image pipeline, flip TTA, and the device type and
    precision it is encoded in (the run's ``amp`` / ``amp_dtype``: a GPU's fp16 index is not
    a CPU's fp32 one)."""
    precision = run.precision
    text = (f"{INDEX_FORMAT}|{backbone_fingerprint(run.backbone)}|{run.cache_tag or 'global'}|"
            f"{source!r}|flip={bool(flip)}|{precision.device_type}|{precision.name}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class SearchModel:
    """The model that ranks: a rebuilt run (or the zero-shot backbone) and its image pipeline."""

    run: LoadedRun
    source: ImageSource
    flip: bool
    key: str

    @property
    def name(self) -> str:
        return self.run.info.name

    @property
    def stage(self) -> str:
        return self.run.stage

    @property
    def is_promptsg(self) -> bool:
        return self.run.stage == "stage3"

    @property
    def ranks_in_text_space(self) -> bool:
        """True when the ranking feature is the global image embedding itself (stage 0)."""
        return self.run.encode is None

    def describe(self) -> str:
        where = f"run {self.run.info.folder} ({self.stage})" if self.run.info.folder \
            else "no run folder (zero-shot)"
        return (f"{self.run.info.backbone_display}; {where}; input "
                f"{tuple(self.run.backbone.image_size)}, {self.run.params['resize_mode']}")


def load_search_model(params: Mapping[str, Any], inputs: SearchInputs) -> SearchModel:
    """The run of ``inputs.run_dir`` rebuilt on ``params["device"]`` (its own backbone, image
    size and head), or the zero-shot ``backbone`` of ``params``; images are decoded as
    ``params`` say (``decode_cache``, ``reduced_jpeg_decode``)."""
    if inputs.run_dir is not None:
        run = load_run(inputs.run_dir, params["device"], stages=RUN_STAGES)
    else:
        run = zero_shot_run(params)
    source = run.image_source(params)
    flip = bool(params.get("flip_tta", False))
    return SearchModel(run=run, source=source, flip=flip, key=model_key(run, source, flip))


# ----------------------------------------------------------------------------- open set


@dataclass
class SearchCalibration:
    """The search model's distances on ``calibration_dir``'s people (never trained on by any
    model of the user's): one query/gallery split of them, built like a test split."""

    root: Path
    distances: np.ndarray
    query_ids: list[str]
    gallery_ids: list[str]
    far_target: float

    @property
    def where(self) -> str:
        return f"{len(set(self.query_ids) | set(self.gallery_ids))} never-trained people of " \
               f"calibration_dir {self.root}"

    def measure(self, threshold: float | None) -> dict:
        """FAR (with its interval, :func:`.open_set.far_interval`) and TAR of ``threshold``
        (None or -inf: accept nothing) on these people."""
        value = None if threshold is None or math.isinf(threshold) else float(threshold)
        point = far_at_threshold(self.distances, self.query_ids, self.gallery_ids, value)
        counts = identity_pair_counts(self.distances, self.query_ids, self.gallery_ids, value)
        return {"identities": NEVER_TRAINED, **far_interval(counts), "tar": float(point.tar)}

    def calibrate(self) -> tuple[float, dict]:
        """The threshold at ``far_target`` on these people (-inf: none within it) and its
        measurement there."""
        point = calibrate_threshold(self.distances, self.query_ids, self.gallery_ids,
                                    self.far_target)
        return float(point.threshold), self.measure(point.threshold)


def calibrate_search(model: SearchModel, inputs: SearchInputs,
                     params: Mapping[str, Any]) -> SearchCalibration | None:
    """Encode ``calibration_dir``'s images with the search model (None without one) and split
    them as a test split: the roles its labels.csv names, else one gallery image per person
    drawn by ``split_seed`` (:func:`.open_set.query_gallery_split`)."""
    if not inputs.calibration:
        return None
    records = inputs.calibration
    person = [r.person for r in records]
    if any(r.split for r in records):
        query = [i for i, r in enumerate(records) if r.split == "query"]
        gallery = [i for i, r in enumerate(records) if r.split == "gallery"]
    else:
        query, gallery = query_gallery_split(range(len(records)), person, params["split_seed"])
    if not query or not gallery:
        raise SearchError(f"calibration_dir {inputs.calibration_root}: no query or no gallery "
                          f"image (every person needs two images). Fix: add images")
    feats = _encode(model, [str(inputs.calibration_root / r.path) for r in records], params,
                    False, "encode calibration people")
    q, g = feats[list(query)], feats[list(gallery)]
    return SearchCalibration(root=inputs.calibration_root,
                             distances=cosine_distance(q.float(), g.float()).numpy()
                             .astype(np.float64),
                             query_ids=[person[i] for i in query],
                             gallery_ids=[person[i] for i in gallery],
                             far_target=float(params["open_set_far"]))


@dataclass(frozen=True)
class Threshold:
    """The open-set decision: accept a gallery image as the query's person when its distance is
    <= ``value``. ``value`` None: no threshold, nothing is decided; ``-inf``: the calibration
    found no threshold within its FAR target, so nothing is accepted. ``reliability``: how far
    to trust it (:func:`resolve_threshold`)."""

    value: float | None
    source: str
    open_set: Mapping[str, Any] | None = None
    reliability: Mapping[str, Any] | None = None

    def accepts(self, distance: float | None) -> bool | None:
        if self.value is None or distance is None:
            return None
        return bool(distance <= self.value)

    def describe(self) -> str:
        if self.value is None:
            return f"no open-set threshold: {self.source}"
        if math.isinf(self.value):
            return f"open-set threshold: accept nothing ({self.source})"
        return (f"open-set threshold: cosine distance <= {self.value:.4f} is accepted as the "
                f"query's person ({self.source})")

    def describe_reliability(self) -> str:
        """Lines saying how far to trust the threshold: what chose it (fitted or never-trained
        identities, impostor pairs, the FAR's interval), the FAR it measured on never-trained
        identities, and the too-few-pairs warning."""
        return _reliability_text(self.reliability or {})

    def record(self) -> dict:
        finite = self.value is not None and not math.isinf(self.value)
        return {"value": float(self.value) if finite else None,
                "accept_nothing": bool(self.value is not None and math.isinf(self.value)),
                "source": self.source,
                "open_set": dict(self.open_set) if self.open_set else None,
                "reliability": dict(self.reliability) if self.reliability else None}


def _reliability_text(r: Mapping[str, Any]) -> str:
    lines = [r.get("chosen", "no threshold: nothing is decided")]
    if r.get("calibration"):
        c = r["calibration"]
        lines.append(f"  calibrated on {c['identities']} identities: {measured_text(c)}")
        if c["identities"] == FITTED:
            lines.append("  the model trained on these people; a stranger's impostor pairs lie "
                         "closer, so on new people the FAR is typically above the target")
    for m in r.get("never_trained", []):
        lines.append(f"  on never-trained identities ({m['where']}): {measured_text(m)}")
    if r.get("warning"):
        lines.append(f"  WARNING: {r['warning']}")
    if r.get("note"):
        lines.append(f"  {r['note']}")
    return "\n".join(lines)


_NO_CALIBRATION_DIR = ("no calibration_dir: set it to a folder of people no model of yours "
                       "trained on (<folder>/<person>/<image>) to calibrate the threshold on "
                       "them and measure its FAR there")


def resolve_threshold(model: SearchModel, override: float | None = None,
                      flip_tta: bool | None = None,
                      calibration: SearchCalibration | None = None) -> Threshold:
    """``override`` (the ``threshold`` parameter) when given; else, with ``calibration``
    (``calibration_dir``), the threshold calibrated there at ``open_set_far``; else the run's
    calibrated ``metrics.json["open_set"]["threshold"]``; else none (a zero-shot backbone, or a
    run finished before open-set calibration existed).

    ``reliability`` states how far to trust it: ``chosen`` (what chose it), ``calibration``
    (the FAR at its calibration, with the identities kind, impostor pairs, identities and 95 %
    interval; None for a given threshold), ``never_trained`` (its FAR measured on never-trained
    identities: the calibration_dir's people, and the run's test identities when the run's
    threshold is applied; each names ``where``), ``warning`` (too few calibration pairs for
    the target), ``note``."""
    info = model.run.info
    open_set = (info.recorded or {}).get("open_set") if info.folder is not None else None
    run_value = None
    if open_set:
        run_value = -math.inf if open_set.get("threshold") is None \
            else float(open_set["threshold"])
    never_trained: list[dict] = []
    reliability: dict[str, Any] = {"calibration": None, "never_trained": never_trained,
                                   "warning": None, "note": None}
    if calibration is not None and run_value is not None and override is None:
        # the run's own threshold on strangers: what the recorded one would have done
        never_trained.append({"where": f"{calibration.where}, the run's threshold "
                                       f"{_value_text(run_value)}",
                              **calibration.measure(run_value)})
    if override is not None:
        value = float(override)
        reliability["chosen"] = (f"applied: {_value_text(value)}, the threshold parameter "
                                 f"(chosen by you, not calibrated)")
        if calibration is not None:
            never_trained.append({"where": calibration.where, **calibration.measure(value)})
        else:
            reliability["note"] = _NO_CALIBRATION_DIR
        return Threshold(value, "the threshold parameter", reliability=reliability)
    if calibration is not None:
        value, measured = calibration.calibrate()
        source = (f"calibrated in this search for FAR {calibration.far_target:g} on "
                  f"{calibration.where}")
        reliability["chosen"] = f"applied: {_value_text(value)}, {source}"
        reliability["calibration"] = {**measured, "where": calibration.where}
        reliability["warning"] = too_few_pairs_warning(measured["impostor_pairs"],
                                                       calibration.far_target,
                                                       "calibration_dir")
        return Threshold(value, source, reliability=reliability)
    if info.folder is None:
        reliability["chosen"] = "no threshold: a zero-shot backbone has none; nothing is decided"
        reliability["note"] = _NO_CALIBRATION_DIR
        return Threshold(None, "a zero-shot backbone has no calibrated threshold; set "
                               "threshold (a cosine distance) or calibration_dir to decide "
                               "matches", reliability=reliability)
    if not open_set:
        reliability["chosen"] = "no threshold: the run recorded none; nothing is decided"
        return Threshold(None, f"{info.folder}/metrics.json has no open_set (the run finished "
                               f"before open-set calibration was recorded): re-run it, or set "
                               f"threshold or calibration_dir", reliability=reliability)
    source = (f"calibrated in {info.name} for FAR {open_set.get('far_target')} on "
              f"{open_set.get('calibrated_on')}")
    run_flip = bool(info.params.get("flip_tta", False))
    if flip_tta is not None and bool(flip_tta) != run_flip:
        source += (f"; note: calibrated with flip_tta={run_flip}, this search uses "
                   f"flip_tta={bool(flip_tta)}")
    reliability["chosen"] = f"applied: {_value_text(run_value)}, {source}"
    recorded = open_set.get("calibration")
    if recorded:
        reliability["calibration"] = dict(recorded)
        reliability["warning"] = open_set.get("warning")
        pooled = (open_set.get("test") or {}).get("pooled")
        if pooled:
            never_trained.append({"where": f"the run's {pooled['num_identities']} test identities, "
                                           f"never used to choose it", **pooled})
    else:
        reliability["warning"] = (f"{info.folder}/metrics.json predates reliability records "
                                  f"(no identities kind, impostor pairs or interval): re-run "
                                  f"the run, or set calibration_dir")
    if calibration is None:
        reliability["note"] = _NO_CALIBRATION_DIR
    return Threshold(run_value, source, dict(open_set), reliability)


def _value_text(value: float) -> str:
    if math.isinf(value):
        return "accept nothing"
    return f"cosine distance <= {value:.4f}"


# ----------------------------------------------------------------------------- the index


def gallery_files_key(images: Sequence[GalleryImage]) -> str:
    """Changes when a gallery file is added, removed, renamed, relabelled or rewritten."""
    h = hashlib.sha256()
    for g in images:
        st = os.stat(g.path)
        h.update(f"{g.path}\t{g.person}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


@dataclass
class GalleryIndex:
    """The gallery's features: ``features`` rank image queries (the model's own feature),
    ``text_features`` (the global image embedding, in CLIP's text space) text queries; both
    L2-normalised rows in the order of ``images``."""

    images: list[GalleryImage]
    features: torch.Tensor
    text_features: torch.Tensor | None
    model_key: str
    files_key: str
    path: Path
    status: str  # "reused", or "built (<why>)"
    encoded: int = 0  # images encoded by this call

    def describe(self) -> str:
        return (f"gallery index {self.path}: {len(self.images)} images, {self.status}; "
                f"{self.encoded} image encodings now")


def _load_index(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged index is rebuilt, never trusted
        return None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        return None
    return data


def _encode(model: SearchModel, paths: Sequence[str], params: Mapping, text_space: bool,
            desc: str) -> torch.Tensor:
    run = model.run
    return extract_features(run.backbone, paths, model.source,
                            batch_size=params["batch_size"], device=run.device,
                            flip=False if text_space else model.flip, cache_dir=None,
                            num_workers=params.get("num_workers"), desc=desc,
                            encode=None if text_space else run.encode,
                            cache_tag=None if text_space else run.cache_tag,
                            precision=run.precision)


def build_gallery_index(model: SearchModel, inputs: SearchInputs, folder: str | os.PathLike,
                        params: Mapping[str, Any], text: bool | None = None) -> GalleryIndex:
    """The gallery index in ``folder/gallery_index.pt``: reused when its gallery-files key and
    model key are this search's (and ``feature_cache`` is on), else encoded and written
    atomically. ``text`` (default: when there are text queries) also makes sure the
    text-space features are there (for stage 0 they are the ranking features)."""
    path = Path(folder) / INDEX_FILE
    files_key = gallery_files_key(inputs.gallery)
    paths = [g.path for g in inputs.gallery]
    text = bool(inputs.texts) if text is None else bool(text)
    cached = _load_index(path)
    encoded, changed = 0, False
    if cached is None:
        why = "no index yet" if not path.exists() else "the index file was unreadable"
    elif not params.get("feature_cache", True):
        why = "feature_cache is off"
    elif cached.get("model_key") != model.key:
        why = "the model differs from the index's"
    elif cached.get("files_key") != files_key or cached.get("count") != len(paths):
        why = "the gallery files changed"
    else:
        why = None
    if why is None:
        features, text_features, status = cached["features"], cached.get("text_features"), "reused"
    else:
        features = _encode(model, paths, params, False, "encode gallery")
        text_features, status, encoded, changed = None, f"built ({why})", len(paths), True
    if model.ranks_in_text_space:
        text_features = None  # the ranking features are the text-space ones: never stored twice
    elif text and text_features is None:
        text_features = _encode(model, paths, params, True, "encode gallery (text space)")
        encoded += len(paths)
        changed = True
        if status == "reused":
            status = "reused (text-space features added)"
    if changed:
        atomic_torch_save({"format": INDEX_FORMAT, "model_key": model.key, "files_key": files_key,
                           "count": len(paths), "names": [g.name for g in inputs.gallery],
                           "persons": [g.person or "" for g in inputs.gallery],
                           "features": features, "text_features": text_features}, path)
    if model.ranks_in_text_space:
        text_features = features
    return GalleryIndex(images=list(inputs.gallery), features=features,
                        text_features=text_features, model_key=model.key, files_key=files_key,
                        path=path, status=status, encoded=encoded)


# ----------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class RankedImage:
    """One gallery image of a query's ranking."""

    rank: int  # 1-based
    index: int  # position in the gallery
    name: str
    path: str
    person: str | None
    distance: float


@dataclass
class QueryResult:
    """A query and its ``top_k`` nearest gallery images."""

    query: str  # the image's name in its folder, or the text
    kind: str  # "image" | "text"
    path: str | None  # the image file (None for a text)
    person: str | None
    matches: list[RankedImage]
    #: whether ANOTHER image of the query's person is in the gallery (its own file, left out of
    #: its ranking, does not count); None for an unlabelled or a text query
    in_gallery: bool | None = None

    @property
    def best(self) -> RankedImage | None:
        return self.matches[0] if self.matches else None

    @property
    def best_distance(self) -> float | None:
        return self.best.distance if self.best else None

    def accepts(self, match: RankedImage | None,
                threshold: Threshold | float | None) -> bool | None:
        """Whether the open-set rule accepts ``match`` as this query's person (distance <=
        threshold); None for a text query (its distances are on another scale), without a
        threshold, or without a match. Acceptance is the rule's claim, not the truth: whether
        the image shows the query's person is :meth:`same_person`, from the labels."""
        if self.kind != "image" or match is None:
            return None
        if not isinstance(threshold, Threshold):
            threshold = Threshold(threshold, "given")
        return threshold.accepts(match.distance)

    def same_person(self, match: RankedImage | None) -> bool | None:
        """Whether the labels say ``match`` shows the query's person; None when the query or
        the image is unlabelled."""
        if self.person is None or match is None or match.person is None:
            return None
        return match.person == self.person

    def decision(self, threshold: Threshold | float | None) -> bool | None:
        """The open-set decision on the top-1 image. True: accepted (the query is identified as
        the top-1 image's person); False: no match in the gallery; None: not decided (no
        threshold, a text query, or nothing ranked)."""
        return self.accepts(self.best, threshold)

    def correct(self) -> bool | None:
        """Whether the top-1 image shows the query's person (None when either is unlabelled)."""
        return self.same_person(self.best)

    def decision_correct(self, threshold: Threshold | float | None,
                         in_gallery: bool | None = None) -> bool | None:
        """Whether the open-set decision is right by the labels: a query whose person is in the
        gallery must be identified as that person, one whose person is not must get "no match".
        None when not decided, or when the labels cannot say (an unlabelled query; the top-1
        image unlabelled). ``in_gallery`` overrides :attr:`in_gallery` (results built without
        :func:`search_queries`)."""
        decided = self.decision(threshold)
        where = self.in_gallery if in_gallery is None else in_gallery
        if decided is None or self.person is None or where is None:
            return None
        if not where:
            return not decided
        return False if not decided else self.correct()


def rank_features(query: torch.Tensor, gallery: torch.Tensor, top_k: int,
                  exclude: Sequence[Sequence[int]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(order, distances), each ``[Q, min(top_k, G)]``: the gallery indices of each query's
    nearest images by cosine distance (ties by gallery index) and their distances; an index in
    ``exclude[q]`` is left out of query ``q``'s ranking (its slot holds index -1 when fewer
    images remain than ``top_k``)."""
    dist = cosine_distance(query.float(), gallery.float()).numpy().astype(np.float64)
    for q, leave_out in enumerate(exclude or ()):
        dist[q, list(leave_out)] = np.inf
    k = min(int(top_k), dist.shape[1])
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    taken = np.take_along_axis(dist, order, axis=1)
    order = np.where(np.isinf(taken), -1, order)
    return order, taken


def _results(kind: str, queries: Sequence[tuple[str, str | None, str | None]],
             order: np.ndarray, dist: np.ndarray, gallery: Sequence[GalleryImage],
             exclude: Sequence[Sequence[int]] | None = None) -> list[QueryResult]:
    by_person: dict[str, list[int]] = {}
    for i, g in enumerate(gallery):
        if g.person is not None:
            by_person.setdefault(g.person, []).append(i)
    out = []
    for q, ((name, path, person), row, drow) in enumerate(zip(queries, order, dist)):
        matches = [RankedImage(rank=r + 1, index=int(j), name=gallery[j].name,
                               path=gallery[j].path, person=gallery[j].person,
                               distance=float(d))
                   for r, (j, d) in enumerate(zip(row, drow)) if j >= 0]
        in_gallery = None
        if kind == "image" and person is not None:
            own = set(exclude[q]) if exclude else set()
            in_gallery = any(i not in own for i in by_person.get(person, ()))
        out.append(QueryResult(query=name, kind=kind, path=path, person=person, matches=matches,
                               in_gallery=in_gallery))
    return out


def search_queries(model: SearchModel, index: GalleryIndex, inputs: SearchInputs,
                   params: Mapping[str, Any]) -> list[QueryResult]:
    """Rank the gallery for every query image (the model's own feature), then for every query
    text (the joint image-text space); ``params["top_k"]`` matches each."""
    top_k = int(params["top_k"])
    results: list[QueryResult] = []
    if inputs.queries:
        feats = _encode(model, [q.path for q in inputs.queries], params, False, "encode queries")
        where = {}
        for i, g in enumerate(index.images):
            where.setdefault(os.path.realpath(g.path), []).append(i)
        exclude = [where.get(os.path.realpath(q.path), []) for q in inputs.queries]
        order, dist = rank_features(feats, index.features, top_k, exclude)
        results += _results("image", [(q.name, q.path, q.person) for q in inputs.queries],
                            order, dist, index.images, exclude)
    if inputs.texts:
        if index.text_features is None:
            raise ValueError("the gallery index has no text-space features; build it with "
                             "text=True (build_gallery_index does when there are text queries)")
        was_training = model.run.backbone.training
        model.run.backbone.eval()
        text_feats = _embed_texts(model.run.backbone, inputs.texts)
        model.run.backbone.train(was_training)
        order, dist = rank_features(text_feats, index.text_features, top_k)
        results += _results("text", [(t, None, None) for t in inputs.texts], order, dist,
                            index.images)
    return results


# ----------------------------------------------------------------------------- outputs


def rankings_rows(results: Sequence[QueryResult], threshold: Threshold) -> list[dict]:
    """One row per (query, rank): :data:`RANKINGS_COLUMNS`. ``above_threshold`` is True when
    the distance is above the open-set threshold (not the same person), empty when there is no
    threshold or for a text query."""
    rows = []
    for r in results:
        for m in r.matches:
            accepted = r.accepts(m, threshold)
            rows.append({"query": r.query, "query_type": r.kind, "query_person": r.person or "",
                         "rank": m.rank, "gallery_image": m.name, "person": m.person or "",
                         "distance": f"{m.distance:.6f}",
                         "above_threshold": "" if accepted is None else str(not accepted)})
    return rows


def write_rankings_csv(path: str | os.PathLike, results: Sequence[QueryResult],
                       threshold: Threshold) -> Path:
    """``rankings.csv`` (atomically): :func:`rankings_rows` under a header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RANKINGS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rankings_rows(results, threshold))
    return atomic_write_text(path, buf.getvalue())


def _percent(hits: int, total: int) -> float | None:
    return 100.0 * hits / total if total else None


def search_summary(results: Sequence[QueryResult], threshold: Threshold,
                   gallery_people: Sequence[str]) -> dict:
    """Counts over the queries; with labelled queries and gallery, the top-1 accuracy (percent)
    over the queries whose person is in the gallery, and with a threshold the open-set accuracy
    (a known person matched by the right top-1, or an unknown one with no match).

    A query's person is in the gallery when another image of that person is there
    (``QueryResult.in_gallery``): a query whose only image of its person in the gallery is the
    query itself (left out of its ranking) counts as not in the gallery. ``gallery_people``
    decides only for results that do not say (built without :func:`search_queries`)."""
    images = [r for r in results if r.kind == "image"]
    decided = [r.decision(threshold) for r in images]
    known = set(gallery_people)

    def person_in_gallery(r: QueryResult) -> bool:
        return r.in_gallery if r.in_gallery is not None else r.person in known

    in_gallery = [r for r in images if r.person is not None and person_in_gallery(r)]
    unknown = [r for r in images if r.person is not None and not person_in_gallery(r)]
    top1 = sum(bool(r.correct()) for r in in_gallery)
    out = {"image_queries": len(images), "text_queries": len(results) - len(images),
           "matches": sum(d is True for d in decided),
           "no_matches": sum(d is False for d in decided),
           "labelled_queries": len(in_gallery) + len(unknown),
           "queries_in_gallery": len(in_gallery), "queries_not_in_gallery": len(unknown),
           "top1_correct": top1, "top1_accuracy": _percent(top1, len(in_gallery)),
           "open_set_accuracy": None}
    if threshold.value is not None and (in_gallery or unknown):
        # an identification whose top-1 image is unlabelled cannot be checked: counted wrong
        right = sum(bool(r.decision_correct(threshold, person_in_gallery(r)))
                    for r in in_gallery + unknown)
        out["open_set_accuracy"] = _percent(right, len(in_gallery) + len(unknown))
    return out


def search_record(params: Mapping[str, Any], inputs: SearchInputs, model: SearchModel,
                  index: GalleryIndex, results: Sequence[QueryResult], threshold: Threshold,
                  figures: Sequence[str | os.PathLike] = ()) -> dict:
    """The search's ``metrics.json`` body (docs/contracts.md): what ranked what, the threshold,
    per query its top-1 and decision, and :func:`search_summary`."""
    run = model.run
    queries = []
    for r in results:
        best = r.best
        queries.append({"query": r.query, "type": r.kind, "query_person": r.person,
                        "top1_image": best.name if best else None,
                        "top1_person": best.person if best else None,
                        "best_distance": r.best_distance, "match": r.decision(threshold),
                        "correct": r.correct(), "in_gallery": r.in_gallery})
    return {
        "stage": "search",
        "backbone": run.params["backbone"],
        "backbone_display": run.info.backbone_display,
        "run_dir": run.info.folder,
        "run_stage": run.stage,
        "prompt_mode": run.info.prompt_mode,
        "image_size": list(run.backbone.image_size),
        "flip_tta": model.flip,
        "top_k": int(params["top_k"]),
        "gallery": {"dir": str(inputs.gallery_root), "images": len(inputs.gallery),
                    "people": len(inputs.gallery_people),
                    "labelled_images": sum(g.person is not None for g in inputs.gallery),
                    "index": {"file": INDEX_FILE, "status": index.status,
                              "encoded": index.encoded, "model_key": index.model_key,
                              "files_key": index.files_key}},
        "query": {"path": str(params.get("query")) if params.get("query") is not None else None,
                  "images": len(inputs.queries), "texts": list(inputs.texts)},
        "threshold": threshold.record(),
        "queries": queries,
        "summary": search_summary(results, threshold, inputs.gallery_people),
        "rankings": RANKINGS_FILE,
        "figures": [Path(f).name for f in figures],
    }
