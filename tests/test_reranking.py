"""k-reciprocal re-ranking against a slow, obvious loop reference (torchreid's algorithm written
item by item), its behaviour on clustered features, and its input errors."""
import numpy as np
import pytest

from handclip_nb.evaluate.metrics import rank_metrics
from handclip_nb.evaluate.reranking import euclidean_from_cosine, re_ranking, rerank_features


def reference_re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al. 2017 as torchreid / the authors' Python code computes it, one item at a
    time with Python sets (stable argsort, so ties go to the smaller index)."""
    num_q = q_g.shape[0]
    full = np.concatenate([np.concatenate([q_q, q_g], axis=1),
                           np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    original = np.power(full, 2).astype(np.float32)
    original = np.transpose(1.0 * original / np.max(original, axis=0))
    n = original.shape[0]
    rank = np.argsort(original, axis=1, kind="stable")

    def k_reciprocal(i, k):
        forward = list(rank[i, :k + 1])
        return [j for j in forward if i in rank[j, :k + 1]]

    V = np.zeros((n, n), dtype=np.float32)
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        r_i = k_reciprocal(i, k1)
        expansion = set(r_i)
        for c in r_i:
            r_c = k_reciprocal(c, half)
            if len(set(r_c) & set(r_i)) > 2.0 / 3 * len(r_c):
                expansion |= set(r_c)
        idx = sorted(expansion)
        w = np.exp(-original[i, idx])
        V[i, idx] = w / np.sum(w)
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    final = np.zeros((num_q, n - num_q), dtype=np.float32)
    for i in range(num_q):
        for j in range(num_q, n):
            shared = sum(min(V[i, k], V[j, k]) for k in range(n))
            jaccard = 1 - shared / (2 - shared)
            final[i, j - num_q] = jaccard * (1 - lambda_value) + original[i, j] * lambda_value
    return final


def _features(rng, n, dim=8):
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _euclidean(a, b):
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))


@pytest.mark.parametrize("num_q,num_g,k1,k2,lam", [
    (3, 5, 20, 6, 0.3),     # k1 and k2 larger than all 8 items: neighbourhoods = everything
    (6, 9, 4, 2, 0.3),
    (10, 25, 5, 3, 0.5),    # odd k1: round(2.5) = 2 (NumPy rounds half to even)
    (25, 12, 20, 6, 0.3),   # torchreid defaults, more queries than gallery
    (12, 30, 7, 1, 0.0),    # no query expansion, Jaccard only
    (1, 1, 20, 6, 1.0),     # one query, one gallery item, original distance only
    (8, 16, 3, 16, 0.2),    # k2 larger than the items
])
def test_matches_the_loop_reference(num_q, num_g, k1, k2, lam):
    rng = np.random.default_rng(num_q * 100 + num_g)
    q, g = _features(rng, num_q), _features(rng, num_g)
    args = (_euclidean(q, g), _euclidean(q, q), _euclidean(g, g))
    fast = re_ranking(*args, k1=k1, k2=k2, lambda_value=lam)
    slow = reference_re_ranking(*args, k1=k1, k2=k2, lambda_value=lam)
    assert fast.shape == (num_q, num_g) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


def test_matches_reference_on_an_unstructured_metric():
    """Random symmetric distances (not from features) with many near-ties."""
    rng = np.random.default_rng(3)
    n_q, n_g = 7, 11
    m = rng.integers(1, 6, size=(n_q + n_g, n_q + n_g)).astype(np.float64)
    m = (m + m.T) / 2
    np.fill_diagonal(m, 0.0)
    args = (m[:n_q, n_q:], m[:n_q, :n_q], m[n_q:, n_q:])
    np.testing.assert_allclose(re_ranking(*args, k1=4, k2=3),
                               reference_re_ranking(*args, k1=4, k2=3), rtol=1e-5, atol=1e-6)


def test_large_k1_equals_everything_rule():
    """k1 beyond the number of items is the same as k1 = items - 1 for the reciprocal sets and
    round(k1/2)+1 >= items for the half sets: all items are neighbours."""
    rng = np.random.default_rng(7)
    q, g = _features(rng, 4), _features(rng, 6)
    args = (_euclidean(q, g), _euclidean(q, q), _euclidean(g, g))
    np.testing.assert_array_equal(re_ranking(*args, k1=100, k2=50),
                                  re_ranking(*args, k1=1000, k2=500))


def test_features_entry_point_equals_euclidean_distances():
    rng = np.random.default_rng(11)
    q, g = _features(rng, 9, 16), _features(rng, 14, 16)
    direct = re_ranking(_euclidean(q, g), _euclidean(q, q), _euclidean(g, g), k1=5, k2=3)
    np.testing.assert_allclose(rerank_features(q, g, k1=5, k2=3), direct, atol=1e-5)
    np.testing.assert_allclose(euclidean_from_cosine(1 - q @ g.T), _euclidean(q, g), atol=1e-6)


def test_improves_map_on_clustered_features():
    """Identities form clusters; queries are much noisier than the gallery, which holds four
    images per identity.  A query's own nearest neighbours are then often wrong, but the
    k-reciprocal sets of the gallery recover its cluster (measured, seeds 0/1/2: mAP
    40.6/46.8/44.9 % -> 49.0/56.9/54.7 %)."""
    gains, rank1_gains = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ids, dim = 30, 16
        centres = _features(rng, ids, dim)
        g_ids = np.repeat(np.arange(ids), 4)
        q_ids = np.repeat(np.arange(ids), 2)
        gallery = centres[g_ids] + 0.8 * rng.normal(size=(len(g_ids), dim)) / np.sqrt(dim)
        queries = centres[q_ids] + 1.6 * rng.normal(size=(len(q_ids), dim)) / np.sqrt(dim)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        before = rank_metrics(1 - queries @ gallery.T, q_ids, g_ids)
        after = rank_metrics(rerank_features(queries, gallery), q_ids, g_ids)
        gains.append(after["mAP"] - before["mAP"])
        rank1_gains.append(after["cmc"][0] - before["cmc"][0])
    assert min(gains) > 0.05, gains
    assert np.mean(rank1_gains) > 0, rank1_gains


def _ok(nq=3, ng=4):
    rng = np.random.default_rng(0)
    q, g = _features(rng, nq), _features(rng, ng)
    return [_euclidean(q, g), _euclidean(q, q), _euclidean(g, g)]


@pytest.mark.parametrize("position,bad,message", [
    (0, np.zeros(4), "q_g_dist must be a 2-D"),
    (1, np.zeros((3, 4)), "q_q_dist has shape \\(3, 4\\) but columns must be 3"),
    (2, np.zeros((5, 5)), "g_g_dist has shape \\(5, 5\\) but rows must be 4"),
    (0, np.zeros((0, 4)), "at least one query"),
    (0, np.array([["a"] * 4] * 3), "real numbers"),
])
def test_bad_shapes_are_refused(position, bad, message):
    args = _ok()
    args[position] = bad
    with pytest.raises(ValueError, match=message):
        re_ranking(*args)


@pytest.mark.parametrize("value,message", [(np.nan, "1 NaN"), (np.inf, "1 infinite"),
                                           (-0.5, "negative distances")])
def test_bad_values_are_refused(value, message):
    args = _ok()
    args[2] = args[2].copy()
    args[2][1, 2] = value
    with pytest.raises(ValueError, match=f"g_g_dist .*{message}"):
        re_ranking(*args)


@pytest.mark.parametrize("kw,message", [({"k1": 0}, "k1 must be an integer >= 1"),
                                        ({"k2": 2.5}, "k2 must be an integer >= 1"),
                                        ({"k1": True}, "k1 must be an integer"),
                                        ({"lambda_value": 1.5}, "lambda_value must be in"),
                                        ({"lambda_value": "x"}, "lambda_value must be a number")])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        re_ranking(*_ok(), **kw)


def test_bad_feature_shapes_are_refused():
    with pytest.raises(ValueError, match="dimension 8, gallery 4"):
        rerank_features(np.ones((2, 8)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="query features must be 2-D"):
        rerank_features(np.ones(8), np.ones((3, 8)))


def test_a_split_too_large_is_refused_with_the_size_it_would_need():
    from handclip_nb.evaluate.reranking import RERANK_BYTES_PER_PAIR, rerank_bytes

    assert rerank_bytes(20_000, 20_000) == RERANK_BYTES_PER_PAIR * 40_000 ** 2
    rng = np.random.default_rng(0)
    # 7,000 + 7,000 items: about 9 GiB of (q+g)² matrices, over the default 8 GiB; refused
    # before any distance is computed (the features themselves are tiny)
    query, gallery = rng.normal(size=(7_000, 4)), rng.normal(size=(7_000, 4))
    need = f"{rerank_bytes(7_000, 7_000) / 2**30:.1f} GiB"
    with pytest.raises(ValueError, match=rf"7000 queries x 7000 gallery items needs about "
                                         rf"{need}.*rerank: false.*max_bytes="):
        rerank_features(query, gallery)
    # the same limit on precomputed distances (broadcast views: nothing allocated here)
    q_g = np.broadcast_to(np.float32(0.5), (7_000, 7_000))
    with pytest.raises(ValueError, match="needs about"):
        re_ranking(q_g, q_g, q_g)
    # an explicit limit: a small split refused below its estimate, computed at it
    q, g = rng.normal(size=(6, 4)), rng.normal(size=(9, 4))
    with pytest.raises(ValueError, match=f"max_bytes={rerank_bytes(6, 9)}"):
        rerank_features(q, g, max_bytes=rerank_bytes(6, 9) - 1)
    np.testing.assert_array_equal(rerank_features(q, g, max_bytes=rerank_bytes(6, 9)),
                                  rerank_features(q, g))
