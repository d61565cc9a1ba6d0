"""Evaluate features on a protocol's splits and summarise over splits (docs/contracts.md schema).

Percent values (0–100) are used in every summary and in ``metrics.json``; ``rank_metrics``
itself returns fractions.  ``std`` is the sample standard deviation over splits (ddof=1; 0 for
a single split).  Every summary holds both APs, ``mAP`` (standard) and ``mAP_mbanet`` (MBA-Net's
trapezoid mAP); the ``ap_mode`` parameter only names the one model selection ranks epochs by
(``constants.AP_METRIC[ap_mode]``).

Split distances are cosine distances of the L2-normalised features, or, with re-ranking
settings (``rerank_settings(params)``: the evaluation notebook's ``rerank*`` parameters), the
k-reciprocal re-ranked distances of :mod:`handclip_nb.evaluate.reranking`, computed per split
from that split's queries and gallery only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from ..data.protocols import Protocol, Split
from ..constants import AP_METRIC, METRIC_NAMES
from ..data.images import image_source
from ..data.provenance import is_synthetic_dataset
from ..device import run_precision
from .features import cosine_distance, extract_features
from .metrics import rank_metrics
from .open_set import (FITTED, NEVER_TRAINED, far_interval, identity_pair_counts,
                       query_gallery_split, too_few_pairs_warning)
from .reranking import rerank_features
from .verification import (VerificationResult, calibrate_threshold, evaluate_verification,
                           far_at_threshold)

__all__ = ["SplitResult", "EvalResult", "evaluate_split", "evaluate_splits", "summarise",
           "evaluate_backbone", "metrics_record", "needed_indices", "rerank_settings",
           "split_distances", "calibration_split", "calibration_identities",
           "calibrate_open_set"]


@dataclass
class SplitResult:
    split: Split
    metrics: dict  # rank_metrics output (fractions)
    distmat: np.ndarray | None = None  # kept for the first split only (figures)

    def percent(self) -> dict[str, float]:
        cmc = self.metrics["cmc"]
        return {"rank1": 100 * float(cmc[0]), "rank5": 100 * float(cmc[min(4, len(cmc) - 1)]),
                "rank10": 100 * float(cmc[min(9, len(cmc) - 1)]),
                "mAP": 100 * float(self.metrics["mAP"]),
                "mAP_mbanet": 100 * float(self.metrics["mAP_mbanet"]),
                "mINP": 100 * float(self.metrics["mINP"])}


@dataclass
class EvalResult:
    name: str
    splits: list[SplitResult]
    summary: dict = field(default_factory=dict)
    #: verification over the same splits (every query-gallery pair; None when not asked for)
    verification: VerificationResult | None = None
    #: the open-set threshold calibrated on training identities and its FAR/TAR on these
    #: splits (:func:`calibrate_open_set`; test results of a run only)
    open_set: dict | None = None

    @property
    def cmc(self) -> np.ndarray:
        """Mean CMC over splits, in percent."""
        return 100 * np.mean([s.metrics["cmc"] for s in self.splits], axis=0)

    def table_row(self) -> dict[str, str]:
        return {k: f"{v['mean']:.2f} ± {v['std']:.2f}" for k, v in self.summary.items()}


def summarise(per_split: Sequence[Mapping[str, float]]) -> dict[str, dict]:
    """``[{"rank1": .., ...}, ...]`` (percent) → ``{"rank1": {"mean", "std", "per_split"}}``.

    Summarises the ``METRIC_NAMES`` the splits carry, in that order (``SplitResult.percent``
    carries all of them; a name some splits lack is a ``KeyError``)."""
    out = {}
    for name in [n for n in METRIC_NAMES if any(n in s for s in per_split)]:
        values = np.asarray([float(s[name]) for s in per_split])
        out[name] = {"mean": float(values.mean()),
                     "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "per_split": [float(v) for v in values]}
    return out


def needed_indices(splits: Sequence[Split]) -> list[int]:
    """Every item index used by ``splits`` (sorted), so each image is encoded once."""
    return sorted({i for s in splits for i in (*s.query, *s.gallery)})


def rerank_settings(params: Mapping) -> dict | None:
    """``{"k1", "k2", "lambda_value"}`` when ``params["rerank"]`` is on, else None (stages
    without the evaluation parameters never re-rank)."""
    if not params.get("rerank", False):
        return None
    return {"k1": int(params["rerank_k1"]), "k2": int(params["rerank_k2"]),
            "lambda_value": float(params["rerank_lambda"])}


def split_distances(features: torch.Tensor, row_of: Mapping[int, int], split: Split,
                    rerank: Mapping | None = None) -> np.ndarray:
    """Query × gallery distances of one split: cosine, or re-ranked with ``rerank`` settings."""
    q = features[[row_of[i] for i in split.query]]
    g = features[[row_of[i] for i in split.gallery]]
    if rerank is not None:
        return rerank_features(q, g, **rerank)
    return cosine_distance(q, g).numpy()


def _check_ap_mode(ap_mode: str) -> None:
    if ap_mode not in AP_METRIC:
        raise ValueError(f"unknown ap_mode {ap_mode!r}; valid values: {', '.join(AP_METRIC)}")


def evaluate_split(features: torch.Tensor, row_of: Mapping[int, int], protocol: Protocol,
                   split: Split, max_rank: int = 50, ap_mode: str = "standard",
                   keep_distmat: bool = False, rerank: Mapping | None = None) -> SplitResult:
    """Rank one split.  Both APs are computed whatever ``ap_mode`` says; it is checked here so
    that a caller passing the run's parameter learns of a bad value at once."""
    _check_ap_mode(ap_mode)
    dist = split_distances(features, row_of, split, rerank)
    m = rank_metrics(dist, protocol.ids_of(split.query), protocol.ids_of(split.gallery),
                     max_rank=max_rank)
    return SplitResult(split=split, metrics=m, distmat=dist if keep_distmat else None)


