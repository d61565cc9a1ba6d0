"""Comparison tables of runs: one row per run, each metric's mean and std over splits.

Rows come from :class:`~handclip_nb.evaluate.compare.RunEvaluation` objects (a fresh
evaluation), record dicts, or finished run folders (their own ``metrics.json``; an evaluation
run's folder gives one row per run it evaluated). :func:`write_tables` saves the numbers as CSV
and the ``mean ± std`` view as markdown.

Both APs are columns: ``mAP`` (standard) and ``mAP_mbanet`` (MBA-Net's trapezoid mAP), headed
``mAP`` and ``mAP (MBA-Net)`` in the formatted view (``constants.METRIC_LABELS``). A run folder
written before ``mAP_mbanet`` was recorded still gives a row: its numbers are NaN (empty in the
CSV) and the formatted view says ``not recorded``; :func:`split_values` has no rows for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import math

import pandas as pd

from ..constants import METRIC_LABELS, METRIC_NAMES
from ..runs import RunFolderError, atomic_write_text, domain_name, read_metrics, resolve_path

__all__ = ["run_records", "comparison_table", "format_table", "write_tables", "markdown_table",
           "split_values", "NOT_RECORDED"]

#: What the formatted view shows for a metric a run's record lacks (an older metrics.json).
NOT_RECORDED = "not recorded"


def _record_from_metrics(metrics: Mapping, folder: Path) -> dict:
    """A stage run's own metrics.json as a comparison row (trained and tested in-domain)."""
    domain = domain_name(metrics["dataset"], metrics["aspect"])
    return {"run": folder.name, "folder": str(folder), "stage": metrics["stage"],
            "backbone": metrics["backbone"],
            "backbone_display": metrics.get("backbone_display", metrics["backbone"]),
            "trained_on": "zero-shot" if metrics["stage"] == "stage0" else domain,
            "tested_on": domain, "gallery_mode": metrics.get("gallery_mode"),
            "cross_domain": False, "seen_test_people": None if metrics["stage"] == "stage0" else 0,
            "num_splits": metrics["num_splits"], "flip_tta": metrics.get("flip_tta", False),
            "rerank": metrics.get("rerank"), "ap_mode": metrics.get("ap_mode", "standard"),
            "test": metrics["test"], "cmc_test_mean": metrics.get("cmc_test_mean")}


def run_records(sources: Iterable[Any]) -> list[dict]:
    """Comparison rows from :class:`RunEvaluation` objects, record dicts, or run folders
    (their ``metrics.json``; an evaluation run's folder gives one row per run it evaluated)."""
    records = []
    for source in sources:
        if hasattr(source, "record"):  # a RunEvaluation (evaluate.compare)
            records.append(source.record())
        elif isinstance(source, Mapping):
            records.append(dict(source))
        else:
            folder = resolve_path(source)
            if not folder.is_dir():
                raise RunFolderError(f"run folder {folder} does not exist; fix the path")
            try:
                metrics = read_metrics(folder)
            except FileNotFoundError:
                raise RunFolderError(
                    f"run {folder} has not finished: no metrics.json. Fix: run its notebook to "
                    f"the end, or leave it out of the table") from None
            if metrics["stage"] == "evaluation":
                records.extend(dict(r) for r in metrics["runs"])
            else:
                records.append(_record_from_metrics(metrics, folder))
    return records


def _rerank_label(rerank: Mapping | None) -> str:
    if not rerank:
        return "off"
    return f"k1={rerank['k1']} k2={rerank['k2']} λ={rerank['lambda_value']:g}"


def comparison_table(sources: Iterable[Any]) -> pd.DataFrame:
    """One row per run: what it is, where it was trained and tested, and each metric's mean
    and std over splits in percent (numeric ``<metric>_mean`` / ``<metric>_std`` columns, so
    the CSV can be re-analysed; :func:`format_table` gives the ``mean ± std`` view).  A metric
    a record lacks (``mAP_mbanet`` of a run folder written before it was recorded) is NaN."""
    rows, names = [], []
    for r in run_records(sources):
        row = {"stage": r["stage"], "backbone": r.get("backbone_display", r["backbone"]),
               "trained_on": r["trained_on"], "tested_on": r["tested_on"],
               "gallery": r.get("gallery_mode"), "splits": r["num_splits"],
               "flip_tta": bool(r.get("flip_tta")), "rerank": _rerank_label(r.get("rerank")),
               "seen_test_people": r.get("seen_test_people")}
        for m in METRIC_NAMES:
            entry = r["test"].get(m)
            row[f"{m}_mean"] = math.nan if entry is None else round(float(entry["mean"]), 4)
            row[f"{m}_std"] = math.nan if entry is None else round(float(entry["std"]), 4)
        rows.append(row)
        names.append(r["run"])
    if not rows:
        raise ValueError("nothing to compare: no runs given")
    if len(set(names)) < len(names):  # the same folder name from two places: number them
        names = [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]
    table = pd.DataFrame(rows, index=pd.Index(names, name="run"))
    table["seen_test_people"] = table["seen_test_people"].astype("Int64")  # None for zero-shot
    return table


def format_table(table: "pd.DataFrame", decimals: int = 2) -> pd.DataFrame:
    """The comparison with each metric as ``mean ± std`` (what the notebook and README show),
    headed by ``METRIC_LABELS`` (``mAP (MBA-Net)``); a metric not recorded says so."""
    out = table.drop(columns=[c for c in table.columns
                              if c.endswith(("_mean", "_std"))]).copy()
    out["seen_test_people"] = ["–" if v is None or v is pd.NA else str(v)
                               for v in table["seen_test_people"].astype(object)]
    for m in METRIC_NAMES:
        out[METRIC_LABELS.get(m, m)] = [
            NOT_RECORDED if pd.isna(a) else f"{a:.{decimals}f} ± {b:.{decimals}f}"
            for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])]
    return out


def write_tables(table: "pd.DataFrame", output_dir: str | Path,  # noqa: F821
                 name: str = "comparison", decimals: int = 2) -> dict[str, Path]:
    """``<name>.csv`` (numeric) and ``<name>.md`` (mean ± std) in ``output_dir``, atomically."""
    out = resolve_path(output_dir)
    return {"csv": atomic_write_text(out / f"{name}.csv", table.to_csv()),
            "md": atomic_write_text(out / f"{name}.md",
                                    markdown_table(format_table(table, decimals)))}


def split_values(sources: Iterable[Any]) -> pd.DataFrame:
    """Long table ``run, metric, split, value`` (percent) of every run's per-split metrics
    (a metric a run's record lacks gives no rows)."""
    rows = [{"run": r["run"], "metric": m, "split": s, "value": float(v)}
            for r in run_records(sources) for m in METRIC_NAMES if m in r["test"]
            for s, v in enumerate(r["test"][m]["per_split"])]
    return pd.DataFrame(rows, columns=["run", "metric", "split", "value"])


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs the optional tabulate)."""
    header = ["run", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"
