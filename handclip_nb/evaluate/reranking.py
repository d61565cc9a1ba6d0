"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), vectorised.

:func:`re_ranking` has the signature, defaults (``k1=20, k2=6, lambda_value=0.3``) and numbers
of torchreid's ``torchreid.utils.re_ranking`` (the authors' Python code), which builds the
final distance from three pieces:

1. ``original``: the (q+g)×(q+g) distance matrix of every query and gallery item, **squared**
   (the inputs are Euclidean distances, the paper works with squared ones), then each row
   divided by its maximum (torchreid divides the columns and transposes; the same on a
   symmetric matrix, and we keep its exact arithmetic).
2. ``V``: for each item *i*, its k-reciprocal set ``R(i)`` = the items *j* in *i*'s ``k1 + 1``
   nearest (self included) that have *i* in their own ``k1 + 1`` nearest; expanded by the set
   ``R½(c)`` (same rule with ``round(k1 / 2) + 1`` neighbours) of every candidate ``c ∈ R(i)``
   that shares more than 2/3 of ``R½(c)`` with ``R(i)``; weighted by ``exp(-original)`` and
   normalised to sum 1.  With ``k2 > 1``, local query expansion replaces ``V[i]`` by the mean
   of ``V`` over *i*'s ``k2`` nearest items.
3. Jaccard distance ``1 - Σ min(V_q, V_g) / (2 - Σ min(V_q, V_g))``, mixed as
   ``(1 - lambda_value) · jaccard + lambda_value · original``.

Neighbourhood sizes larger than the number of items (``q + g``) are truncated to all items
(NumPy slicing, as in torchreid), so a small gallery with the default ``k1=20`` is valid and
gives exactly torchreid's numbers.  Ties in the neighbour order are broken by item index
(queries first, then gallery: the order of ``np.argsort(row, kind="stable")``).

How it is vectorised: the k-nearest sets are boolean masks built from one stable ``argsort``;
reciprocity is ``mask & mask.T``; the expansion test counts set intersections over the
``(item, candidate, half-neighbour)`` index arrays (``O(N · k1 · k1/2)``); the Jaccard sums run
over blocks of queries restricted to the columns where those queries' ``V`` is non-zero
(``V`` is sparse).  Memory: a few ``N × N`` float64/float32/int64/bool arrays (N = q + g),
about ``RERANK_BYTES_PER_PAIR`` bytes per item pair in all (``tracemalloc`` peaks of
:func:`rerank_features`: 48 bytes at 2,000 items, 45 at 3,000; benchmarks/bench_verification.py).  The method needs every item's full ranked list, so it is not
chunked: a split whose estimate exceeds ``max_bytes`` (default ``RERANK_MAX_BYTES``, 8 GiB: up
to about 13,000 items) is refused before anything is allocated, with the size it would need.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["re_ranking", "rerank_features", "euclidean_from_cosine", "rerank_bytes",
           "RERANK_MAX_BYTES"]

#: Default limit of the memory re-ranking may take (bytes); see :func:`rerank_bytes`.
RERANK_MAX_BYTES = 8 << 30
#: Bytes re-ranking allocates per (item, item) pair of its (q+g)² matrices, rounded up from
#: tracemalloc peaks of :func:`rerank_features` (48.2 at 1,000 + 1,000 items, 45.0 at
#: 1,500 + 1,500; smaller splits add a fixed overhead of a few MB).
RERANK_BYTES_PER_PAIR = 50

# Elements of the (queries × gallery × columns) block in the Jaccard step: bounds memory.
_BLOCK_ELEMENTS = 1 << 22


def _as_distances(name: str, value: Any, shape: tuple[int | None, int | None]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {arr.shape}")
    for axis, want in enumerate(shape):
        if want is not None and arr.shape[axis] != want:
            raise ValueError(
                f"{name} has shape {arr.shape} but {('rows', 'columns')[axis]} must be {want} "
                f"(q_g_dist is (num_query, num_gallery), q_q_dist (num_query, num_query), "
                f"g_g_dist (num_gallery, num_gallery))")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.size and not np.isfinite(arr).all():
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        n_inf = int(np.count_nonzero(np.isinf(arr)))
        raise ValueError(f"{name} contains {n_nan} NaN and {n_inf} infinite value(s); "
                         f"distances must be finite")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative distances (min {arr.min():.3g}); pass Euclidean "
                         f"distances (>= 0), e.g. euclidean_from_cosine(1 - q @ g.T)")
    return arr


