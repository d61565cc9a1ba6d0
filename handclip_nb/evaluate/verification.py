"""Verification metrics (1:1 "same hand or not?"): ROC, AUC, EER, TAR at a FAR, thresholds.

Re-identification ranks a gallery for each query (:mod:`.metrics`); verification decides for
one query-gallery *pair* at a time whether both images show the same identity.  Every pair of a
split's ``(num_query, num_gallery)`` distance matrix is a trial: *genuine* when the two ids are
equal, *impostor* otherwise.  Distances are those of the re-ID metrics (cosine distance
``1 - q.g`` of L2-normalised features, or re-ranked distances): smaller is closer.  A pair is
**accepted at threshold t when its distance is <= t**.  The similarity score is ``s = -d`` (so
``sklearn.metrics.roc_curve(genuine, -d)`` gives the same curve, with thresholds ``-t``); every
threshold in this module is a *distance* threshold.

Terms (ISO/IEC 19795-1:2021, "Biometric performance testing and reporting -- Part 1", and
ISO/IEC 2382-37 vocabulary), all as fractions of the split's pairs:

* FAR(t), false accept rate: impostor pairs with ``d <= t`` / impostor pairs.  (ISO/IEC 19795-1
  calls the algorithm-level rate the false match rate, FMR; there is no failure to acquire here,
  so FAR = FMR and the literature's "TAR @ FAR" names are used.)
* TAR(t), true accept rate: genuine pairs with ``d <= t`` / genuine pairs.
* FRR(t) = 1 - TAR(t), false reject rate (FNMR).

Definitions chosen here (tests/test_verification.py checks each against a slow reference and
against scikit-learn):

* **ROC curve, ties.** One point per distinct distance value ``t_1 < ... < t_m`` of the split's
  pairs, plus the starting point ``t_0 = -inf`` (accept nothing: FAR = TAR = 0).  All pairs with
  equal distance switch from rejected to accepted together, so a tie group is one step of the
  curve, never split by pair order: exactly ``sklearn.metrics.roc_curve(..., drop_intermediate=
  False)``.  The last point (``t_m``, the largest distance) accepts everything: FAR = TAR = 1.
* **AUC**: the trapezoid rule over those points, i.e. the probability that a random genuine pair
  is closer than a random impostor pair, ties counted 1/2 (Mann-Whitney); equals
  ``sklearn.metrics.roc_auc_score``.
* **EER**, equal error rate: where FAR = FRR.  FRR - FAR strictly decreases along the curve from
  +1 (``t_0``) to -1 (``t_m``), so it changes sign exactly once.  If some point has FRR = FAR
  exactly, EER is that value.  Otherwise the sign changes between consecutive points ``k-1``
  (FRR > FAR) and ``k`` (FRR < FAR) and the EER is taken on the straight ROC segment between
  them: with ``lam = (FRR-FAR)[k-1] / ((FRR-FAR)[k-1] - (FRR-FAR)[k])``,
  ``EER = FAR[k-1] + lam * (FAR[k] - FAR[k-1])`` (= FRR there).  That segment is what accepting a
  random fraction ``lam`` of the pairs at distance ``t_k`` achieves, so the interpolated EER is an
  attainable (randomised) operating point, not a guess between two thresholds.
* **TAR @ FAR = x**: the TAR at the largest threshold of the curve whose FAR <= x (the
  conservative operating point of biometric reporting: the measured FAR never exceeds the
  target; no interpolation between points).  Point ``t_0`` always qualifies, so the value exists
  for every target; it is the TAR at zero false accepts when even the closest tie group holds too
  many impostors.  A target is *resolvable* when one false accept is within it,
  ``1 / impostor_pairs <= x``; with fewer than ``1/x`` impostor pairs the only FAR <= x is 0 and
  the value is really "TAR @ FAR = 0": it is still returned, with ``resolvable = False``.
  (Resolvable is not the same as precise: a FAR near x is measured from about ``x * impostor
  pairs`` false accepts, so a few times ``1/x`` impostor pairs are needed for a stable value.)
* **Threshold calibration** (:func:`calibrate_threshold`): the same operating point, measured on
  pairs of training identities; the threshold is the observed distance ``t_k`` itself.  Every
  threshold in ``[t_k, t_k+1)`` gives the same rates on those pairs; ``t_k`` is the most
  conservative of them.  :func:`far_at_threshold` then measures that stored threshold on other
  identities (the test split), where its FAR may differ from the target: that difference is
  what open-set calibration has to show.

Distances must be finite (NaN and +/-inf are refused): the only infinite threshold is then
``t_0 = -inf``, which the JSON-ready dicts (:meth:`OperatingPoint.to_dict`, :func:`roc_points`)
write as ``None`` ("accept nothing") and :func:`far_at_threshold` reads back.

Rates are fractions in [0, 1] everywhere except in :func:`verification_metrics` and the
summaries, which use percent like the re-ID summaries of :mod:`.protocol_eval` (``std`` is the
sample standard deviation over splits, ddof=1; 0 for a single split).

Pure numpy.  Input handling (numpy arrays or torch tensors; ids of any hashable kind) is shared
with :func:`.rank_metrics`.

**Memory.** A split of ``q x g`` pairs is never copied, flattened or masked whole: the distance
matrix is read in blocks of query rows, and the curve is resolved in *batches* of consecutive
distances of at most ``batch_pairs`` pairs (default 256 MiB of distances), each sorted on its
own.  The batches are found by histograms of the distances' order keys (the float's bits mapped
to an unsigned integer in the same order, -0.0 and +0.0 one key): 65,536 bins over the split's
range, a bin with more than ``batch_pairs`` pairs split again by a histogram of its own range,
down to a single distance if need be (a tie group of any size is then one curve point, counted
without being read).  Sorting a batch gives its exact curve points with the cumulative counts of
the batches before it, so the curve is exactly the one of one sort of all pairs (float32
distances are sorted as float32: each is a float64 exactly, so thresholds and counts are those
of a float64 sort).  :func:`verification_metrics`, :func:`evaluate_verification` and
:func:`calibrate_threshold` consume the points as they come (area, EER crossing, last point
within each FAR) and never hold the curve; the ROC figure's points are read again from the
batches that hold them once the curve's length is known.  Memory beyond the distances is then
a few times ``batch_pairs`` values (about 40 MB on a 2,000 x 2,000 split against 215 MB for one
sort of all pairs, and under 1 GB for 20,000 x 20,000: benchmarks/bench_verification.py).
:func:`verification_curve` returns every point (24 bytes each, up to one per pair).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .metrics import _as_distmat, _as_ids, _comparable_ids

__all__ = ["FAR_TARGETS", "MAX_CURVE_POINTS", "VERIFICATION_METRIC_NAMES",
           "VERIFICATION_METRIC_LABELS", "VerificationCurve", "OperatingPoint",
           "VerificationResult", "verification_curve", "roc_auc", "eer", "tar_at_far", "tar_key",
           "verification_metrics", "summarise_verification", "roc_points",
           "evaluate_verification", "calibrate_threshold", "far_at_threshold"]

#: The FAR targets of the recorded TAR @ FAR metrics (fractions).
FAR_TARGETS = (1e-2, 1e-3)

#: Default number of ROC points kept for a figure (:func:`roc_points`).
MAX_CURVE_POINTS = 200


def tar_key(far_target: float) -> str:
    """Metric key of the TAR at ``far_target``: ``1e-2`` -> ``"tar_at_far1e-2"``."""
    return "tar_at_far" + np.format_float_scientific(float(far_target), trim="-", exp_digits=1)


#: Keys of :func:`verification_metrics` (with the default ``FAR_TARGETS``), in table order.
VERIFICATION_METRIC_NAMES = ("roc_auc", "eer") + tuple(tar_key(f) for f in FAR_TARGETS)
#: Column headings for tables and figures.
VERIFICATION_METRIC_LABELS = {"roc_auc": "ROC AUC", "eer": "EER",
                              **{tar_key(f): f"TAR@FAR={tar_key(f)[len('tar_at_far'):]}"
                                 for f in FAR_TARGETS}}


# --------------------------------------------------------------------------- curve


@dataclass(frozen=True, eq=False)
class VerificationCurve:
    """The exact ROC of one split's pairs (see the module docstring for the definitions).

    Point ``k`` accepts the pairs with distance ``<= thresholds[k]``; ``thresholds[0]`` is
    ``-inf`` (accept nothing), ``thresholds[1:]`` are the distinct pair distances, increasing.
    """

    thresholds: np.ndarray      # float64 (m + 1,), distance thresholds
    true_accepts: np.ndarray    # int64 (m + 1,), genuine pairs accepted
    false_accepts: np.ndarray   # int64 (m + 1,), impostor pairs accepted
    genuine_pairs: int
    impostor_pairs: int

    @property
    def far(self) -> np.ndarray:
        """False accept rate at each threshold, non-decreasing from 0 to 1."""
        return self.false_accepts / self.impostor_pairs

    @property
    def tar(self) -> np.ndarray:
        """True accept rate at each threshold, non-decreasing from 0 to 1."""
        return self.true_accepts / self.genuine_pairs

    @property
    def frr(self) -> np.ndarray:
        """False reject rate ``1 - TAR``."""
        return 1.0 - self.tar


def verification_curve(distances: Any, query_ids: Any, gallery_ids: Any, *,
                       batch_pairs: int | None = None) -> VerificationCurve:
    """The ROC of all ``num_query x num_gallery`` pairs of one split, every point of it.

    Args:
        distances: ``(num_query, num_gallery)`` numpy array or torch tensor of finite distances
            (smaller = closer).
        query_ids, gallery_ids: 1-D sequences of identity labels, compared by equality (as in
            :func:`.rank_metrics`); a pair is genuine when its two labels are equal.
        batch_pairs: pairs sorted at once (a memory knob; default: 256 MiB of distances).

    Returns:
        a :class:`VerificationCurve`; one point per distinct distance plus the ``-inf`` start,
        tied pairs switching together (``sklearn.metrics.roc_curve(genuine, -distances,
        drop_intermediate=False)``, thresholds negated).  The curve itself has up to one point
        per pair (24 bytes each); the metrics of a large split come from
        :func:`verification_metrics` / :func:`evaluate_verification`, which never hold it.

    Raises:
        ValueError: malformed inputs, a non-finite distance, or no genuine or no impostor pair
            (TAR or FAR would be undefined).
    """
    pairs = _SplitPairs(distances, query_ids, gallery_ids, batch_pairs)
    blocks = [block for batch in pairs.batches() for block in pairs.points(batch)]
    return VerificationCurve(
        thresholds=np.concatenate([[-np.inf]] + [b[0] for b in blocks]),
        true_accepts=np.concatenate([np.zeros(1, np.int64)] + [b[1] for b in blocks]),
        false_accepts=np.concatenate([np.zeros(1, np.int64)] + [b[2] for b in blocks]),
        genuine_pairs=pairs.genuine_pairs,
        impostor_pairs=pairs.impostor_pairs,
    )


def roc_auc(curve: VerificationCurve) -> float:
    """Area under the ROC (trapezoid rule), a fraction: 1 = perfect, 0.5 = chance."""
    # integer arithmetic up to the one division: exact for any realistic number of pairs
    heights = curve.true_accepts[1:] + curve.true_accepts[:-1]
    area = int(np.dot(np.diff(curve.false_accepts), heights))
    return area / (2 * curve.genuine_pairs * curve.impostor_pairs)


def eer(curve: VerificationCurve) -> float:
    """Equal error rate (FAR = FRR), a fraction, interpolated on the ROC segment where FRR - FAR
    changes sign (module docstring)."""
    # FRR - FAR scaled by genuine_pairs * impostor_pairs: integers, so the sign test is exact
    gap = ((curve.genuine_pairs - curve.true_accepts) * curve.impostor_pairs
           - curve.false_accepts * curve.genuine_pairs)  # strictly decreasing, +GI to -GI
    k = int(np.argmax(gap <= 0))  # first point at or past the crossing; k >= 1 since gap[0] > 0
    far = curve.far
    if gap[k] == 0:
        return float(far[k])
    lam = int(gap[k - 1]) / (int(gap[k - 1]) - int(gap[k]))
    return float(far[k - 1] + lam * (far[k] - far[k - 1]))


# --------------------------------------------------------------------------- operating points


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold and its measured rates (fractions).

    ``far_target`` and ``resolvable`` are set when the threshold was chosen for a FAR target
    (:func:`tar_at_far`, :func:`calibrate_threshold`) and are None for a given threshold
    (:func:`far_at_threshold`).
    """

    threshold: float          # accept a pair when its distance <= threshold; -inf: accept none
    far: float
    tar: float
    genuine_pairs: int
    impostor_pairs: int
    far_target: float | None = None
    resolvable: bool | None = None

    def to_dict(self) -> dict:
        """JSON-ready: ``{"threshold", "far_target", "far_measured", "tar_measured",
        "pairs": {"genuine", "impostor"}, "resolvable"}``; a ``-inf`` threshold is None, and
        the two target keys are left out for a given threshold."""
        out = {"threshold": float(self.threshold) if np.isfinite(self.threshold) else None}
        if self.far_target is not None:
            out["far_target"] = float(self.far_target)
        out["far_measured"] = float(self.far)
        out["tar_measured"] = float(self.tar)
        out["pairs"] = {"genuine": int(self.genuine_pairs), "impostor": int(self.impostor_pairs)}
        if self.resolvable is not None:
            out["resolvable"] = bool(self.resolvable)
        return out