def evaluate_splits(features: torch.Tensor, row_of: Mapping[int, int], protocol: Protocol,
                    splits: Sequence[Split], name: str, max_rank: int = 50,
                    ap_mode: str = "standard", rerank: Mapping | None = None,
                    verification: bool = True) -> EvalResult:
    """Rank every split and summarise (both APs; ``ap_mode`` as in :func:`evaluate_split`).
    With ``verification`` the same distances also give the verification metrics of every
    query-gallery pair of each split (``evaluate.verification``)."""
    _check_ap_mode(ap_mode)
    results: list[SplitResult] = []

    def ranked_splits():  # one split's distances in memory at a time
        for k, s in enumerate(splits):
            dist = split_distances(features, row_of, s, rerank)
            q_ids, g_ids = protocol.ids_of(s.query), protocol.ids_of(s.gallery)
            results.append(SplitResult(split=s, metrics=rank_metrics(dist, q_ids, g_ids,
                                                                     max_rank=max_rank),
                                       distmat=dist if k == 0 else None))
            yield dist, q_ids, g_ids

    if verification:
        checked = evaluate_verification(ranked_splits())
    else:
        checked = None
        for _ in ranked_splits():
            pass
    return EvalResult(name=name, splits=results,
                      summary=summarise([r.percent() for r in results]), verification=checked)


