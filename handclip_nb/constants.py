"""Constants every layer shares: the bottom of the import graph (imports nothing of ours).

They live here, not in the module that first needed them, so that ``data`` and ``models``
can both use them without importing each other (see docs/architecture.md).
"""
from __future__ import annotations

__all__ = ["CLIP_MEAN", "CLIP_STD", "ASPECTS", "ASPECT_NAMES", "HD_ASPECT", "DATASETS",
           "METRIC_NAMES", "METRIC_LABELS", "AP_METRIC"]

#: Per-channel RGB normalisation of every OpenAI CLIP model (and of handclip-mini, trained with
#: it). A backbone's preprocessing config carries it; transforms read it from there.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: The four 11k aspects, by their short names (parameter ``aspect``).
ASPECTS = ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l")
#: ``aspectOfHand`` text in HandInfo.csv -> the short aspect name.
ASPECT_NAMES = {
    "dorsal right": "dorsal_r",
    "dorsal left": "dorsal_l",
    "palmar right": "palmar_r",
    "palmar left": "palmar_l",
}
#: HD holds dorsal images only; its records carry this aspect (used in prompts and reports).
HD_ASPECT = "dorsal"
#: Dataset layouts the readers understand (parameter ``dataset``); ``custom`` is the user's own
#: photos, a folder per person or a labels.csv (data/custom.py).
DATASETS = ("11k", "hd", "custom")
#: Test metrics of every ``metrics.json`` (percent), in report order. ``mAP`` is the standard
#: (torchreid / CLIP-ReID) mAP, ``mAP_mbanet`` MBA-Net's trapezoid mAP (docs/protocols.md#metrics).
METRIC_NAMES = ("rank1", "rank5", "rank10", "mAP", "mAP_mbanet", "mINP")
#: Column headings of the formatted (mean ± std) tables; a name not listed is shown as is.
METRIC_LABELS = {"mAP_mbanet": "mAP (MBA-Net)"}
#: ``ap_mode`` parameter value -> the metric key of that AP (what model selection ranks by).
AP_METRIC = {"standard": "mAP", "mbanet_trapezoid": "mAP_mbanet"}
