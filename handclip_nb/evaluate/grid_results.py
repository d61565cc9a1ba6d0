"""Results of an experiment grid: one row per run, paper-style tables, seed spread, gains.

A grid (``params/grids/<name>.yaml``) expands into runs; the runner writes every run folder
and then ``results.csv`` with :func:`results_rows` and :func:`write_results_csv`. The results
notebook (``notebooks/results.ipynb``) reads it back with :func:`load_results` and shows:

* :func:`paper_table` -- rows method × backbone, columns the protocols (11k's four aspects,
  then HD), each cell ``mean ± std`` **pooled over seeds and splits**: every run's
  ``per_split`` values of the metric (from its ``metrics.json``) of the cell's runs, their mean
  and sample standard deviation (ddof=1; 0 for one value). The best cell of each column (the
  highest mean; ties all) is marked;
* :func:`seed_spread` -- the per-seed means of each cell, for a strip plot;
* :func:`gain_over_zero_shot` -- each trained method's pooled mean minus the zero-shot pooled
  mean of the same backbone and protocol;
* :func:`published_table` -- cited published numbers (``published_results.csv``, shipped with
  the package), shown beside a grid on real data only and never mixed into its numbers.

Stage 1 learns prompts only: it does not change the image encoder, so its ``test`` block is
the zero-shot ranking again (docs/contracts.md). Its runs are rows of ``results.csv`` but not
of the paper table or the gains (``PAPER_STAGES``), where they would repeat zero-shot CLIP.

Pure pandas: no torch, no nbconvert, so the runner and the CSV readers stay fast to import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from ..constants import ASPECTS, METRIC_LABELS, METRIC_NAMES
from ..runs import (PARAMS_FILE, RunFolderError, atomic_write_text, domain_name, read_metrics,
                    resolve_path)

__all__ = ["STAGE_METHODS", "PAPER_STAGES", "PROTOCOL_ORDER", "RESULTS_FILE",
           "VERIFICATION_COLUMNS", "SYNTHETIC_NOTE", "PUBLISHED_LABEL", "PaperTable",
           "results_rows", "write_results_csv", "load_results", "paper_table", "seed_spread",
           "gain_over_zero_shot", "published_table", "ran_on_real_data", "real_protocols"]

#: How each stage is named in the tables (rows of the paper table).
STAGE_METHODS = {"stage0": "zero-shot CLIP", "stage1": "CLIP-ReID prompts (stage 1)",
                 "stage2": "CLIP-ReID", "stage3": "PromptSG"}
#: The stages the paper table and the gains show: stage 1 would repeat zero-shot CLIP.
PAPER_STAGES = ("stage0", "stage2", "stage3")
#: Column order of the paper table; other protocols (``custom/...``) follow, sorted.
PROTOCOL_ORDER = tuple(domain_name("11k", a) for a in ASPECTS) + (domain_name("hd", None),)
#: The grid's table, in the grid folder.
RESULTS_FILE = "results.csv"
#: metrics.json ``verification.metrics`` key -> column of results.csv (mean over splits, %).
VERIFICATION_COLUMNS = {"eer": "eer_mean", "tar_at_far1e-2": "tar_at_far1e-2_mean"}
#: What the results notebook prints instead of the published table for a synthetic grid.
SYNTHETIC_NOTE = ("synthetic data: published results not shown (they are results on real "
                  "photos)")
#: The label every display of the published table carries.
PUBLISHED_LABEL = "published, not measured here"

_PUBLISHED_FILE = "published_results.csv"
#: The columns of results.csv besides the axes (also the header of a grid with no finished run).
_BASE_COLUMNS = (["run", "stage", "method", "dataset", "aspect", "protocol", "backbone", "seed",
                  "synthetic", "finished"]
                 + [f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std")]
                 + list(VERIFICATION_COLUMNS.values()) + ["num_splits", "folder"])


# ----------------------------------------------------------------------------- results.csv


def _run_params(folder: Path) -> dict:
    """The resolved parameters in a run's params.yaml ({} when it has none yet)."""
    path = folder / PARAMS_FILE
    if not path.is_file():
        return {}
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("params") or {}
    except yaml.YAMLError as exc:
        raise RunFolderError(f"{path} is not valid YAML ({exc}); re-run that grid run") from None


def _metrics_or_none(folder: Path) -> dict | None:
    try:
        return read_metrics(folder)
    except FileNotFoundError:
        return None


