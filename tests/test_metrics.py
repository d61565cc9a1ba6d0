"""Tests for handclip_nb.evaluate.rank_metrics (CMC / mAP / mAP_mbanet / mINP).

The fast, vectorised implementation is compared with a slow, obvious
per-query reference written here: stable argsort of each row (tie rule:
distance, then gallery index), then a walk down the ranked list.
"""
import numpy as np
import pytest
import torch

import handclip_nb.evaluate.metrics as metrics_mod
from handclip_nb.evaluate import rank_metrics


# --------------------------------------------------------------------------- reference


def reference_rank_metrics(distmat, query_ids, gallery_ids, max_rank=50):
    """Slow per-query reference: stable argsort, then walk the ranked list.

    Both APs: standard (mean precision at each match, averaged over valid queries) and
    MBA-Net's trapezoid (mean of the precisions just before and at each match, summed over
    valid queries and divided by all queries, skipped ones included).
    """
    distmat = np.asarray(distmat)
    all_cmc, all_ap, all_trap, all_inp = [], [], [], []
    skipped = 0
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        matches = [gallery_ids[j] == query_ids[i] for j in order]
        n_true = sum(matches)
        if n_true == 0:
            skipped += 1
            continue
        hits, ap, trap, first, last = 0, 0.0, 0.0, None, None
        for rank, is_match in enumerate(matches, start=1):
            if not is_match:
                continue
            hits += 1
            precision = hits / rank
            ap += precision
            before = (hits - 1) / (rank - 1) if rank > 1 else 1.0
            trap += (precision + before) / 2
            if first is None:
                first = rank
            last = rank
        all_ap.append(ap / n_true)
        all_trap.append(trap / n_true)
        all_inp.append(n_true / last)
        all_cmc.append([1.0 if first <= k else 0.0 for k in range(1, max_rank + 1)])
    if not all_cmc:
        raise ValueError("no valid query")
    return {
        "cmc": np.mean(all_cmc, axis=0),
        "mAP": float(np.mean(all_ap)),
        "mAP_mbanet": float(np.sum(all_trap) / distmat.shape[0]),
        "mINP": float(np.mean(all_inp)),
        "num_queries": len(all_cmc),
        "num_skipped": skipped,
    }


def mbanet_compute_map(distmat, query_ids, gallery_ids):
    """MBA-Net's mAP transcribed from its code (utils/evaluation_metrics.py:27-77 of
    nathanlem1/MBA-Net: 0-based ``rows_good``, ``d_recall``, ``old_precision``; the sum over
    queries divided by *all* queries), ranking with our tie rule (stable argsort of the
    distances) instead of its reversed quicksort of similarities."""
    distmat = np.asarray(distmat)
    gallery_ids = np.asarray(gallery_ids)
    total = 0.0
    for i in range(distmat.shape[0]):
        index = np.argsort(distmat[i], kind="stable")
        good_index = np.flatnonzero(gallery_ids == query_ids[i])
        if good_index.size == 0:  # compute_mAP returns ap = 0, cmc[0] = -1: skipped in the sum
            continue
        rows_good = np.flatnonzero(np.isin(index, good_index))
        ngood = len(good_index)
        ap = 0.0
        for k in range(ngood):
            d_recall = 1.0 / ngood
            precision = (k + 1) * 1.0 / (rows_good[k] + 1)
            old_precision = k * 1.0 / rows_good[k] if rows_good[k] != 0 else 1.0
            ap = ap + d_recall * (old_precision + precision) / 2
        total += ap
    return total / distmat.shape[0]  # compute_CMC_mAP: ap / len(query_label)


def assert_same(got, want):
    assert got["num_queries"] == want["num_queries"]
    assert got["num_skipped"] == want["num_skipped"]
    assert got["cmc"].dtype == np.float64
    assert got["cmc"].shape == want["cmc"].shape
    np.testing.assert_allclose(got["cmc"], want["cmc"], rtol=0, atol=1e-12)
    assert got["mAP"] == pytest.approx(want["mAP"], rel=1e-12, abs=1e-12)
    assert got["mAP_mbanet"] == pytest.approx(want["mAP_mbanet"], rel=1e-12, abs=1e-12)
    assert got["mINP"] == pytest.approx(want["mINP"], rel=1e-12, abs=1e-12)


