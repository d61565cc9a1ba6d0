"""CLIP backbones: registry, weight loading, 2-D positional-embedding adaptation, one interface.

Every backbone is a :class:`ClipBackbone` wrapping a real :class:`clip.model.CLIP` (``backbone.clip``)
and exposing one image-encoder interface (timm-like)::

    bb = build_backbone("tiny-vit", image_size=(96, 128))
    feats = bb.encode_image(images)      # ImageFeatures
    feats.global_embedding               # [B, D]  exactly CLIP's encode_image output
    feats.patch_tokens                   # [B, N, D] dense tokens in the same joint space, N = h*w
    feats.grid                           # (h, w)
    feats.pre_projection                 # [B, C]  un-projected global feature (CLIP-ReID "img_feature")

Registry (``BACKBONES``):

* ``vitb16``, ``vitb32``, ``rn50``, ``rn101`` -- OpenAI CLIP weights ("ViT-B/16", "ViT-B/32", "RN50",
  "RN101"), loaded with ``clip.load`` from a local file. Nothing is ever downloaded: when the file is
  missing, :class:`WeightsNotFoundError` says at once where we looked and how to supply it.
* ``tiny-vit``, ``tiny-rn`` -- tiny, randomly initialised (seeded) CLIP architectures built with the
  real ``clip.model.CLIP`` class, real vocabulary (49408) and context length (77), so the real
  ``clip.tokenize`` works. They are *untrained* and named so in ``display_name``.
* ``handclip-mini`` -- a small CLIP (ResNet image tower) pretrained image-text on captioned synthetic hands
  (``notebooks/pretrain_mini.ipynb``); its fp16 weights ship in ``handclip_nb/models/weights/``
  with a SHA-256 (checked before loading) and a model card. It is *pretrained on synthetic hands
  only* and named so. Adding another shipped backbone is one ``register_backbone`` entry.

Dense features of the ResNets (``patch_tokens``): CLIP's RN image embedding is the output of an
attention pool whose query is the mean-pooled feature map. Following MaskCLIP (Zhou et al., ECCV 2022),
the dense tokens are the last-stage spatial positions (with the attention pool's positional embedding
added) passed through the pool's value projection and output projection: ``c_proj(v_proj(x_i + pos_i))``.
The global embedding is ``c_proj`` of an attention-weighted average of exactly these values (per head),
so dense and global features live in the same joint space; with uniform attention the global
embedding is the mean of the projected values of the mean token and the N spatial tokens.

For ViTs ``patch_tokens`` = ``ln_post(token) @ proj`` for every patch token of the final layer.

Input sizes: ``image_size`` is (height, width). The positional embeddings (ViT ``visual.positional_embedding``,
RN ``visual.attnpool.positional_embedding``) are resized in 2-D (bicubic, class/mean token kept) to the
new grid; ``visual.input_resolution`` becomes an ``int`` for square sizes and ``(H, W)`` otherwise (both
forms are accepted by torchvision ``Resize``). After adaptation CLIP's own ``encode_image`` works at
the new size and agrees with ``global_embedding``. At the native size nothing is changed, so outputs
are bit-identical to the unmodified CLIP model.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # openai-clip imports pkg_resources, which warns on import
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    import clip
    import clip.clip
    from clip.model import CLIP, ModifiedResNet, VisionTransformer, build_model, convert_weights

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "TINY_VIT_ARCH",
    "TINY_RN_ARCH",
    "HANDCLIP_MINI_NAME",
    "HANDCLIP_MINI_ARCH",
    "WEIGHTS_DIR",
    "BackboneSpec",
    "BACKBONES",
    "register_backbone",
    "available_backbones",
    "get_backbone_spec",
    "WeightsNotFoundError",
    "IncompatibleWeightsError",
    "ImageFeatures",
    "ClipBackbone",
    "build_backbone",
    "backbone_fingerprint",
    "resize_positional_embedding",
    "validate_image_size",
    "resolve_device",
    "default_cache_dir",
]

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: Per-channel RGB normalisation used by every CLIP model (the one place this concept lives).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Folder for weight files shipped with the package (``handclip-mini``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HANDCLIP_MINI_NAME = "handclip-mini"

#: Format tag written by :meth:`ClipBackbone.save_weights`.
_SAVE_FORMAT = "handclip_nb.backbone/1"

_CLIP_VOCAB_SIZE = 49408
_CLIP_CONTEXT_LENGTH = 77

#: ``clip.model.CLIP`` constructor arguments of the tiny, untrained architectures.
TINY_VIT_ARCH: Mapping[str, Any] = MappingProxyType(dict(
    embed_dim=64,
    image_resolution=224,
    vision_layers=2,
    vision_width=64,  # CLIP uses width // 64 heads -> 1 head
    vision_patch_size=16,
    context_length=_CLIP_CONTEXT_LENGTH,
    vocab_size=_CLIP_VOCAB_SIZE,
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
    context_length=_CLIP_CONTEXT_LENGTH,
    vocab_size=_CLIP_VOCAB_SIZE,
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
    context_length=_CLIP_CONTEXT_LENGTH,
    vocab_size=_CLIP_VOCAB_SIZE,
    transformer_width=128,
    transformer_heads=2,
    transformer_layers=3,
))

# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Exactly one of ``openai_name`` (weights from OpenAI's CLIP release, read with ``clip.load``) and
    ``arch`` (``clip.model.CLIP`` constructor kwargs, built locally) is set. ``weights_file`` is a
    default local weight file for an ``arch`` entry (shipped pretrained weights); without it the
    model is randomly initialised from ``seed`` and is *untrained*.
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

    def __post_init__(self) -> None:
        if (self.openai_name is None) == (self.arch is None):
            raise ValueError(f"BackboneSpec {self.name!r}: set exactly one of openai_name and arch")
        if self.openai_name is not None and self.openai_name not in clip.clip._MODELS:
            raise ValueError(f"BackboneSpec {self.name!r}: unknown OpenAI CLIP model {self.openai_name!r}")

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
        return clip.clip._MODELS[self.openai_name] if self.openai_name else None

    @property
    def weights_basename(self) -> Optional[str]:
        """File name ``clip`` would download (e.g. ``ViT-B-16.pt``)."""
        return os.path.basename(self.url) if self.url else None

    @property
    def sha256(self) -> Optional[str]:
        return self.url.split("/")[-2] if self.url else None


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, overwrite: bool = False) -> BackboneSpec:
    """Add ``spec`` to :data:`BACKBONES` (names are lower case)."""
    if spec.name != spec.name.strip().lower():
        raise ValueError(f"backbone names are lower case without spaces: {spec.name!r}")
    if spec.name in BACKBONES and not overwrite:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    BACKBONES[spec.name] = spec
    return spec


for _spec in (
    BackboneSpec("vitb16", "OpenAI CLIP ViT-B/16", openai_name="ViT-B/16", expected=("vit", 16, 768, 12)),
    BackboneSpec("vitb32", "OpenAI CLIP ViT-B/32", openai_name="ViT-B/32", expected=("vit", 32, 768, 12)),
    BackboneSpec("rn50", "OpenAI CLIP RN50", openai_name="RN50", expected=("rn", (3, 4, 6, 3), 64)),
    BackboneSpec("rn101", "OpenAI CLIP RN101", openai_name="RN101", expected=("rn", (3, 4, 23, 3), 64)),
    BackboneSpec("tiny-vit", "tiny CLIP ViT (random init, for tests and smoke runs)", arch=TINY_VIT_ARCH),
    BackboneSpec("tiny-rn", "tiny CLIP ModifiedResNet (random init, for tests and smoke runs)", arch=TINY_RN_ARCH),
    BackboneSpec(HANDCLIP_MINI_NAME,
                 "small CLIP (ResNet) pretrained image-text on captioned synthetic hands (shipped, offline)",
                 arch=HANDCLIP_MINI_ARCH, weights_file=str(WEIGHTS_DIR / "handclip_mini.pt"),
                 weights_label="pretrained on synthetic hands only (handclip-mini)",
                 weights_sha256_file=str(WEIGHTS_DIR / "handclip_mini.sha256")),
):
    register_backbone(_spec)
del _spec


def available_backbones() -> list[str]:
    return list(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
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


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class WeightsNotFoundError(FileNotFoundError):
    """No weight file for a backbone; the message says where we looked and how to supply it."""

    def __init__(self, message: str, *, backbone: str, searched: Sequence[str], url: Optional[str] = None):
        super().__init__(message)
        self.backbone = backbone
        self.searched = [str(p) for p in searched]
        self.url = url

    def __str__(self) -> str:  # FileNotFoundError's default str() would drop the message
        return self.args[0]


class IncompatibleWeightsError(ValueError):
    """A weight file cannot be read as a CLIP checkpoint or does not fit the requested backbone."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """``~/.cache/clip``, where ``clip.load`` keeps downloaded weights (evaluated at call time)."""
    return os.path.expanduser("~/.cache/clip")


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given."""
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        dev = device
    else:
        text = str(device).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def _as_hw(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return (image_size, image_size)
    try:
        h, w = image_size  # type: ignore[misc]
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if (h, w) != tuple(image_size):  # reject 96.5 etc.
        raise ValueError(f"image_size must be integers, got {image_size!r}")
    return (h, w)


def validate_image_size(image_size: Union[int, Sequence[int]], stride: int, backbone: str = "backbone") -> tuple[int, int]:
    """Return ``(H, W)``; both must be positive multiples of ``stride`` (ViT patch size, 32 for RN)."""
    h, w = _as_hw(image_size)
    if h > 0 and w > 0 and h % stride == 0 and w % stride == 0:
        return (h, w)

    def down(v: int) -> int:
        return max(stride, (v // stride) * stride)

    def up(v: int) -> int:
        return max(stride, -(-v // stride) * stride)

    options = sorted({(down(h), down(w)), (up(h), up(w))})
    raise ValueError(
        f"image_size (H, W) = ({h}, {w}) does not fit {backbone}: height and width must be positive "
        f"multiples of {stride} ({'patch size' if stride != 32 else 'the ResNet output stride'}). "
        f"Nearby valid sizes: {', '.join(str(o) for o in options)}"
    )


def resize_positional_embedding(
    posemb: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize a ``[prefix + gh*gw, C]`` positional embedding to a new 2-D grid.

    The prefix (class token for ViT, mean token for the RN attention pool) is kept; the grid part
    (row-major) is resampled with bicubic interpolation in 2-D (``align_corners=False``, so each new
    token takes the embedding of the image region it covers; antialiased when shrinking). The same
    grid returns ``posemb`` itself (no-op).
    """
    old_grid = tuple(int(v) for v in old_grid)
    new_grid = tuple(int(v) for v in new_grid)
    n_grid = posemb.shape[0] - num_prefix_tokens
    if n_grid != old_grid[0] * old_grid[1]:
        raise ValueError(f"positional embedding has {n_grid} grid tokens, which is not {old_grid[0]}x{old_grid[1]}")
    if old_grid == new_grid:
        return posemb
    prefix, grid = posemb[:num_prefix_tokens], posemb[num_prefix_tokens:]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    shrink = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=shrink)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(dtype)
    return torch.cat([prefix, grid], dim=0)


def _is_torchscript_archive(path: Path) -> bool:
    """True for TorchScript zip archives (OpenAI's released ``.pt`` files are these)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names)


def _arch_of(model: CLIP) -> dict[str, Any]:
    """The ``clip.model.CLIP`` constructor kwargs of ``model`` (read from its modules)."""
    v = model.visual
    arch: dict[str, Any] = dict(
        embed_dim=int(model.text_projection.shape[1]),
        context_length=int(model.context_length),
        vocab_size=int(model.token_embedding.num_embeddings),
        transformer_width=int(model.ln_final.weight.shape[0]),
        transformer_heads=int(model.transformer.resblocks[0].attn.num_heads),
        transformer_layers=int(model.transformer.layers),
    )
    if isinstance(v, VisionTransformer):
        patch = int(v.conv1.kernel_size[0])
        grid = round((v.positional_embedding.shape[0] - 1) ** 0.5)
        arch.update(image_resolution=patch * grid, vision_layers=int(v.transformer.layers),
                    vision_width=int(v.conv1.out_channels), vision_patch_size=patch)
    else:
        grid = round((v.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
        arch.update(image_resolution=32 * grid,
                    vision_layers=tuple(len(getattr(v, f"layer{i}")) for i in (1, 2, 3, 4)),
                    vision_width=int(v.layer1[0].conv1.out_channels), vision_patch_size=None)
    return arch


def _describe_arch(arch: Mapping[str, Any]) -> str:
    if isinstance(arch["vision_layers"], (tuple, list)):
        vis = f"ResNet layers {tuple(arch['vision_layers'])} width {arch['vision_width']}"
    else:
        vis = f"ViT patch {arch['vision_patch_size']} width {arch['vision_width']} layers {arch['vision_layers']}"
    return f"{vis}, embed dim {arch['embed_dim']}, text width {arch['transformer_width']}"


def _arch_from_state_dict(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Human description of the architecture a CLIP state dict holds (for error messages)."""
    try:
        if "visual.proj" in sd:
            w = sd["visual.conv1.weight"]
            layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
            vis = f"ViT patch {w.shape[-1]} width {w.shape[0]} layers {layers}"
        else:
            counts = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
            vis = f"ResNet layers {counts} width {sd['visual.layer1.0.conv1.weight'].shape[0]}"
        return f"{vis}, embed dim {sd['text_projection'].shape[1]}, text width {sd['ln_final.weight'].shape[0]}"
    except Exception:  # noqa: BLE001 - only a hint
        return None


# --------------------------------------------------------------------------------------------------
# Image features
# --------------------------------------------------------------------------------------------------


class ImageFeatures(NamedTuple):
    """Output of :meth:`ClipBackbone.encode_image`."""

    #: [B, D] exactly CLIP's ``encode_image`` (projected CLS for ViT, attention-pool output for RN)
    global_embedding: torch.Tensor
    #: [B, N, D] dense tokens in the same joint space, row-major over ``grid``
    patch_tokens: torch.Tensor
    #: (h, w) with N = h * w
    grid: tuple[int, int]
    #: [B, C] un-projected global feature: ViT ``ln_post(CLS)`` (C = width), RN mean-pooled last stage
    #: (C = 32 * width); CLIP-ReID's pre-projection "img_feature"
    pre_projection: torch.Tensor

    def patch_map(self) -> torch.Tensor:
        """``patch_tokens`` as a [B, D, h, w] map (for heatmaps)."""
        b, n, d = self.patch_tokens.shape
        return self.patch_tokens.transpose(1, 2).reshape(b, d, self.grid[0], self.grid[1])


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------


class ClipBackbone(nn.Module):
    """A ``clip.model.CLIP`` (``self.clip``) with its name, provenance, input size and one interface.

    Text-side attributes (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
    ``text_projection``, ``logit_scale``) are those of the CLIP *text* encoder; the image encoder is
    ``visual``.
    """

    def __init__(
        self,
        model: CLIP,
        *,
        name: str,
        pretrained: bool,
        weights_label: str,
        weights_path: Optional[str] = None,
        seed: Optional[int] = None,
        arch: Optional[Mapping[str, Any]] = None,
        image_size: Union[int, Sequence[int], None] = None,
    ):
        super().__init__()
        if not isinstance(model, CLIP):
            raise TypeError(f"expected a clip.model.CLIP, got {type(model).__name__}")
        self.clip = model
        self.name = name
        self.pretrained = bool(pretrained)
        self.weights_label = weights_label
        self.weights_path = weights_path
        self.seed = seed
        self.arch = dict(arch) if arch is not None else _arch_of(model)
        native = int(self.arch["image_resolution"])
        self.native_image_size: tuple[int, int] = (native, native)
        self._image_size: tuple[int, int] = self.native_image_size
        gh, gw = self._grid_for(self.native_image_size)
        if self._pos_param().shape[0] != 1 + gh * gw:
            raise ValueError(f"{name}: the model's positional embedding does not match its native size {native}")
        if image_size is not None:
            self.set_image_size(image_size)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        if not self.pretrained:
            return f"{self.name} (untrained, random init seed {self.seed})"
        return f"{self.name} ({self.weights_label})"

    def extra_repr(self) -> str:
        return f"display_name={self.display_name!r}, image_size={self.image_size}, grid={self.grid}"

    # -- architecture -----------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def is_vit(self) -> bool:
        return isinstance(self.clip.visual, VisionTransformer)

    @property
    def patch_size(self) -> int:
        """Pixels per token side: ViT patch size, 32 (the output stride) for the ResNets."""
        return int(self.clip.visual.conv1.kernel_size[0]) if self.is_vit else 32

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint image-text space."""
        return int(self.clip.text_projection.shape[1])

    @property
    def visual_width(self) -> int:
        """Dimension C of :attr:`ImageFeatures.pre_projection`."""
        v = self.clip.visual
        return int(v.conv1.out_channels) if self.is_vit else int(v.attnpool.c_proj.in_features)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the positional embeddings are adapted to."""
        return self._image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid_for(self._image_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    # -- text side (for prompt learning) --------------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        return self.clip.token_embedding

    @property
    def positional_embedding(self) -> nn.Parameter:
        """Text positional embedding [context_length, width]."""
        return self.clip.positional_embedding

    @property
    def transformer(self) -> nn.Module:
        """Text transformer."""
        return self.clip.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self.clip.ln_final

    @property
    def text_projection(self) -> nn.Parameter:
        return self.clip.text_projection

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def vocab_size(self) -> int:
        return int(self.clip.token_embedding.num_embeddings)

    def tokenize(self, texts: Union[str, list[str]], truncate: bool = False) -> torch.Tensor:
        """``clip.tokenize`` with this model's context length, on this model's device."""
        return clip.tokenize(texts, context_length=self.context_length, truncate=truncate).to(self.device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's ``encode_text``: [B, context_length] token ids -> [B, D] (taken at the EOT token)."""
        return self.clip.encode_text(tokens)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text encoder from token *embeddings* [B, L, width] (e.g. with learned context vectors).

        Same computation as ``encode_text`` after the embedding lookup; the feature is taken at the
        EOT position of ``tokens`` (``tokens.argmax(-1)``; EOT has the highest id), never position 0.
        """
        x = embeddings.type(self.dtype) + self.clip.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)
        x = self.clip.transformer(x)
        x = x.permute(1, 0, 2)
        x = self.clip.ln_final(x).type(self.dtype)
        eot = tokens.argmax(dim=-1).to(x.device)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.clip.text_projection

    # -- preprocessing --------------------------------------------------------------------------
    def preprocess_config(self) -> dict[str, Any]:
        """What the image pipeline must produce for this backbone."""
        return {
            "mean": CLIP_MEAN,
            "std": CLIP_STD,
            "image_size": self.image_size,  # (height, width)
            "interpolation": "bicubic",
        }

    # -- input size ------------------------------------------------------------------------------
    def _grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        s = self.patch_size
        return (image_size[0] // s, image_size[1] // s)

    def _pos_param(self) -> nn.Parameter:
        v = self.clip.visual
        return v.positional_embedding if self.is_vit else v.attnpool.positional_embedding

    def set_image_size(self, image_size: Union[int, Sequence[int]]) -> "ClipBackbone":
        """Adapt the positional embeddings in place to ``image_size`` (H, W) (2-D bicubic resize).

        The same grid is a no-op. Resizing goes from the *current* grid, so repeated changes
        accumulate interpolation; build the backbone with the final size instead where possible.
        """
        hw = validate_image_size(image_size, self.patch_size, self.name)
        old_grid, new_grid = self.grid, self._grid_for(hw)
        if new_grid != old_grid:
            pos = self._pos_param()
            new = resize_positional_embedding(pos.detach(), old_grid, new_grid)
            param = nn.Parameter(new.clone(), requires_grad=pos.requires_grad)
            if self.is_vit:
                self.clip.visual.positional_embedding = param
            else:
                self.clip.visual.attnpool.positional_embedding = param
        self._image_size = hw
        self.clip.visual.input_resolution = hw[0] if hw[0] == hw[1] else hw
        return self

    # -- image side ------------------------------------------------------------------------------
    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{self.name} is adapted to image_size (H, W) = {self.image_size} but got images of "
                f"{tuple(images.shape[-2:])}; build the backbone with image_size={tuple(images.shape[-2:])} "
                f"or call set_image_size()"
            )

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Global embedding (identical to CLIP's ``encode_image``) plus projected dense tokens."""
        self._check_input(images)
        images = images.type(self.dtype)
        if self.is_vit:
            return self._encode_vit(images)
        return self._encode_rn(images)

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        return self.encode_image(images)

    def _encode_vit(self, x: torch.Tensor) -> ImageFeatures:
        v: VisionTransformer = self.clip.visual
        # --- exactly clip.model.VisionTransformer.forward up to the final tokens ---
        x = v.conv1(x)  # [B, width, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # [B, width, gh*gw]
        x = x.permute(0, 2, 1)  # [B, gh*gw, width]
        x = torch.cat([v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device), x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = v.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        cls = v.ln_post(x[:, 0, :])
        patches = v.ln_post(x[:, 1:, :])
        if v.proj is not None:
            glob, patches = cls @ v.proj, patches @ v.proj
        else:
            glob = cls
        return ImageFeatures(glob, patches, self.grid, cls)

    def _encode_rn(self, x: torch.Tensor) -> ImageFeatures:
        v: ModifiedResNet = self.clip.visual
        # --- exactly clip.model.ModifiedResNet.forward (stem, layers, attnpool) ---
        x = v.relu1(v.bn1(v.conv1(x)))
        x = v.relu2(v.bn2(v.conv2(x)))
        x = v.relu3(v.bn3(v.conv3(x)))
        x = v.avgpool(x)
        x = v.layer1(x)
        x = v.layer2(x)
        x = v.layer3(x)
        fmap = v.layer4(x)  # [B, C, gh, gw]
        pool = v.attnpool
        glob = pool(fmap)
        # --- dense tokens (MaskCLIP): value + output projections of every spatial position ---
        tokens = fmap.flatten(2).permute(0, 2, 1)  # [B, gh*gw, C], row-major
        tokens = tokens + pool.positional_embedding[1:].to(tokens.dtype)
        patches = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
        return ImageFeatures(glob, patches, self.grid, fmap.mean(dim=(2, 3)))

    # -- persistence -------------------------------------------------------------------------------
    def save_weights(self, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Path:
        """Save the CLIP weights (at the current image size) so that
        ``build_backbone(name, weights=path, image_size=...)`` restores them (exactly, in the
        default fp32; ``dtype=torch.float16`` halves the file, as OpenAI ships CLIP, and loads
        back into an fp32 model).
        """
        from ..runs import atomic_torch_save

        path = Path(path)

        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().cpu()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        payload = {
            "format": _SAVE_FORMAT,
            "name": self.name,
            "image_size": tuple(self.image_size),
            "arch": dict(self.arch),
            "state_dict": {k: cast(t) for k, t in self.clip.state_dict().items()},
        }
        return atomic_torch_save(payload, path)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _not_found(spec: BackboneSpec, searched: Sequence[str], explicit: Optional[str]) -> WeightsNotFoundError:
    base = spec.weights_basename or (os.path.basename(spec.weights_file) if spec.weights_file else "weights.pt")
    lines = [f"No weight file for backbone {spec.name!r} ({spec.description})."]
    if explicit is not None:
        lines.append(f"weights={explicit!r}: file not found (looked at: {', '.join(searched)}).")
    else:
        lines.append("Looked for:")
        lines += [f"  - {p}" for p in searched]
    lines.append("handclip_nb never downloads weights. Supply them in one of these ways:")
    lines.append(f"  - pass weights='/path/to/{base}' (papermill: -p weights /path/to/{base});")
    if spec.openai_name is not None:
        lines.append(f"  - place {base} in {default_cache_dir()} (clip's cache, ~/.cache/clip);")
        lines.append(f"  - or pass download_root='/some/dir' for a folder that holds {base}.")
        lines.append(f"The file is OpenAI's release: {spec.url} (sha256 {spec.sha256}); on a machine with internet,")
        lines.append(f"  python -c \"import clip; clip.load('{spec.openai_name}', device='cpu')\" puts it in ~/.cache/clip.")
    lines.append("For runs without weights use the untrained backbones 'tiny-vit' or 'tiny-rn'.")
    return WeightsNotFoundError("\n".join(lines), backbone=spec.name, searched=searched, url=spec.url)


def _resolve_weights_file(spec: BackboneSpec, weights, download_root) -> Optional[Path]:
    """The weight file to load, ``None`` for a random-init arch, or raise WeightsNotFoundError."""
    if weights is not None:
        p = Path(os.path.expanduser(os.fspath(weights)))
        if p.is_dir():  # a folder holding the expected file
            name = spec.weights_basename or (os.path.basename(spec.weights_file) if spec.weights_file else None)
            cand = p / name if name else p
            if name and cand.is_file():
                return cand
            raise _not_found(spec, [str(cand)], os.fspath(weights))
        if p.is_file():
            return p
        raise _not_found(spec, [str(p)], os.fspath(weights))
    if spec.openai_name is not None:
        dirs = []
        if download_root is not None:
            dirs.append(Path(os.path.expanduser(os.fspath(download_root))))
        dirs.append(Path(default_cache_dir()))
        cands = [d / spec.weights_basename for d in dirs]
        for c in cands:
            if c.is_file():
                return c
        raise _not_found(spec, [str(c) for c in cands], None)
    if spec.weights_file is not None:
        p = Path(spec.weights_file)
        if p.is_file():
            _check_shipped_sha256(spec, p)
            return p
        raise _not_found(spec, [str(p)], None)
    return None


def _check_shipped_sha256(spec: BackboneSpec, path: Path) -> None:
    """A shipped file must match its recorded SHA-256 (a git-lfs pointer or a truncated copy
    would otherwise fail later with a confusing unpickling error)."""
    if spec.weights_sha256_file is None:
        return
    record = Path(spec.weights_sha256_file)
    if not record.is_file():
        raise IncompatibleWeightsError(f"{record} is missing: the SHA-256 of the shipped weights "
                                       f"{path} cannot be checked; reinstall the package")
    expected = record.read_text().split()[0].strip().lower()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise IncompatibleWeightsError(
            f"shipped weights {path} have SHA-256 {h.hexdigest()}, but {record} records {expected}: "
            f"the file is corrupt, truncated or a git-lfs pointer; restore it from the repository "
            f"(git checkout -- {path.name}) or re-run notebooks/pretrain_mini.ipynb")


def _read_checkpoint(path: Path, spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(state_dict, meta) of a non-TorchScript checkpoint; meta is set for ``save_weights`` files."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleWeightsError(
            f"cannot read {path} as weights for backbone {spec.name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    meta = None
    if isinstance(obj, dict) and obj.get("format") == _SAVE_FORMAT:
        meta, obj = obj, obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(t, torch.Tensor) for t in obj.values()):
        raise IncompatibleWeightsError(f"{path} does not hold a CLIP state dict (backbone {spec.name!r})")
    sd = {k[len("clip."):] if k.startswith("clip.") else k: t for k, t in obj.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # as clip.model.build_model
        sd.pop(key, None)
    return sd, meta


def _load_into(model: CLIP, sd: Mapping[str, torch.Tensor], path: Path, spec: BackboneSpec) -> None:
    """Strict load with an error naming checkpoint, backbone and the offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        holds = _arch_from_state_dict(sd)
        parts = [f"weights {path} do not fit backbone {spec.name!r} ({_describe_arch(_arch_of(model))})."]
        if holds:
            parts.append(f"The checkpoint holds: {holds}.")
        if mismatched:
            parts.append("Shape mismatches: " + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise IncompatibleWeightsError(" ".join(parts))
    model.load_state_dict(sd, strict=True)


def _check_openai_arch(model: CLIP, spec: BackboneSpec, path: Path) -> None:
    if spec.expected is None:
        return
    arch = _arch_of(model)
    is_vit = isinstance(model.visual, VisionTransformer)
    family = spec.expected[0]
    if (family == "vit") != is_vit or (is_vit and arch["vision_patch_size"] != spec.expected[1]):
        want = f"ViT patch {spec.expected[1]}" if family == "vit" else "ResNet"
        raise IncompatibleWeightsError(
            f"weights {path} hold a CLIP with {_describe_arch(arch)}, but backbone {spec.name!r} is a {want}; "
            f"pick the backbone that matches the file (valid names: {', '.join(BACKBONES)})"
        )
    if family == "vit":
        standard = (arch["vision_width"], arch["vision_layers"]) == tuple(spec.expected[2:])
    else:
        standard = (tuple(arch["vision_layers"]), arch["vision_width"]) == tuple(spec.expected[1:])
    if not standard:
        warnings.warn(
            f"weights {path} hold a CLIP with {_describe_arch(arch)}, not the standard {spec.description}; "
            f"using it as backbone {spec.name!r}",
            stacklevel=3,
        )


def _load_openai_jit(path: Path, spec: BackboneSpec, download_root) -> CLIP:
    """OpenAI's TorchScript release file -> CLIP through ``clip.load`` (fp32 on CPU)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated.*")
            model, _ = clip.load(str(path), device="cpu", jit=False,
                                 download_root=None if download_root is None else os.fspath(download_root))
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleWeightsError(
            f"clip.load could not read {path} for backbone {spec.name!r} ({type(exc).__name__}: {exc}); "
            f"the file may be truncated: compare its sha256 with {spec.sha256 or 'the release'}"
        ) from exc
    return model


def _build_openai_state_dict(sd: Mapping[str, torch.Tensor], path: Path, spec: BackboneSpec) -> CLIP:
    """What ``clip.load`` does for a non-TorchScript file: ``clip.model.build_model(state_dict)``.

    (``clip.load`` itself cannot do it with current torch: after its ``torch.jit.load`` attempt fails,
    it calls ``torch.load`` on the same file object, now at EOF.) Like ``clip.load``, ``build_model``
    rounds conv/linear/attention/projection weights to fp16; we return the model in fp32.
    """
    try:
        return build_model(dict(sd))
    except Exception as exc:  # noqa: BLE001
        holds = _arch_from_state_dict(sd)
        raise IncompatibleWeightsError(
            f"weights {path} are not an OpenAI CLIP state dict usable for backbone {spec.name!r}"
            + (f" (it holds {holds})" if holds else "") + f": {type(exc).__name__}: {exc}"
        ) from exc


def _read_torchscript_state_dict(path: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated.*")
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleWeightsError(f"cannot read TorchScript archive {path} for backbone {spec.name!r}: {exc}") from exc
    sd = dict(sd)
    for key in ("input_resolution", "context_length", "vocab_size"):
        sd.pop(key, None)
    return sd


def _build_arch(arch: Mapping[str, Any], seed: int) -> CLIP:
    with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG stream is left untouched
        torch.manual_seed(int(seed))
        return CLIP(**arch)


def build_backbone(
    name: str,
    weights: Union[str, os.PathLike, None] = None,
    image_size: Union[int, Sequence[int]] = (224, 224),
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    download_root: Union[str, os.PathLike, None] = None,
) -> ClipBackbone:
    """Build a backbone by registry name: fp32, adapted to ``image_size`` (H, W), eval mode, on ``device``.

    * OpenAI entries (``vitb16`` ...): ``weights`` (a ``.pt`` file, or a folder holding ``ViT-B-16.pt``
      etc.), else the file ``clip`` would download, looked for in ``download_root`` then
      ``~/.cache/clip``. TorchScript release files go through ``clip.load(path, device="cpu",
      jit=False)``; plain state dicts through ``clip.model.build_model`` (clip.load's fallback).
      Missing file -> :class:`WeightsNotFoundError` at once; nothing is ever downloaded.
    * Arch entries (``tiny-vit``, ``tiny-rn``): random init from ``seed`` (untrained, seeded without
      touching the global RNG) unless ``weights`` (or the entry's shipped file) is given: a state dict
      of this architecture (e.g. ``torch.save(backbone.clip.state_dict(), p)`` at the native size),
      loaded with ``weights_only=True``; shape mismatch -> :class:`IncompatibleWeightsError`.
    * A :meth:`ClipBackbone.save_weights` file works for every entry and restores fp32 weights exactly,
      at any image size.
    """
    spec = get_backbone_spec(name)
    dev = resolve_device(device)
    hw = validate_image_size(image_size, spec.stride, spec.name)  # fail before any loading work

    path = _resolve_weights_file(spec, weights, download_root)
    meta = None
    if path is None:  # random init
        model, arch, pretrained, label = _build_arch(spec.arch, seed), dict(spec.arch), False, "untrained"
    else:
        official = spec.openai_name is not None and path.name == spec.weights_basename
        label = spec.weights_label if (weights is None or official) else f"weights from {path.name}"
        pretrained = True
        if _is_torchscript_archive(path):
            sd = None if spec.openai_name is not None else _read_torchscript_state_dict(path, spec)
        else:
            sd, meta = _read_checkpoint(path, spec)
        if meta is not None:  # our own format: architecture recorded in the file
            # An arch entry keeps its architecture, except that a file saved under the same name
            # (e.g. a handclip-mini re-pretrained with another width) brings its own.
            own_family = spec.arch is None or meta.get("name") == spec.name
            arch = dict(meta["arch"]) if own_family else dict(spec.arch)
            model = _build_arch(arch, seed)  # loaded below, after adapting to the file's image size
        elif spec.openai_name is not None:
            model = _load_openai_jit(path, spec, download_root) if sd is None else _build_openai_state_dict(sd, path, spec)
            arch = _arch_of(model)
        else:
            model, arch = _build_arch(spec.arch, seed), dict(spec.arch)
            _load_into(model, sd, path, spec)

    model = model.float().eval()
    backbone = ClipBackbone(model, name=spec.name, pretrained=pretrained, weights_label=label,
                            weights_path=None if path is None else str(path),
                            seed=None if pretrained else int(seed), arch=arch)
    if meta is not None:
        try:
            backbone.set_image_size(meta["image_size"])
        except ValueError as exc:
            raise IncompatibleWeightsError(f"weights {path} were saved at image_size {meta['image_size']}, "
                                           f"which does not fit backbone {spec.name!r}: {exc}") from exc
        _load_into(backbone.clip, sd, path, spec)
    if spec.openai_name is not None and path is not None:
        _check_openai_arch(backbone.clip, spec, path)
    backbone.set_image_size(hw)
    return backbone.to(dev).eval()


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------


def backbone_fingerprint(backbone: ClipBackbone, length: int = 16) -> str:
    """Short stable hash of a backbone's name, input size and current weights (for feature caches).

    Hashes the bytes of every tensor in ``backbone.clip.state_dict()`` (parameters and BN buffers,
    keys, shapes, dtypes), so fine-tuned weights, a different checkpoint or a different image size
    give a different key while rebuilding the same model gives the same one. Cost: one pass over the
    weights (well under a second for ViT-B/16 on a modern CPU).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(b"handclip_nb.backbone_fingerprint/1\0")
    h.update(f"{backbone.name}\0{tuple(backbone.image_size)}\0".encode())
    for key, tensor in sorted(backbone.clip.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]
