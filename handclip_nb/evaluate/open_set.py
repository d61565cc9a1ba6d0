"""How far to trust an open-set threshold: what it was calibrated on, how many impostor pairs,
and a confidence interval for its false accept rate (docs/protocols.md#how-far-to-trust-the-threshold).

A threshold chosen at FAR ``f`` (:func:`.verification.calibrate_threshold`) is a number measured
on a finite set of people. Three things decide how far its FAR carries to strangers, and every
threshold record of the workbench states them:

* **Whose pairs.** ``"fitted"``: identities the model trained on (a trained run under the
  literature's ``selection: last``); their impostor pairs lie further apart than a stranger's,
  so on new people the FAR is typically *above* the target. ``"never-trained"``: identities no
  weight of the model was fitted on (held-out training identities, a zero-shot encoder's
  training identities, the test identities, or the user's own ``calibration_dir``).
* **How many impostor pairs.** With ``n`` impostor pairs and target ``f`` about ``n * f`` false
  accepts are observed. Doddington's *rule of 30* (Doddington et al., "The NIST speaker
  recognition evaluation", Speech Communication 31, 2000; Mansfield & Wayman, "Best practices
  in testing and reporting performance of biometric devices", NPL 2002, section 7.4): at least
  30 errors are needed for 90 % confidence that the true rate is within ±30 % of the observed
  one. :func:`too_few_pairs_warning` warns when ``n * f < 30`` (:data:`RULE_OF_30`).
* **A confidence interval** (:func:`far_interval`, 95 %). Impostor pairs are not independent
  trials: they share images and people, so the exact binomial (Clopper–Pearson) interval over
  pairs is too narrow whenever some people are easier to confuse than others. Resampling
  *people* (a bootstrap over identities, the "subsets bootstrap" of Bolle, Ratha and Pankanti,
  "Error analysis of pattern recognition systems", Image and Vision Computing 21, 2003)
  captures that correlation, but collapses to a single point when there are no (or very few)
  false accepts, where the binomial interval still has a width. The recorded interval is the
  **union** of the two (the lower of the two lower ends, the higher of the two upper ends):
  each is a lower bound on the honest uncertainty for a different reason. Both are recorded.

The interval at the calibrated threshold is measured on the very pairs that chose it (the FAR
there is at most the target by construction); what it says is how precisely those people pin
the threshold's FAR down. Its FAR on other people is only known by measuring it on other
never-trained people: the run's test identities (:func:`.protocol_eval.calibrate_open_set`
records it, never choosing anything on them) or a ``calibration_dir``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch

from .metrics import _as_distmat, _as_ids

__all__ = ["CONFIDENCE", "RULE_OF_30", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "FITTED",
           "NEVER_TRAINED", "IDENTITY_KINDS", "binomial_cdf", "clopper_pearson",
           "IdentityPairCounts", "identity_pair_counts", "identity_bootstrap_interval",
           "far_interval", "enough_pairs", "pairs_needed", "too_few_pairs_warning",
           "query_gallery_split", "measured_text", "describe_open_set"]

#: Confidence level of every FAR interval.
CONFIDENCE = 0.95
#: Expected false accepts (impostor pairs x FAR target) below which a FAR is not trusted.
RULE_OF_30 = 30
#: Identity-bootstrap resamples and their seed (fixed: a record is reproducible).
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
#: What a threshold was calibrated on (``identities`` of a record).
FITTED, NEVER_TRAINED = "fitted", "never-trained"
IDENTITY_KINDS = (FITTED, NEVER_TRAINED)


# --------------------------------------------------------------------------- binomial interval


def _binomial_cdf_of(k: int, n: int):
    """``p -> P(X <= k)`` for X ~ Binomial(n, p), its log-binomial coefficients computed once
    (``lgamma``) and the terms summed in log space: exact up to float64 rounding for any n."""
    j = torch.arange(max(k, -1) + 1, dtype=torch.float64)
    log_choose = math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)

    def cdf(p: float) -> float:
        if k < 0:
            return 0.0
        if k >= n or p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        log_terms = log_choose + j * math.log(p) + (n - j) * math.log1p(-p)
        return float(torch.logsumexp(log_terms, 0).exp().clamp(max=1.0))

    return cdf


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return _binomial_cdf_of(int(k), int(n))(float(p))


def _bisect(decreasing, target: float) -> float:
    """The p in [0, 1] where the non-increasing ``decreasing(p)`` crosses ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(100):  # 2^-100: far below any FAR a pair count can resolve
        mid = 0.5 * (lo + hi)
        if decreasing(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(false_accepts: int, pairs: int,
                    confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper–Pearson) two-sided interval of a binomial rate ``false_accepts /
    pairs``: the lower end solves P(X >= k | p) = alpha/2, the upper P(X <= k | p) = alpha/2
    (0 and 1 at k = 0 and k = n)."""
    k, n = int(false_accepts), int(pairs)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= false_accepts <= pairs and pairs > 0, got {k} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    half = (1.0 - confidence) / 2
    lower = 0.0 if k == 0 else _bisect(_binomial_cdf_of(k - 1, n), 1.0 - half)
    upper = 1.0 if k == n else _bisect(_binomial_cdf_of(k, n), half)
    return lower, upper


# --------------------------------------------------------------------------- identity bootstrap


@dataclass(frozen=True, eq=False)
class IdentityPairCounts:
    """Impostor pairs and false accepts of a threshold, per (query identity, gallery identity):
    ``false_accepts[a, b]`` and ``impostor_pairs[a, b]`` over ``identities`` (0 on the
    diagonal: a pair of one identity is genuine)."""

    identities: tuple
    false_accepts: np.ndarray   # int64 (I, I)
    impostor_pairs: np.ndarray  # int64 (I, I)

    @property
    def total_false_accepts(self) -> int:
        return int(self.false_accepts.sum())

    @property
    def total_impostor_pairs(self) -> int:
        return int(self.impostor_pairs.sum())

    @property
    def far(self) -> float:
        return self.total_false_accepts / self.total_impostor_pairs

    def __add__(self, other: "IdentityPairCounts") -> "IdentityPairCounts":
        """The counts of both (e.g. several test splits of the same people), over the union of
        their identities."""
        union = tuple(sorted(set(self.identities) | set(other.identities), key=repr))
        where = {ident: i for i, ident in enumerate(union)}
        fa = np.zeros((len(union), len(union)), dtype=np.int64)
        ip = np.zeros_like(fa)
        for part in (self, other):
            rows = np.asarray([where[x] for x in part.identities])
            fa[np.ix_(rows, rows)] += part.false_accepts
            ip[np.ix_(rows, rows)] += part.impostor_pairs
        return IdentityPairCounts(union, fa, ip)


def identity_pair_counts(distances: Any, query_ids: Any, gallery_ids: Any,
                         threshold: float | None) -> IdentityPairCounts:
    """Per identity pair, the impostor pairs of a split and those a threshold accepts
    (distance <= threshold; None or -inf accepts nothing)."""
    dist = _as_distmat(distances).astype(np.float64, copy=False)
    q = _as_ids(query_ids, "query_ids").tolist()
    g = _as_ids(gallery_ids, "gallery_ids").tolist()
    if dist.shape != (len(q), len(g)):
        raise ValueError(f"distances have shape {dist.shape}, but there are {len(q)} query and "
                         f"{len(g)} gallery ids")
    identities = tuple(sorted(set(q) | set(g), key=repr))
    where = {ident: i for i, ident in enumerate(identities)}
    qi = np.asarray([where[x] for x in q], dtype=np.int64)
    gi = np.asarray([where[x] for x in g], dtype=np.int64)
    impostor = qi[:, None] != gi[None, :]
    t = -np.inf if threshold is None else float(threshold)
    accepted = impostor & (dist <= t)
    cell = (qi[:, None] * len(identities) + gi[None, :])
    size = len(identities) ** 2
    shape = (len(identities), len(identities))
    return IdentityPairCounts(
        identities,
        np.bincount(cell[accepted], minlength=size).reshape(shape).astype(np.int64),
        np.bincount(cell[impostor], minlength=size).reshape(shape).astype(np.int64))


def identity_bootstrap_interval(counts: IdentityPairCounts, confidence: float = CONFIDENCE,
                                resamples: int = BOOTSTRAP_RESAMPLES,
                                seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile interval of the FAR when the *people* are resampled with replacement: a
    person drawn ``w`` times weighs each of their pairs by ``w`` (a pair of two drawn people by
    the product), so FAR* = w'Fw / w'Nw. Resamples with no impostor pair (every draw one
    person) are skipped."""
    n = len(counts.identities)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=int(resamples)).astype(np.float64)
    # w'Fw for every resample at once: one matrix product (BLAS), then a row-wise dot
    accepted = ((weights @ counts.false_accepts.astype(np.float64)) * weights).sum(axis=1)
    pairs = ((weights @ counts.impostor_pairs.astype(np.float64)) * weights).sum(axis=1)
    far = accepted[pairs > 0] / pairs[pairs > 0]
    if far.size == 0:
        return (counts.far, counts.far)
    half = 100 * (1.0 - confidence) / 2
    low, high = np.percentile(far, [half, 100 - half])
    return float(low), float(high)


