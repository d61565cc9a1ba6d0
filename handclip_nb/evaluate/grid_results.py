"""Results of an experiment grid: one row per run, paper-style tables, seed spread, gains.

A grid (``params/grids/<name>.yaml``) expands into runs; the runner writes every run folder
and then ``results.csv`` with :func:`results_rows` and :func:`write_results_csv`. The results
notebook (``notebooks/results.ipynb``) reads it back with :func:`load_results` and shows:

* :func:`paper_table` -- rows method × backbone, columns the protocols (11k's four aspects,
  then HD). **A cell pools only runs that differ in their seed**: every other parameter of a
  run's identity (``params.run_identity``, read from its ``params.yaml``, with the identity of
  the runs it reads, e.g. ``stage1.lr`` for a stage 2) that differs between runs of one
  stage, backbone and protocol becomes part of the row label (``CLIP-ReID · triplet_weight=0``),
  and runs tested on different splits (``test_splits_hash``) are never pooled. Each cell is the
  re-ID papers' convention: each run's mean over its test splits, then the mean ± sample
  standard deviation (ddof=1) over the runs (seeds); a cell with one run (a zero-shot run
  shared by every seed) shows ± over its splits instead, and every cell says which
  (``(3×10)``: 3 seeds × 10 splits; ``(1×10†)``: one run, ± over its 10 splits). The best cell of
  each column (the highest mean; ties all) is marked;
* :func:`seed_spread` -- each run's (seed's) mean of each cell, for a strip plot;
* :func:`gain_over_zero_shot` -- each trained cell's mean minus the mean of the zero-shot cell
  of the same backbone, protocol, test splits and evaluation settings
  (``params.EVALUATION_PARAMETERS``);
* :func:`published_table` -- cited published numbers (``published_results.csv``, shipped with
  the package), shown beside a grid on real data only and never mixed into its numbers.

Stage 1 learns prompts only: it does not change the image encoder, so its ``test`` block is
the zero-shot ranking again (docs/contracts.md). Its runs are rows of ``results.csv`` but not
of the paper table or the gains (``PAPER_STAGES``), where they would repeat zero-shot CLIP.

Pure pandas: no torch, no nbconvert, so the runner and the CSV readers stay fast to import.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from ..constants import ASPECTS, METRIC_LABELS, METRIC_NAMES
from ..params import EVALUATION_PARAMETERS, run_identity
from ..runs import (PARAMS_FILE, RunFolderError, atomic_write_text, domain_name, read_metrics,
                    resolve_path)

__all__ = ["STAGE_METHODS", "PAPER_STAGES", "PROTOCOL_ORDER", "RESULTS_FILE", "STALE_FILE",
           "POOLING_NOTE", "VERIFICATION_COLUMNS", "SYNTHETIC_NOTE", "PUBLISHED_LABEL",
           "PaperTable", "run_setting", "results_rows", "write_results_csv", "load_results",
           "write_stale_csv", "load_stale", "labelled_runs", "paper_table", "seed_spread", "gain_over_zero_shot",
           "published_table", "ran_on_real_data", "real_protocols"]

#: How each stage is named in the tables (rows of the paper table).
STAGE_METHODS = {"stage0": "zero-shot CLIP", "stage1": "CLIP-ReID prompts (stage 1)",
                 "stage2": "CLIP-ReID", "stage3": "PromptSG", "handid": "CLIP-HandID"}
#: The stages the paper table and the gains show: stage 1 would repeat zero-shot CLIP.
PAPER_STAGES = ("stage0", "stage2", "stage3", "handid")
#: Column order of the paper table; other protocols (``custom/...``) follow, sorted.
PROTOCOL_ORDER = tuple(domain_name("11k", a) for a in ASPECTS) + (domain_name("hd", None),)
#: The grid's table, in the grid folder.
RESULTS_FILE = "results.csv"
#: Run folders under the grid's ``runs/`` that are not tabled (not in the grid file as it is
#: now, or with outdated inputs), with the reason; written by the runner beside results.csv.
STALE_FILE = "stale.csv"
#: What every cell of the paper table is (its caption, the notebook and docs/contracts.md).
POOLING_NOTE = ("each run's mean over its test splits, then mean ± std (ddof=1) over the runs, "
                "which differ only in their seed; (s×n): s seeds × n splits; † one run: ± is "
                "the std over its n splits")
#: Separates a method from the settings that tell its rows apart (``CLIP-ReID · lr=0.001``).
LABEL_SEPARATOR = " · "
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
                 + list(VERIFICATION_COLUMNS.values())
                 + ["num_splits", "test_splits_hash", "git_commit", "slurm_job_id", "eval_key",
                    "setting", "folder"])
#: Links from a run to the run folders it reads: their identity is part of its setting.
_UPSTREAM_LINKS = ("stage1_dir", "init_from")


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


def run_setting(params: Mapping[str, Any], depth: int = 0) -> dict:
    """A run's identity (``params.run_identity`` of its resolved ``params.yaml``) and, prefixed
    with their stage (``stage1.lr``), the identities of the run folders it reads."""
    out = run_identity(params) if params else {}
    for link in _UPSTREAM_LINKS:
        target = params.get(link) if params else None
        if not target or depth > 3:
            continue
        upstream = _run_params(resolve_path(target))
        for key, value in run_setting(upstream, depth + 1).items():
            out[f"{upstream.get('stage', link)}.{key}"] = value
    return out


def _evaluation_key(setting: Mapping[str, Any]) -> str:
    """A hash of what a run is tested on and with which starting model
    (``EVALUATION_PARAMETERS``): the key a trained run shares with its zero-shot baseline."""
    chosen = {k: setting.get(k) for k in EVALUATION_PARAMETERS if k in setting}
    if not chosen:
        return ""
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_synthetic(metrics: Mapping[str, Any], params: Mapping[str, Any]):
    """The run's own record (metrics.json ``synthetic``, from the dataset's provenance file);
    for runs written before it was recorded, the embedded default (``data_root: None``)."""
    if "synthetic" in metrics:
        return bool(metrics["synthetic"])
    return (params["data_root"] is None) if "data_root" in params else None


def results_rows(runs: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per grid run ``{"name", "stage", "folder", "axes": {axis: value}}`` (optional
    ``"job_id"``: the Slurm job that ran it).

    Columns: ``run``, ``stage``, ``method``, the axes (an axis a run does not set is empty; an
    axis named like a recorded column below is that column, and appears as ``axis_<name>``
    only where its value differs from the recorded one, e.g. ``aspect: hd`` for an HD run),
    ``dataset``, ``aspect``, ``protocol`` (``11k/dorsal_r``, ``hd``: ``runs.domain_name``),
    ``backbone``, ``seed``, ``synthetic`` (the run's metrics.json says its data came from the
    synthetic-hands generator), ``finished`` (its metrics.json exists), ``<metric>_mean`` and
    ``<metric>_std`` for every ``METRIC_NAMES`` (percent over the run's splits),
    ``eer_mean`` and ``tar_at_far1e-2_mean`` (verification, when recorded), ``num_splits``,
    ``test_splits_hash``, ``git_commit`` (the commit that computed it), ``slurm_job_id``,
    ``eval_key`` (:func:`_evaluation_key`), ``setting`` (JSON of :func:`run_setting`: what the
    tables tell runs apart by) and ``folder``. An unfinished run keeps its row with empty
    numbers; no runs give the header only."""
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
            "synthetic": _is_synthetic(record, params),
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
        row["test_splits_hash"] = record.get("test_splits_hash")
        row["git_commit"] = (record.get("provenance") or {}).get("git_commit")
        row["slurm_job_id"] = spec.get("job_id") or None
        setting = run_setting(params)
        row["eval_key"] = _evaluation_key(setting)
        row["setting"] = json.dumps(setting, sort_keys=True, default=str)
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


