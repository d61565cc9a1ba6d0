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

Pure numpy, float64; one value sort of all the split's pair distances per curve.  Input handling
(numpy arrays or torch tensors; ids of any hashable kind) is shared with :func:`.rank_metrics`.
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


def verification_curve(distances: Any, query_ids: Any, gallery_ids: Any) -> VerificationCurve:
    """The ROC of all ``num_query x num_gallery`` pairs of one split.

    Args:
        distances: ``(num_query, num_gallery)`` numpy array or torch tensor of finite distances
            (smaller = closer).
        query_ids, gallery_ids: 1-D sequences of identity labels, compared by equality (as in
            :func:`.rank_metrics`); a pair is genuine when its two labels are equal.

    Returns:
        a :class:`VerificationCurve`; one point per distinct distance plus the ``-inf`` start,
        tied pairs switching together (``sklearn.metrics.roc_curve(genuine, -distances,
        drop_intermediate=False)``, thresholds negated).

    Raises:
        ValueError: malformed inputs, a non-finite distance, or no genuine or no impostor pair
            (TAR or FAR would be undefined).
    """
    flat, genuine = _pairs(distances, query_ids, gallery_ids)
    # Value sorts, no argsort (several times slower on millions of pairs): all pairs once, and
    # the genuine pairs, a small fraction on re-ID protocols, on their own for counting.
    sorted_dist = np.sort(flat)
    sorted_genuine = np.sort(flat[genuine])
    # the last pair of each run of equal distances: a tie group is accepted all at once
    group_ends = np.flatnonzero(np.r_[sorted_dist[1:] != sorted_dist[:-1], True])
    true_accepts = np.searchsorted(sorted_genuine, sorted_dist[group_ends], side="right")
    false_accepts = group_ends + 1 - true_accepts
    return VerificationCurve(
        thresholds=np.r_[-np.inf, sorted_dist[group_ends]],
        true_accepts=np.r_[np.int64(0), true_accepts].astype(np.int64),
        false_accepts=np.r_[np.int64(0), false_accepts].astype(np.int64),
        genuine_pairs=int(true_accepts[-1]),
        impostor_pairs=int(false_accepts[-1]),
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
                        far: float) -> OperatingPoint:
    """The largest observed distance threshold whose FAR on these pairs is <= ``far``.

    Meant for pairs of *training* identities only; store ``.to_dict()`` with the run and
    measure it on test identities with :func:`far_at_threshold`.  The threshold is ``-inf``
    (``None`` in ``to_dict``) when even the closest tie group of pairs exceeds the target.
    """
    return tar_at_far(verification_curve(distances, query_ids, gallery_ids), far)


def far_at_threshold(distances: Any, query_ids: Any, gallery_ids: Any,
                     threshold: float | None) -> OperatingPoint:
    """FAR and TAR of a given distance threshold (accept when distance <= threshold) on these
    pairs.  ``threshold`` None means ``-inf`` (accept nothing), as written by ``to_dict``."""
    threshold = -np.inf if threshold is None else float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN; give a distance threshold, or None to accept nothing")
    flat, genuine = _pairs(distances, query_ids, gallery_ids)
    accepted = flat <= threshold
    genuine_pairs = int(np.count_nonzero(genuine))
    impostor_pairs = flat.shape[0] - genuine_pairs
    true_accepts = int(np.count_nonzero(accepted & genuine))
    false_accepts = int(np.count_nonzero(accepted)) - true_accepts
    return OperatingPoint(threshold=threshold, far=false_accepts / impostor_pairs,
                          tar=true_accepts / genuine_pairs, genuine_pairs=genuine_pairs,
                          impostor_pairs=impostor_pairs)


# --------------------------------------------------------------------------- per split, summary


def verification_metrics(distances: Any, query_ids: Any, gallery_ids: Any,
                         far_targets: Sequence[float] = FAR_TARGETS) -> dict:
    """One split's verification metrics, in percent.

    Returns ``{"roc_auc", "eer", "tar_at_far1e-2", "tar_at_far1e-3"}`` (floats, 0-100; one
    ``tar_key(f)`` per FAR target) plus ``"pairs": {"genuine", "impostor"}`` (ints) and
    ``"resolvable": {tar key: bool}``.
    """
    return _metrics_of_curve(verification_curve(distances, query_ids, gallery_ids), far_targets)


