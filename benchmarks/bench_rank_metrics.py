"""Benchmark: handclip_nb.evaluate.rank_metrics vs. the CLIP-ReID evaluator design.

A script that prints figures (not a test).  Run from the repository root:

    .venv/bin/python benchmarks/bench_rank_metrics.py            # full sizes
    .venv/bin/python benchmarks/bench_rank_metrics.py --quick    # smoke run

For each case it times (median of a few repeats, seconds):
  ours     rank_metrics(distmat, query_ids, gallery_ids)  (validation included)
  clipreid a re-creation of CLIP-ReID's ``eval_func`` design (utils/metrics.py):
           one ``np.argsort(distmat, axis=1)``, a (nq, ng) match matrix, then a
           per-query Python loop computing CMC / AP / INP with numpy
  argsort  a bare ``np.argsort(distmat, axis=1)`` of the same matrix
and checks that the three give the same CMC / mAP / mINP.  For the bare argsort
the metrics are derived, outside the timed region, from the order of
``np.argsort(distmat, axis=1, kind="stable")``, which is our tie rule, so the
agreement must be exact (<= 1e-12).  CLIP-ReID's unstable argsort may order
exactly tied float32 distances differently, so it is held to 1e-5.

Distances are realistic: ``1 - cos`` between L2-normalised float32 features
drawn around one random centre per identity (float32 is the dtype our
evaluation uses; ``--dtype float64`` for the other), so most true matches rank
high but not all.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from handclip_nb.evaluate.metrics import rank_metrics  # noqa: E402

MAX_RANK = 50


# --------------------------------------------------------------------------- baselines


def clipreid_style_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=MAX_RANK):
    """The design of CLIP-ReID's ``eval_func`` (Market-1501 protocol), re-created.

    Full argsort of every row, a gathered (nq, ng) match matrix, then one Python
    iteration per query: drop same-id-same-camera gallery items, cumulative sums
    for CMC, precision-at-hit for AP, last-hit for INP.  ``max_rank`` is cut to
    the gallery size like the original.  The hand datasets have no cameras, so
    the caller passes query and gallery camera ids that never coincide (the
    removal step costs its usual time but removes nothing).
    """
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    num_valid = 0
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw = matches[q_idx][np.invert(remove)]
        if not np.any(raw):
            continue  # query identity absent from the gallery
        cum = raw.cumsum()
        last_hit = np.max(np.where(raw == 1))
        all_inp.append(cum[last_hit] / (last_hit + 1.0))
        hit_curve = cum.copy()
        hit_curve[hit_curve > 1] = 1
        all_cmc.append(hit_curve[:max_rank])
        num_valid += 1
        precision = cum / np.arange(1, cum.shape[0] + 1, dtype=np.float64)
        all_ap.append((precision * raw).sum() / raw.sum())
    assert num_valid > 0, "no query identity appears in the gallery"
    cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / num_valid
    return cmc, float(np.mean(all_ap)), float(np.mean(all_inp))


def bare_argsort(distmat):
    return np.argsort(distmat, axis=1)


def metrics_from_order(indices, q_pids, g_pids, max_rank=MAX_RANK):
    """CMC / mAP / mINP from a given ordering (vectorised; used only for checking)."""
    matches = g_pids[indices] == q_pids[:, None]
    valid = matches.any(axis=1)
    m = matches[valid]
    cum = np.cumsum(m, axis=1)
    pos = np.arange(1, m.shape[1] + 1)
    first = np.argmax(m, axis=1) + 1
    last = m.shape[1] - np.argmax(m[:, ::-1], axis=1)
    n = m.sum(axis=1)
    ap = (np.where(m, cum / pos, 0.0)).sum(axis=1) / n
    cmc = np.array([(first <= k).mean() for k in range(1, max_rank + 1)])
    return cmc, float(ap.mean()), float((n / last).mean())


# --------------------------------------------------------------------------- data


def make_case(rng, num_ids, gallery_per_id, num_query, dim=64, noise=1.3, dtype=np.float32):
    """Float32 cosine distances with identity structure; query ids all present in the gallery."""
    centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
    g_ids = np.repeat(np.arange(num_ids), gallery_per_id)
    rng.shuffle(g_ids)
    q_ids = rng.integers(0, num_ids, num_query)

    def feats(ids):
        f = centres[ids] + noise * rng.standard_normal((ids.shape[0], dim)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    distmat = (1.0 - feats(q_ids) @ feats(g_ids).T).astype(dtype)
    return distmat, q_ids, g_ids


def cases(quick: bool):
    # (label, num_ids, gallery images per id, num_query)
    if quick:
        return [
            ("(a) 200 x 60, ~10 matches/query", 6, 10, 200),
            ("(b) 600 x 600, ~10 matches/query", 60, 10, 600),
            ("(c) 1,500 x 1,500, ~10 matches/query", 150, 10, 1500),
            ("(d) 200 x 60, 1 match/query (11k-like)", 60, 1, 200),
        ]
    return [
        ("(a) 1,000 x 300, ~10 matches/query", 30, 10, 1000),
        ("(b) 3,000 x 3,000, ~10 matches/query", 300, 10, 3000),
        ("(c) 10,000 x 10,000, ~10 matches/query", 1000, 10, 10000),
        ("(d) 1,000 x 300, 1 match/query (11k-like)", 300, 1, 1000),
    ]


# --------------------------------------------------------------------------- timing


def median_times(fns, repeats: int, min_total: float = 0.3, max_repeats: int = 50) -> list[float]:
    """Median wall time of each ``fn()``, calling them round-robin so that load from
    other processes hits all of them alike; small cases get more repeats."""
    times = [[] for _ in fns]
    while len(times[0]) < repeats or (sum(times[0]) < min_total and len(times[0]) < max_repeats):
        for fn, acc in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per timing (default 5, quick 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the distance matrix (default float32, as our evaluation produces)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)

    print(f"rank_metrics benchmark  {datetime.date.today()}  python {platform.python_version()}  "
          f"numpy {np.__version__}  cpus {os.cpu_count()}  "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"distances: {args.dtype} 1 - cos; max_rank {MAX_RANK}; median of >= {repeats} repeats; "
          f"{'QUICK sizes' if args.quick else 'full sizes'}\n")

    rng = np.random.default_rng(args.seed)
    rows, checks = [], []
    for label, num_ids, per_id, num_query in cases(args.quick):
        distmat, q_ids, g_ids = make_case(rng, num_ids, per_id, num_query, dtype=np.dtype(args.dtype))
        q_cams = np.zeros(num_query, dtype=np.int64)
        g_cams = np.ones(g_ids.shape[0], dtype=np.int64)
        rep = repeats if distmat.size < 5e7 else max(2, repeats - 2)

        ours = rank_metrics(distmat, q_ids, g_ids, max_rank=MAX_RANK)
        clip = clipreid_style_eval(distmat, q_ids, g_ids, q_cams, g_cams)
        from_argsort = metrics_from_order(np.argsort(distmat, axis=1, kind="stable"), q_ids, g_ids)

        t_ours, t_clip, t_sort = median_times([
            lambda: rank_metrics(distmat, q_ids, g_ids, max_rank=MAX_RANK),
            lambda: clipreid_style_eval(distmat, q_ids, g_ids, q_cams, g_cams),
            lambda: bare_argsort(distmat),
        ], rep)
        rows.append((label, t_ours, t_clip, t_sort))

        diffs = []
        for name, tol, (cmc, m_ap, m_inp) in (("CLIP-ReID design", 1e-5, clip),
                                              ("stable argsort", 1e-12, from_argsort)):
            diffs.append((name, tol,
                          float(np.max(np.abs(ours["cmc"] - cmc))),
                          abs(ours["mAP"] - m_ap), abs(ours["mINP"] - m_inp)))
        checks.append((label, ours, diffs))

    header = ("| case | ours (s) | CLIP-ReID design (s) | bare argsort (s) "
              "| speed-up vs CLIP-ReID | ours / argsort |")
    print(header)
    print("|" + "---|" * 6)
    for label, t_ours, t_clip, t_sort in rows:
        print(f"| {label} | {t_ours:.5f} | {t_clip:.5f} | {t_sort:.5f} "
              f"| {t_clip / t_ours:.1f}x | {t_ours / t_sort:.2f} |")

    print("\nagreement (max |difference| of ours vs. each):")
    ok_all = True
    for label, ours, diffs in checks:
        parts = []
        for name, tol, d_cmc, d_map, d_inp in diffs:
            ok = max(d_cmc, d_map, d_inp) <= tol
            ok_all &= ok
            parts.append(f"{name}: cmc {d_cmc:.1e} mAP {d_map:.1e} mINP {d_inp:.1e} "
                         f"{'OK' if ok else 'DIFFERENT'} (tol {tol:g})")
        print(f"  {label}:\n    ours: R1 {ours['cmc'][0]:.4f} mAP {ours['mAP']:.4f} mINP {ours['mINP']:.4f} "
              f"(queries {ours['num_queries']})\n    " + "\n    ".join(parts))
    print("all agree" if ok_all else "SOME RESULTS DIFFER")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
