"""Models: CLIP backbones (registry, loading, 2-D positional-embedding adaptation), prompt
learners (CLIP-ReID, PromptSG composer) and re-ID heads."""
from .backbones import (
    BACKBONES,
    CLIP_MEAN,
    CLIP_STD,
    BackboneSpec,
    ClipBackbone,
    ImageFeatures,
    IncompatibleWeightsError,
    WeightsNotFoundError,
    available_backbones,
    backbone_fingerprint,
    build_backbone,
    get_backbone_spec,
    register_backbone,
    resolve_device,
)
from .heads import ArcFaceClassifier, BNNeck, LinearClassifier, ReIDHead, build_classifier
from .prompts import PromptComposer, PromptLearner, aspect_phrase

__all__ = [
    "BACKBONES",
    "CLIP_MEAN",
    "CLIP_STD",
    "BackboneSpec",
    "ClipBackbone",
    "ImageFeatures",
    "IncompatibleWeightsError",
    "WeightsNotFoundError",
    "available_backbones",
    "backbone_fingerprint",
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
]
