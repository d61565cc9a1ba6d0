"""Evaluation across runs: any finished run folder on any test protocol, compared side by side.

Each run folder is rebuilt by the one run loader (:func:`handclip_nb.run_loader.load_run`)
from its own ``params.yaml`` and checkpoint.  The *test* protocol comes from the
evaluation parameters (dataset, aspect, gallery_mode, data_root, num_splits, split_seed), so a run
trained on one aspect or dataset is tested on another just by changing those (cross-domain).

:func:`evaluate_runs` ranks every run on the same protocol (the same Monte-Carlo splits, so the
per-split numbers are paired), with optional flip TTA and k-reciprocal re-ranking, and returns
:class:`RunEvaluation` objects: mean ± std over splits in the ``runs.METRIC_NAMES`` schema.
Tables are :mod:`.tables`; t-SNE maps :mod:`.tsne`; figures :mod:`handclip_nb.viz`.

Cross-aspect caveat (11k): the train/test halves are cut per aspect from that aspect's sorted
ids, so some test people of aspect B may be training people of aspect A.  Each evaluation counts
them (``seen_test_people``, from the run's ``splits.json``) instead of hiding the leak.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..data.datasets import build_protocol
from ..data.protocols import Protocol
from ..data.provenance import is_synthetic_dataset
from ..params import default_output_dir
from ..run_loader import (LoadedRun, RunInfo, check_stage, load_run, read_run_folder,
                          zero_shot_run)
from ..runs import (BEST_CHECKPOINT, METRICS_FILE, SPLITS_FILE, domain_name, feature_cache_dir,
                    resolve_path)
from .features import extract_features
from .protocol_eval import EvalResult, evaluate_splits, needed_indices, rerank_settings

__all__ = ["RUN_STAGES", "RunEvaluation", "check_evaluable", "default_run_dirs", "evaluate_run",
           "evaluate_runs",
           "cmc_curves", "evaluation_record"]

#: Stages whose run folders hold an image model worth ranking with.
RUN_STAGES = ("stage0", "stage2", "stage3", "handid")


def default_run_dirs(params: Mapping) -> list[Path]:
    """The finished stage-2, stage-3 and CLIP-HandID runs in these parameters' default folders
    (same dataset, aspect, backbone and seed), for an evaluation notebook run without ``runs``."""
    found = []
    for stage in ("stage2", "stage3", "handid"):
        folder = resolve_path(default_output_dir(params, stage))
        if (folder / METRICS_FILE).is_file() and (folder / BEST_CHECKPOINT).is_file():
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
        return domain_name(self.protocol.dataset, self.protocol.aspect)

    @property
    def cross_domain(self) -> bool:
        return self.info.stage != "stage0" and self.info.trained_on != self.tested_on

    def record(self) -> dict:
        """A JSON-able row: the evaluation run's ``metrics.json`` lists one per run."""
        recorded = self.info.recorded or {}
        # the same test splits on the same images (runs hold out different training ids)
        same_protocol = ((recorded["test_splits_hash"] == self.protocol.test_hash()
                          if "test_splits_hash" in recorded
                          else recorded.get("splits_hash") == self.protocol.manifest()["content_hash"])
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
            "verification": (self.test.verification.summary
                             if self.test.verification is not None else None),
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
    manifest = Path(info.folder) / SPLITS_FILE
    if not manifest.is_file():
        return None
    trained = set(json.loads(manifest.read_text()).get("train_people", []))
    return len(trained & set(protocol.test_people))


def evaluate_run(run: LoadedRun, params: Mapping, protocol: Protocol | None = None,
                 cache_dir: str | Path | None = None) -> RunEvaluation:
    """Rank ``run``'s features on every test split of ``protocol`` (default: the protocol of
    ``params``) with the evaluation settings of ``params`` (flip_tta, rerank*, max_rank,
    batch_size).  Both APs (``mAP``, ``mAP_mbanet``) are computed; ``ap_mode`` is only recorded
    in ``settings``.  Test identities only: no model selection happens here."""
    protocol = protocol if protocol is not None else build_protocol(params)
    started = time.time()
    splits = list(protocol.test)
    indices = needed_indices(splits)
    features = extract_features(run.backbone, protocol.paths(indices), run.image_source(params),
                                batch_size=params["batch_size"], device=run.device,
                                flip=params["flip_tta"], cache_dir=cache_dir,
                                num_workers=params["num_workers"], desc=f"encode {run.info.name}",
                                encode=run.encode, cache_tag=run.cache_tag,
                                precision=run.precision)
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


def check_evaluable(run_dir: str | Path) -> None:
    """Refuse, before any model is built, a folder that is not a finished run with an image
    model of its own, saying what to evaluate instead."""
    folder, params, _ = read_run_folder(run_dir)
    stage = params["stage"]
    if stage == "stage1":
        raise ValueError(
            f"{folder} is a stage-1 run: it learns prompts with the image encoder frozen, so its "
            f"image features are the zero-shot backbone's. Evaluate the stage-0 run, or the "
            f"stage-2 run that used these prompts")
    check_stage(folder, params, RUN_STAGES)


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
    given = list(params.get("runs") or []) if run_dirs is None else list(run_dirs)
    folders = [resolve_path(d) for d in given] if given else default_run_dirs(params)
    for folder in given or folders:
        check_evaluable(folder)  # fail fast, naming the folder as the user wrote it
    if cache_dir is None and params.get("feature_cache"):
        cache_dir = feature_cache_dir()
    protocol = protocol if protocol is not None else build_protocol(params)
    loaders: list[Callable[[], LoadedRun]] = []
    if not given:
        loaders.append(lambda: zero_shot_run(params))
    loaders += [lambda f=f, n=n: load_run(f, params["device"], name=n, stages=RUN_STAGES)
                for f, n in zip(folders, _unique_names(folders))]
    evaluations = []
    for load in loaders:
        run = load()
        evaluations.append(evaluate_run(run, params, protocol, cache_dir=cache_dir))
        del run  # free the model before building the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return evaluations


def cmc_curves(evaluations: Sequence[RunEvaluation]) -> dict[str, np.ndarray]:
    """``{run name: mean CMC over splits (percent)}`` for :func:`handclip_nb.viz.plot_cmc`."""
    return {e.name: e.test.cmc for e in evaluations}


# ----------------------------------------------------------------------------- metrics.json


def evaluation_record(params: Mapping, protocol: Protocol,
                      evaluations: Sequence[RunEvaluation], tables: Mapping | None = None,
                      figures: Iterable[str] = ()) -> dict:
    """``metrics.json`` of an evaluation run.  The docs/contracts.md keys (``test``, ``backbone``)
    describe the *first* run (``primary_run``); ``runs`` holds one record per evaluated run."""
    if not evaluations:
        raise ValueError("no evaluated runs to record")
    first = evaluations[0]
    return {
        "stage": "evaluation", "dataset": protocol.dataset, "aspect": protocol.aspect,
        "synthetic": is_synthetic_dataset(params),  # the test data (params' data_root)
        "gallery_mode": protocol.gallery_mode, "backbone": first.info.params["backbone"],
        "backbone_display": first.info.backbone_display, "primary_run": first.name,
        "num_splits": protocol.num_splits, "split_seed": protocol.seed,
        "ap_mode": params["ap_mode"],
        "flip_tta": bool(params["flip_tta"]), "rerank": rerank_settings(params),
        "test": first.summary, "cmc_test_mean": [round(float(v), 4) for v in first.test.cmc[:20]],
        "data": protocol.sizes(), "splits_hash": protocol.manifest()["content_hash"],
        "test_splits_hash": protocol.test_hash(),
        "runs": [e.record() for e in evaluations],
        "tables": {k: Path(v).name for k, v in (tables or {}).items()},
        "figures": sorted(Path(f).name for f in figures),
    }