def random_case(rng):
    """A random problem: small id alphabets (many matches), absent ids, ties."""
    nq = int(rng.integers(1, 30))
    ng = int(rng.integers(1, 60))
    n_ids = int(rng.integers(1, 12))
    gallery_ids = rng.integers(0, n_ids, ng)
    query_ids = rng.integers(0, n_ids + 3, nq)  # ids >= n_ids never match
    kind = rng.integers(0, 4)
    if kind == 0:  # integer-valued distances: lots of ties
        distmat = rng.integers(0, 4, (nq, ng)).astype(np.float64)
    elif kind == 1:  # continuous float32
        distmat = rng.random((nq, ng), dtype=np.float32)
    elif kind == 2:  # integer dtype
        distmat = rng.integers(-3, 3, (nq, ng))
    else:  # float64 with some repeated values and infinities
        distmat = np.round(rng.random((nq, ng)), 1)
        distmat[rng.random((nq, ng)) < 0.05] = np.inf
        distmat[rng.random((nq, ng)) < 0.02] = -np.inf
    max_rank = int(rng.integers(1, 80))
    return distmat, query_ids, gallery_ids, max_rank


@pytest.fixture(params=["auto", "always_sort", "always_compare"])
def path(request, monkeypatch):
    """Run a test through each internal strategy."""
    if request.param == "always_sort":
        monkeypatch.setattr(metrics_mod, "_MAX_COMPARE_SLOTS", 0)
    elif request.param == "always_compare":
        monkeypatch.setattr(metrics_mod, "_MAX_COMPARE_SLOTS", 10**9)
    return request.param


# --------------------------------------------------------------------------- random vs reference


def test_random_cases_match_reference(path):
    """120 random problems per strategy: ties (integer-valued and rounded distances, ±inf),
    queries without a match, several matches per query; both APs in the one call."""
    rng = np.random.default_rng(12345)
    checked = with_skipped = with_ties = 0
    for _ in range(120):
        distmat, q, g, max_rank = random_case(rng)
        chunk_rows = [None, 1, 4][int(rng.integers(0, 3))]
        try:
            want = reference_rank_metrics(distmat, q, g, max_rank)
        except ValueError:
            with pytest.raises(ValueError, match="no valid query"):
                rank_metrics(distmat, q, g, max_rank, chunk_rows=chunk_rows)
            continue
        got = rank_metrics(distmat, q, g, max_rank=max_rank, chunk_rows=chunk_rows)
        assert_same(got, want)
        checked += 1
        with_skipped += want["num_skipped"] > 0
        with_ties += any(len(np.unique(row)) < len(row) for row in np.asarray(distmat))
    assert checked > 80 and with_skipped > 20 and with_ties > 40


@pytest.mark.parametrize("matches_per_query", [1, 2, 3, 10])
def test_larger_cases_match_reference(path, matches_per_query):
    """Gallery with `matches_per_query` images of each identity (1 = the 11k protocol)."""
    rng = np.random.default_rng(matches_per_query)
    n_ids = 40
    g = np.repeat(np.arange(n_ids), matches_per_query)
    rng.shuffle(g)
    q = rng.integers(0, n_ids + 5, 60)
    for distmat in (rng.random((60, g.size)), rng.integers(0, 6, (60, g.size)).astype(np.float32)):
        want = reference_rank_metrics(distmat, q, g, 50)
        assert_same(rank_metrics(distmat, q, g), want)
        assert_same(rank_metrics(distmat, q, g, chunk_rows=7), want)