_STALE_COLUMNS = ["run", "folder", "reason"]


def write_stale_csv(stale: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The runner's list of untabled run folders (``run, folder, reason``) as CSV at ``path``,
    atomically."""
    table = pd.DataFrame(list(stale), columns=_STALE_COLUMNS)
    return atomic_write_text(resolve_path(path), table.to_csv(index=False))


def load_stale(grid_dir: str | Path) -> pd.DataFrame:
    """``<grid_dir>/stale.csv`` (``run, folder, reason``): the run folders the runner left out
    of results.csv; empty when there is none (or the grid predates the file)."""
    path = resolve_path(grid_dir) / STALE_FILE
    if not path.is_file():
        return pd.DataFrame(columns=_STALE_COLUMNS)
    return pd.read_csv(path)


def _resolve_folder(grid: Path, folder) -> str:
    if not isinstance(folder, str) or not folder:
        return folder
    p = Path(folder)
    if p.is_absolute():
        return folder
    return str(grid / p if (grid / p).exists() else resolve_path(p))


# ----------------------------------------------------------------------------- pooling


def _finished(df: pd.DataFrame, stages: Sequence[str]) -> pd.DataFrame:
    """The finished runs of ``stages``."""
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


def _settings(df: pd.DataFrame) -> list[dict]:
    if "setting" not in df.columns:
        return [{} for _ in range(len(df))]
    return [json.loads(v) if isinstance(v, str) and v else {} for v in df["setting"]]


def _is_seed(key: str) -> bool:
    """``seed``, and the seed of an upstream run (``stage1.seed``): a grid links each run to
    the upstream run of its own seed, so that seed is the run's seed again, not a setting."""
    return key.rsplit(".", 1)[-1] == "seed"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _same(values: Iterable[Any]) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) <= 1


