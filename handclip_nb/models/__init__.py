"""Models: CLIP backbones (registry, loading, 2-D positional-embedding adaptation)."""
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
]
