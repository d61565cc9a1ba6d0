"""Evaluation: ranking metrics (one module), feature extraction + cache, multi-split summaries."""
from .features import cosine_distance, extract_features, resolve_device
from .metrics import rank_metrics
from .protocol_eval import (EvalResult, SplitResult, evaluate_backbone, evaluate_split,
                            evaluate_splits, metrics_record, summarise)

__all__ = ["rank_metrics", "extract_features", "cosine_distance", "resolve_device",
           "EvalResult", "SplitResult", "evaluate_backbone", "evaluate_split", "evaluate_splits",
           "metrics_record", "summarise"]