def evaluate_backbone(backbone, protocol: Protocol, params: Mapping, cache_dir=None,
                      encode=None, cache_tag=None) -> dict[str, EvalResult]:
    """Encode the images of the test splits and the model-selection split once (preprocessed
    as the backbone's own config says), then rank.

    Returns ``{"test": EvalResult, "val": EvalResult}`` (``"val"`` only when the protocol has
    a model-selection split).
    """
    groups = {"test": list(protocol.test)}
    if protocol.selection is not None:
        groups["val"] = [protocol.selection]
    # the image encoder of stages 0 and 1 never trained on any identity (stage 1 learns prompts)
    fitted = params.get("stage") not in ("stage0", "stage1")
    calibration, _ = calibration_split(protocol, fitted)
    indices = needed_indices([s for splits in groups.values() for s in splits] + [calibration])
    transform = image_source(backbone.preprocess_config(), params)
    feats = extract_features(backbone, protocol.paths(indices), transform,
                             batch_size=params["batch_size"], device=params["device"],
                             flip=params["flip_tta"], cache_dir=cache_dir,
                             num_workers=params["num_workers"], desc="encode images",
                             encode=encode, cache_tag=cache_tag,
                             precision=run_precision(params, params["device"]))
    row_of = {idx: r for r, idx in enumerate(indices)}
    results = {name: evaluate_splits(feats, row_of, protocol, splits, name,
                                     max_rank=params["max_rank"], ap_mode=params["ap_mode"],
                                     rerank=rerank_settings(params))
               for name, splits in groups.items()}
    results["test"].open_set = calibrate_open_set(
        lambda idx: feats[[row_of[i] for i in idx]], protocol,
        params.get("open_set_far", OPEN_SET_FAR), test=results["test"],
        test_features=feats, test_row_of=row_of, fitted=fitted)
    return results


def metrics_record(stage: str, params: Mapping, protocol: Protocol,
                   results: Mapping[str, EvalResult], backbone=None,
                   trained_by: str | None = None, **extra) -> dict:
    """The ``metrics.json`` body of docs/contracts.md (percentages, sizes under ``"data"``).
    ``synthetic``: whether ``params["data_root"]`` is synthetic data (None, or a root the
    generator marked; :func:`handclip_nb.data.provenance.is_synthetic_dataset`)."""
    record = {
        "stage": stage,
        "dataset": protocol.dataset,
        "synthetic": is_synthetic_dataset(params),
        "aspect": protocol.aspect,
        "gallery_mode": protocol.gallery_mode,
        "backbone": params["backbone"],
        # the starting point (pretrained or "untrained, random init") and what trained it since
        "backbone_display": getattr(backbone, "display_name", params["backbone"])
        + (f" + {trained_by}" if trained_by else ""),
        "pretrained": bool(getattr(backbone, "pretrained", False)),
        "num_splits": protocol.num_splits,
        "split_seed": protocol.seed,  # the protocol's seed (params.split_seed), not training's
        "ap_mode": params["ap_mode"],
        "flip_tta": params["flip_tta"],
        "test": results["test"].summary,
        "cmc_test_mean": [round(float(v), 4) for v in results["test"].cmc[:20]],
        "data": protocol.sizes(),
        "splits_hash": protocol.manifest()["content_hash"],
        "test_splits_hash": protocol.test_hash(),
    }
    if results["test"].verification is not None:
        record["verification"] = results["test"].verification.record()
    if results["test"].open_set is not None:
        record["open_set"] = results["test"].open_set
    if "val" in results:
        record["val"] = {k: v["mean"] for k, v in results["val"].summary.items()}
    record.update(extra)
    return record


#: Default FAR of the open-set threshold (parameter ``open_set_far``).
OPEN_SET_FAR = 0.01


def calibration_identities(protocol: Protocol, fitted: bool = True) -> str:
    """``"fitted"`` when :func:`calibration_split` holds identities the model trained on (a
    trained model and no held-out identities: the literature's ``selection: last``), else
    ``"never-trained"`` (:mod:`.open_set`)."""
    return FITTED if fitted and protocol.selection is None else NEVER_TRAINED


def calibration_split(protocol: Protocol, fitted: bool = True) -> tuple[Split, str]:
    """The training-identity pairs an open-set threshold is calibrated on, never test ones.

    A model that never trained on the training identities (zero-shot, ``fitted=False``) sees
    them as it sees new people: all of them are used, as a query/gallery split built like a
    test split (one gallery image per identity, chosen by ``split_seed``;
    :func:`.open_set.query_gallery_split`). A trained model: the model-selection split when the
    protocol holds identities out (nobody trained on them), else such a split of the fitted
    identities, whose distances are smaller than new people's would be, so the threshold's FAR
    on new people comes out above its target (the run records both, and
    :func:`calibration_identities` says which). Returns (split, what it holds)."""
    if fitted and protocol.selection is not None:
        return protocol.selection, "held-out training identities (never fitted)"
    pool = list(protocol.fit)
    if not fitted and protocol.selection is not None:
        pool += [*protocol.selection.query, *protocol.selection.gallery]
    query, gallery = query_gallery_split(pool, protocol.identities, protocol.seed)
    source = ("training identities (the model never trained on them)" if not fitted
              else "fitted training identities")
    return Split(query=query, gallery=gallery), source


