"""The backbone registry: the one source of backbone names, architectures, default input sizes
and preprocessing.

Pure data, no torch: :mod:`handclip_nb.params` takes its valid ``backbone`` values and default
``image_size`` from here, and :mod:`handclip_nb.models.backbones` builds the models. Like
open_clip's model configs, an entry carries the preprocessing its weights expect
(:class:`PreprocessConfig`), and every transform is built from the built backbone's
:meth:`~handclip_nb.models.backbones.ClipBackbone.preprocess_config`, so a model and its input
pipeline cannot drift apart.

Entries:

* ``vitb16``, ``vitb32``, ``rn50``, ``rn101`` -- OpenAI CLIP weights ("ViT-B/16", ...), read
  from a local file, downloaded from :attr:`BackboneSpec.url` on first use unless downloads are
  off (``models/weight_download.py``);
* ``tiny-vit``, ``tiny-rn`` -- tiny, randomly initialised (seeded) CLIP architectures for fast
  tests; *untrained*;
* ``handclip-mini`` -- a small CLIP pretrained on captioned synthetic hands, shipped in
  ``handclip_nb/models/weights/`` with its SHA-256 and model card.

Adding a backbone is one :func:`register_backbone` call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .constants import CLIP_MEAN, CLIP_STD

__all__ = [
    "PreprocessConfig",
    "BackboneSpec",
    "BACKBONES",
    "register_backbone",
    "available_backbones",
    "get_backbone_spec",
    "TINY_VIT_ARCH",
    "TINY_RN_ARCH",
    "HANDCLIP_MINI_NAME",
    "HANDCLIP_MINI_ARCH",
    "WEIGHTS_DIR",
    "REAL_CLIP_IMAGE_SIZE",
    "SMALL_IMAGE_SIZE",
]

#: Folder for weight files shipped with the package (``handclip-mini``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "models" / "weights"
HANDCLIP_MINI_NAME = "handclip-mini"

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77

#: Default (height, width) of the real CLIP backbones. Hands are 4:3 landscape photos: a
#: 224-high input whose width is the multiple of 32 nearest to 4/3 x 224 (298 -> 288), so the
#: ViT patches (16, 32) and the ResNet stride (32) all divide it.
REAL_CLIP_IMAGE_SIZE = (224, 288)
#: Default of the small backbones (tiny-vit, tiny-rn, handclip-mini, pretrained at it): an
#: exact 4:3 that keeps CPU runs fast.
SMALL_IMAGE_SIZE = (96, 128)


@dataclass(frozen=True)
class PreprocessConfig:
    """What the image pipeline must produce for a backbone (open_clip's ``PreprocessCfg``).

    ``image_size`` is (height, width); ``resize_mode`` is ``"pad"`` (letterbox: aspect ratio
    kept, borders in the mean colour) or ``"squash"``.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "pad"


#: ``clip.model.CLIP`` constructor arguments of the tiny, untrained architectures.
TINY_VIT_ARCH: Mapping[str, Any] = MappingProxyType(dict(
    embed_dim=64,
    image_resolution=224,
    vision_layers=2,
    vision_width=64,  # CLIP uses width // 64 heads -> 1 head
    vision_patch_size=16,
    context_length=CLIP_CONTEXT_LENGTH,
    vocab_size=CLIP_VOCAB_SIZE,
    transformer_width=64,
    transformer_heads=1,  # build_model infers width // 64
    transformer_layers=2,
))
TINY_RN_ARCH: Mapping[str, Any] = MappingProxyType(dict(
    embed_dim=64,
    image_resolution=224,
    vision_layers=(1, 1, 1, 1),
    vision_width=8,  # attention pool: 8 * 32 = 256 channels, 8 * 32 // 64 = 4 heads of 64
    vision_patch_size=None,
    context_length=CLIP_CONTEXT_LENGTH,
    vocab_size=CLIP_VOCAB_SIZE,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
))

#: The shipped handclip-mini (``handclip_nb.train.pretrain.mini_arch``): CLIP's ModifiedResNet
#: with one block per stage, stem width 16 (attention pool on 512 channels, 8 heads); text width
#: 128, 3 layers; joint space 128. Saved at 96x128 (the file records it).
HANDCLIP_MINI_ARCH: Mapping[str, Any] = MappingProxyType(dict(
    embed_dim=128,
    image_resolution=128,
    vision_layers=(1, 1, 1, 1),
    vision_width=16,
    vision_patch_size=None,
    context_length=CLIP_CONTEXT_LENGTH,
    vocab_size=CLIP_VOCAB_SIZE,
    transformer_width=128,
    transformer_heads=2,
    transformer_layers=3,
))


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Exactly one of ``openai_name`` (weights from OpenAI's CLIP release, read with ``clip.load``)
    and ``arch`` (``clip.model.CLIP`` constructor kwargs, built locally) is set. ``weights_file``
    is a default local weight file for an ``arch`` entry (shipped pretrained weights); without
    it the model is randomly initialised from ``seed`` and is *untrained*.
    """

    name: str
    description: str
    openai_name: Optional[str] = None
    arch: Optional[Mapping[str, Any]] = None
    weights_file: Optional[str] = None
    weights_label: str = "OpenAI CLIP weights"
    #: a ``sha256sum``-format file beside a shipped ``weights_file``; checked before loading
    weights_sha256_file: Optional[str] = None
    #: expected architecture of OpenAI entries: ("vit", patch, width, layers) or ("rn", layers, width)
    expected: Optional[tuple] = None
    #: (height, width) when the ``image_size`` parameter is None
    default_image_size: tuple[int, int] = REAL_CLIP_IMAGE_SIZE
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if (self.openai_name is None) == (self.arch is None):
            raise ValueError(f"BackboneSpec {self.name!r}: set exactly one of openai_name and arch")

    def preprocess(self, image_size=None, resize_mode: str = "pad") -> PreprocessConfig:
        """The preprocessing of this entry at ``image_size`` (None = its default)."""
        size = self.default_image_size if image_size is None else image_size
        return PreprocessConfig(image_size=(int(size[0]), int(size[1])), mean=self.mean,
                                std=self.std, interpolation=self.interpolation,
                                resize_mode=resize_mode)

    @property
    def is_vit(self) -> bool:
        if self.arch is not None:
            return not isinstance(self.arch["vision_layers"], (tuple, list))
        return self.openai_name.startswith("ViT")

    @property
    def stride(self) -> int:
        """Pixels per token side: the ViT patch size, 32 for the ResNets."""
        if not self.is_vit:
            return 32
        if self.arch is not None:
            return int(self.arch["vision_patch_size"])
        if self.expected is not None:
            return int(self.expected[1])
        return int(self.openai_name.split("/")[-1].split("@")[0])

    @property
    def url(self) -> Optional[str]:
        """OpenAI's download address of the weights (``clip``'s; fetched on first use)."""
        if self.openai_name is None:
            return None
        # imported here, not at the top: clip imports torch, and this module must stay cheap
        # for `params` (the pipeline's command line and the schema never need torch)
        import clip.clip

        try:
            return clip.clip._MODELS[self.openai_name]
        except KeyError:
            raise ValueError(f"backbone {self.name!r}: {self.openai_name!r} is not an OpenAI "
                             f"CLIP model; known: {', '.join(clip.clip._MODELS)}") from None

    @property
    def weights_basename(self) -> Optional[str]:
        """File name ``clip`` would download (e.g. ``ViT-B-16.pt``)."""
        return os.path.basename(self.url) if self.openai_name else None

    @property
    def sha256(self) -> Optional[str]:
        """SHA-256 of OpenAI's file: the address's last folder, as ``clip._download`` reads it."""
        return self.url.split("/")[-2] if self.openai_name else None


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, overwrite: bool = False) -> BackboneSpec:
    """Add ``spec`` to :data:`BACKBONES` (names are lower case); it is then also a valid value
    of the ``backbone`` parameter."""
    if spec.name != spec.name.strip().lower():
        raise ValueError(f"backbone names are lower case without spaces: {spec.name!r}")
    if spec.name in BACKBONES and not overwrite:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    BACKBONES[spec.name] = spec
    return spec


for _spec in (
    BackboneSpec(HANDCLIP_MINI_NAME,
                 "small CLIP (ResNet) pretrained image-text on captioned synthetic hands (shipped, offline)",
                 arch=HANDCLIP_MINI_ARCH, weights_file=str(WEIGHTS_DIR / "handclip_mini.pt"),
                 weights_label="pretrained on synthetic hands only (handclip-mini)",
                 weights_sha256_file=str(WEIGHTS_DIR / "handclip_mini.sha256"),
                 default_image_size=SMALL_IMAGE_SIZE),
    BackboneSpec("vitb16", "OpenAI CLIP ViT-B/16", openai_name="ViT-B/16", expected=("vit", 16, 768, 12)),
    BackboneSpec("vitb32", "OpenAI CLIP ViT-B/32", openai_name="ViT-B/32", expected=("vit", 32, 768, 12)),
    BackboneSpec("rn50", "OpenAI CLIP RN50", openai_name="RN50", expected=("rn", (3, 4, 6, 3), 64)),
    BackboneSpec("rn101", "OpenAI CLIP RN101", openai_name="RN101", expected=("rn", (3, 4, 23, 3), 64)),
    BackboneSpec("tiny-vit", "tiny CLIP ViT (random init, for tests and smoke runs)",
                 arch=TINY_VIT_ARCH, default_image_size=SMALL_IMAGE_SIZE),
    BackboneSpec("tiny-rn", "tiny CLIP ModifiedResNet (random init, for tests and smoke runs)",
                 arch=TINY_RN_ARCH, default_image_size=SMALL_IMAGE_SIZE),
):
    register_backbone(_spec)
del _spec


def available_backbones() -> list[str]:
    return list(BACKBONES)


def get_backbone_spec(name) -> BackboneSpec:
    """Look up ``name`` (case-insensitive; OpenAI names like ``"ViT-B/16"`` are accepted as aliases)."""
    if isinstance(name, BackboneSpec):
        return name
    key = str(name).strip().lower()
    if key in BACKBONES:
        return BACKBONES[key]
    for spec in BACKBONES.values():
        if spec.openai_name is not None and spec.openai_name.lower() == key:
            return spec
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
