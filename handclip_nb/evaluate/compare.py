"""Evaluation across runs: any finished run folder on any test protocol, compared side by side.

One loader, :func:`load_run`, turns a run folder into an embedding function:

* ``stage0`` (zero-shot): the backbone named in its ``params.yaml``, global image embedding;
* ``stage2``: backbone + CLIP-ReID head, image encoder and head from ``checkpoints/best.pt``;
* ``stage3``: PromptSG from ``checkpoints/best.pt``, ranked with the run's ``prompt_mode``.

The model is rebuilt from the run's own ``params.yaml`` (backbone, weights, image size, resize
mode: what it was trained with) and the checkpoint's ``meta`` (number of training identities,
classifier), so the *training* data need not be present.  The *test* protocol comes from the
evaluation parameters (dataset, aspect, gallery_mode, data_root, num_splits, seed), so a run
trained on one aspect or dataset is tested on another just by changing those (cross-domain).

:func:`evaluate_runs` ranks every run on the same protocol (the same Monte-Carlo splits, so the
per-split numbers are paired), with optional flip TTA and k-reciprocal re-ranking, and returns
:class:`RunEvaluation` objects: mean ± std over splits in the ``runs.METRIC_NAMES`` schema.
Tables (:func:`comparison_table`) read either those evaluations or finished runs' own
``metrics.json``; :func:`write_tables` saves them as CSV (numbers) and markdown (mean ± std).

Cross-aspect caveat (11k): the train/test halves are cut per aspect from that aspect's sorted
ids, so some test people of aspect B may be training people of aspect A.  Each evaluation counts
them (``seen_test_people``, from the run's ``splits.json``) instead of hiding the leak.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import yaml

from ..data.protocols import Protocol
from ..runs import METRIC_NAMES, atomic_write_text, feature_cache_dir, resolve_path
from .features import extract_features
from .protocol_eval import EvalResult, evaluate_splits, needed_indices, rerank_settings

__all__ = ["RUN_STAGES", "RunFolderError", "RunInfo", "LoadedRun", "RunEvaluation", "load_run",
           "zero_shot_run", "default_run_dirs", "evaluate_run", "evaluate_runs",
           "run_records", "comparison_table", "format_table", "write_tables", "cmc_curves",
           "split_values", "tsne_points", "tsne_by_run", "failure_figures", "save_figures",
           "evaluation_record"]

#: Stages whose run folders hold an image model worth ranking with.
RUN_STAGES = ("stage0", "stage2", "stage3")


class RunFolderError(FileNotFoundError):
    """A folder in ``runs`` that cannot be evaluated; the message names it and the fix."""


# ----------------------------------------------------------------------------- run loading


@dataclass(frozen=True)
class RunInfo:
    """What a row of the comparison says about a run (no model: cheap to keep around)."""

    name: str
    folder: str | None  # None: the zero-shot backbone of the evaluation parameters
    stage: str
    params: Mapping[str, Any]  # the run's own parameters: what it was trained on
    recorded: Mapping[str, Any] | None  # its metrics.json
    backbone_display: str
    prompt_mode: str | None = None  # stage 3: the inference prompt used

    @property
    def trained_on(self) -> str:
        if self.stage == "stage0":
            return "zero-shot"
        return _domain(self.params["dataset"], self.params.get("aspect"))


@dataclass
class LoadedRun:
    """A run rebuilt for inference: ``encode`` maps an image batch to its ranking feature."""

    info: RunInfo
    backbone: Any  # ClipBackbone
    model: torch.nn.Module | None
    encode: Callable[[torch.Tensor], torch.Tensor] | None  # None = the global embedding
    cache_tag: str | None  # identifies ``encode`` for the feature cache

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def transform(self):
        """The evaluation transform the run was trained with (its image size, resize mode)."""
        from ..data.transforms import build_transform

        return build_transform(self.info.params["image_size"], train=False,
                               resize_mode=self.info.params["resize_mode"])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Ranking features of a preprocessed batch (not L2-normalised)."""
        if self.encode is not None:
            return self.encode(images)
        return self.backbone.encode_image(images).global_embedding


def _domain(dataset: str, aspect: str | None) -> str:
    return f"11k/{aspect}" if dataset == "11k" else "hd"


