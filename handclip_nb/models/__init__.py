"""Models: CLIP backbones (built from the registry in :mod:`handclip_nb.backbone_specs`), their
weight files and input sizes, prompt learners (CLIP-ReID, PromptSG composer), re-ID heads, and
the two trained models: :class:`ReIDModel` (CLIP-ReID) and :class:`PromptSG`."""
from ..backbone_specs import (BACKBONES, HANDCLIP_MINI_NAME, BackboneSpec, PreprocessConfig,
                              available_backbones, get_backbone_spec, register_backbone)
from ..device import resolve_device
from .backbones import (ClipBackbone, ImageFeatures, backbone_fingerprint, backbone_from_params,
                        build_backbone)
from .heads import ArcFaceClassifier, BNNeck, LinearClassifier, ReIDHead, build_classifier
from .prompts import PromptComposer, PromptLearner, aspect_phrase
from .reid import ReIDModel
from .weight_files import IncompatibleWeightsError, WeightsDownloadError, WeightsNotFoundError

__all__ = [
    "BACKBONES",
    "HANDCLIP_MINI_NAME",
    "BackboneSpec",
    "PreprocessConfig",
    "ClipBackbone",
    "ImageFeatures",
    "IncompatibleWeightsError",
    "WeightsNotFoundError",
    "WeightsDownloadError",
    "available_backbones",
    "backbone_fingerprint",
    "backbone_from_params",
    "build_backbone",
    "get_backbone_spec",
    "register_backbone",
    "resolve_device",
    "ArcFaceClassifier",
    "BNNeck",
    "LinearClassifier",
    "ReIDHead",
    "build_classifier",
    "PromptComposer",
    "PromptLearner",
    "aspect_phrase",
    "ReIDModel",
]