def tar_at_far(curve: VerificationCurve, far_target: float) -> OperatingPoint:
    """The operating point at the largest threshold of ``curve`` whose FAR <= ``far_target``.

    Its ``tar`` is the TAR @ FAR; no interpolation.  ``resolvable`` is
    ``1 / impostor_pairs <= far_target`` (module docstring): when False the point has FAR 0
    and the value is reported all the same.
    """
    far_target = _check_far_target(far_target)
    # FAR is non-decreasing and FAR[0] = 0: the qualifying points are a prefix of the curve
    k = int(np.searchsorted(curve.far, far_target, side="right")) - 1
    return OperatingPoint(threshold=float(curve.thresholds[k]), far=float(curve.far[k]),
                          tar=float(curve.tar[k]), genuine_pairs=curve.genuine_pairs,
                          impostor_pairs=curve.impostor_pairs, far_target=far_target,
                          resolvable=bool(1.0 / curve.impostor_pairs <= far_target))


def calibrate_threshold(distances: Any, query_ids: Any, gallery_ids: Any,
                        far: float, *, batch_pairs: int | None = None) -> OperatingPoint:
    """The largest observed distance threshold whose FAR on these pairs is <= ``far``.

    Meant for pairs of *training* identities only; store ``.to_dict()`` with the run and
    measure it on test identities with :func:`far_at_threshold`.  The threshold is ``-inf``
    (``None`` in ``to_dict``) when even the closest tie group of pairs exceeds the target.
    This is ``tar_at_far(verification_curve(...), far)``, computed without holding the curve
    (memory bounded by ``batch_pairs``, as in :func:`verification_metrics`).
    """
    far = _check_far_target(far)
    walk = _CurveWalk.of(_SplitPairs(distances, query_ids, gallery_ids, batch_pairs), [far])
    return walk.operating_point(0, far)