def _column(df: pd.DataFrame, name: str) -> list:
    if name not in df.columns:
        return [""] * len(df)
    return ["" if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v)
            for v in df[name]]


def labelled_runs(df: pd.DataFrame, stages: Sequence[str] = PAPER_STAGES) -> pd.DataFrame:
    """The finished runs of ``stages``, each with ``variant`` (the settings that tell it apart
    from the other runs of its stage, backbone and protocol, ``"lr=0.001 · stage1.n_ctx=8"``;
    empty where only the seed differs), ``method`` (the stage's name, then the variant), and
    ``splits_key`` (its test splits). Runs of one (method, backbone, protocol, splits_key)
    differ only in their seed: they are what one cell pools."""
    done = _finished(df, stages).copy().reset_index(drop=True)
    settings = _settings(done)
    done["splits_key"] = _column(done, "test_splits_hash")
    done["eval_key"] = _column(done, "eval_key")
    label_keys: dict[int, list[str]] = {}
    for _, rows in done.groupby(["stage", "backbone"], sort=False, dropna=False).groups.items():
        differing: set[str] = set()
        for _, cell in done.loc[rows].groupby("protocol", sort=False, dropna=False).groups.items():
            group = [settings[i] for i in cell]
            for key in set().union(*group):
                if not _is_seed(key) and not _same(g.get(key) for g in group):
                    differing.add(key)
        for i in rows:
            label_keys[i] = sorted(differing)
    variants = [LABEL_SEPARATOR.join(f"{k}={_show(settings[i].get(k))}" for k in label_keys[i])
                for i in range(len(done))]
    done["variant"] = variants
    # runs whose test splits differ are never pooled: the splits' hash tells them apart
    for _, rows in done.groupby(["stage", "backbone", "protocol", "variant"], sort=False,
                                dropna=False).groups.items():
        if len(set(done.loc[rows, "splits_key"])) > 1:
            for i in rows:
                tag = f"test splits {done.at[i, 'splits_key'][:8] or 'unknown'}"
                done.at[i, "variant"] = LABEL_SEPARATOR.join(filter(None, [done.at[i, "variant"],
                                                                           tag]))
    done["method"] = [LABEL_SEPARATOR.join(filter(None, [STAGE_METHODS.get(st, st), v]))
                      for st, v in zip(done["stage"], done["variant"])]
    return done


_CELL = ["stage", "method", "backbone", "protocol", "splits_key"]