def results_rows(runs: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per grid run ``{"name", "stage", "folder", "axes": {axis: value}}``.

    Columns: ``run``, ``stage``, ``method``, the axes (an axis a run does not set is empty; an
    axis named like a recorded column below is that column, and appears as ``axis_<name>``
    only where its value differs from the recorded one, e.g. ``aspect: hd`` for an HD run),
    ``dataset``, ``aspect``, ``protocol`` (``11k/dorsal_r``, ``hd``: ``runs.domain_name``),
    ``backbone``, ``seed``, ``synthetic`` (the run's ``data_root`` is None: the embedded
    synthetic hands), ``finished`` (its metrics.json exists), ``<metric>_mean`` and
    ``<metric>_std`` for every ``METRIC_NAMES`` (percent over the run's splits),
    ``eer_mean`` and ``tar_at_far1e-2_mean`` (verification, when recorded), ``num_splits`` and
    ``folder``. An unfinished run keeps its row with empty numbers; no runs give the header
    only."""
    rows: list[dict] = []
    axis_names: list[str] = []
    for spec in runs:
        folder = resolve_path(spec["folder"])
        params = _run_params(folder)
        metrics = _metrics_or_none(folder)
        record = metrics or {}
        stage = record.get("stage") or params.get("stage") or spec.get("stage")
        dataset = record.get("dataset", params.get("dataset"))
        aspect = record.get("aspect", params.get("aspect"))
        row: dict[str, Any] = {
            "run": spec["name"], "stage": stage, "method": STAGE_METHODS.get(stage, stage),
            "dataset": dataset, "aspect": aspect,
            "protocol": None if dataset is None else domain_name(dataset, aspect),
            "backbone": record.get("backbone", params.get("backbone")),
            "seed": params.get("seed", (record.get("provenance") or {}).get("seed")),
            "synthetic": (params["data_root"] is None) if "data_root" in params else None,
            "finished": metrics is not None,
        }
        test = record.get("test") or {}
        for m in METRIC_NAMES:
            entry = test.get(m)
            row[f"{m}_mean"] = math.nan if entry is None else float(entry["mean"])
            row[f"{m}_std"] = math.nan if entry is None else float(entry["std"])
        verification = (record.get("verification") or {}).get("metrics") or {}
        for key, column in VERIFICATION_COLUMNS.items():
            entry = verification.get(key)
            row[column] = math.nan if entry is None else float(entry["mean"])
        row["num_splits"] = record.get("num_splits", params.get("num_splits"))
        row["folder"] = str(folder)
        for axis, value in (spec.get("axes") or {}).items():
            if axis not in axis_names:
                axis_names.append(axis)
            if axis in row and axis not in ("run", "folder"):
                if row[axis] is None:
                    row[axis] = value
                elif str(row[axis]) != str(value):
                    row[f"axis_{axis}"] = value
            else:
                row[f"axis_{axis}" if axis in ("run", "folder") else axis] = value
        rows.append(row)
    table = pd.DataFrame(rows, columns=None if rows else _BASE_COLUMNS)
    head = ["run", "stage", "method"] + [a for a in axis_names if a in table.columns
                                         and a not in ("run", "stage", "method")]
    rest = [c for c in table.columns if c not in head]
    table = table[head + rest]
    for column in ("seed", "num_splits"):
        table[column] = table[column].astype("Int64")
    return table


def write_results_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """``df`` (from :func:`results_rows`) as CSV at ``path``, atomically."""
    return atomic_write_text(resolve_path(path), df.to_csv(index=False))


def load_results(grid_dir: str | Path) -> pd.DataFrame:
    """``<grid_dir>/results.csv`` with every ``folder`` made absolute (a relative folder is
    taken from the grid folder when it exists there, else from the project root)."""
    grid = resolve_path(grid_dir)
    path = grid / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run the grid first (its runner writes results.csv when "
            f"every run has finished), or set grid_dir to a finished grid's folder")
    table = pd.read_csv(path)
    if "folder" in table.columns:
        table["folder"] = [_resolve_folder(grid, f) for f in table["folder"]]
    for column in ("seed", "num_splits"):
        if column in table.columns:
            table[column] = table[column].astype("Int64")
    return table


def _resolve_folder(grid: Path, folder) -> str:
    if not isinstance(folder, str) or not folder:
        return folder
    p = Path(folder)
    if p.is_absolute():
        return folder
    return str(grid / p if (grid / p).exists() else resolve_path(p))


# ----------------------------------------------------------------------------- pooling


def _finished(df: pd.DataFrame, stages: Sequence[str]) -> pd.DataFrame:
    keep = df["stage"].isin(list(stages))
    if "finished" in df.columns:
        keep &= df["finished"].astype(bool)
    return df[keep]


def _protocols(values: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(v for v in values if isinstance(v, str)))
    return ([p for p in PROTOCOL_ORDER if p in present]
            + sorted(p for p in present if p not in PROTOCOL_ORDER))


def _split_values(folder: str, metric: str, cache: dict) -> list[float]:
    """The run's ``test[metric]["per_split"]`` (percent) from its metrics.json."""
    if folder not in cache:
        cache[folder] = read_metrics(folder)
    entry = (cache[folder].get("test") or {}).get(metric)
    return [] if entry is None else [float(v) for v in entry["per_split"]]


def _check_metric(metric: str) -> None:
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)} "
                         f"(mAP is the standard mAP, mAP_mbanet MBA-Net's trapezoid mAP)")