def far_interval(counts: IdentityPairCounts, confidence: float = CONFIDENCE) -> dict:
    """The FAR of ``counts`` with its interval (module docstring), JSON-ready: ``far``,
    ``false_accepts``, ``impostor_pairs``, ``num_identities``, ``ci`` (the union of the two below),
    ``ci_binomial`` (Clopper–Pearson over pairs), ``ci_identity_bootstrap``, ``confidence``."""
    k, n = counts.total_false_accepts, counts.total_impostor_pairs
    if n == 0:
        raise ValueError("no impostor pair: a FAR needs pairs of two different people")
    binomial = clopper_pearson(k, n, confidence)
    bootstrap = identity_bootstrap_interval(counts, confidence)
    return {"far": k / n, "false_accepts": k, "impostor_pairs": n,
            "num_identities": len(counts.identities),
            "ci": [min(binomial[0], bootstrap[0]), max(binomial[1], bootstrap[1])],
            "ci_binomial": list(binomial), "ci_identity_bootstrap": list(bootstrap),
            "confidence": float(confidence)}


# --------------------------------------------------------------------------- too few pairs


def pairs_needed(far_target: float) -> int:
    """Impostor pairs for :data:`RULE_OF_30` expected false accepts at ``far_target``."""
    return math.ceil(RULE_OF_30 / float(far_target) - 1e-9)


