"""Benchmark: memory (and time) of verification, ranking and re-ranking on large splits.

A script that prints figures (not a test).  Run from the repository root:

    .venv/bin/python benchmarks/bench_verification.py            # 1k, 2k, 4k squared splits
    .venv/bin/python benchmarks/bench_verification.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_verification.py --large 20000   # also one 20k x 20k split

For each ``n x n`` split of realistic float32 cosine distances (L2-normalised features drawn
around one random centre per identity, ``n / 10`` identities) it reports, as the peak of
``tracemalloc`` (numpy's allocations are traced) during the call, i.e. memory *beyond* the
distance matrix, which exists before the call:

  all-pairs  the previous verification (tests/test_verification.py's reference: a float64 copy
             of every pair, a genuine mask, two full sorts, the whole curve) + its metrics
  streamed   ``evaluate_verification`` (metrics and the ROC figure's points, as a run records)
  ranking    ``rank_metrics`` (CMC, both mAPs, mINP)

and checks that the two verifications give identical results.  On the ``--large`` split only
the streamed verification and the ranking run; the all-pairs figure there is the estimate
``bytes per pair`` (measured on the largest compared split) ``x pairs``.  Re-ranking's need at
each size is :func:`handclip_nb.evaluate.reranking.rerank_bytes` (it refuses past
``RERANK_MAX_BYTES``), with one measured peak at 1,000 + 1,000 items to check the estimate.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from handclip_nb.evaluate.metrics import rank_metrics  # noqa: E402
from handclip_nb.evaluate.reranking import (  # noqa: E402
    RERANK_MAX_BYTES, rerank_bytes, rerank_features)
from handclip_nb.evaluate.verification import evaluate_verification, roc_points  # noqa: E402

MB = 2 ** 20


def _reference():
    """The all-pairs implementation, from the tests (the one place it is written)."""
    spec = importlib.util.spec_from_file_location("verification_reference",
                                                  ROOT / "tests" / "test_verification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cosine_split(n: int, seed: int = 0, dim: int = 64):
    """``(distances float32 (n, n), query_ids, gallery_ids)`` of n/10 identities."""
    rng = np.random.default_rng(seed)
    num_ids = max(2, n // 10)
    centres = rng.normal(size=(num_ids, dim)).astype(np.float32)
    q_ids, g_ids = rng.integers(0, num_ids, n), rng.integers(0, num_ids, n)
    q = centres[q_ids] + rng.normal(size=(n, dim)).astype(np.float32)
    g = centres[g_ids] + rng.normal(size=(n, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    distances = q @ g.T
    np.subtract(np.float32(1.0), distances, out=distances)  # in place: one n x n matrix
    return distances, q_ids, g_ids


def peak(fn):
    """``(result, peak MB allocated during fn, seconds)``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    try:
        result = fn()
        seconds = time.perf_counter() - start
        top = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, top / MB, seconds


def measure(n: int, compare: bool = True) -> dict:
    """One n x n split: the figures of the module docstring."""
    distances, q_ids, g_ids = cosine_split(n)
    row = {"n": n, "pairs": n * n, "matrix_mb": distances.nbytes / MB}
    streamed, row["streamed_mb"], row["streamed_s"] = peak(
        lambda: evaluate_verification([(distances, q_ids, g_ids)]))
    _, row["ranking_mb"], row["ranking_s"] = peak(lambda: rank_metrics(distances, q_ids, g_ids))
    if compare:
        ref = _reference()

        def all_pairs():
            curve = ref.all_pairs_curve(distances, q_ids, g_ids)
            return ref.all_pairs_metrics(curve), roc_points(curve)

        (metrics, roc), row["all_pairs_mb"], row["all_pairs_s"] = peak(all_pairs)
        row["identical"] = streamed.splits == [metrics] and streamed.roc == roc
    row["rerank_need_gb"] = rerank_bytes(n, n) / 2 ** 30
    row["rerank_refused"] = rerank_bytes(n, n) > RERANK_MAX_BYTES
    row["eer"] = streamed.splits[0]["eer"]
    return row


def rerank_check(n: int = 1000) -> dict:
    """Measured peak of re-ranking n + n items against its estimate."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(n, 64))
    g = rng.normal(size=(n, 64))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    _, measured, seconds = peak(lambda: rerank_features(q, g))
    return {"items": 2 * n, "measured_mb": measured, "estimate_mb": rerank_bytes(n, n) / MB,
            "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--large", type=int, default=None,
                        help="also one n x n split with the streamed verification only")
    args = parser.parse_args(argv)
    sizes = [300, 600] if args.quick else [1000, 2000, 4000]
    print(f"# bench_verification  {datetime.date.today()}  {platform.processor() or platform.machine()}"
          f"  {os.cpu_count()} CPUs  numpy {np.__version__}")
    print("| n x n | matrix MB | all-pairs MB (s) | streamed MB (s) | ranking MB (s) | identical "
          "| re-ranking needs GiB |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in sizes:
        row = measure(n)
        rows.append(row)
        print(f"| {n} x {n} | {row['matrix_mb']:.0f} | {row['all_pairs_mb']:.0f} "
              f"({row['all_pairs_s']:.1f}) | {row['streamed_mb']:.0f} ({row['streamed_s']:.1f}) "
              f"| {row['ranking_mb']:.0f} ({row['ranking_s']:.1f}) | {row['identical']} | "
              f"{row['rerank_need_gb']:.1f}{' (refused)' if row['rerank_refused'] else ''} |",
              flush=True)
    per_pair = rows[-1]["all_pairs_mb"] * MB / rows[-1]["pairs"]
    print(f"\nall-pairs verification: {per_pair:.1f} bytes per pair at "
          f"{rows[-1]['n']} x {rows[-1]['n']}")
    if args.large:
        row = measure(args.large, compare=False)
        print(f"| {args.large} x {args.large} | {row['matrix_mb']:.0f} | estimate "
              f"{per_pair * row['pairs'] / MB:.0f} | {row['streamed_mb']:.0f} "
              f"({row['streamed_s']:.1f}) | {row['ranking_mb']:.0f} ({row['ranking_s']:.1f}) | "
              f"- | {row['rerank_need_gb']:.1f}{' (refused)' if row['rerank_refused'] else ''} |")
    check = rerank_check(300 if args.quick else 1000)
    print(f"\nre-ranking {check['items']} items: measured peak {check['measured_mb']:.0f} MB, "
          f"estimate {check['estimate_mb']:.0f} MB ({check['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