def _read_run_folder(run_dir: str | Path) -> tuple[Path, dict, dict]:
    """(folder, its params, its metrics.json) of a finished run, or a RunFolderError."""
    folder = resolve_path(run_dir)
    if not folder.is_dir():
        raise RunFolderError(
            f"run folder {folder} (from runs: {str(run_dir)!r}) does not exist. Fix: correct the "
            f"path in `runs`, or first run the stage notebook with output_dir={run_dir}")
    params_path = folder / "params.yaml"
    if not params_path.is_file():
        raise RunFolderError(
            f"{folder} is not a run folder: it has no params.yaml. Fix: list the output_dir of a "
            f"stage notebook run in `runs`")
    if not (folder / "metrics.json").is_file():
        raise RunFolderError(
            f"run {folder} has not finished: its metrics.json (written last, when the run "
            f"completes) is missing. Fix: run the notebook to the end (a training stage "
            f"continues with -p resume true -p output_dir {run_dir}), or remove it from `runs`")
    from ..runs import read_metrics

    params = (yaml.safe_load(params_path.read_text()) or {}).get("params") or {}
    return folder, params, read_metrics(folder)


def load_run(run_dir: str | Path, device: str | torch.device = "auto",
             name: str | None = None) -> LoadedRun:
    """Rebuild a finished stage-0, stage-2 or stage-3 run folder as an embedding function.

    Raises :class:`RunFolderError` for a missing, foreign or unfinished folder, ``ValueError``
    for a stage without an image model of its own (stage 1, attention), and
    ``CheckpointError`` for a checkpoint that does not fit the run's backbone.
    """
    from ..models.backbones import build_backbone, resolve_device
    from ..train.checkpoint import CheckpointError, check_meta, load_checkpoint

    folder, params, metrics = _read_run_folder(run_dir)
    stage = params.get("stage") or metrics.get("stage")
    if not params or stage is None:
        raise RunFolderError(f"{folder}/params.yaml holds no resolved parameters (it was not "
                             f"written by a stage notebook); list a stage run's output_dir")
    if stage == "stage1":
        raise ValueError(
            f"{folder} is a stage-1 run: it learns prompts with the image encoder frozen, so its "
            f"image features are the zero-shot backbone's. Evaluate the stage-0 run, or the "
            f"stage-2 run that used these prompts")
    if stage == "attention":
        raise ValueError(f"{folder} is an attention run (figures only); evaluate the stage-3 run "
                         f"it shows instead: {params.get('stage3_dir')}")
    if stage not in RUN_STAGES:
        raise ValueError(f"{folder}: cannot evaluate a {stage!r} run; evaluable stages: "
                         f"{', '.join(RUN_STAGES)}")
    params = dict(params)
    params["device"] = str(resolve_device(device))
    backbone = build_backbone(params["backbone"], weights=params.get("weights"),
                              image_size=params["image_size"], device=params["device"],
                              seed=params["seed"], download_root=params.get("download_root"))
    info = dict(name=name or folder.name, folder=str(folder), stage=stage, params=params,
                recorded=metrics)
    if stage == "stage0":
        return LoadedRun(info=RunInfo(**info, backbone_display=backbone.display_name),
                         backbone=backbone, model=None, encode=None, cache_tag=None)

    best = folder / "checkpoints" / "best.pt"
    if not best.is_file():
        raise RunFolderError(
            f"run {folder} has no {best.relative_to(folder)}: it never validated (epochs=0?), "
            f"so there is no trained state to evaluate. Fix: train it for at least one epoch")
    ckpt = load_checkpoint(best, stage=stage)
    check_meta(best, ckpt["meta"], {"backbone": backbone.name})
    num_classes, classifier = int(ckpt["meta"]["num_classes"]), ckpt["meta"]["classifier"]
    prompt_mode = None
    if stage == "stage2":
        from ..train.stage2 import ReIDModel

        model = ReIDModel(backbone, num_classes, classifier)
        encode = model.embed
        display = f"{backbone.display_name} + stage-2 fine-tuning"
    else:
        from ..data.handinfo import HD_ASPECT
        from ..models.promptsg import PromptSG

        # the prompt names the aspect the run was trained on (what its text side learned)
        aspect = params["aspect"] if params["dataset"] == "11k" else HD_ASPECT
        model = PromptSG(backbone, num_classes, aspect=aspect, classifier=classifier)
        prompt_mode = params.get("prompt_mode", "simplified")

        def encode(images, _model=model, _mode=prompt_mode):
            return _model.embed(images, prompt_mode=_mode)

        display = f"{backbone.display_name} + PromptSG ({prompt_mode} prompt)"
    model = model.to(params["device"])
    for key, module in model.trainable_modules().items():
        try:
            module.load_state_dict(ckpt["model"][key])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"{best}: its {key!r} state does not fit the model rebuilt from "
                f"{folder / 'params.yaml'} ({str(exc).splitlines()[0][:200]}); was the folder "
                f"edited, or the checkpoint copied from another run?") from None
    model.eval()
    # the backbone fingerprint (part of every cache key) covers the image encoder; the tag
    # must tell the heads apart
    tag = hashlib.sha256(f"{stage}|{prompt_mode}".encode())
    for key in sorted(k for k in ckpt["model"] if k != "visual"):
        for pname, tensor in sorted(ckpt["model"][key].items()):
            tag.update(f"{key}.{pname}".encode())
            tag.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                       .numpy().tobytes())
    return LoadedRun(info=RunInfo(**info, backbone_display=display, prompt_mode=prompt_mode),
                     backbone=backbone, model=model, encode=encode,
                     cache_tag=tag.hexdigest()[:24])


