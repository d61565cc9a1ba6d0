"""Tests for handclip_nb.evaluate.verification (ROC, AUC, EER, TAR @ FAR, threshold calibration).

Every formula is compared with a slow, obvious reference written here (a loop over every
distinct distance as a threshold, counting accepted pairs), with scikit-learn's ``roc_curve`` /
``roc_auc_score`` on random data with ties, and with examples worked out by hand.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from handclip_nb.evaluate import verification as ver
from handclip_nb.evaluate.verification import (
    FAR_TARGETS, VERIFICATION_METRIC_NAMES, calibrate_threshold, eer, evaluate_verification,
    far_at_threshold, roc_auc, roc_points, summarise_verification, tar_at_far,
    verification_curve, verification_metrics,
)

# --------------------------------------------------------------------------- references


def reference_pairs(distances, query_ids, gallery_ids):
    """[(distance, is_genuine)] for every query-gallery pair."""
    return [(float(distances[i][j]), query_ids[i] == gallery_ids[j])
            for i in range(len(query_ids)) for j in range(len(gallery_ids))]


def reference_curve(distances, query_ids, gallery_ids):
    """(thresholds, FAR, TAR): every distinct distance as a threshold, plus -inf; accepts counted
    pair by pair."""
    pairs = reference_pairs(distances, query_ids, gallery_ids)
    n_genuine = sum(1 for _, genuine in pairs if genuine)
    n_impostor = len(pairs) - n_genuine
    thresholds = [-math.inf] + sorted({d for d, _ in pairs})
    far, tar = [], []
    for t in thresholds:
        far.append(sum(1 for d, genuine in pairs if d <= t and not genuine) / n_impostor)
        tar.append(sum(1 for d, genuine in pairs if d <= t and genuine) / n_genuine)
    return thresholds, far, tar


def reference_auc(distances, query_ids, gallery_ids):
    """P(genuine closer than impostor) + P(tie) / 2, over all genuine x impostor pairs."""
    pairs = reference_pairs(distances, query_ids, gallery_ids)
    gen = [d for d, g in pairs if g]
    imp = [d for d, g in pairs if not g]
    wins = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a in gen for b in imp)
    return wins / (len(gen) * len(imp))


def reference_eer(far, tar):
    """Walk the curve; at the first point with FRR <= FAR, interpolate linearly on the segment."""
    for k in range(len(far)):
        frr = 1 - tar[k]
        if frr == far[k]:
            return far[k]
        if frr < far[k]:
            before = (1 - tar[k - 1]) - far[k - 1]
            after = frr - far[k]
            lam = before / (before - after)
            return far[k - 1] + lam * (far[k] - far[k - 1])
    raise AssertionError("the curve never crosses FRR = FAR")


def reference_tar_at_far(thresholds, far, tar, target):
    """(threshold, FAR, TAR) of the largest threshold whose FAR <= target."""
    best = None
    for t, f, r in zip(thresholds, far, tar):
        if f <= target:
            best = (t, f, r)
    return best


def random_case(seed, num_query=12, num_gallery=15, num_ids=5, decimals=None):
    """Random distances (rounded to ``decimals`` to make ties) and random ids with at least one
    genuine and one impostor pair."""
    rng = np.random.default_rng(seed)
    while True:
        q = rng.integers(0, num_ids, num_query)
        g = rng.integers(0, num_ids, num_gallery)
        genuine = q[:, None] == g[None, :]
        if genuine.any() and not genuine.all():
            break
    # genuine pairs a little closer on average, so the curves are not trivial
    d = rng.random((num_query, num_gallery)) + 0.3 * ~genuine
    if decimals is not None:
        d = np.round(d, decimals)
    return d, q, g


CASES = [dict(seed=s, decimals=dec) for s in range(3) for dec in (None, 1, 2)]


# --------------------------------------------------------------------------- curve and AUC


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}-dec{c['decimals']}")
def test_curve_matches_slow_reference(case):
    d, q, g = random_case(**case)
    curve = verification_curve(d, q, g)
    thresholds, far, tar = reference_curve(d, q.tolist(), g.tolist())
    np.testing.assert_array_equal(curve.thresholds, thresholds)
    np.testing.assert_allclose(curve.far, far, rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve.tar, tar, rtol=0, atol=1e-15)
    assert curve.far[0] == curve.tar[0] == 0 and curve.far[-1] == curve.tar[-1] == 1
    assert curve.genuine_pairs == int((q[:, None] == g[None, :]).sum())
    assert curve.genuine_pairs + curve.impostor_pairs == d.size


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_curve_and_auc_match_sklearn_with_ties(seed, decimals):
    d, q, g = random_case(seed + 10, num_query=40, num_gallery=50, num_ids=8, decimals=decimals)
    genuine = (q[:, None] == g[None, :]).ravel()
    fpr, tpr, score_thresholds = roc_curve(genuine, -d.ravel(), drop_intermediate=False)
    curve = verification_curve(d, q, g)
    np.testing.assert_allclose(curve.far, fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve.tar, tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(curve.thresholds, -score_thresholds)  # score = -distance
    assert roc_auc(curve) == pytest.approx(roc_auc_score(genuine, -d.ravel()), abs=1e-12)


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: f"seed{c['seed']}-dec{c['decimals']}")
def test_auc_is_the_mann_whitney_probability(case):
    d, q, g = random_case(**case)
    assert roc_auc(verification_curve(d, q, g)) == pytest.approx(
        reference_auc(d, q.tolist(), g.tolist()), abs=1e-12)


def test_ids_of_any_kind_and_torch_float32_inputs():
    d, q, g = random_case(3, decimals=2)
    expected = verification_curve(d.astype(np.float32), q, g)
    as_strings = verification_curve(d.astype(np.float32), [f"p{i}" for i in q],
                                     [f"p{i}" for i in g])
    as_tuples = verification_curve(torch.from_numpy(d.astype(np.float32)),
                                   [("dorsal_r", int(i)) for i in q],
                                   [("dorsal_r", int(i)) for i in g])
    for other in (as_strings, as_tuples):
        np.testing.assert_array_equal(other.thresholds, expected.thresholds)
        np.testing.assert_array_equal(other.true_accepts, expected.true_accepts)
        np.testing.assert_array_equal(other.false_accepts, expected.false_accepts)


# --------------------------------------------------------------------------- EER


def hand_example():
    """One query (id 0) against 7 gallery items; pairs sorted by distance are
    G(0.1) I(0.2) G(0.3) I(0.4) G(0.5) I(0.6) I(0.7): 3 genuine, 4 impostor."""
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    return d, [0], [0, 1, 0, 2, 0, 3, 4]


def test_eer_hand_example():
    # (FAR, FRR) at t = 0.3 is (1/4, 1/3), at t = 0.4 is (1/2, 1/3): FRR - FAR goes from 1/12
    # to -1/6, lam = (1/12) / (1/12 + 1/6) = 1/3, EER = 1/4 + 1/3 * 1/4 = 1/3.
    assert eer(verification_curve(*hand_example())) == pytest.approx(1 / 3, abs=1e-15)


def test_eer_on_a_tie_group_is_random_acceptance_of_the_tie():
    # genuine 0.1, 0.3; impostor 0.3, 0.5.  At 0.1: FAR 0, FRR 1/2; at 0.3: FAR 1/2, FRR 0.
    # Accepting half of the tied pairs at 0.3 gives FAR = FRR = 1/4.
    d = np.array([[0.1, 0.3, 0.3, 0.5]])
    assert eer(verification_curve(d, [0], [0, 0, 1, 2])) == pytest.approx(0.25, abs=1e-15)


def test_eer_at_an_exact_crossing_point():
    # genuine 0.1, 0.3; impostor 0.2, 0.4: at t = 0.2 FAR = FRR = 1/2 exactly
    d = np.array([[0.1, 0.2, 0.3, 0.4]])
    assert eer(verification_curve(d, [0], [0, 1, 0, 2])) == 0.5


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}-dec{c['decimals']}")
def test_eer_matches_reference(case):
    d, q, g = random_case(**case)
    _, far, tar = reference_curve(d, q.tolist(), g.tolist())
    assert eer(verification_curve(d, q, g)) == pytest.approx(reference_eer(far, tar), abs=1e-12)


# --------------------------------------------------------------------------- TAR @ FAR


@pytest.mark.parametrize("target, threshold, far, tar, resolvable", [
    (0.2, 0.1, 0.0, 1 / 3, False),   # 1/4 > 0.2: no false accept allowed; FAR-0 point
    (0.25, 0.3, 0.25, 2 / 3, True),  # one false accept (0.2) allowed; 0.3 adds a genuine
    (0.4, 0.3, 0.25, 2 / 3, True),   # 0.4 would make FAR 1/2
    (0.5, 0.5, 0.5, 1.0, True),      # the largest threshold with FAR 1/2 is 0.5, not 0.4
    (1.0, 0.7, 1.0, 1.0, True),
])
def test_tar_at_far_hand_example(target, threshold, far, tar, resolvable):
    point = tar_at_far(verification_curve(*hand_example()), target)
    assert point.threshold == threshold
    assert point.far == pytest.approx(far, abs=1e-15)
    assert point.tar == pytest.approx(tar, abs=1e-15)
    assert point.resolvable is resolvable
    assert point.far_target == target


def test_tar_at_far_is_zero_when_the_closest_pair_is_an_impostor():
    # two of three impostors tied at the smallest distance: FAR 2/3 there, above the target
    point = tar_at_far(verification_curve(np.array([[0.1, 0.1, 0.2, 0.3]]), [0], [1, 2, 0, 3]),
                       0.5)
    assert point.threshold == -math.inf and point.far == 0 and point.tar == 0
    assert point.resolvable  # 1/3 <= 0.5: the target is resolvable, just not reached
    single = tar_at_far(verification_curve(np.array([[0.1, 0.2]]), [0], [1, 0]), 0.5)
    assert single.tar == 0 and not single.resolvable  # one impostor pair: FAR is 0 or 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}-dec{c['decimals']}")
@pytest.mark.parametrize("target", [1e-3, 1e-2, 0.05, 0.1, 0.3, 0.9])
def test_tar_at_far_matches_reference(case, target):
    d, q, g = random_case(**case)
    thresholds, far, tar = reference_curve(d, q.tolist(), g.tolist())
    point = tar_at_far(verification_curve(d, q, g), target)
    ref_threshold, ref_far, ref_tar = reference_tar_at_far(thresholds, far, tar, target)
    assert point.threshold == ref_threshold
    assert point.far == pytest.approx(ref_far, abs=1e-15)
    assert point.tar == pytest.approx(ref_tar, abs=1e-15)
    num_impostor = sum(1 for _, genuine in reference_pairs(d, q, g) if not genuine)
    assert point.resolvable == (num_impostor * target >= 1)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_far_target_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match="FAR target"):
        tar_at_far(verification_curve(*hand_example()), bad)


# --------------------------------------------------------------------------- limiting cases


def test_perfect_separation():
    rng = np.random.default_rng(0)
    q, g = np.arange(30) % 10, np.arange(10)
    genuine = q[:, None] == g[None, :]
    d = np.where(genuine, rng.random((30, 10)) * 0.4, 0.5 + rng.random((30, 10)))
    m = verification_metrics(d, q, g)
    assert m["roc_auc"] == 100.0 and m["eer"] == 0.0
    assert m["tar_at_far1e-2"] == 100.0 and m["tar_at_far1e-3"] == 100.0
    # 270 impostor pairs: 1e-2 is resolvable, 1e-3 is not (still reported)
    assert m["resolvable"] == {"tar_at_far1e-2": True, "tar_at_far1e-3": False}


def test_identical_distributions_give_chance():
    q, g = np.arange(20) % 5, np.arange(5)
    constant = verification_metrics(np.full((20, 5), 0.7), q, g)
    assert constant["roc_auc"] == 50.0 and constant["eer"] == 50.0
    assert constant["tar_at_far1e-2"] == 0.0  # the single tie group has FAR 1
    rng = np.random.default_rng(1)
    q, g = rng.integers(0, 20, 300), rng.integers(0, 20, 200)
    random = verification_metrics(rng.random((300, 200)), q, g)  # ~3,000 genuine, 57,000 impostor
    assert random["roc_auc"] == pytest.approx(50, abs=3)
    assert random["eer"] == pytest.approx(50, abs=3)


def test_inverted_scores_give_auc_zero():
    q, g = np.arange(6) % 3, np.arange(3)
    genuine = q[:, None] == g[None, :]
    m = verification_metrics(np.where(genuine, 0.9, 0.1), q, g)
    assert m["roc_auc"] == 0.0 and m["eer"] == 100.0


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}-dec{c['decimals']}")
@pytest.mark.parametrize("target", [1e-2, 0.05, 0.2, 0.5])
def test_calibrated_threshold_is_the_largest_within_the_target(case, target):
    d, q, g = random_case(**case)
    point = calibrate_threshold(d, q, g, far=target)
    pairs = reference_pairs(d, q, g)
    impostor = [x for x, genuine in pairs if not genuine]
    genuine = [x for x, is_genuine in pairs if is_genuine]
    assert point.far <= target
    assert point.far == sum(x <= point.threshold for x in impostor) / len(impostor)
    assert point.tar == sum(x <= point.threshold for x in genuine) / len(genuine)
    looser = [x for x, _ in pairs if x > point.threshold]
    if looser:  # the next observed distance would accept too many impostors
        assert sum(x <= min(looser) for x in impostor) / len(impostor) > target
    assert (point.genuine_pairs, point.impostor_pairs) == (len(genuine), len(impostor))


def test_far_at_threshold_agrees_with_every_curve_point():
    d, q, g = random_case(5, decimals=2)
    curve = verification_curve(d, q, g)
    for k, t in enumerate(curve.thresholds):
        point = far_at_threshold(d, q, g, t)
        assert point.far == curve.far[k] and point.tar == curve.tar[k]
        assert point.far_target is None and point.resolvable is None
    between = far_at_threshold(d, q, g, (curve.thresholds[3] + curve.thresholds[4]) / 2)
    assert (between.far, between.tar) == (curve.far[3], curve.tar[3])


def test_calibration_round_trips_through_json_onto_other_identities():
    d, q, g = random_case(6, num_query=30, num_gallery=30, decimals=2)
    stored = json.loads(json.dumps(calibrate_threshold(d, q, g, far=0.1).to_dict(),
                                   allow_nan=False))
    assert set(stored) == {"threshold", "far_target", "far_measured", "tar_measured", "pairs",
                           "resolvable"}
    assert stored["far_target"] == 0.1 and stored["pairs"]["impostor"] > 0
    other_d, other_q, other_g = random_case(7, num_query=30, num_gallery=30, decimals=2)
    measured = far_at_threshold(other_d, other_q, other_g, stored["threshold"])
    expected = reference_curve(other_d, other_q.tolist(), other_g.tolist())
    k = max(i for i, t in enumerate(expected[0]) if t <= stored["threshold"])
    assert measured.far == pytest.approx(expected[1][k]) and measured.tar == pytest.approx(
        expected[2][k])
    assert set(measured.to_dict()) == {"threshold", "far_measured", "tar_measured", "pairs"}


def test_threshold_below_every_pair_is_stored_as_none_and_read_back():
    # two impostors tied at the smallest distance: FAR 1/2 there, above a target of 1/4
    d = np.array([[0.1, 0.1, 0.2, 0.3, 0.4]])
    q, g = [0], [1, 2, 0, 3, 4]
    point = calibrate_threshold(d, q, g, far=0.25)
    assert point.threshold == -math.inf and point.resolvable
    record = point.to_dict()
    assert record["threshold"] is None and record["far_measured"] == 0.0
    again = far_at_threshold(d, q, g, record["threshold"])
    assert (again.far, again.tar) == (0.0, 0.0)


# --------------------------------------------------------------------------- bad inputs


def test_no_genuine_pair_is_a_clear_error():
    with pytest.raises(ValueError, match="no genuine pair"):
        verification_curve(np.random.default_rng(0).random((3, 4)), [0, 1, 2], [3, 4, 5, 6])
    with pytest.raises(ValueError, match="no genuine pair"):
        calibrate_threshold(np.zeros((2, 2)), [0, 1], [2, 3], far=0.1)


def test_no_impostor_pair_is_a_clear_error():
    with pytest.raises(ValueError, match="no impostor pair"):
        verification_curve(np.random.default_rng(0).random((3, 2)), [7, 7, 7], [7, 7])
    with pytest.raises(ValueError, match="no impostor pair"):
        far_at_threshold(np.zeros((1, 1)), [0], [0], threshold=0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_distances_are_refused(bad):
    d, q, g = hand_example()
    d = d.copy()
    d[0, 2] = bad
    with pytest.raises(ValueError, match="finite"):
        verification_curve(d, q, g)


def test_shape_mismatch_is_refused():
    d, q, g = hand_example()
    with pytest.raises(ValueError, match="shape mismatch"):
        verification_curve(d, q + [1], g)
    with pytest.raises(ValueError, match="threshold is NaN"):
        far_at_threshold(d, q, g, float("nan"))


# --------------------------------------------------------------------------- per split, summary


def test_verification_metrics_keys_and_percent():
    d, q, g = random_case(0, decimals=2)
    m = verification_metrics(d, q, g)
    assert list(m) == [*VERIFICATION_METRIC_NAMES, "pairs", "resolvable"]
    assert VERIFICATION_METRIC_NAMES == ("roc_auc", "eer", "tar_at_far1e-2", "tar_at_far1e-3")
    curve = verification_curve(d, q, g)
    assert m["roc_auc"] == pytest.approx(100 * roc_auc(curve))
    assert m["eer"] == pytest.approx(100 * eer(curve))
    for target in FAR_TARGETS:
        assert m[ver.tar_key(target)] == pytest.approx(100 * tar_at_far(curve, target).tar)
    assert m["pairs"] == {"genuine": curve.genuine_pairs, "impostor": curve.impostor_pairs}
    custom = verification_metrics(d, q, g, far_targets=(0.05,))
    assert "tar_at_far5e-2" in custom and "tar_at_far1e-2" not in custom


def test_summary_has_the_reid_summary_shape():
    splits = [verification_metrics(*random_case(s, decimals=2)) for s in range(3)]
    summary = summarise_verification(splits)
    assert list(summary) == list(VERIFICATION_METRIC_NAMES)
    for name, block in summary.items():
        values = [s[name] for s in splits]
        assert set(block) == {"mean", "std", "per_split"}
        assert block["per_split"] == values
        assert block["mean"] == pytest.approx(np.mean(values))
        assert block["std"] == pytest.approx(np.std(values, ddof=1))
    single = summarise_verification(splits[:1])
    assert all(block["std"] == 0.0 for block in single.values())


def test_evaluate_verification_over_splits():
    cases = [random_case(s, num_query=60, num_gallery=80, num_ids=10, decimals=3)
             for s in range(3)]
    result = evaluate_verification(c for c in cases)  # a generator, as a caller would pass
    assert result.summary == summarise_verification([verification_metrics(*c) for c in cases])
    first = verification_curve(*cases[0])
    assert result.roc == roc_points(first)
    record = json.loads(json.dumps(result.record(), allow_nan=False))
    assert set(record) == {"metrics", "pairs", "resolvable", "roc_first_split"}
    assert record["pairs"]["genuine"] == [s["pairs"]["genuine"] for s in result.splits]
    assert record["resolvable"] == {"tar_at_far1e-2": True, "tar_at_far1e-3": True}
    with pytest.raises(ValueError, match="empty"):
        evaluate_verification([])


def test_roc_points_are_few_true_points_of_the_curve():
    d, q, g = random_case(8, num_query=80, num_gallery=100, num_ids=10)  # ~8,000 curve points
    curve = verification_curve(d, q, g)
    assert curve.thresholds.shape[0] > 1000
    points = roc_points(curve, max_points=200)
    assert 100 < len(points["far"]) <= 200
    assert (points["far"][0], points["tar"][0], points["threshold"][0]) == (0.0, 0.0, None)
    assert (points["far"][-1], points["tar"][-1]) == (1.0, 1.0)
    index = {t: k for k, t in enumerate(curve.thresholds.tolist())}
    for far, tar, t in zip(points["far"][1:], points["tar"][1:], points["threshold"][1:]):
        k = index[t]
        assert (far, tar) == (curve.far[k], curve.tar[k])
    assert np.all(np.diff(points["far"]) >= 0) and np.all(np.diff(points["tar"]) >= 0)
    # the log-spaced half reaches the low-FAR end: a point below FAR 1e-3
    assert any(0 < f < 1e-3 for f in points["far"])
    small = verification_curve(*hand_example())
    assert len(roc_points(small)["far"]) == small.thresholds.shape[0]


def test_public_names_are_exported_lazily():
    import handclip_nb.evaluate as evaluate

    for name in ("verification_curve", "roc_auc", "eer", "tar_at_far", "verification_metrics",
                 "summarise_verification", "evaluate_verification", "calibrate_threshold",
                 "far_at_threshold", "roc_points"):
        assert getattr(evaluate, name) is getattr(ver, name)


# --------------------------------------------------------------------------- bounded memory
#
# The previous implementation (before issue 19) held every pair at once: a float64 copy of the
# matrix, a (num_query, num_gallery) genuine mask and two full sorts.  It is kept here, verbatim
# but for its input checks, as the reference the streamed implementation must equal exactly.


def all_pairs_curve(distances, query_ids, gallery_ids):
    """The ROC from one sort of all pairs at once (the implementation before issue 19)."""
    dist = np.asarray(distances)
    q, g = np.asarray(query_ids), np.asarray(gallery_ids)
    flat = dist.astype(np.float64, copy=False).ravel()
    genuine = (q[:, None] == g[None, :]).ravel()
    sorted_dist = np.sort(flat)
    sorted_genuine = np.sort(flat[genuine])
    group_ends = np.flatnonzero(np.r_[sorted_dist[1:] != sorted_dist[:-1], True])
    true_accepts = np.searchsorted(sorted_genuine, sorted_dist[group_ends], side="right")
    false_accepts = group_ends + 1 - true_accepts
    return ver.VerificationCurve(
        thresholds=np.r_[-np.inf, sorted_dist[group_ends]],
        true_accepts=np.r_[np.int64(0), true_accepts].astype(np.int64),
        false_accepts=np.r_[np.int64(0), false_accepts].astype(np.int64),
        genuine_pairs=int(true_accepts[-1]), impostor_pairs=int(false_accepts[-1]))


def all_pairs_metrics(curve, far_targets=FAR_TARGETS):
    """verification_metrics as it was: the metric functions on the whole curve."""
    out = {"roc_auc": 100 * roc_auc(curve), "eer": 100 * eer(curve)}
    for target in far_targets:
        out[ver.tar_key(target)] = 100 * tar_at_far(curve, target).tar
    out["pairs"] = {"genuine": curve.genuine_pairs, "impostor": curve.impostor_pairs}
    out["resolvable"] = {ver.tar_key(t): tar_at_far(curve, t).resolvable for t in far_targets}
    return out


def assert_same_curve(got, want):
    np.testing.assert_array_equal(got.thresholds, want.thresholds)
    np.testing.assert_array_equal(got.true_accepts, want.true_accepts)
    np.testing.assert_array_equal(got.false_accepts, want.false_accepts)
    assert (got.genuine_pairs, got.impostor_pairs) == (want.genuine_pairs, want.impostor_pairs)


def tied_case(seed, num_query, num_gallery, num_ids, levels, dtype=np.float64):
    """Distances on ``levels`` quantisation steps (many ties), some negative and some -0.0."""
    d, q, g = random_case(seed, num_query, num_gallery, num_ids)
    d = np.round((d - 0.1) * levels) / levels
    d[np.random.default_rng(seed).random(d.shape) < 0.05] = -0.0
    return d.astype(dtype), q, g


# small batches make the same data go through many batches, oversized key bins refined by
# further histograms, and tie groups larger than a batch (read without being extracted)
BATCHES = [None, 2, 7, 64, 1000]
EXACT_CASES = (
    [dict(kind="random", seed=s, decimals=dec) for s in range(3) for dec in (None, 1, 2)]
    + [dict(kind="tied", seed=s, levels=lv, dtype=dt) for s in range(2) for lv in (3, 40, 1000)
       for dt in (np.float32, np.float64)])


def exact_case(kind, seed, **kw):
    if kind == "random":
        return random_case(seed, num_query=30, num_gallery=40, num_ids=6, **kw)
    return tied_case(seed, 30, 40, 6, **kw)


@pytest.mark.parametrize("batch_pairs", BATCHES)
@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: "-".join(
    f"{k}{getattr(v, '__name__', v)}" for k, v in c.items()))
def test_streamed_results_equal_the_all_pairs_implementation(case, batch_pairs):
    d, q, g = exact_case(**case)
    want = all_pairs_curve(d, q, g)
    assert_same_curve(verification_curve(d, q, g, batch_pairs=batch_pairs), want)
    targets = (1e-3, 1e-2, 0.05, 0.3, 1.0)
    assert verification_metrics(d, q, g, targets, batch_pairs=batch_pairs) == all_pairs_metrics(
        want, targets)
    for target in (1e-2, 0.2):
        assert calibrate_threshold(d, q, g, target, batch_pairs=batch_pairs) == tar_at_far(
            want, target)
    result = evaluate_verification([(d, q, g)], max_curve_points=20, batch_pairs=batch_pairs)
    assert result.roc == roc_points(want, 20)
    assert result.splits == [all_pairs_metrics(want)]


def test_streamed_results_equal_the_all_pairs_implementation_on_a_2k_split():
    rng = np.random.default_rng(19)
    num_ids = 500
    centres = rng.normal(size=(num_ids, 16))
    q, g = rng.integers(0, num_ids, 2000), rng.integers(0, num_ids, 2100)
    qf = centres[q] + 0.8 * rng.normal(size=(2000, 16))
    gf = centres[g] + 0.8 * rng.normal(size=(2100, 16))
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    d = (1.0 - qf @ gf.T).astype(np.float32)  # the evaluation's dtype: float32 ties included
    want = all_pairs_curve(d, q, g)
    assert want.thresholds.shape[0] < d.size  # float32 cosines do tie
    expected = all_pairs_metrics(want)
    expected_roc = roc_points(want)
    # one batch (the default) and about fifteen (the path of a 20k x 20k split)
    for batch_pairs in (None, 300_000):
        result = evaluate_verification([(d, q, g)], batch_pairs=batch_pairs)
        assert result.splits == [expected]
        assert result.roc == expected_roc
    assert_same_curve(verification_curve(d, q, g, batch_pairs=300_000), want)


def test_verification_memory_stays_bounded_beyond_the_distances():
    import tracemalloc

    num_query, num_gallery = 3000, 3000
    rng = np.random.default_rng(3)
    d = rng.random((num_query, num_gallery), dtype=np.float32)
    q, g = rng.integers(0, 300, num_query), rng.integers(0, 300, num_gallery)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        verification_metrics(d, q, g)
        default_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        verification_metrics(d, q, g, batch_pairs=1 << 20)
        batched_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the all-pairs implementation peaks near 8 x the float32 matrix (a float64 copy, its sort,
    # the curve arrays); one batch here holds the values once, sorted in place
    assert default_peak < 2 * d.nbytes, default_peak / 2**20
    # a million pairs per batch: a few tens of MB whatever the matrix (36 MB here)
    assert batched_peak < 40 * 2**20, batched_peak / 2**20


@pytest.mark.parametrize("bad", [0, 1, 2.5, True])
def test_batch_pairs_must_be_an_integer_of_at_least_two(bad):
    d, q, g = hand_example()
    with pytest.raises(ValueError, match="batch_pairs"):
        verification_metrics(d, q, g, batch_pairs=bad)