def _check_settings(k1: Any, k2: Any, lambda_value: Any) -> tuple[int, int, float]:
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    try:
        lam = float(lambda_value)
    except (TypeError, ValueError):
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}") from None
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    return int(k1), int(k2), lam


def rerank_bytes(num_query: int, num_gallery: int) -> int:
    """Estimated peak memory (bytes) of re-ranking ``num_query`` queries against
    ``num_gallery`` gallery items: ``RERANK_BYTES_PER_PAIR * (num_query + num_gallery) ** 2``."""
    return RERANK_BYTES_PER_PAIR * (int(num_query) + int(num_gallery)) ** 2


def _check_memory(num_query: int, num_gallery: int, max_bytes: int | None) -> None:
    """Refuses, before any allocation, a re-ranking whose estimate exceeds ``max_bytes``."""
    limit = RERANK_MAX_BYTES if max_bytes is None else max_bytes
    need = rerank_bytes(num_query, num_gallery)
    if need > limit:
        raise ValueError(
            f"re-ranking {num_query} queries x {num_gallery} gallery items needs about "
            f"{need / 2**30:.1f} GiB ({RERANK_BYTES_PER_PAIR} bytes per pair of the "
            f"{num_query + num_gallery} x {num_query + num_gallery} item matrices that "
            f"k-reciprocal re-ranking works on), above the limit of {limit / 2**30:.1f} GiB; "
            f"evaluate this split without re-ranking (rerank: false), on a smaller gallery, or "
            f"pass max_bytes={need} to re_ranking/rerank_features on a machine with that much "
            f"free memory")


def _top_mask(rank: np.ndarray, k: int) -> np.ndarray:
    """``mask[i, j]``: item *j* is among the first ``k`` of *i*'s ranked list."""
    n = rank.shape[0]
    mask = np.zeros((n, n), dtype=bool)
    mask[np.arange(n)[:, None], rank[:, :k]] = True
    return mask