def calibrate_open_set(features_of, protocol: Protocol, far: float,
                       test: EvalResult | None = None, test_features=None,
                       test_row_of: Mapping[int, int] | None = None,
                       fitted: bool = True) -> dict:
    """The open-set threshold at FAR ``far`` on training identities (:func:`calibration_split`),
    ``features_of(indices) -> L2-normalised features``; with the test features, also the FAR
    and TAR that threshold gives on every test split (mean and per split), to report how far
    calibration on training identities carries to new people. The ``open_set.json`` body.

    How far to trust it (:mod:`.open_set`): ``calibration`` holds whose identities chose it
    (``identities``: fitted or never-trained), its false accepts among how many impostor pairs
    of how many people, and a 95 % interval of its FAR there; ``test.pooled`` the same on the
    test identities, every split's pairs together (measured with the threshold, which never
    sees them); ``warning`` is set (and warned) when the calibration pairs are too few for
    ``far`` (:func:`.open_set.too_few_pairs_warning`)."""
    split, source = calibration_split(protocol, fitted)
    test_ids = {i for s in protocol.test for i in protocol.ids_of([*s.query, *s.gallery])}
    shared = test_ids & set(protocol.ids_of([*split.query, *split.gallery]))
    if shared:  # a threshold chosen on test identities would flatter every test FAR
        raise ValueError(f"the calibration split holds {len(shared)} test identities; the "
                         f"open-set threshold must be chosen on training identities only")
    indices = sorted({*split.query, *split.gallery})
    feats = features_of(indices)
    row_of = {i: r for r, i in enumerate(indices)}
    dist = split_distances(feats, row_of, split)
    q_ids, g_ids = protocol.ids_of(split.query), protocol.ids_of(split.gallery)
    point = calibrate_threshold(dist, q_ids, g_ids, far)
    threshold = point.threshold if np.isfinite(point.threshold) else None
    calibration = {"identities": calibration_identities(protocol, fitted),
                   **far_interval(identity_pair_counts(dist, q_ids, g_ids, threshold)),
                   "tar": float(point.tar)}
    warning = too_few_pairs_warning(point.impostor_pairs, far, source)
    record = {"far_target": float(far), "calibrated_on": source, **point.to_dict(),
              "calibration": calibration, "enough_pairs": warning is None,
              "warning": warning}
    if warning is not None:
        warnings.warn(f"open-set threshold: {warning}", stacklevel=2)
    if test is not None and test_features is not None:
        measured, counts = [], None
        for s in test.splits:
            dist = split_distances(test_features, test_row_of, s.split)
            q_ids, g_ids = protocol.ids_of(s.split.query), protocol.ids_of(s.split.gallery)
            measured.append(far_at_threshold(dist, q_ids, g_ids, threshold))
            here = identity_pair_counts(dist, q_ids, g_ids, threshold)
            counts = here if counts is None else counts + here
        genuine = sum(m.genuine_pairs for m in measured)
        record["test"] = {"far_mean": float(np.mean([m.far for m in measured])),
                          "tar_mean": float(np.mean([m.tar for m in measured])),
                          "far_per_split": [float(m.far) for m in measured],
                          "tar_per_split": [float(m.tar) for m in measured],
                          "pooled": {"identities": NEVER_TRAINED, **far_interval(counts),
                                     "tar": sum(m.tar * m.genuine_pairs
                                                for m in measured) / genuine}}
    return record
