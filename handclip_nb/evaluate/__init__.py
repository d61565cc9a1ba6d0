"""Evaluation: ranking metrics (one module), feature extraction + cache, multi-split summaries,
k-reciprocal re-ranking, attribute probes, and evaluation across runs (:mod:`.compare`, with its
tables in :mod:`.tables` and t-SNE maps in :mod:`.tsne`).

Names are imported lazily (PEP 562): ``handclip_nb.evaluate.tables`` and ``.metrics`` are used
by the pipeline's command line, which must not pay for importing torch and CLIP.
"""
from importlib import import_module

_EXPORTS = {
    "cosine_distance": "features", "extract_features": "features",
    "rank_metrics": "metrics",
    "EvalResult": "protocol_eval", "SplitResult": "protocol_eval",
    "evaluate_backbone": "protocol_eval", "evaluate_split": "protocol_eval",
    "evaluate_splits": "protocol_eval", "metrics_record": "protocol_eval",
    "summarise": "protocol_eval",
    "re_ranking": "reranking", "rerank_features": "reranking",
    "OperatingPoint": "verification", "VerificationCurve": "verification",
    "VerificationResult": "verification", "calibrate_threshold": "verification",
    "eer": "verification", "evaluate_verification": "verification",
    "far_at_threshold": "verification", "roc_auc": "verification", "roc_points": "verification",
    "summarise_verification": "verification", "tar_at_far": "verification",
    "verification_curve": "verification", "verification_metrics": "verification",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