def zero_shot_run(params: Mapping) -> LoadedRun:
    """The zero-shot backbone of the evaluation parameters, without a run folder."""
    from ..models.backbones import build_backbone

    backbone = build_backbone(params["backbone"], weights=params["weights"],
                              image_size=params["image_size"], device=params["device"],
                              seed=params["seed"], download_root=params["download_root"])
    info = RunInfo(name=f"zero-shot {params['backbone']}", folder=None, stage="stage0",
                   params=dict(params), recorded=None, backbone_display=backbone.display_name)
    return LoadedRun(info=info, backbone=backbone, model=None, encode=None, cache_tag=None)


def default_run_dirs(params: Mapping) -> list[Path]:
    """The finished stage-2 and stage-3 runs in these parameters' default folders (same
    dataset, aspect, backbone and seed), for an evaluation notebook run without ``runs``."""
    from ..params import default_output_dir

    found = []
    for stage in ("stage2", "stage3"):
        folder = resolve_path(default_output_dir(params, stage))
        if (folder / "metrics.json").is_file() and (folder / "checkpoints" / "best.pt").is_file():
            found.append(folder)
    return found


# ----------------------------------------------------------------------------- evaluation


@dataclass
class RunEvaluation:
    """One run ranked on one test protocol."""

    info: RunInfo
    protocol: Protocol
    test: EvalResult
    features: torch.Tensor  # L2-normalised test features, row ``row_of[item index]``
    row_of: dict[int, int]
    settings: dict  # flip_tta, rerank, ap_mode, image_size, resize_mode
    seen_test_people: int | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def summary(self) -> dict:
        return self.test.summary

    @property
    def tested_on(self) -> str:
        return _domain(self.protocol.dataset, self.protocol.aspect)

    @property
    def cross_domain(self) -> bool:
        return self.info.stage != "stage0" and self.info.trained_on != self.tested_on

    def record(self) -> dict:
        """A JSON-able row: the evaluation run's ``metrics.json`` lists one per run."""
        recorded = self.info.recorded or {}
        same_protocol = (recorded.get("splits_hash") == self.protocol.manifest()["content_hash"]
                         if recorded else None)
        return {
            "run": self.name, "folder": self.info.folder, "stage": self.info.stage,
            "backbone": self.info.params["backbone"],
            "backbone_display": self.info.backbone_display,
            "trained_on": self.info.trained_on, "tested_on": self.tested_on,
            "gallery_mode": self.protocol.gallery_mode, "cross_domain": self.cross_domain,
            "seen_test_people": self.seen_test_people, "num_splits": len(self.test.splits),
            **self.settings, "test": self.summary,
            "cmc_test_mean": [round(float(v), 4) for v in self.test.cmc[:20]],
            # the run's own numbers, for a check that re-evaluation reproduces them
            "same_protocol_as_run": same_protocol,
            "recorded_test_mean": ({k: v["mean"] for k, v in recorded["test"].items()}
                                   if recorded.get("test") else None),
            "seconds": round(self.seconds, 2),
        }