def re_ranking(q_g_dist: Any, q_q_dist: Any, g_g_dist: Any, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, *, max_bytes: int | None = None) -> np.ndarray:
    """Re-ranked query-gallery distances (float32, shape of ``q_g_dist``); smaller = closer.

    Args:
        q_g_dist: ``(num_query, num_gallery)`` Euclidean distances (>= 0, finite).
        q_q_dist: ``(num_query, num_query)`` distances among the queries.
        g_g_dist: ``(num_gallery, num_gallery)`` distances among the gallery.
        k1: size of the k-reciprocal neighbourhood (torchreid default 20).
        k2: size of the local query expansion (default 6; 1 = no expansion).
        lambda_value: weight of the original distance in the mix (default 0.3; 0 = Jaccard
            distance only, 1 = the original distance, squared and row-normalised).
        max_bytes: refuse when :func:`rerank_bytes` exceeds this (default
            ``RERANK_MAX_BYTES``).

    Raises:
        ValueError: not 2-D, inconsistent shapes, NaN/inf or negative distances, an empty
            query or gallery set, ``k1``/``k2`` < 1, ``lambda_value`` outside [0, 1], or a
            split too large for ``max_bytes`` (the message gives the size it would need).
    """
    k1, k2, lam = _check_settings(k1, k2, lambda_value)
    q_g = _as_distances("q_g_dist", q_g_dist, (None, None))
    num_q, num_g = q_g.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"q_g_dist has shape {q_g.shape}: need at least one query and one "
                         f"gallery item")
    _check_memory(num_q, num_g, max_bytes)
    q_q = _as_distances("q_q_dist", q_q_dist, (num_q, num_q))
    g_g = _as_distances("g_g_dist", g_g_dist, (num_g, num_g))
    n = num_q + num_g

    full = np.block([[q_q, q_g], [q_g.T, g_g]])
    original = np.power(full, 2).astype(np.float32)
    col_max = original.max(axis=0)
    # all-zero columns (every item identical) stay 0 instead of 0/0
    original = np.divide(original, col_max, out=np.zeros_like(original),
                         where=col_max > 0).T.copy()
    rank = np.argsort(original, axis=1, kind="stable")

    k_full = min(k1 + 1, n)
    k_half = min(int(np.around(k1 / 2.0)) + 1, n)
    recip = _top_mask(rank, k_full)
    recip &= recip.T.copy()
    half_top = _top_mask(rank, k_half)
    recip_half = half_top & half_top.T
    half_size = recip_half.sum(axis=1)

    # Expansion: candidate c ∈ R(i) adds R½(c) when |R½(c) ∩ R(i)| > 2/3 |R½(c)|.
    pair_i, pair_c = np.nonzero(recip)
    half_list = rank[:, :k_half]  # c's half-neighbours in rank order
    half_in = np.take_along_axis(recip_half, half_list, axis=1)  # ... and which are reciprocal
    cand_members = half_list[pair_c]  # [pairs, k_half]
    cand_in = half_in[pair_c]
    shared = (cand_in & recip[pair_i[:, None], cand_members]).sum(axis=1)
    grow = shared > 2.0 / 3.0 * half_size[pair_c]
    expanded = recip.copy()
    rows = np.repeat(pair_i[grow], k_half)
    cols = cand_members[grow].ravel()
    keep = cand_in[grow].ravel()
    expanded[rows[keep], cols[keep]] = True

    weights = np.where(expanded, np.exp(-original), np.float32(0.0)).astype(np.float32)
    totals = weights.sum(axis=1, keepdims=True)
    V = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)

    if k2 != 1:  # local query expansion: mean of V over each item's k2 nearest
        k_qe = min(k2, n)
        expanded_V = np.empty_like(V)
        step = max(1, _BLOCK_ELEMENTS // max(1, k_qe * n))
        for a in range(0, n, step):
            expanded_V[a:a + step] = V[rank[a:a + step, :k_qe]].mean(axis=1)
        V = expanded_V

    Vq, Vg = V[:num_q], V[num_q:]
    jaccard = np.empty((num_q, num_g), dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(1, num_g * n))
    for a in range(0, num_q, step):
        block = Vq[a:a + step]
        cols = np.flatnonzero((block != 0).any(axis=0))  # min() is 0 elsewhere
        overlap = np.minimum(block[:, None, cols], Vg[None, :, cols]).sum(axis=2)
        jaccard[a:a + step] = 1.0 - overlap / (2.0 - overlap)

    return (jaccard * (1 - lam) + original[:num_q, num_q:] * lam).astype(np.float32)


def euclidean_from_cosine(cosine_dist: Any) -> np.ndarray:
    """Euclidean distance between L2-normalised vectors from their cosine distance ``1 - cos``:
    ``||a - b|| = sqrt(2 (1 - cos))`` (tiny negative round-off clipped to 0)."""
    d = np.asarray(cosine_dist, dtype=np.float64)
    return np.sqrt(np.clip(2.0 * d, 0.0, None))


def rerank_features(query: Any, gallery: Any, k1: int = 20, k2: int = 6,
                    lambda_value: float = 0.3, *, max_bytes: int | None = None) -> np.ndarray:
    """:func:`re_ranking` of L2-normalised feature rows (numpy arrays or torch tensors).

    The workbench ranks by cosine distance of L2-normalised features; on the unit sphere the
    Euclidean distance is a monotone function of it, so re-ranking sees the same neighbours
    and squares them into the squared Euclidean distance of the paper (and of CLIP-ReID's
    re-ranking, which starts from squared Euclidean distances of normalised features).
    A split too large for ``max_bytes`` is refused before any distance is computed.
    """
    q = _as_rows(query, "query")
    g = _as_rows(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query features have dimension {q.shape[1]}, gallery {g.shape[1]}")
    _check_memory(q.shape[0], g.shape[0], max_bytes)
    return re_ranking(euclidean_from_cosine(1.0 - q @ g.T),
                      euclidean_from_cosine(1.0 - q @ q.T),
                      euclidean_from_cosine(1.0 - g @ g.T), k1=k1, k2=k2,
                      lambda_value=lambda_value, max_bytes=max_bytes)


def _as_rows(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (items, dim), got shape {arr.shape}")
    return arr