def test_trapezoid_matches_mbanet_code():
    """``mAP_mbanet`` equals MBA-Net's compute_CMC_mAP transcribed (skipped queries in the
    denominator), on random problems with ties and queries without a match."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(200):
        distmat, q, g, _ = random_case(rng)
        if not np.isin(q, g).any():
            continue
        got = rank_metrics(distmat, q, g)
        assert got["mAP_mbanet"] == pytest.approx(mbanet_compute_map(distmat, q, g),
                                                  rel=1e-12, abs=1e-15)
        checked += 1
    assert checked > 150


def test_single_match_trapezoid_is_mean_of_map_and_rank1():
    """One true match per query, none skipped (the 11k and HD protocols): the trapezoid AP is
    1 at rank 1 and 1/(2r) after it, so mAP_mbanet = (mAP + rank-1) / 2 exactly."""
    rng = np.random.default_rng(5)
    g = rng.permutation(30)
    q = rng.integers(0, 30, 200)
    out = rank_metrics(rng.random((200, 30)), q, g)
    assert out["mAP_mbanet"] == pytest.approx((out["mAP"] + out["cmc"][0]) / 2, rel=1e-12)
    assert out["mAP_mbanet"] < out["mAP"]


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(3)
    distmat = rng.integers(0, 5, (25, 40)).astype(np.float32)
    q = rng.integers(0, 8, 25)
    g = rng.integers(0, 8, 40)
    want = rank_metrics(distmat, q, g)
    for tensor in (torch.from_numpy(distmat), torch.from_numpy(distmat).double(),
                   torch.from_numpy(distmat).half(), torch.from_numpy(distmat).requires_grad_()):
        assert_same(rank_metrics(tensor, torch.from_numpy(q), torch.from_numpy(g)), want)
    assert_same(rank_metrics(distmat, q.tolist(), g.tolist()), want)


def test_non_contiguous_inputs():
    rng = np.random.default_rng(11)
    distmat = rng.integers(0, 4, (30, 20)).astype(np.float64)
    q = rng.integers(0, 5, 30)
    g = rng.integers(0, 5, 20)
    want = reference_rank_metrics(distmat, q, g)
    assert_same(rank_metrics(np.asfortranarray(distmat), q, g), want)
    assert_same(rank_metrics(torch.from_numpy(distmat.T.copy()).t(), q, g), want)
    wide = np.repeat(distmat, 2, axis=1)[:, ::2]  # strided view with the same values
    assert_same(rank_metrics(wide, q[::1], np.repeat(g, 2)[::2]), want)


# --------------------------------------------------------------------------- hand examples


def test_hand_example_1x5():
    # Ranked list: g1 (0.1, id 1), g3 (0.2, id 2), g4 (0.3, id 7), g2 (0.4, id 7), g0 (0.5, id 7)
    # -> the three true matches sit at ranks 3, 4, 5.
    distmat = np.array([[0.5, 0.1, 0.4, 0.2, 0.3]])
    out = rank_metrics(distmat, [7], [7, 1, 7, 2, 7], max_rank=6)
    np.testing.assert_array_equal(out["cmc"], [0, 0, 1, 1, 1, 1])
    assert out["mAP"] == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3)  # 43/90
    assert out["mAP"] == pytest.approx(43 / 90)
    assert out["mINP"] == pytest.approx(3 / 5)
    assert (out["num_queries"], out["num_skipped"]) == (1, 0)
    # trapezoid: (p_i + q_i)/2 with p = 1/3, 2/4, 3/5 and q = 0/2, 1/3, 2/4
    assert out["mAP_mbanet"] == pytest.approx(
        ((1 / 3 + 0) / 2 + (2 / 4 + 1 / 3) / 2 + (3 / 5 + 2 / 4) / 2) / 3)
    assert out["mAP_mbanet"] == pytest.approx(17 / 45)


def _one_query(ranks, size=12):
    """One query (id 1) whose true matches sit at the given 1-based ranks (distance = rank)."""
    gallery = [1 if r in ranks else 2 for r in range(1, size + 1)]
    return rank_metrics([list(range(1, size + 1))], [1], gallery, max_rank=size)


@pytest.mark.parametrize("rank, standard, trapezoid", [
    (1, 1.0, 1.0),        # (1 + 1)/2
    (2, 1 / 2, 1 / 4),    # (0/1 + 1/2)/2
    (3, 1 / 3, 1 / 6),    # (0/2 + 1/3)/2
    (10, 1 / 10, 1 / 20),  # (0/9 + 1/10)/2
])
def test_worked_example_single_match(rank, standard, trapezoid):
    out = _one_query({rank})
    assert out["mAP"] == pytest.approx(standard, rel=1e-15)
    assert out["mAP_mbanet"] == pytest.approx(trapezoid, rel=1e-15)


@pytest.mark.parametrize("ranks, standard, trapezoid", [
    ({1, 3}, 5 / 6, 19 / 24),      # standard (1 + 2/3)/2; trapezoid ((1+1)/2 + (1/2 + 2/3)/2)/2
    ({2, 3}, 7 / 12, 5 / 12),      # standard (1/2 + 2/3)/2; trapezoid ((0 + 1/2)/2 + (1/2 + 2/3)/2)/2
    ({1, 2, 3}, 1.0, 1.0),
    ({3, 4, 5}, 43 / 90, 17 / 45),
])
def test_worked_example_several_matches(ranks, standard, trapezoid):
    out = _one_query(ranks)
    assert out["mAP"] == pytest.approx(standard, rel=1e-15)
    assert out["mAP_mbanet"] == pytest.approx(trapezoid, rel=1e-15)


def test_tie_rule_is_distance_then_gallery_index():
    # Three items tied at 0.2: order g0 (id 5), g1 (id 9), g3 (id 9); g2 (0.1) first.
    out = rank_metrics([[0.2, 0.2, 0.1, 0.2]], [9], [5, 9, 5, 9], max_rank=4)
    np.testing.assert_array_equal(out["cmc"], [0, 0, 1, 1])  # first match at rank 3
    assert out["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert out["mINP"] == pytest.approx(2 / 4)
    # A true match tied with a distractor of larger index wins the tie.
    out = rank_metrics([[0.3, 0.3]], [1], [1, 2], max_rank=2)
    np.testing.assert_array_equal(out["cmc"], [1, 1])
    out = rank_metrics([[0.3, 0.3]], [1], [2, 1], max_rank=2)
    np.testing.assert_array_equal(out["cmc"], [0, 1])
    assert out["mAP"] == pytest.approx(0.5)


def test_skipped_queries_and_padding():
    distmat = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.5, 0.5, 0.5]])
    out = rank_metrics(distmat, [1, 2, 42], [2, 1, 2], max_rank=10)
    # query 0 (id 1): match g1 at rank 2; query 1 (id 2): g2 rank 1, g0 rank 3; query 2 skipped.
    assert (out["num_queries"], out["num_skipped"]) == (2, 1)
    np.testing.assert_allclose(out["cmc"], [0.5] + [1.0] * 9)  # padded with CMC[2] = 1.0
    assert out["cmc"].shape == (10,)
    assert out["mAP"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)
    assert out["mINP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # MBA-Net: trapezoid APs 1/4 and 19/24, summed and divided by all three queries
    assert out["mAP_mbanet"] == pytest.approx((1 / 4 + 19 / 24) / 3)
    assert out["mAP_mbanet"] == pytest.approx(25 / 72)


def test_perfect_and_worst_rankings():
    q = np.arange(5)
    g = np.arange(5)
    best = rank_metrics(1.0 - np.eye(5), q, g, max_rank=5)
    assert best["mAP"] == best["mAP_mbanet"] == best["mINP"] == 1.0
    np.testing.assert_array_equal(best["cmc"], np.ones(5))
    worst = rank_metrics(np.eye(5), q, g, max_rank=5)
    np.testing.assert_array_equal(worst["cmc"], [0, 0, 0, 0, 1])
    assert worst["mAP"] == pytest.approx(0.2)
    assert worst["mAP_mbanet"] == pytest.approx(0.1)  # every match at rank 5: 1/(2*5)
    assert worst["mINP"] == pytest.approx(0.2)


def test_non_integer_ids():
    distmat = np.array([[0.1, 0.2, 0.3]])
    out_int = rank_metrics(distmat, [0], [1, 0, 0])
    out_str = rank_metrics(distmat, ["b"], ["a", "b", "b"])
    out_obj = rank_metrics(distmat, [("p", 1)], [("p", 2), ("p", 1), ("p", 1)])
    for out in (out_str, out_obj):
        assert_same(out, out_int)
    assert out_int["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_result_types():
    out = rank_metrics(np.random.default_rng(0).random((4, 6)), [0, 1, 2, 3], [0, 1, 2, 3, 0, 1])
    assert set(out) == {"cmc", "mAP", "mAP_mbanet", "mINP", "num_queries", "num_skipped"}
    assert all(type(out[k]) is float for k in ("mAP", "mAP_mbanet", "mINP"))
    assert type(out["num_queries"]) is int and type(out["num_skipped"]) is int
    assert out["cmc"].shape == (50,) and np.all(np.diff(out["cmc"]) >= 0)


# --------------------------------------------------------------------------- errors


def test_error_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2,\).*\(4,\)"):
        rank_metrics(np.zeros((3, 4)), [0, 1], [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3,\).*\(5,\)"):
        rank_metrics(np.zeros((3, 4)), [0, 1, 2], [0, 1, 2, 3, 4])


def test_error_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        rank_metrics(np.zeros(4), [0], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="2-D"):
        rank_metrics(np.zeros((1, 2, 3)), [0], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        rank_metrics(np.zeros((2, 2)), [[0], [1]], [0, 1])


def test_error_nan():
    distmat = np.zeros((3, 4))
    distmat[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN.*query 2, gallery 1"):
        rank_metrics(distmat, [0, 1, 2], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(torch.from_numpy(distmat), [0, 1, 2], [0, 1, 2, 3])


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_error_max_rank(bad):
    with pytest.raises(ValueError, match="max_rank"):
        rank_metrics(np.zeros((1, 2)), [0], [0, 1], max_rank=bad)


def test_ap_mode_is_no_argument_of_rank_metrics():
    """Both APs come out of every call; an old ``ap_mode=`` call fails loudly instead of
    silently returning the other AP under ``mAP``."""
    with pytest.raises(TypeError, match="ap_mode"):
        rank_metrics(np.zeros((1, 2)), [0], [0, 1], ap_mode="mbanet_trapezoid")


def test_error_no_valid_query():
    with pytest.raises(ValueError, match="no valid query.*2 queries.*3 gallery"):
        rank_metrics(np.zeros((2, 3)), [7, 8], [0, 1, 2])
    with pytest.raises(ValueError, match="no valid query"):
        rank_metrics(np.zeros((0, 3)), [], [0, 1, 2])
    with pytest.raises(ValueError, match="no valid query"):
        rank_metrics(np.zeros((2, 0)), [0, 1], [])


def test_error_non_real_distances():
    with pytest.raises(ValueError, match="real numbers"):
        rank_metrics(np.zeros((1, 2), dtype=complex), [0], [0, 1])