def _seen_test_people(info: RunInfo, protocol: Protocol) -> int | None:
    """Test people of ``protocol`` that the run trained on (its splits.json), same dataset."""
    if info.stage == "stage0" or info.folder is None:
        return None
    if info.params.get("dataset") != protocol.dataset:
        return 0  # different datasets: different people
    manifest = Path(info.folder) / "splits.json"
    if not manifest.is_file():
        return None
    import json

    trained = set(json.loads(manifest.read_text()).get("train_people", []))
    return len(trained & set(protocol.test_people))


def evaluate_run(run: LoadedRun, params: Mapping, protocol: Protocol | None = None,
                 cache_dir: str | Path | None = None) -> RunEvaluation:
    """Rank ``run``'s features on every test split of ``protocol`` (default: the protocol of
    ``params``) with the evaluation settings of ``params`` (flip_tta, rerank*, max_rank,
    ap_mode, batch_size).  Test identities only: no model selection happens here."""
    from ..data.datasets import build_protocol

    protocol = protocol if protocol is not None else build_protocol(params)
    started = time.time()
    splits = list(protocol.test)
    indices = needed_indices(splits)
    features = extract_features(run.backbone, protocol.paths(indices), run.transform(),
                                batch_size=params["batch_size"], device=run.device,
                                flip=params["flip_tta"], cache_dir=cache_dir,
                                num_workers=params["num_workers"], desc=f"encode {run.info.name}",
                                encode=run.encode, cache_tag=run.cache_tag)
    row_of = {idx: r for r, idx in enumerate(indices)}
    rerank = rerank_settings(params)
    test = evaluate_splits(features, row_of, protocol, splits, "test",
                           max_rank=params["max_rank"], ap_mode=params["ap_mode"], rerank=rerank)
    settings = {"flip_tta": bool(params["flip_tta"]), "rerank": rerank,
                "ap_mode": params["ap_mode"], "image_size": list(run.info.params["image_size"]),
                "resize_mode": run.info.params["resize_mode"]}
    if run.info.prompt_mode:
        settings["prompt_mode"] = run.info.prompt_mode
    return RunEvaluation(info=run.info, protocol=protocol, test=test, features=features,
                         row_of=row_of, settings=settings,
                         seen_test_people=_seen_test_people(run.info, protocol),
                         seconds=time.time() - started)


def _unique_names(folders: Sequence[Path]) -> list[str]:
    """Folder names, lengthened with parent folders where two runs share a name."""
    names = [f.name for f in folders]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(f.parts[-depth:]) for f in folders]
    return names


def evaluate_runs(params: Mapping, protocol: Protocol | None = None,
                  run_dirs: Iterable[str | Path] | None = None,
                  cache_dir: str | Path | None = None) -> list[RunEvaluation]:
    """Evaluate each run of ``run_dirs`` (default ``params["runs"]``) on one protocol.

    Without runs: the zero-shot ``backbone`` of ``params`` plus :func:`default_run_dirs`.
    Every folder is checked before any model is built, so a typo in the last entry fails at
    once.  Models are rebuilt one at a time and dropped after encoding.  ``cache_dir``
    defaults to the shared feature cache when ``params["feature_cache"]`` is on.
    """
    from ..data.datasets import build_protocol

    given = list(params.get("runs") or []) if run_dirs is None else list(run_dirs)
    folders = [resolve_path(d) for d in given] if given else default_run_dirs(params)
    for folder in given or folders:
        _read_run_folder(folder)  # fail fast, naming the folder as the user wrote it
    if cache_dir is None and params.get("feature_cache"):
        cache_dir = feature_cache_dir()
    protocol = protocol if protocol is not None else build_protocol(params)
    loaders: list[Callable[[], LoadedRun]] = []
    if not given:
        loaders.append(lambda: zero_shot_run(params))
    loaders += [lambda f=f, n=n: load_run(f, params["device"], name=n)
                for f, n in zip(folders, _unique_names(folders))]
    evaluations = []
    for load in loaders:
        run = load()
        evaluations.append(evaluate_run(run, params, protocol, cache_dir=cache_dir))
        del run  # free the model before building the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return evaluations