def enough_pairs(impostor_pairs: int, far_target: float) -> bool:
    """Whether ``impostor_pairs * far_target`` reaches :data:`RULE_OF_30`."""
    return int(impostor_pairs) >= pairs_needed(far_target)


def too_few_pairs_warning(impostor_pairs: int, far_target: float, where: str) -> str | None:
    """None when there are enough impostor pairs for ``far_target``, else a warning naming
    the count, the rule and the fix."""
    if enough_pairs(impostor_pairs, far_target):
        return None
    expected = int(impostor_pairs) * float(far_target)
    return (f"too few impostor pairs for FAR {_pct(far_target)}: {int(impostor_pairs):,} on "
            f"{where} give {expected:.3g} expected false accepts, under the {RULE_OF_30} that pin "
            f"a FAR down to about ±30 % (rule of 30); its FAR on new people may be far from the "
            f"target. Fix: calibrate on more people (at least {pairs_needed(far_target):,} "
            f"impostor pairs), e.g. calibration_dir in the search notebook")


# --------------------------------------------------------------------------- calibration pairs


def query_gallery_split(indices: Sequence[int], label_of: Mapping[int, Hashable] | Sequence,
                        seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A query/gallery split of ``indices`` built like a test split: one gallery image per
    identity that has more than one (drawn by ``seed``), every other image a query. Returns
    (query, gallery), each sorted."""
    rng = np.random.default_rng([int(seed), 7])
    by_label: dict = {}
    for index in sorted(set(indices)):
        by_label.setdefault(label_of[index], []).append(index)
    gallery = sorted(int(rng.choice(v)) for v in by_label.values() if len(v) > 1)
    query = sorted(set(indices) - set(gallery))
    return tuple(query), tuple(gallery)


# --------------------------------------------------------------------------- the statement


def _pct(fraction: float) -> str:
    return f"{100 * float(fraction):.3g} %"


def _ci(interval: Sequence[float], confidence: float = CONFIDENCE) -> str:
    return f"{100 * confidence:.0f} % CI {_pct(interval[0])} – {_pct(interval[1])}"


def measured_text(m: Mapping[str, Any]) -> str:
    """One :func:`far_interval` record (plus ``tar`` when present) in words."""
    text = (f"FAR {_pct(m['far'])} ({m['false_accepts']:,} false accepts of "
            f"{m['impostor_pairs']:,} impostor pairs, {m['num_identities']} identities; "
            f"{_ci(m['ci'], m.get('confidence', CONFIDENCE))})")
    if m.get("tar") is not None:
        text += f", TAR {_pct(m['tar'])}"
    return text


def describe_open_set(open_set: Mapping[str, Any] | None) -> str:
    """Lines stating how far a run's open-set record (``metrics.json["open_set"]``) can be
    trusted: the identities and pairs it was calibrated on, its FAR there with the interval,
    the FAR on the never-trained test identities (measured, never used to choose), and the
    too-few-pairs warning. Records written before this module say what they lack."""
    if not open_set:
        return "no open-set threshold recorded"
    calibration = open_set.get("calibration")
    if not calibration:
        return ("calibrated before reliability was recorded (no identities kind, impostor "
                "pairs or interval): re-run the stage to record them")
    kind = calibration["identities"]
    lines = [f"calibrated for FAR {_pct(open_set['far_target'])} on {calibration['num_identities']} "
             f"{kind} identities ({open_set['calibrated_on']}): {measured_text(calibration)}"]
    if kind == FITTED:
        lines.append("  the model trained on these people; a stranger's impostor pairs lie "
                     "closer, so on new people the FAR is typically above the target")
    test = open_set.get("test")
    if test and test.get("pooled"):
        lines.append(f"on the test identities (never trained on, never used to choose it): "
                     f"{measured_text(test['pooled'])}, over {len(test['far_per_split'])} split(s)")
    if open_set.get("warning"):
        lines.append(f"WARNING: {open_set['warning']}")
    return "\n".join(lines)