def _pooled(df: pd.DataFrame, metric: str, stages: Sequence[str]) -> pd.DataFrame:
    """Long table stage, method, backbone, protocol, mean, std, n: every finished run's
    per-split values of ``metric`` pooled per (stage, backbone, protocol)."""
    _check_metric(metric)
    cache: dict = {}
    rows = []
    done = _finished(df, stages)
    for (stage, backbone, protocol), group in done.groupby(["stage", "backbone", "protocol"],
                                                           sort=False):
        values = [v for folder in group["folder"] for v in _split_values(folder, metric, cache)]
        if not values:
            continue
        arr = np.asarray(values, dtype=float)
        rows.append({"stage": stage, "method": STAGE_METHODS.get(stage, stage),
                     "backbone": backbone, "protocol": protocol, "mean": float(arr.mean()),
                     "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                     "n": len(arr), "seeds": int(group["seed"].nunique())})
    return pd.DataFrame(rows, columns=["stage", "method", "backbone", "protocol", "mean",
                                       "std", "n", "seeds"])


def _row_order(df: pd.DataFrame, stages: Sequence[str]) -> list[tuple[str, str]]:
    backbones = list(dict.fromkeys(df["backbone"].dropna()))
    present = set(zip(df["stage"], df["backbone"]))
    return [(STAGE_METHODS.get(s, s), b) for s in stages for b in backbones
            if (s, b) in present]


# ----------------------------------------------------------------------------- paper table


@dataclass(frozen=True)
class PaperTable:
    """The paper-style table of one metric. Unpacks as ``numbers, formatted = paper_table(..)``.

    ``numbers``: pooled means (index ``method``, ``backbone``; columns the protocols; NaN where
    no run), ``std``: pooled sample standard deviations, ``count``: how many (seed, split)
    values each cell pools, ``best``: True at the highest mean of each column, ``formatted``:
    ``mean ± std`` strings (``–`` where no run)."""

    metric: str
    numbers: pd.DataFrame
    std: pd.DataFrame
    count: pd.DataFrame
    best: pd.DataFrame
    formatted: pd.DataFrame

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.numbers, self.formatted))

    @property
    def label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    def markdown(self) -> str:
        """A markdown table, the best cell of each column in bold."""
        shown = self.formatted.where(~self.best, "**" + self.formatted + "**")
        header = ["method", "backbone", *map(str, shown.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (method, backbone), row in shown.iterrows():
            lines.append("| " + " | ".join([method, str(backbone), *row.tolist()]) + " |")
        return "\n".join(lines) + "\n"

    def styled(self):
        """The formatted table as a pandas Styler (notebook and HTML): best cells in bold."""
        best = self.best
        return (self.formatted.style
                .apply(lambda _: np.where(best, "font-weight: bold", ""), axis=None)
                .set_caption(f"{self.label} (%), mean ± std over seeds and splits; "
                             f"bold: best of the column"))


def paper_table(df: pd.DataFrame, metric: str = "rank1", stages: Sequence[str] = PAPER_STAGES,
                decimals: int = 2) -> PaperTable:
    """Rows method × backbone, columns the protocols (``PROTOCOL_ORDER``), each cell the
    metric's mean ± sample std pooled over every (seed, split) value of the cell's finished
    runs, read from their metrics.json. ``metric``: any of ``METRIC_NAMES`` (``mAP``: standard,
    ``mAP_mbanet``: MBA-Net's trapezoid mAP)."""
    pooled = _pooled(df, metric, stages)
    rows = pd.MultiIndex.from_tuples(_row_order(_finished(df, stages), stages),
                                     names=["method", "backbone"])
    columns = pd.Index(_protocols(pooled["protocol"]), name="protocol")

    def grid(value: str) -> pd.DataFrame:
        if not len(pooled):
            return pd.DataFrame(np.nan, index=rows, columns=columns)
        wide = pooled.pivot_table(index=["method", "backbone"], columns="protocol",
                                  values=value, aggfunc="first")
        return wide.reindex(index=rows, columns=columns).astype(float)

    numbers, std, count = grid("mean"), grid("std"), grid("n")
    best = numbers.eq(numbers.max(axis=0)) & numbers.notna()
    formatted = pd.DataFrame(
        [[("–" if math.isnan(a) else f"{a:.{decimals}f} ± {b:.{decimals}f}")
          for a, b in zip(numbers.loc[i], std.loc[i])] for i in numbers.index],
        index=rows, columns=columns)
    return PaperTable(metric=metric, numbers=numbers, std=std,
                      count=count.fillna(0).astype(int), best=best, formatted=formatted)


def seed_spread(df: pd.DataFrame, metric: str = "rank1",
                stages: Sequence[str] = PAPER_STAGES) -> pd.DataFrame:
    """Long table ``method, backbone, protocol, seed, mean, n``: per cell of the paper table,
    each seed's mean of the metric over its splits (runs of one seed pooled), for a strip
    plot of how much the seeds disagree."""
    _check_metric(metric)
    cache: dict = {}
    rows = []
    done = _finished(df, stages)
    for (stage, backbone, protocol, seed), group in done.groupby(
            ["stage", "backbone", "protocol", "seed"], sort=False):
        values = [v for f in group["folder"] for v in _split_values(f, metric, cache)]
        if values:
            rows.append({"method": STAGE_METHODS.get(stage, stage), "backbone": backbone,
                         "protocol": protocol, "seed": int(seed),
                         "mean": float(np.mean(values)), "n": len(values)})
    out = pd.DataFrame(rows, columns=["method", "backbone", "protocol", "seed", "mean", "n"])
    order = {p: i for i, p in enumerate(_protocols(out["protocol"]))}
    methods = {STAGE_METHODS.get(s, s): i for i, s in enumerate(stages)}
    backbones = {b: i for i, b in enumerate(dict.fromkeys(df["backbone"].dropna()))}
    return (out.assign(_p=out["protocol"].map(order), _m=out["method"].map(methods),
                       _b=out["backbone"].map(backbones))
            .sort_values(["_p", "_m", "_b", "seed"], kind="stable")
            .drop(columns=["_p", "_m", "_b"]).reset_index(drop=True))


def gain_over_zero_shot(df: pd.DataFrame, metric: str = "rank1",
                        stages: Sequence[str] = PAPER_STAGES) -> pd.DataFrame:
    """Long table ``method, backbone, protocol, mean, zero_shot, gain``: each trained
    method's pooled mean (over seeds and splits) minus the pooled zero-shot (stage 0) mean of
    the same backbone and protocol, in percentage points (NaN where the grid has no zero-shot
    run for it)."""
    pooled = _pooled(df, metric, stages)
    zero = pooled[pooled["stage"] == "stage0"].set_index(["backbone", "protocol"])["mean"]
    trained = pooled[pooled["stage"] != "stage0"].copy()
    trained["zero_shot"] = [zero.get((b, p), math.nan)
                            for b, p in zip(trained["backbone"], trained["protocol"])]
    trained["gain"] = trained["mean"] - trained["zero_shot"]
    order = {p: i for i, p in enumerate(_protocols(trained["protocol"]))}
    return (trained.assign(_p=trained["protocol"].map(order))
            .sort_values(["_p"], kind="stable")
            [["method", "backbone", "protocol", "mean", "zero_shot", "gain"]]
            .reset_index(drop=True))


# ----------------------------------------------------------------------------- published


def ran_on_real_data(df: pd.DataFrame) -> bool:
    """True when every run of the grid read a real dataset (no run on the synthetic hands,
    and none whose data is unknown)."""
    synthetic = df["synthetic"] if "synthetic" in df.columns else pd.Series([None] * len(df))
    return bool(len(df)) and all(v is False or v == 0 or str(v) == "False" for v in synthetic)


def real_protocols(df: pd.DataFrame) -> list[str]:
    """The protocols the grid's runs were tested on, in ``PROTOCOL_ORDER``."""
    return _protocols(df["protocol"]) if "protocol" in df.columns else []


def published_table(real_protocols: Sequence[str] | None = None) -> pd.DataFrame:
    """The cited published numbers shipped with the package (``published_results.csv``:
    paper, venue/year, table, method, backbone, dataset, aspect, gallery mode, metric, its
    definition, value in percent, source URL, note), restricted to ``real_protocols``
    (``11k/dorsal_r`` ... ``hd``; None = all). They were *published, not measured here*:
    show them beside a grid on real data only, never mixed into its numbers."""
    with resources.files(__package__).joinpath(_PUBLISHED_FILE).open("r") as fh:
        table = pd.read_csv(fh)
    table.insert(table.columns.get_loc("aspect") + 1, "protocol",
                 [domain_name(d, a) for d, a in zip(table["dataset"], table["aspect"])])
    if real_protocols is not None:
        table = table[table["protocol"].isin(list(real_protocols))]
    return table.reset_index(drop=True).rename_axis(PUBLISHED_LABEL)