def _metrics_of_curve(curve: VerificationCurve, far_targets: Sequence[float]) -> dict:
    out: dict = {"roc_auc": 100 * roc_auc(curve), "eer": 100 * eer(curve)}
    resolvable = {}
    for far_target in far_targets:
        point = tar_at_far(curve, far_target)
        out[tar_key(far_target)] = 100 * point.tar
        resolvable[tar_key(far_target)] = point.resolvable
    out["pairs"] = {"genuine": curve.genuine_pairs, "impostor": curve.impostor_pairs}
    out["resolvable"] = resolvable
    return out


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
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2 (the curve's two ends), got {max_points}")
    num = curve.thresholds.shape[0]
    if num <= max_points:
        keep = np.arange(num)
    else:
        linear = np.linspace(0, num - 1, max_points // 2).round().astype(np.int64)
        levels = np.geomspace(1.0 / curve.impostor_pairs, 1.0, max_points - max_points // 2)
        # the last point at or below each FAR level: the top of its vertical step
        logarithmic = np.searchsorted(curve.far, levels, side="right") - 1
        keep = np.unique(np.r_[linear, logarithmic])  # linear holds both ends
    thresholds = curve.thresholds[keep]
    return {"far": curve.far[keep].tolist(), "tar": curve.tar[keep].tolist(),
            "threshold": [float(t) if np.isfinite(t) else None for t in thresholds],
            "genuine_pairs": curve.genuine_pairs, "impostor_pairs": curve.impostor_pairs}


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
                          max_curve_points: int = MAX_CURVE_POINTS) -> VerificationResult:
    """Verification metrics of every split, their summary, and the first split's ROC.

    ``split_inputs`` yields ``(distances, query_ids, gallery_ids)`` per split, e.g.
    ``((split_distances(feats, row_of, s, rerank), protocol.ids_of(s.query),
    protocol.ids_of(s.gallery)) for s in protocol.test)``; a generator keeps one split's
    distances in memory at a time.
    """
    splits, roc = [], None
    for distances, query_ids, gallery_ids in split_inputs:
        curve = verification_curve(distances, query_ids, gallery_ids)
        splits.append(_metrics_of_curve(curve, far_targets))
        if roc is None:
            roc = roc_points(curve, max_curve_points)
    if not splits:
        raise ValueError("split_inputs is empty: no split to evaluate")
    return VerificationResult(summary=summarise_verification(splits), splits=splits, roc=roc)


# --------------------------------------------------------------------------- inputs


def _pairs(distances: Any, query_ids: Any, gallery_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flattened float64 pair distances and the matching genuine mask, validated."""
    dist = _as_distmat(distances)
    q_ids = _as_ids(query_ids, "query_ids")
    g_ids = _as_ids(gallery_ids, "gallery_ids")
    if q_ids.shape[0] != dist.shape[0] or g_ids.shape[0] != dist.shape[1]:
        raise ValueError(
            f"shape mismatch: distances has shape {dist.shape} (num_query, num_gallery) but "
            f"query_ids has shape {q_ids.shape} and gallery_ids has shape {g_ids.shape}")
    flat = dist.astype(np.float64, copy=False).ravel()
    finite = np.isfinite(flat)
    if not finite.all():
        bad = flat[~finite]
        raise ValueError(
            f"distances contain {int(np.isnan(bad).sum())} NaN and {int(np.isinf(bad).sum())} "
            f"infinite value(s); verification needs finite distances")
    q_ids, g_ids = _comparable_ids(q_ids, g_ids)
    genuine = (q_ids[:, None] == g_ids[None, :]).ravel()
    num_genuine = int(np.count_nonzero(genuine))
    if num_genuine == 0:
        raise ValueError(
            f"no genuine pair: none of the {flat.shape[0]} query-gallery pairs shares an "
            f"identity, so the TAR is undefined (check that query and gallery ids use the same "
            f"labels)")
    if num_genuine == flat.shape[0]:
        raise ValueError(
            f"no impostor pair: all {flat.shape[0]} query-gallery pairs share an identity, so "
            f"the FAR is undefined (verification needs pairs of different identities)")
    return flat, genuine


def _check_far_target(far_target: float) -> float:
    value = float(far_target)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"a FAR target must be a fraction in (0, 1], got {far_target!r}")
    return value