def far_at_threshold(distances: Any, query_ids: Any, gallery_ids: Any,
                     threshold: float | None) -> OperatingPoint:
    """FAR and TAR of a given distance threshold (accept when distance <= threshold) on these
    pairs.  ``threshold`` None means ``-inf`` (accept nothing), as written by ``to_dict``."""
    threshold = -np.inf if threshold is None else float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN; give a distance threshold, or None to accept nothing")
    pairs = _SplitPairs(distances, query_ids, gallery_ids)
    accepted = true_accepts = 0
    for block, genuine in pairs.chunks():  # a block of rows at a time: no copy of the matrix
        accepted_block = block <= threshold
        accepted += int(np.count_nonzero(accepted_block))
        accepted_block &= genuine
        true_accepts += int(np.count_nonzero(accepted_block))
    false_accepts = accepted - true_accepts
    return OperatingPoint(threshold=threshold, far=false_accepts / pairs.impostor_pairs,
                          tar=true_accepts / pairs.genuine_pairs,
                          genuine_pairs=pairs.genuine_pairs, impostor_pairs=pairs.impostor_pairs)


# --------------------------------------------------------------------------- per split, summary


def verification_metrics(distances: Any, query_ids: Any, gallery_ids: Any,
                         far_targets: Sequence[float] = FAR_TARGETS, *,
                         batch_pairs: int | None = None) -> dict:
    """One split's verification metrics, in percent.

    Returns ``{"roc_auc", "eer", "tar_at_far1e-2", "tar_at_far1e-3"}`` (floats, 0-100; one
    ``tar_key(f)`` per FAR target) plus ``"pairs": {"genuine", "impostor"}`` (ints) and
    ``"resolvable": {tar key: bool}``.  Exactly the values of :func:`roc_auc`, :func:`eer` and
    :func:`tar_at_far` on :func:`verification_curve`, computed in one pass over the curve's
    points without holding the curve: memory beyond the distance matrix is bounded by
    ``batch_pairs`` (as in :func:`verification_curve`) whatever the split's size.
    """
    far_targets = [_check_far_target(f) for f in far_targets]
    pairs = _SplitPairs(distances, query_ids, gallery_ids, batch_pairs)
    return _CurveWalk.of(pairs, far_targets).metrics(far_targets)