# ----------------------------------------------------------------------------- tables


def _record_from_metrics(metrics: Mapping, folder: Path) -> dict:
    """A stage run's own metrics.json as a comparison row (trained and tested in-domain)."""
    domain = _domain(metrics["dataset"], metrics["aspect"])
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
    from ..runs import read_metrics

    records = []
    for source in sources:
        if isinstance(source, RunEvaluation):
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


def comparison_table(sources: Iterable[Any]) -> "pd.DataFrame":  # noqa: F821
    """One row per run: what it is, where it was trained and tested, and each metric's mean
    and std over splits in percent (numeric ``<metric>_mean`` / ``<metric>_std`` columns, so
    the CSV can be re-analysed; :func:`format_table` gives the ``mean ± std`` view)."""
    import pandas as pd

    rows, names = [], []
    for r in run_records(sources):
        row = {"stage": r["stage"], "backbone": r.get("backbone_display", r["backbone"]),
               "trained_on": r["trained_on"], "tested_on": r["tested_on"],
               "gallery": r.get("gallery_mode"), "splits": r["num_splits"],
               "flip_tta": bool(r.get("flip_tta")), "rerank": _rerank_label(r.get("rerank")),
               "seen_test_people": r.get("seen_test_people")}
        for m in METRIC_NAMES:
            row[f"{m}_mean"] = round(float(r["test"][m]["mean"]), 4)
            row[f"{m}_std"] = round(float(r["test"][m]["std"]), 4)
        rows.append(row)
        names.append(r["run"])
    if not rows:
        raise ValueError("nothing to compare: no runs given")
    if len(set(names)) < len(names):  # the same folder name from two places: number them
        names = [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]
    table = pd.DataFrame(rows, index=pd.Index(names, name="run"))
    table["seen_test_people"] = table["seen_test_people"].astype("Int64")  # None for zero-shot
    return table


def format_table(table: "pd.DataFrame", decimals: int = 2) -> "pd.DataFrame":  # noqa: F821
    """The comparison with each metric as ``mean ± std`` (what the notebook and README show)."""
    import pandas as pd

    out = table.drop(columns=[c for c in table.columns
                              if c.endswith(("_mean", "_std"))]).copy()
    out["seen_test_people"] = ["–" if v is None or v is pd.NA else str(v)
                               for v in table["seen_test_people"].astype(object)]
    for m in METRIC_NAMES:
        out[m] = [f"{a:.{decimals}f} ± {b:.{decimals}f}"
                  for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])]
    return out


def write_tables(table: "pd.DataFrame", output_dir: str | Path,  # noqa: F821
                 name: str = "comparison", decimals: int = 2) -> dict[str, Path]:
    """``<name>.csv`` (numeric) and ``<name>.md`` (mean ± std) in ``output_dir``, atomically."""
    from ..pipeline import markdown_table

    out = resolve_path(output_dir)
    return {"csv": atomic_write_text(out / f"{name}.csv", table.to_csv()),
            "md": atomic_write_text(out / f"{name}.md",
                                    markdown_table(format_table(table, decimals)))}


# ----------------------------------------------------------------------------- figure data


def cmc_curves(evaluations: Sequence[RunEvaluation]) -> dict[str, np.ndarray]:
    """``{run name: mean CMC over splits (percent)}`` for :func:`handclip_nb.viz.plot_cmc`."""
    return {e.name: e.test.cmc for e in evaluations}


def split_values(sources: Iterable[Any]) -> "pd.DataFrame":  # noqa: F821
    """Long table ``run, metric, split, value`` (percent) of every run's per-split metrics."""
    import pandas as pd

    rows = [{"run": r["run"], "metric": m, "split": s, "value": float(v)}
            for r in run_records(sources) for m in METRIC_NAMES
            for s, v in enumerate(r["test"][m]["per_split"])]
    return pd.DataFrame(rows, columns=["run", "metric", "split", "value"])


