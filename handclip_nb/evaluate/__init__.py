"""Evaluation: ranking metrics (one module), feature extraction + cache, multi-split summaries,
k-reciprocal re-ranking, and evaluation across runs (:mod:`.compare`)."""
from .features import cosine_distance, extract_features, resolve_device
from .metrics import rank_metrics
from .protocol_eval import (EvalResult, SplitResult, evaluate_backbone, evaluate_split,
                            evaluate_splits, metrics_record, summarise)
from .reranking import re_ranking, rerank_features
from .compare import RunEvaluation, RunFolderError, comparison_table, evaluate_runs, load_run

__all__ = ["rank_metrics", "extract_features", "cosine_distance", "resolve_device",
           "EvalResult", "SplitResult", "evaluate_backbone", "evaluate_split", "evaluate_splits",
           "metrics_record", "summarise", "re_ranking", "rerank_features", "RunEvaluation",
           "RunFolderError", "comparison_table", "evaluate_runs", "load_run"]
