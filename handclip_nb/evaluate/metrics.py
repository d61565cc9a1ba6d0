"""Ranking metrics for re-identification: CMC, mAP (two definitions) and mINP.

One public function, :func:`rank_metrics`, a pure function of a distance
matrix and two id vectors (the design of torchreid's ``evaluate_rank``).
Both AP definitions come out of the one pass, so every caller gets both.

Definitions (``r_1 < r_2 < ... < r_n`` are the 1-based ranks of a query's
``n`` true matches in its ranked gallery list; a *valid* query has n >= 1):

* CMC[k-1]: fraction of valid queries whose first true match has rank <= k.
* ``mAP`` (standard AP, the torchreid / CLIP-ReID definition):
  ``AP = (1/n) * sum_i i / r_i``, the mean of the precision at each true
  match; ``mAP`` is the mean AP over the *valid* queries.
* ``mAP_mbanet`` (MBA-Net's ``compute_mAP``, nathanlem1/MBA-Net
  ``utils/evaluation_metrics.py``, which comes from layumi's
  Person_reID_baseline_pytorch): the trapezoid rule on the precision-recall
  curve, ``AP = (1/n) * sum_i (q_i + p_i) / 2`` with ``p_i = i / r_i``
  (precision at the i-th match) and ``q_i = (i - 1) / (r_i - 1)`` (precision
  just before it; 1 when ``r_i = 1``).  One match at rank 1 scores 1, one
  match at rank ``r > 1`` scores ``1/(2r)`` (standard: ``1/r``).  As in
  MBA-Net's ``compute_CMC_mAP``, the sum over the valid queries is divided
  by *all* queries: a query without a true match adds 0 and still counts in
  the denominator.  (On MBA-Net's 11k and HD protocols every query has its
  match in the gallery, so this only matters on other data.)
* INP (Ye et al., "Deep Learning for Person Re-identification: A Survey and
  Outlook", TPAMI 2021): ``n / r_n``; mINP is its mean over valid queries.

Queries without any true match in the gallery are "skipped": they enter the
CMC, ``mAP`` and ``mINP`` averages nowhere, are counted in ``num_skipped``,
and count (with AP 0) only in ``mAP_mbanet``'s denominator.  MBA-Net also
divides its CMC by all queries; ours stays over valid queries (torchreid).

Tie rule (applies to every metric): the gallery of a query is ordered by
(distance, gallery index), i.e. exactly the order of
``np.argsort(row, kind="stable")``.  Equal distances therefore rank the
gallery item with the smaller index first.  (MBA-Net ranks by a reversed
quicksort of similarities and CLIP-ReID by an unstable ``np.argsort``, so on
exactly tied distances their numbers can differ from ours; without ties all
three agree.)

How it is computed: no argsort.  The rank of a true match at gallery index
``j`` with distance ``d`` is
``#{k: D[k] < d} + #{k < j: D[k] == d} + 1``.  Queries are processed in
chunks of rows (bounded memory).  For chunks where every query has at most
``_MAX_COMPARE_SLOTS`` true matches (the 11k protocol has exactly one), the
counts come from direct comparisons against each match's distance (O(ng)
per match, no sort at all).  Otherwise each row is value-sorted with
``np.sort`` (SIMD-accelerated, much cheaper than ``argsort``) and the counts
come from a vectorised binary search; a tie check on the sorted row sends
only tied matches to an exact direct count.  Both APs are weighted sums over
the same (match index, rank) pairs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..constants import AP_METRIC

__all__ = ["rank_metrics", "AP_MODES", "AP_METRIC"]

#: Valid values of the ``ap_mode`` parameter (which AP model selection ranks epochs by);
#: ``AP_METRIC[ap_mode]`` is the key of that AP in every result.
AP_MODES = tuple(AP_METRIC)

# Distance-matrix elements handled per chunk of query rows (bounds the
# temporary memory to a few times this many bytes).
_CHUNK_ELEMENTS = 1 << 20
# Largest number of true matches per query for which the direct-comparison
# path (two passes over the row per match) beats value-sorting the rows.
_MAX_COMPARE_SLOTS = 2


def rank_metrics(
    distmat: Any,
    query_ids: Any,
    gallery_ids: Any,
    max_rank: int = 50,
    *,
    chunk_rows: int | None = None,
) -> dict:
    """CMC, mAP (standard and MBA-Net's) and mINP of a query-gallery distance matrix.

    Args:
        distmat: ``(num_query, num_gallery)`` numpy array or torch tensor of
            real distances; smaller means closer.  NaN is rejected; +/-inf is
            allowed.
        query_ids: 1-D sequence (list, numpy array, torch tensor) of
            ``num_query`` identity labels (ints, or any hashable compared by
            equality).
        gallery_ids: 1-D sequence of ``num_gallery`` identity labels.
        max_rank: length of the returned CMC curve (>= 1).  If the gallery
            has fewer than ``max_rank`` items, the curve is padded with its
            last value, CMC[num_gallery - 1], which is 1.0 since every valid
            query has its first match within the gallery.  (CLIP-ReID and
            torchreid truncate the curve instead; we keep a fixed length.)
        chunk_rows: number of query rows processed at once (a memory /
            speed knob; default: about 1M distance elements per chunk).

    Returns:
        ``{"cmc": float64 array (max_rank,), "mAP": float, "mAP_mbanet": float,
        "mINP": float, "num_queries": int, "num_skipped": int}`` -- values
        are fractions in [0, 1]; ``mAP`` is the standard AP averaged over
        valid queries, ``mAP_mbanet`` MBA-Net's trapezoid AP summed over valid
        queries and divided by all queries (see the module docstring);
        ``num_queries`` counts the valid queries (with at least one true
        match in the gallery), ``num_skipped`` the others.

    Raises:
        ValueError: malformed inputs (not 2-D, shape mismatch, NaN, bad
            ``max_rank``) or no query with a true match.

    Ties are broken by gallery index (the order of
    ``np.argsort(row, kind="stable")``); see the module docstring.
    """
    dist = _as_distmat(distmat)
    num_q, num_g = dist.shape
    q_ids = _as_ids(query_ids, "query_ids")
    g_ids = _as_ids(gallery_ids, "gallery_ids")
    if q_ids.shape[0] != num_q or g_ids.shape[0] != num_g:
        raise ValueError(
            f"shape mismatch: distmat has shape {dist.shape} (num_query, num_gallery) "
            f"but query_ids has shape {q_ids.shape} and gallery_ids has shape {g_ids.shape}; "
            f"expected ({num_q},) and ({num_g},)"
        )
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)):
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    max_rank = int(max_rank)
    if chunk_rows is not None and (int(chunk_rows) != chunk_rows or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    _check_nan(dist)
    q_ids, g_ids = _comparable_ids(q_ids, g_ids)

    # True-match pairs, ordered by (query, gallery index); no (nq, ng) mask.
    rows, cols, n_pos, offsets = _positive_pairs(q_ids, g_ids)
    valid = n_pos > 0
    num_valid = int(np.count_nonzero(valid))
    num_skipped = num_q - num_valid
    if num_valid == 0:
        raise ValueError(
            f"no valid query: none of the {num_q} queries has a true match among the "
            f"{num_g} gallery items (check that query and gallery ids use the same labels)"
        )

    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(num_g, 1))
    chunk_rows = int(chunk_rows)
    ranks = np.empty(rows.shape[0], dtype=np.int64)
    for start in range(0, num_q, chunk_rows):
        stop = min(start + chunk_rows, num_q)
        p0, p1 = int(offsets[start]), int(offsets[stop])
        if p0 == p1:
            continue
        ranks[p0:p1] = _ranks_in_block(
            dist[start:stop], rows[p0:p1] - start, cols[p0:p1],
            n_pos[start:stop], offsets[start:stop + 1] - p0,
        )

    # Ranks are distinct within a row: sort them per row via a combined key.
    key = rows * (num_g + 1) + ranks
    key.sort()
    r = key - rows * (num_g + 1)
    k = np.arange(r.shape[0], dtype=np.int64) - offsets[rows] + 1  # 1-based index within row
    rf = r.astype(np.float64)
    kf = k.astype(np.float64)
    precision = kf / rf  # p_k = k / r_k
    before = np.ones_like(rf)  # q_k = (k - 1) / (r_k - 1), 1 at rank 1
    np.divide(kf - 1.0, rf - 1.0, out=before, where=r > 1)
    n_valid = n_pos[valid]
    ap = np.bincount(rows, weights=precision, minlength=num_q)[valid] / n_valid
    ap_trapezoid = np.bincount(rows, weights=0.5 * (precision + before),
                               minlength=num_q)[valid] / n_valid

    first = r[offsets[:-1][valid]]
    last = r[offsets[1:][valid] - 1]
    inp = n_valid / last
    hist = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hist).astype(np.float64) / num_valid
    return {
        "cmc": cmc,
        "mAP": float(ap.mean()),
        # MBA-Net divides by every query: a query without a match adds 0 (docstring)
        "mAP_mbanet": float(ap_trapezoid.sum() / num_q),
        "mINP": float(inp.mean()),
        "num_queries": num_valid,
        "num_skipped": int(num_skipped),
    }


# --------------------------------------------------------------------------- inputs


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _as_distmat(distmat: Any) -> np.ndarray:
    if _is_torch_tensor(distmat):
        import torch  # already loaded when a tensor is passed; the module itself is numpy-only

        t = distmat.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        distmat = t.cpu().numpy()
    dist = np.asarray(distmat)
    if dist.ndim != 2:
        raise ValueError(
            f"distmat must be 2-D (num_query, num_gallery), got {dist.ndim}-D with shape {dist.shape}"
        )
    if dist.dtype == np.bool_:
        dist = dist.view(np.uint8)
    if dist.dtype.kind not in "iuf":
        raise ValueError(f"distmat must hold real numbers, got dtype {dist.dtype}")
    if dist.dtype == np.float16:
        dist = dist.astype(np.float32)  # exact; np.sort has no fast float16 path
    return dist


def _as_ids(ids: Any, name: str) -> np.ndarray:
    if _is_torch_tensor(ids):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim > 1 and not isinstance(ids, np.ndarray) and all(isinstance(x, tuple) for x in ids):
        arr = np.empty(len(ids), dtype=object)  # a sequence of tuple labels, e.g. (aspect, id)
        for i, x in enumerate(ids):
            arr[i] = x
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_nan(dist: np.ndarray) -> None:
    if dist.dtype.kind != "f" or dist.size == 0:
        return
    step = max(1, _CHUNK_ELEMENTS // dist.shape[1])
    for start in range(0, dist.shape[0], step):
        block = dist[start:start + step]
        if np.isnan(block.min()):  # min propagates NaN; cheaper than isnan(block).any()
            count = int(np.count_nonzero(np.isnan(dist)))
            i, j = np.argwhere(np.isnan(block))[0]
            raise ValueError(
                f"distmat contains {count} NaN value(s) (first at query {start + int(i)}, "
                f"gallery {int(j)}); distances must be real numbers"
            )


def _comparable_ids(q: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return id arrays that can be sorted together (numbers, strings, or codes)."""
    if q.dtype.kind in "biuf" and g.dtype.kind in "biuf":
        for name, a in (("query_ids", q), ("gallery_ids", g)):
            if a.dtype.kind == "f" and np.isnan(a).any():
                raise ValueError(f"{name} contains NaN")
        return q, g
    if q.dtype.kind in "US" and q.dtype.kind == g.dtype.kind:
        return q, g
    # Arbitrary hashables (or mixed kinds): map to integer codes by equality.
    codes: dict = {}
    qc = np.fromiter((codes.setdefault(x, len(codes)) for x in q.tolist()), np.int64, q.shape[0])
    gc = np.fromiter((codes.setdefault(x, len(codes)) for x in g.tolist()), np.int64, g.shape[0])
    return qc, gc


def _positive_pairs(q: np.ndarray, g: np.ndarray):
    """(rows, cols) of all true matches, ordered by (query, gallery index).

    Also returns the number of true matches per query and the row offsets
    into the pair arrays (length num_query + 1).
    """
    order = np.argsort(g, kind="stable")  # equal ids keep gallery-index order
    g_sorted = g[order]
    lo = np.searchsorted(g_sorted, q, side="left")
    hi = np.searchsorted(g_sorted, q, side="right")
    n_pos = (hi - lo).astype(np.int64)
    offsets = np.zeros(q.shape[0] + 1, dtype=np.int64)
    np.cumsum(n_pos, out=offsets[1:])
    rows = np.repeat(np.arange(q.shape[0], dtype=np.int64), n_pos)
    within = np.arange(rows.shape[0], dtype=np.int64) - offsets[rows]
    cols = order[lo[rows] + within].astype(np.int64)
    return rows, cols, n_pos, offsets


# --------------------------------------------------------------------------- ranks


def _count_true(mask: np.ndarray) -> np.ndarray:
    """Per-row number of True values of a 2-D bool array."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: popcount of packed bits is fastest
        return np.bitwise_count(np.packbits(mask, axis=1)).sum(axis=1, dtype=np.int64)
    return np.count_nonzero(mask, axis=1).astype(np.int64)


def _ranks_in_block(block, lrows, cols, n_block, loffsets) -> np.ndarray:
    """1-based ranks (tie rule: distance, then gallery index) of the true matches.

    ``block`` holds rows of the distance matrix; ``lrows``/``cols`` give the
    true-match pairs (row within the block, gallery index), grouped by row.
    """
    num_pairs = lrows.shape[0]
    values = block[lrows, cols]
    max_slots = int(n_block.max())
    if max_slots <= _MAX_COMPARE_SLOTS:
        less = np.empty(num_pairs, dtype=np.int64)
        tied = np.empty(num_pairs, dtype=bool)
        slot = np.arange(num_pairs, dtype=np.int64) - loffsets[lrows]
        for s in range(max_slots):
            sel = np.flatnonzero(slot == s)
            srows = lrows[sel]
            if srows.shape[0] == block.shape[0]:
                sub = block  # every row has this slot: no copy
            else:
                sub = block[srows]
            v = values[sel][:, None]
            less[sel] = _count_true(sub < v)
            tied[sel] = _count_true(sub == v) > 1
    else:
        valid_rows = np.flatnonzero(n_block > 0)
        if valid_rows.shape[0] == block.shape[0]:
            srt = np.sort(block, axis=1)
            srow = lrows
        else:
            srt = np.sort(block[valid_rows], axis=1)
            compress = np.cumsum(n_block > 0) - 1
            srow = compress[lrows]
        less = _count_less_sorted(srt, srow, values)
        ng = srt.shape[1]
        nxt = np.minimum(less + 1, ng - 1)
        tied = (less + 1 < ng) & (srt.ravel()[srow * ng + nxt] == values)
    ranks = less + 1
    if tied.any():
        t = np.flatnonzero(tied)
        ranks[t] += _count_equal_before(block, lrows[t], cols[t], values[t])
    return ranks


def _count_less_sorted(srt: np.ndarray, srow: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each pair, #{x in srt[srow] : x < value}; rows of ``srt`` are sorted.

    A vectorised binary search (binary lifting) over all pairs at once.
    """
    ng = srt.shape[1]
    flat = srt.ravel()
    base = srow * ng - 1
    pos = np.zeros(values.shape[0], dtype=np.int64)
    step = 1 << (ng.bit_length() - 1) if ng > 0 else 0
    while step:
        cand = pos + step
        ok = cand <= ng
        idx = base + np.minimum(cand, ng)
        take = ok & (flat[idx] < values)
        pos = np.where(take, cand, pos)
        step >>= 1
    return pos


def _count_equal_before(block, lrows, cols, values) -> np.ndarray:
    """For each pair, #{k < col : block[row, k] == value} (exact tie correction)."""
    ng = block.shape[1]
    out = np.empty(lrows.shape[0], dtype=np.int64)
    col_index = np.arange(ng, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(ng, 1))
    for a in range(0, lrows.shape[0], step):
        b = min(a + step, lrows.shape[0])
        eq = block[lrows[a:b]] == values[a:b, None]
        eq &= col_index[None, :] < cols[a:b, None]
        out[a:b] = _count_true(eq)
    return out