def tsne_points(evaluation: RunEvaluation, max_ids: int = 12, seed: int = 0,
                split: int = 0) -> dict[str, np.ndarray]:
    """2-D t-SNE of the test embeddings of ``max_ids`` randomly chosen test identities (their
    queries and gallery image in ``split``; cross-aspect and HD distractors left out).

    Returns ``{"points": [n, 2], "person": [n] str, "gallery": [n] bool}``.
    """
    from sklearn.manifold import TSNE

    protocol = evaluation.protocol
    chosen = protocol.test[split]
    items = [i for i in (*chosen.query, *chosen.gallery)
             if protocol.items[i].aspect == protocol.aspect and not protocol.items[i].distractor]
    people = sorted({protocol.items[i].person for i in items})
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(people, size=min(max_ids, len(people)), replace=False).tolist())
    items = [i for i in items if protocol.items[i].person in keep]
    if len(items) < 3:
        raise ValueError(f"t-SNE needs at least 3 test images, got {len(items)}")
    feats = evaluation.features[[evaluation.row_of[i] for i in items]].numpy()
    # perplexity must stay below the number of points; 30 (the default) for large sets
    perplexity = float(min(30.0, max(1.0, (len(items) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                  ).fit_transform(feats)
    gallery = set(chosen.gallery)
    return {"points": points, "person": np.array([protocol.items[i].person for i in items]),
            "gallery": np.array([i in gallery for i in items])}


def tsne_by_run(evaluations: Sequence[RunEvaluation], max_ids: int = 12,
                seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """:func:`tsne_points` of every run, the same people in each (for ``viz.plot_tsne``)."""
    return {e.name: tsne_points(e, max_ids=max_ids, seed=seed) for e in evaluations}


def failure_figures(evaluations: Sequence[RunEvaluation], k: int = 5, n_queries: int = 6,
                    seed: int = 0) -> dict[str, Any]:
    """``{"failures_<run>": figure}``: queries of the first split whose rank-1 is wrong, with
    their top-k gallery (green = same person), ranked by the distances used for the metrics
    (re-ranked when re-ranking is on).  ``n_queries=0``: no figures."""
    from .. import viz

    figures = {}
    if n_queries <= 0:
        return figures
    for e in evaluations:
        first = e.test.splits[0]
        fig = viz.retrieval_grid(e.protocol, first.split, first.distmat, k=k,
                                 n_queries=n_queries, failures_only=True, seed=seed)
        fig.suptitle(f"{e.name}: rank-1 failures (green = same person)", fontsize=10)
        figures[f"failures_{_slug(e.name)}"] = fig
    return figures


def save_figures(run, figures: Mapping[str, Any]) -> list[Path]:
    """Save each figure as ``<run folder>/figures/<name>.png`` (a :class:`runs.Run`)."""
    return [run.save_figure(fig, name) for name, fig in figures.items()]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ----------------------------------------------------------------------------- metrics.json


def evaluation_record(params: Mapping, protocol: Protocol,
                      evaluations: Sequence[RunEvaluation], tables: Mapping | None = None,
                      figures: Iterable[str] = ()) -> dict:
    """``metrics.json`` of an evaluation run.  The DESIGN §3 keys (``test``, ``backbone``)
    describe the *first* run (``primary_run``); ``runs`` holds one record per evaluated run."""
    if not evaluations:
        raise ValueError("no evaluated runs to record")
    first = evaluations[0]
    return {
        "stage": "evaluation", "dataset": protocol.dataset, "aspect": protocol.aspect,
        "gallery_mode": protocol.gallery_mode, "backbone": first.info.params["backbone"],
        "backbone_display": first.info.backbone_display, "primary_run": first.name,
        "num_splits": protocol.num_splits, "ap_mode": params["ap_mode"],
        "flip_tta": bool(params["flip_tta"]), "rerank": rerank_settings(params),
        "test": first.summary, "cmc_test_mean": [round(float(v), 4) for v in first.test.cmc[:20]],
        "data": protocol.sizes(), "splits_hash": protocol.manifest()["content_hash"],
        "runs": [e.record() for e in evaluations],
        "tables": {k: Path(v).name for k, v in (tables or {}).items()},
        "figures": sorted(Path(f).name for f in figures),
    }