def summarise_verification(per_split: Sequence[Mapping]) -> dict[str, dict]:
    """``[verification_metrics(...), ...]`` -> ``{name: {"mean", "std", "per_split"}}``.

    The shape of :func:`.protocol_eval.summarise`: percent, ``std`` with ddof=1 (0 for one
    split).  Summarises the numeric keys of the first split, in its order (``pairs`` and
    ``resolvable`` are left out); a key some later split lacks is a ``KeyError``.
    """
    if not per_split:
        raise ValueError("no split to summarise")
    names = [k for k, v in per_split[0].items()
             if isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))]
    out = {}
    for name in names:
        values = np.asarray([float(s[name]) for s in per_split], dtype=np.float64)
        out[name] = {"mean": float(values.mean()),
                     "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "per_split": [float(v) for v in values]}
    return out


def roc_points(curve: VerificationCurve, max_points: int = MAX_CURVE_POINTS) -> dict:
    """At most ``max_points`` points of ``curve`` for a figure, JSON-ready.

    Returns ``{"far": [...], "tar": [...], "threshold": [...], "genuine_pairs", "impostor_pairs"}``
    (fractions; the ``-inf`` start's threshold is None).  Every point is a true point of the
    curve, the first (0, 0) and the last (1, 1) included.  Half of them are evenly spaced along
    the curve (for a linear-axis ROC), half at log-spaced FARs from ``1/impostor_pairs`` to 1
    (for a DET plot or a log-FAR ROC, whose interesting part is the low-FAR end).
    """
    _check_max_points(max_points)
    # the last point at or below each FAR level: the top of its vertical step
    logarithmic = np.searchsorted(curve.far, _log_far_levels(curve.impostor_pairs, max_points),
                                  side="right") - 1
    keep = _kept_points(curve.thresholds.shape[0], logarithmic, max_points)
    return _roc_record(curve.thresholds[keep], curve.true_accepts[keep],
                       curve.false_accepts[keep], curve.genuine_pairs, curve.impostor_pairs)


def _check_max_points(max_points: int) -> None:
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2 (the curve's two ends), got {max_points}")


def _log_far_levels(impostor_pairs: int, max_points: int) -> np.ndarray:
    return np.geomspace(1.0 / impostor_pairs, 1.0, max_points - max_points // 2)


def _kept_points(num_points: int, logarithmic: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of the points :func:`roc_points` keeps of a curve of ``num_points`` points;
    ``logarithmic``: the index of the last point at or below each log-spaced FAR."""
    if num_points <= max_points:
        return np.arange(num_points)
    linear = np.linspace(0, num_points - 1, max_points // 2).round().astype(np.int64)
    return np.unique(np.r_[linear, logarithmic])  # linear holds both ends


def _roc_record(thresholds, true_accepts, false_accepts, genuine_pairs: int,
                impostor_pairs: int) -> dict:
    return {"far": (np.asarray(false_accepts, dtype=np.int64) / impostor_pairs).tolist(),
            "tar": (np.asarray(true_accepts, dtype=np.int64) / genuine_pairs).tolist(),
            "threshold": [float(t) if np.isfinite(t) else None for t in thresholds],
            "genuine_pairs": genuine_pairs, "impostor_pairs": impostor_pairs}


@dataclass
class VerificationResult:
    """Verification over a protocol's splits: ``summary`` (percent, ``summarise`` shape),
    ``splits`` (each split's :func:`verification_metrics`) and ``roc`` (the first split's
    :func:`roc_points`)."""

    summary: dict
    splits: list[dict]
    roc: dict

    def record(self) -> dict:
        """JSON-ready: ``{"metrics": summary, "pairs": {"genuine": [per split],
        "impostor": [per split]}, "resolvable": {tar key: bool, True when every split
        resolves it}, "roc_first_split": roc}``."""
        return {
            "metrics": self.summary,
            "pairs": {kind: [s["pairs"][kind] for s in self.splits]
                      for kind in ("genuine", "impostor")},
            "resolvable": {key: all(s["resolvable"][key] for s in self.splits)
                           for key in self.splits[0]["resolvable"]},
            "roc_first_split": self.roc,
        }


def evaluate_verification(split_inputs: Iterable[tuple[Any, Any, Any]],
                          far_targets: Sequence[float] = FAR_TARGETS,
                          max_curve_points: int = MAX_CURVE_POINTS, *,
                          batch_pairs: int | None = None) -> VerificationResult:
    """Verification metrics of every split, their summary, and the first split's ROC.

    ``split_inputs`` yields ``(distances, query_ids, gallery_ids)`` per split, e.g.
    ``((split_distances(feats, row_of, s, rerank), protocol.ids_of(s.query),
    protocol.ids_of(s.gallery)) for s in protocol.test)``; a generator keeps one split's
    distances in memory at a time.  Each split gives :func:`verification_metrics` and the first
    also ``roc_points(verification_curve(...), max_curve_points)``, both without holding the
    curve (memory bounded by ``batch_pairs`` beyond the distances; the kept ROC points are read
    again from the batches holding them once the curve's length is known).
    """
    _check_max_points(max_curve_points)
    far_targets = [_check_far_target(f) for f in far_targets]
    splits, roc = [], None
    for distances, query_ids, gallery_ids in split_inputs:
        pairs = _SplitPairs(distances, query_ids, gallery_ids, batch_pairs)
        levels = list(far_targets)
        if roc is None:
            levels += _log_far_levels(pairs.impostor_pairs, max_curve_points).tolist()
        walk = _CurveWalk.of(pairs, levels)
        splits.append(walk.metrics(far_targets))
        if roc is None:
            roc = walk.roc_points(max_curve_points, first_level=len(far_targets))
    if not splits:
        raise ValueError("split_inputs is empty: no split to evaluate")
    return VerificationResult(summary=summarise_verification(splits), splits=splits, roc=roc)


# --------------------------------------------------------------------------- inputs


def _check_far_target(far_target: float) -> float:
    value = float(far_target)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"a FAR target must be a fraction in (0, 1], got {far_target!r}")
    return value


# --------------------------------------------------------------------------- the pairs, streamed

#: Bytes of pair distances resolved (sorted) at once: bounds verification's extra memory.
_BATCH_BYTES = 1 << 28
#: Distance-matrix elements read per chunk of query rows.
_CHUNK_ELEMENTS = 1 << 20
#: Curve points handed on at once from a sorted batch.
_POINT_BLOCK = 1 << 18
#: Bits of the order key resolved by one histogram pass (65,536 bins).
_HISTOGRAM_BITS = 16


def _key_dtypes(value_dtype: np.dtype) -> tuple[type, int]:
    return (np.uint32, 32) if value_dtype == np.float32 else (np.uint64, 64)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers in the order of the (finite) float ``values``; -0.0 and +0.0 share a key
    (they are one distance, one tie group)."""
    utype, bits = _key_dtypes(values.dtype)
    sign = utype(1 << (bits - 1))
    raw = np.ascontiguousarray(values).view(utype)
    magnitude = raw & utype((1 << (bits - 1)) - 1)
    # negative numbers count down from the sign bit, positive ones up from it
    return np.where(raw >= sign, sign - magnitude, raw | sign)


def _value_of_key(key: int, value_dtype: np.dtype) -> float:
    """The float whose order key is ``key`` (+0.0 for the shared key of the zeros)."""
    utype, bits = _key_dtypes(value_dtype)
    sign = 1 << (bits - 1)
    raw = key - sign if key >= sign else sign | (sign - key)
    return float(np.array([raw], dtype=utype).view(value_dtype)[0])


@dataclass(frozen=True)
class _Batch:
    """Pairs with order key in ``[low_key, high_key]``, resolved together; ``genuine`` and
    ``impostor`` count them, ``before_*`` count the pairs of smaller distance."""

    low_key: int
    high_key: int
    genuine: int
    impostor: int
    before_genuine: int
    before_impostor: int

    @property
    def pairs(self) -> int:
        return self.genuine + self.impostor


class _SplitPairs:
    """Every query-gallery pair of one split, read in chunks of query rows: the distance matrix
    is neither copied nor flattened, and no ``(num_query, num_gallery)`` mask is built.

    The pairs are resolved into the exact ROC in batches of consecutive distances of at most
    ``batch_pairs`` pairs, found by histograms of the distances' order keys: a batch is sorted
    alone, so memory beyond the matrix is a few times ``batch_pairs`` values whatever the size
    of the split.  Float32 distances are read as float32 (every float32 is a float64 exactly, so
    the thresholds and counts are those of a float64 sort); any other real dtype as float64.
    """

    def __init__(self, distances: Any, query_ids: Any, gallery_ids: Any,
                 batch_pairs: int | None = None):
        dist = _as_distmat(distances)
        q_ids = _as_ids(query_ids, "query_ids")
        g_ids = _as_ids(gallery_ids, "gallery_ids")
        if q_ids.shape[0] != dist.shape[0] or g_ids.shape[0] != dist.shape[1]:
            raise ValueError(
                f"shape mismatch: distances has shape {dist.shape} (num_query, num_gallery) but "
                f"query_ids has shape {q_ids.shape} and gallery_ids has shape {g_ids.shape}")
        self.dist = dist
        self.value_dtype = np.dtype(np.float32 if dist.dtype == np.float32 else np.float64)
        if batch_pairs is None:
            # the sorted batch and its genuine copy, at most two values per pair
            batch_pairs = _BATCH_BYTES // (2 * self.value_dtype.itemsize)
        if isinstance(batch_pairs, bool) or int(batch_pairs) != batch_pairs or batch_pairs < 2:
            raise ValueError(f"batch_pairs must be an integer >= 2, got {batch_pairs!r}")
        self.batch_pairs = int(batch_pairs)
        self.query_codes, self.gallery_codes = _comparable_ids(q_ids, g_ids)
        self.rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, dist.shape[1]))
        total = dist.shape[0] * dist.shape[1]
        self.genuine_pairs = _count_genuine(self.query_codes, self.gallery_codes)
        self.impostor_pairs = total - self.genuine_pairs
        if self.genuine_pairs == 0:
            raise ValueError(
                f"no genuine pair: none of the {total} query-gallery pairs shares an "
                f"identity, so the TAR is undefined (check that query and gallery ids use the "
                f"same labels)")
        if self.impostor_pairs == 0:
            raise ValueError(
                f"no impostor pair: all {total} query-gallery pairs share an identity, so "
                f"the FAR is undefined (verification needs pairs of different identities)")
        self.low_key, self.high_key = self._key_range()

    def chunks(self):
        """``(distances, genuine)`` of consecutive row blocks, distances as ``value_dtype``."""
        for start in range(0, self.dist.shape[0], self.rows_per_chunk):
            stop = start + self.rows_per_chunk
            block = self.dist[start:stop].astype(self.value_dtype, copy=False)
            genuine = self.query_codes[start:stop, None] == self.gallery_codes[None, :]
            yield block, genuine

    def _key_range(self) -> tuple[int, int]:
        """Order keys of the smallest and largest distance; refuses NaN and +/-inf."""
        low, high = np.inf, -np.inf
        for block, _ in self.chunks():
            block_low, block_high = block.min(), block.max()  # NaN propagates through both
            if not (np.isfinite(block_low) and np.isfinite(block_high)):
                self._refuse_non_finite()
            low, high = min(low, block_low), max(high, block_high)
        keys = _order_keys(np.array([low, high], dtype=self.value_dtype))
        return int(keys[0]), int(keys[1])

    def _refuse_non_finite(self) -> None:
        nan = inf = 0
        for block, _ in self.chunks():
            nan += int(np.count_nonzero(np.isnan(block)))
            inf += int(np.count_nonzero(np.isinf(block)))
        raise ValueError(f"distances contain {nan} NaN and {inf} infinite value(s); "
                         f"verification needs finite distances")

    def _selected(self, block: np.ndarray, low_key: int, high_key: int) -> np.ndarray | None:
        """Mask of the distances of ``block`` whose key is in ``[low_key, high_key]`` (None: all)."""
        if low_key <= self.low_key and high_key >= self.high_key:
            return None
        low = _value_of_key(low_key, self.value_dtype)
        high = _value_of_key(high_key, self.value_dtype)
        mask = block >= low
        mask &= block <= high
        return mask

    def histogram(self, low_key: int, high_key: int, shift: int):
        """Genuine and impostor pairs per bin ``(key - low_key) >> shift`` of the pairs with key
        in ``[low_key, high_key]``."""
        bins = ((high_key - low_key) >> shift) + 1
        all_counts = np.zeros(bins, dtype=np.int64)
        genuine_counts = np.zeros(bins, dtype=np.int64)
        utype, _ = _key_dtypes(self.value_dtype)
        for block, genuine in self.chunks():
            mask = self._selected(block, low_key, high_key)
            values = block.ravel() if mask is None else block[mask]
            is_genuine = genuine.ravel() if mask is None else genuine[mask]
            index = ((_order_keys(values) - utype(low_key)) >> utype(shift)).astype(np.intp)
            all_counts += np.bincount(index, minlength=bins)
            genuine_counts += np.bincount(index[is_genuine], minlength=bins)
        return genuine_counts, all_counts - genuine_counts

    def batches(self) -> list[_Batch]:
        """The key ranges resolved together, in increasing order of distance."""
        ranges = self._ranges(self.low_key, self.high_key, self.genuine_pairs,
                              self.impostor_pairs)
        batches: list[_Batch] = []
        group: list[tuple[int, int, int, int]] = []
        group_pairs = before_genuine = before_impostor = 0

        def close():
            nonlocal before_genuine, before_impostor, group_pairs
            genuine = sum(r[2] for r in group)
            impostor = sum(r[3] for r in group)
            batches.append(_Batch(group[0][0], group[-1][1], genuine, impostor,
                                  before_genuine, before_impostor))
            before_genuine += genuine
            before_impostor += impostor
            group.clear()
            group_pairs = 0

        for rng in ranges:
            if group and group_pairs + rng[2] + rng[3] > self.batch_pairs:
                close()
            group.append(rng)
            group_pairs += rng[2] + rng[3]
        close()
        return batches

    def _ranges(self, low_key: int, high_key: int, genuine: int, impostor: int) -> list:
        """``[(low_key, high_key, genuine, impostor)]`` covering the pairs of this key range,
        each either at most ``batch_pairs`` pairs or one single distance."""
        if genuine + impostor <= self.batch_pairs or low_key == high_key:
            return [(low_key, high_key, genuine, impostor)]
        shift = max(0, (high_key - low_key).bit_length() - _HISTOGRAM_BITS)
        genuine_counts, impostor_counts = self.histogram(low_key, high_key, shift)
        out = []
        for b in np.flatnonzero(genuine_counts + impostor_counts).tolist():
            bin_low = low_key + (b << shift)
            bin_high = min(high_key, bin_low + (1 << shift) - 1)
            out += self._ranges(bin_low, bin_high, int(genuine_counts[b]),
                                int(impostor_counts[b]))
        return out

    def points(self, batch: _Batch):
        """The curve points of ``batch``'s distances: ``(thresholds, true_accepts,
        false_accepts)`` blocks (float64, cumulative int64 counts), increasing."""
        if batch.low_key == batch.high_key:  # one distance: no need to read its pairs
            yield (np.array([_value_of_key(batch.low_key, self.value_dtype)]),
                   np.array([batch.before_genuine + batch.genuine], dtype=np.int64),
                   np.array([batch.before_impostor + batch.impostor], dtype=np.int64))
            return
        values = np.empty(batch.pairs, dtype=self.value_dtype)
        genuine_values = np.empty(batch.genuine, dtype=self.value_dtype)
        filled = filled_genuine = 0
        for block, genuine in self.chunks():
            mask = self._selected(block, batch.low_key, batch.high_key)
            if mask is None:
                chunk, chunk_genuine = block.ravel(), block[genuine]
            else:
                chunk = block[mask]
                mask &= genuine
                chunk_genuine = block[mask]
            values[filled:filled + chunk.shape[0]] = chunk
            genuine_values[filled_genuine:filled_genuine + chunk_genuine.shape[0]] = chunk_genuine
            filled += chunk.shape[0]
            filled_genuine += chunk_genuine.shape[0]
        # in-place value sorts, no argsort (several times slower on millions of pairs)
        values.sort()
        genuine_values.sort()
        num = values.shape[0]
        for start in range(0, num, _POINT_BLOCK):
            stop = min(start + _POINT_BLOCK, num)
            # the last pair of each run of equal distances: a tie group is accepted all at once
            ends = start + np.flatnonzero(values[start:stop - 1] != values[start + 1:stop])
            if stop == num or values[stop - 1] != values[stop]:
                ends = np.r_[ends, stop - 1]
            thresholds = values[ends]
            true_accepts = np.searchsorted(genuine_values, thresholds, side="right")
            false_accepts = ends + 1 - true_accepts
            yield (thresholds.astype(np.float64),
                   (batch.before_genuine + true_accepts).astype(np.int64),
                   (batch.before_impostor + false_accepts).astype(np.int64))


def _count_genuine(query_codes: np.ndarray, gallery_codes: np.ndarray) -> int:
    """Genuine pairs (equal ids), counted without a ``(num_query, num_gallery)`` mask."""
    sorted_gallery = np.sort(gallery_codes)
    return int((np.searchsorted(sorted_gallery, query_codes, side="right")
                - np.searchsorted(sorted_gallery, query_codes, side="left")).sum())


# --------------------------------------------------------------------------- one pass over a curve


class _CurveWalk:
    """What the metrics need of a split's curve, gathered in one pass over its points in
    increasing order of threshold, without keeping them: the area, the EER crossing, and the
    last point at or below each FAR level (the FAR targets, the log-spaced FARs of the ROC
    figure).  Each value is computed with the arithmetic of the function it stands for
    (:func:`roc_auc`, :func:`eer`, :func:`tar_at_far`), so the results are identical."""

    def __init__(self, pairs: _SplitPairs, far_levels: Sequence[float]):
        self.pairs = pairs
        self.genuine_pairs, self.impostor_pairs = pairs.genuine_pairs, pairs.impostor_pairs
        self.far_levels = np.asarray(far_levels, dtype=np.float64)
        self.num_points = 1  # the -inf start (FAR = TAR = 0)
        self.last = (-np.inf, 0, 0)  # threshold, true accepts, false accepts
        self.twice_area = 0
        self.equal_error_rate: float | None = None
        # per FAR level: (index, threshold, true accepts, false accepts); the start qualifies
        self.at_level = [(0, -np.inf, 0, 0)] * len(self.far_levels)
        self.batches = pairs.batches()
        self.batch_starts: list[int] = []  # index of each batch's first point

    @classmethod
    def of(cls, pairs: _SplitPairs, far_levels: Sequence[float]) -> "_CurveWalk":
        walk = cls(pairs, far_levels)
        for batch in walk.batches:
            walk.batch_starts.append(walk.num_points)
            for block in pairs.points(batch):
                walk.add(*block)
        return walk

    def add(self, thresholds: np.ndarray, true_accepts: np.ndarray,
            false_accepts: np.ndarray) -> None:
        """The next points of the curve, in order (cumulative int64 counts)."""
        genuine, impostor = self.genuine_pairs, self.impostor_pairs
        previous_true = np.r_[np.int64(self.last[1]), true_accepts[:-1]]
        previous_false = np.r_[np.int64(self.last[2]), false_accepts[:-1]]
        self.twice_area += int(np.dot(false_accepts - previous_false,
                                      true_accepts + previous_true))
        if self.equal_error_rate is None:
            # FRR - FAR scaled by genuine * impostor pairs: integers, the sign test is exact
            gap = (genuine - true_accepts) * impostor - false_accepts * genuine
            crossed = np.flatnonzero(gap <= 0)
            if crossed.shape[0]:
                k = int(crossed[0])
                far_k = np.int64(false_accepts[k]) / impostor
                if gap[k] == 0:
                    self.equal_error_rate = float(far_k)
                else:
                    gap_before = int((genuine - previous_true[k]) * impostor
                                     - previous_false[k] * genuine)
                    far_before = np.int64(previous_false[k]) / impostor
                    lam = gap_before / (gap_before - int(gap[k]))
                    self.equal_error_rate = float(far_before + lam * (far_k - far_before))
        far = false_accepts / impostor
        qualifying = np.searchsorted(far, self.far_levels, side="right")
        for j in np.flatnonzero(qualifying).tolist():
            k = int(qualifying[j]) - 1
            self.at_level[j] = (self.num_points + k, float(thresholds[k]),
                                int(true_accepts[k]), int(false_accepts[k]))
        self.num_points += thresholds.shape[0]
        self.last = (float(thresholds[-1]), int(true_accepts[-1]), int(false_accepts[-1]))

    def operating_point(self, level: int, far_target: float) -> OperatingPoint:
        """:func:`tar_at_far` at FAR level number ``level`` (which is ``far_target``)."""
        _, threshold, true_accepts, false_accepts = self.at_level[level]
        return OperatingPoint(threshold=threshold,
                              far=float(np.int64(false_accepts) / self.impostor_pairs),
                              tar=float(np.int64(true_accepts) / self.genuine_pairs),
                              genuine_pairs=self.genuine_pairs,
                              impostor_pairs=self.impostor_pairs, far_target=far_target,
                              resolvable=bool(1.0 / self.impostor_pairs <= far_target))

    def metrics(self, far_targets: Sequence[float]) -> dict:
        """:func:`verification_metrics`; ``far_targets`` are the first FAR levels."""
        pairs_product = 2 * self.genuine_pairs * self.impostor_pairs
        out: dict = {"roc_auc": 100 * (self.twice_area / pairs_product),
                     "eer": 100 * self.equal_error_rate}
        resolvable = {}
        for level, far_target in enumerate(far_targets):
            point = self.operating_point(level, far_target)
            out[tar_key(far_target)] = 100 * point.tar
            resolvable[tar_key(far_target)] = point.resolvable
        out["pairs"] = {"genuine": self.genuine_pairs, "impostor": self.impostor_pairs}
        out["resolvable"] = resolvable
        return out

    def roc_points(self, max_points: int, first_level: int) -> dict:
        """:func:`roc_points` of the curve; its log-spaced FARs are the levels from
        ``first_level`` on.  The kept points are read again from the batches holding them."""
        logarithmic = np.array([p[0] for p in self.at_level[first_level:]], dtype=np.int64)
        keep = _kept_points(self.num_points, logarithmic, max_points)
        found = {0: (-np.inf, 0, 0)}
        wanted = keep[keep > 0]
        ends = self.batch_starts[1:] + [self.num_points]
        for batch, start, end in zip(self.batches, self.batch_starts, ends):
            inside = wanted[(wanted >= start) & (wanted < end)]
            if not inside.shape[0]:
                continue
            index = start
            for thresholds, true_accepts, false_accepts in self.pairs.points(batch):
                stop = index + thresholds.shape[0]
                for i in inside[(inside >= index) & (inside < stop)].tolist():
                    found[i] = (thresholds[i - index], true_accepts[i - index],
                                false_accepts[i - index])
                index = stop
        rows = [found[i] for i in keep.tolist()]
        return _roc_record([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                           self.genuine_pairs, self.impostor_pairs)