def _pooled(done: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Long table, one row per cell: ``stage, method, backbone, protocol, splits_key,
    eval_key, mean, std, n, seeds, splits, spread``. Each run's mean over its splits, then the
    mean ± sample std over the cell's runs (``spread`` "seeds"); one run: ± over its splits
    (``spread`` "splits"). ``n``: the (run, split) values pooled; ``splits``: splits per run
    (one number, or "a–b" when they differ)."""
    _check_metric(metric)
    cache: dict = {}
    rows = []
    for key, group in done.groupby(_CELL, sort=False, dropna=False):
        per_run = [v for v in (_split_values(f, metric, cache) for f in group["folder"]) if v]
        if not per_run:
            continue
        means = np.asarray([np.mean(v) for v in per_run], dtype=float)
        counts = sorted({len(v) for v in per_run})
        if len(per_run) > 1:
            std, spread = float(means.std(ddof=1)), "seeds"
        else:
            only = np.asarray(per_run[0], dtype=float)
            std, spread = (float(only.std(ddof=1)) if len(only) > 1 else 0.0), "splits"
        rows.append({**dict(zip(_CELL, key)), "eval_key": group["eval_key"].iloc[0],
                     "mean": float(means.mean()), "std": std,
                     "n": int(sum(len(v) for v in per_run)), "seeds": len(per_run),
                     "splits": (str(counts[0]) if len(counts) == 1
                                else f"{counts[0]}–{counts[-1]}"),
                     "spread": spread})
    return pd.DataFrame(rows, columns=_CELL + ["eval_key", "mean", "std", "n", "seeds",
                                               "splits", "spread"])


def _row_order(done: pd.DataFrame, stages: Sequence[str]) -> list[tuple[str, str]]:
    """(method, backbone) rows: stages in order, then backbones as the grid lists them, then
    the variants of a method in the order the grid lists them."""
    backbones = list(dict.fromkeys(done["backbone"].dropna()))
    methods = list(dict.fromkeys(zip(done["stage"], done["method"])))
    present = set(zip(done["method"], done["backbone"]))
    return [(m, b) for s in stages for b in backbones for st, m in methods
            if st == s and (m, b) in present]


def _pools(seeds: int, splits: str, spread: str) -> str:
    return f"({seeds}×{splits}{'†' if spread == 'splits' else ''})"


# ----------------------------------------------------------------------------- paper table


@dataclass(frozen=True)
class PaperTable:
    """The paper-style table of one metric. Unpacks as ``numbers, formatted = paper_table(..)``.

    ``numbers``: each cell's mean (index ``method``, ``backbone``; columns the protocols; NaN
    where no run), ``std``: its ± (over seeds, or over the splits of a one-run cell:
    ``spread``), ``count``: how many (run, split) values it pools, ``seeds``: how many runs,
    ``pools``: ``(s×n)`` / ``(1×n†)`` as shown in the cell, ``best``: True at the highest mean
    of each column, ``formatted``: ``mean ± std (s×n)`` strings (``–`` where no run)."""

    metric: str
    numbers: pd.DataFrame
    std: pd.DataFrame
    count: pd.DataFrame
    seeds: pd.DataFrame
    pools: pd.DataFrame
    best: pd.DataFrame
    formatted: pd.DataFrame

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.numbers, self.formatted))

    @property
    def label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    @property
    def caption(self) -> str:
        return f"{self.label} (%): {POOLING_NOTE}; bold: best of the column"

    def markdown(self) -> str:
        """A markdown table, the best cell of each column in bold, the pooling rule below."""
        shown = self.formatted.where(~self.best, "**" + self.formatted + "**")
        header = ["method", "backbone", *map(str, shown.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (method, backbone), row in shown.iterrows():
            lines.append("| " + " | ".join([method, str(backbone), *row.tolist()]) + " |")
        return "\n".join(lines) + f"\n\n{self.caption}\n"

    def styled(self):
        """The formatted table as a pandas Styler (notebook and HTML): best cells in bold."""
        best = self.best
        return (self.formatted.style
                .apply(lambda _: np.where(best, "font-weight: bold", ""), axis=None)
                .set_caption(self.caption))


def paper_table(df: pd.DataFrame, metric: str = "rank1", stages: Sequence[str] = PAPER_STAGES,
                decimals: int = 2) -> PaperTable:
    """Rows method × backbone (a method's variants are rows of their own), columns the
    protocols (``PROTOCOL_ORDER``); each cell pools the runs that differ only in their seed
    (see the module docstring and ``POOLING_NOTE``), read from their metrics.json.
    ``metric``: any of ``METRIC_NAMES`` (``mAP``: standard, ``mAP_mbanet``: MBA-Net's
    trapezoid mAP)."""
    done = labelled_runs(df, stages)
    pooled = _pooled(done, metric)
    rows = pd.MultiIndex.from_tuples(_row_order(done, stages),
                                     names=["method", "backbone"])
    columns = pd.Index(_protocols(pooled["protocol"]), name="protocol")
    pooled = pooled.assign(pools=[_pools(k, n, sp) for k, n, sp in
                                  zip(pooled["seeds"], pooled["splits"], pooled["spread"])])

    def grid(value: str, fill=np.nan, kind=float) -> pd.DataFrame:
        if not len(pooled):
            return pd.DataFrame(fill, index=rows, columns=columns)
        wide = pooled.pivot_table(index=["method", "backbone"], columns="protocol",
                                  values=value, aggfunc="first")
        return wide.reindex(index=rows, columns=columns).astype(kind)

    numbers, std, count = grid("mean"), grid("std"), grid("n")
    seeds = grid("seeds").fillna(0).astype(int)
    pools = grid("pools", fill="", kind=object).fillna("")
    best = numbers.eq(numbers.max(axis=0)) & numbers.notna()
    formatted = pd.DataFrame(
        [[("–" if math.isnan(a) else f"{a:.{decimals}f} ± {b:.{decimals}f} {p}")
          for a, b, p in zip(numbers.loc[i], std.loc[i], pools.loc[i])] for i in numbers.index],
        index=rows, columns=columns)
    return PaperTable(metric=metric, numbers=numbers, std=std,
                      count=count.fillna(0).astype(int), seeds=seeds, pools=pools, best=best,
                      formatted=formatted)


def seed_spread(df: pd.DataFrame, metric: str = "rank1",
                stages: Sequence[str] = PAPER_STAGES) -> pd.DataFrame:
    """Long table ``method, backbone, protocol, seed, mean, n``: per cell of the paper table,
    each run's (seed's) mean of the metric over its splits, for a strip plot of how much the
    seeds disagree."""
    _check_metric(metric)
    cache: dict = {}
    rows = []
    done = labelled_runs(df, stages)
    for (stage, method, backbone, protocol, _, seed), group in done.groupby(
            _CELL + ["seed"], sort=False, dropna=False):
        values = [v for f in group["folder"] for v in _split_values(f, metric, cache)]
        if values:
            rows.append({"stage": stage, "method": method, "backbone": backbone,
                         "protocol": protocol, "seed": None if pd.isna(seed) else int(seed),
                         "mean": float(np.mean(values)), "n": len(values)})
    out = pd.DataFrame(rows, columns=["stage", "method", "backbone", "protocol", "seed", "mean",
                                      "n"])
    order = {p: i for i, p in enumerate(_protocols(out["protocol"]))}
    methods = {m: i for i, m in enumerate(m for _, m in _row_order(done, stages))}
    backbones = {b: i for i, b in enumerate(dict.fromkeys(df["backbone"].dropna()))}
    return (out.assign(_p=out["protocol"].map(order), _m=out["method"].map(methods),
                       _b=out["backbone"].map(backbones))
            .sort_values(["_p", "_m", "_b", "seed"], kind="stable")
            .drop(columns=["_p", "_m", "_b", "stage"]).reset_index(drop=True))


def gain_over_zero_shot(df: pd.DataFrame, metric: str = "rank1",
                        stages: Sequence[str] = PAPER_STAGES) -> pd.DataFrame:
    """Long table ``method, backbone, protocol, mean, zero_shot, gain``: each trained cell's
    mean (as in the paper table) minus the mean of the zero-shot (stage 0) cell of the same
    backbone, protocol, test splits and evaluation settings (``eval_key``), in percentage
    points; NaN where the grid has no such zero-shot cell, or more than one."""
    pooled = _pooled(labelled_runs(df, stages), metric)
    zero = pooled[pooled["stage"] == "stage0"]
    trained = pooled[pooled["stage"] != "stage0"].copy()
    baselines = []
    for _, cell in trained.iterrows():
        match = zero[(zero["backbone"] == cell["backbone"])
                     & (zero["protocol"] == cell["protocol"])
                     & (zero["splits_key"] == cell["splits_key"])
                     & (zero["eval_key"] == cell["eval_key"])]
        baselines.append(float(match["mean"].iloc[0]) if len(match) == 1 else math.nan)
    trained["zero_shot"] = baselines
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
    paper, venue/year, table (where the number was read), method, backbone, dataset, aspect,
    gallery mode, ``trained_on`` (the protocol whose training data it was trained on: another
    protocol than its own for a cross-domain number), metric, its definition, value in percent,
    ``source_kind`` (``primary``: the authors' own report; ``secondary``: a copy of it, the note
    naming the primary source), source URL, note), with ``protocol`` (the protocol it was
    tested on) after ``aspect``, restricted to rows tested on ``real_protocols``
    (``11k/dorsal_r`` ... ``hd``; None = all). They were *published, not measured here*:
    show them beside a grid on real data only, never mixed into its numbers."""
    with resources.files(__package__).joinpath(_PUBLISHED_FILE).open("r") as fh:
        table = pd.read_csv(fh)
    table.insert(table.columns.get_loc("aspect") + 1, "protocol",
                 [domain_name(d, a) for d, a in zip(table["dataset"], table["aspect"])])
    if real_protocols is not None:
        table = table[table["protocol"].isin(list(real_protocols))]
    return table.reset_index(drop=True).rename_axis(PUBLISHED_LABEL)
