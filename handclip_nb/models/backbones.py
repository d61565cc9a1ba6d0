"""CLIP backbones: one image-encoder interface over ``clip.model.CLIP``, and building one by name.

Every backbone is a :class:`ClipBackbone` wrapping a real :class:`clip.model.CLIP` (``backbone.clip``)
and exposing one image-encoder interface (timm-like)::

    bb = build_backbone("tiny-vit", image_size=(96, 128))
    feats = bb.encode_image(images)      # ImageFeatures
    feats.global_embedding               # [B, D]  exactly CLIP's encode_image output
    feats.patch_tokens                   # [B, N, D] dense tokens in the same joint space, N = h*w
    feats.grid                           # (h, w)
    feats.pre_projection                 # [B, C]  un-projected global feature (CLIP-ReID "img_feature")
    feats.intermediate                   # [B, C'] one stage earlier (CLIP-ReID "img_feature_last")

The entries (names, architectures, default input sizes, preprocessing) are the registry in
:mod:`handclip_nb.backbone_specs`; weight files are found and read by
:mod:`.weight_files` (OpenAI's checkpoints are downloaded on first use, SHA-256 checked, by
:mod:`.weight_download`; with downloads off a missing file raises
:class:`~.weight_files.WeightsNotFoundError` at once, saying where we looked and how to supply
it); positional embeddings are resized by :mod:`.positional`. :func:`backbone_from_params` is
the one way the stages build a backbone from their parameters. Untrained models say so in
``display_name``.

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

Last stride of the ResNets (``rn_last_stride``): CLIP-ReID builds CLIP's ModifiedResNet with a
stride-1 fourth stage (``model/clip/model.py``, ``layer4 ... stride=1``), as re-ID CNNs usually do.
``rn_last_stride=1`` does the same to a loaded model: the two ``AvgPool2d(2)`` of ``layer4[0]``
(after its 3x3 convolution and in front of its downsample convolution) become identities -- no
weight changes -- so the output stride is 16, the token grid doubles in each direction, and the
attention pool's positional embedding is resized in 2-D to that grid. Image sizes must then be
multiples of 16.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # openai-clip imports pkg_resources, which warns on import
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    import clip
    from clip.model import CLIP, ModifiedResNet, VisionTransformer

from ..backbone_specs import PreprocessConfig, get_backbone_spec
from ..device import configure_cuda, resolve_device
from ..runs import atomic_torch_save
from .clip_arch import arch_of, build_arch
from .positional import resize_positional_embedding, validate_image_size
from .weight_files import (SAVE_FORMAT, IncompatibleWeightsError, build_openai_state_dict,
                           check_openai_arch, is_torchscript_archive, load_into, load_openai_jit,
                           read_checkpoint, read_torchscript_state_dict, resolve_weights_file)

__all__ = ["ImageFeatures", "ClipBackbone", "build_backbone", "backbone_from_params",
           "encoder_and_new_param_groups",
           "backbone_fingerprint"]


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
    #: [B, C'] the global feature one stage earlier, CLIP-ReID's "img_feature_last"
    #: (``model/make_model_clipreid.py``): ViT the CLS token entering the last transformer block
    #: (the 11th layer's output for ViT-B/16; no ``ln_post``; C' = width), RN the mean-pooled third
    #: stage (C' = 16 * width). Its third triplet feature (``triplet_features="clipreid"``).
    intermediate: Optional[torch.Tensor] = None

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
        preprocess: Optional[PreprocessConfig] = None,
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
        self.arch = dict(arch) if arch is not None else arch_of(model)
        # mean/std/interpolation/resize mode of the registry entry; the size follows the model
        self._preprocess = preprocess or PreprocessConfig(image_size=(1, 1))
        self._last_stride = 2  # CLIP's ModifiedResNet; see set_last_stride
        self.channels_last = False  # see use_channels_last
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
        stride = "" if self._last_stride == 2 else f", rn_last_stride={self._last_stride}"
        return (f"display_name={self.display_name!r}, image_size={self.image_size}, "
                f"grid={self.grid}{stride}")

    # -- architecture -----------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def is_vit(self) -> bool:
        return isinstance(self.clip.visual, VisionTransformer)

    @property
    def patch_size(self) -> int:
        """Pixels per token side: ViT patch size; for the ResNets the output stride, 32 (16 with
        ``rn_last_stride`` 1)."""
        return int(self.clip.visual.conv1.kernel_size[0]) if self.is_vit else 16 * self._last_stride

    @property
    def last_stride(self) -> int:
        """Stride of the ResNet's fourth stage: 2 (CLIP) or 1 (CLIP-ReID); 2 for ViTs."""
        return self._last_stride

    @property
    def intermediate_width(self) -> int:
        """Dimension C' of :attr:`ImageFeatures.intermediate`."""
        v = self.clip.visual
        return int(v.conv1.out_channels) if self.is_vit else int(v.layer3[-1].bn3.num_features)

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
    def preprocess_config(self) -> PreprocessConfig:
        """What the image pipeline must produce for this backbone, at its current input size:
        every transform is built from this (``data.transforms.build_transform``), so model and
        preprocessing cannot drift apart."""
        return dataclasses.replace(self._preprocess, image_size=self.image_size)

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

    def set_last_stride(self, stride: int,
                        image_size: Union[int, Sequence[int], None] = None) -> "ClipBackbone":
        """Set the ResNet's fourth-stage stride (1 = CLIP-ReID, 2 = CLIP) and adapt to
        ``image_size`` (None = the current size) in one 2-D resize of the attention pool's
        positional embedding, from the current grid to the new one.

        Stride 1 replaces the two ``AvgPool2d(2)`` of ``layer4[0]`` (after ``conv2`` and at the
        head of ``downsample``) by identities; no weight changes, so a state dict saved at one
        stride loads at the other wherever the grid is the same. ViTs accept only 2 (no-op).
        """
        stride = int(stride)
        if stride not in (1, 2):
            raise ValueError(f"rn_last_stride must be 1 or 2, got {stride}")
        if self.is_vit:
            if stride != 2:
                raise ValueError(f"{self.name} is a ViT: rn_last_stride applies to the ResNet "
                                 f"backbones only (leave it at 2)")
            return self if image_size is None else self.set_image_size(image_size)
        target = self._image_size if image_size is None else image_size
        if stride == self._last_stride:
            return self.set_image_size(target)
        hw = validate_image_size(target, 16 * stride, f"{self.name} with rn_last_stride {stride}")
        old_grid = self.grid
        block = self.clip.visual.layer4[0]
        pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2)
        block.avgpool = pool
        setattr(block.downsample, "-1", nn.Identity() if stride == 1 else nn.AvgPool2d(2))
        block.stride = stride
        self._last_stride = stride
        new_grid = self._grid_for(hw)
        pos = self._pos_param()
        new = resize_positional_embedding(pos.detach(), old_grid, new_grid)
        self.clip.visual.attnpool.positional_embedding = nn.Parameter(
            new.clone(), requires_grad=pos.requires_grad)
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
        # v.transformer(x) is v.transformer.resblocks(x) (an nn.Sequential): running all blocks but
        # the last, then the last, is the same computation; the CLS token in between is CLIP-ReID's
        # 11th-layer feature (model/clip/model.py: resblocks[:11], then resblocks[11])
        blocks = v.transformer.resblocks
        x = blocks[:-1](x)
        inter = x[0]  # [B, width], LND: the class token is position 0
        x = blocks[-1](x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        cls = v.ln_post(x[:, 0, :])
        patches = v.ln_post(x[:, 1:, :])
        if v.proj is not None:
            glob, patches = cls @ v.proj, patches @ v.proj
        else:
            glob = cls
        return ImageFeatures(glob, patches, self.grid, cls, inter)

    def use_channels_last(self) -> "ClipBackbone":
        """Keep a ResNet image tower and its inputs in channels-last (NHWC) memory: cuDNN's
        fast convolution kernels under AMP read that layout, so no transposes are inserted.
        Values are unchanged; a ViT (no convolutions after the patch embedding) is left as is."""
        if not self.is_vit:
            self.clip.visual.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    def _encode_rn(self, x: torch.Tensor) -> ImageFeatures:
        v: ModifiedResNet = self.clip.visual
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # --- exactly clip.model.ModifiedResNet.forward (stem, layers, attnpool) ---
        x = v.relu1(v.bn1(v.conv1(x)))
        x = v.relu2(v.bn2(v.conv2(x)))
        x = v.relu3(v.bn3(v.conv3(x)))
        x = v.avgpool(x)
        x = v.layer1(x)
        x = v.layer2(x)
        x3 = v.layer3(x)
        fmap = v.layer4(x3)  # [B, C, gh, gw]
        pool = v.attnpool
        glob = pool(fmap)
        # --- dense tokens (MaskCLIP): value + output projections of every spatial position ---
        tokens = fmap.flatten(2).permute(0, 2, 1)  # [B, gh*gw, C], row-major
        tokens = tokens + pool.positional_embedding[1:].to(tokens.dtype)
        patches = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
        return ImageFeatures(glob, patches, self.grid, fmap.mean(dim=(2, 3)), x3.mean(dim=(2, 3)))

    # -- persistence -------------------------------------------------------------------------------
    def save_weights(self, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Path:
        """Save the CLIP weights (at the current image size) so that
        ``build_backbone(name, weights=path, image_size=...)`` restores them (exactly, in the
        default fp32; ``dtype=torch.float16`` halves the file, as OpenAI ships CLIP, and loads
        back into an fp32 model).
        """
        path = Path(path)

        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().cpu()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        payload = {
            "format": SAVE_FORMAT,
            "name": self.name,
            "image_size": tuple(self.image_size),
            "rn_last_stride": self.last_stride,
            "arch": dict(self.arch),
            "state_dict": {k: cast(t) for k, t in self.clip.state_dict().items()},
        }
        return atomic_torch_save(payload, path)




def build_backbone(
    name: str,
    weights: Union[str, os.PathLike, None] = None,
    image_size: Union[int, Sequence[int], None] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    download_root: Union[str, os.PathLike, None] = None,
    resize_mode: str = "pad",
    rn_last_stride: int = 2,
    pixel_mean: Optional[Sequence[float]] = None,
    pixel_std: Optional[Sequence[float]] = None,
    download: bool = True,
) -> ClipBackbone:
    """Build a backbone by registry name: fp32, adapted to ``image_size`` (H, W; None = the
    entry's default), eval mode, on ``device``; its :meth:`~ClipBackbone.preprocess_config` is
    the entry's preprocessing with ``resize_mode`` (and ``pixel_mean`` / ``pixel_std`` instead
    of the entry's normalisation where given, e.g. CLIP-ReID's 0.5 / 0.5 or ImageNet's).
    ``rn_last_stride=1``: a ResNet with a stride-1 fourth stage, as CLIP-ReID
    (:meth:`ClipBackbone.set_last_stride`); ViTs take only 2.

    * OpenAI entries (``vitb16`` ...): ``weights`` (a ``.pt`` file, or a folder holding ``ViT-B-16.pt``
      etc.), else the file ``clip`` would download, looked for in ``download_root`` then
      ``~/.cache/clip``. TorchScript release files go through ``clip.load(path, device="cpu",
      jit=False)``; plain state dicts through ``clip.model.build_model`` (clip.load's fallback).
      Missing file: downloaded into ``download_root`` (else ``~/.cache/clip``) and SHA-256
      checked, as ``clip.load`` does (:mod:`.weight_download`: atomic, safe for concurrent jobs;
      ``HANDCLIP_CLIP_MIRROR`` / ``HANDCLIP_CLIP_URL_<NAME>`` name another address);
      ``download=False`` or ``HANDCLIP_OFFLINE=1``: :class:`WeightsNotFoundError` at once.
    * Arch entries (``tiny-vit``, ``tiny-rn``): random init from ``seed`` (untrained, seeded without
      touching the global RNG) unless ``weights`` (or the entry's shipped file) is given: a state dict
      of this architecture (e.g. ``torch.save(backbone.clip.state_dict(), p)`` at the native size),
      loaded with ``weights_only=True``; shape mismatch -> :class:`IncompatibleWeightsError`.
    * A :meth:`ClipBackbone.save_weights` file works for every entry and restores fp32 weights exactly,
      at any image size.
    """
    spec = get_backbone_spec(name)
    dev = resolve_device(device)
    if image_size is None:
        image_size = spec.default_image_size
    if rn_last_stride not in (1, 2):
        raise ValueError(f"rn_last_stride must be 1 or 2, got {rn_last_stride!r}")
    if spec.is_vit and rn_last_stride != 2:
        raise ValueError(f"{spec.name} is a ViT: rn_last_stride applies to the ResNet backbones "
                         f"only (leave it at 2)")
    stride = spec.stride if rn_last_stride == 2 else 16
    hw = validate_image_size(image_size, stride, spec.name)  # fail before any loading work
    if resize_mode not in ("pad", "squash"):
        raise ValueError(f"unknown resize_mode {resize_mode!r}; valid: pad, squash")
    preprocess = spec.preprocess(hw, resize_mode)
    for label, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        if value is not None:
            value = tuple(float(v) for v in value)
            if len(value) != 3 or (label == "pixel_std" and min(value) <= 0):
                raise ValueError(f"{label} must be three numbers (R, G, B)"
                                 f"{', each > 0' if label == 'pixel_std' else ''}, got {value}")
            preprocess = dataclasses.replace(preprocess, **{label[6:]: value})

    path = resolve_weights_file(spec, weights, download_root, download=download)
    meta = None
    if path is None:  # random init
        model, arch, pretrained, label = build_arch(spec.arch, seed), dict(spec.arch), False, "untrained"
    else:
        # an OpenAI entry's label claims OpenAI's weights only for a file of OpenAI's name (a
        # download of another SHA-256 is kept under another name, weight_download.py)
        official = path.name == spec.weights_basename if spec.openai_name is not None \
            else weights is None
        label = spec.weights_label if official else f"weights from {path.name}"
        pretrained = True
        if is_torchscript_archive(path):
            sd = None if spec.openai_name is not None else read_torchscript_state_dict(path, spec)
        else:
            sd, meta = read_checkpoint(path, spec)
        if meta is not None:  # our own format: architecture recorded in the file
            # An arch entry keeps its architecture, except that a file saved under the same name
            # (e.g. a handclip-mini re-pretrained with another width) brings its own.
            own_family = spec.arch is None or meta.get("name") == spec.name
            arch = dict(meta["arch"]) if own_family else dict(spec.arch)
            model = build_arch(arch, seed)  # loaded below, after adapting to the file's image size
        elif spec.openai_name is not None:
            model = load_openai_jit(path, spec, download_root) if sd is None else build_openai_state_dict(sd, path, spec)
            arch = arch_of(model)
        else:
            model, arch = build_arch(spec.arch, seed), dict(spec.arch)
            load_into(model, sd, path, spec)

    model = model.float().eval()
    backbone = ClipBackbone(model, name=spec.name, pretrained=pretrained, weights_label=label,
                            weights_path=None if path is None else str(path),
                            seed=None if pretrained else int(seed), arch=arch,
                            preprocess=preprocess)
    if meta is not None:
        try:
            # the file's network: its image size and (RN) last stride, before loading its weights
            backbone.set_last_stride(int(meta.get("rn_last_stride", 2)),
                                     image_size=meta["image_size"])
        except ValueError as exc:
            raise IncompatibleWeightsError(f"weights {path} were saved at image_size {meta['image_size']}, "
                                           f"which does not fit backbone {spec.name!r}: {exc}") from exc
        load_into(backbone.clip, sd, path, spec)
    if spec.openai_name is not None and path is not None:
        check_openai_arch(backbone.clip, spec, path)
    backbone.set_last_stride(rn_last_stride, image_size=hw)  # one resize to the final grid
    return backbone.to(dev).eval()


def encoder_and_new_param_groups(backbone: ClipBackbone, new_modules, lr_backbone: float,
                                 lr_new: float, weight_decay: float) -> list[dict]:
    """The two optimizer groups of a model that fine-tunes CLIP's image encoder beside layers of
    its own (PromptSG, CLIP-HandID): ``"backbone"`` (the image encoder, ``lr_backbone``) and
    ``"new"`` (``new_modules``, ``lr_new``), each with only the parameters that train (a frozen
    text tower or BNNeck bias is left out); an empty group is dropped."""
    groups = []
    for name, modules, lr in (("backbone", [backbone.visual], lr_backbone),
                              ("new", list(new_modules), lr_new)):
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": float(lr),
                           "weight_decay": float(weight_decay)})
    return groups


def backbone_from_params(params: Mapping[str, Any], device=None) -> ClipBackbone:
    """The backbone a stage's parameters name: ``backbone``, ``weights``, ``download_root``,
    ``download``, ``image_size``, ``resize_mode``, ``rn_last_stride``, ``pixel_mean``, ``pixel_std``, ``seed``
    (the init of untrained models) and ``device`` (``device`` here overrides the parameter).
    On CUDA it also applies ``tf32`` (process-wide) and ``channels_last`` (ResNet towers)."""
    backbone = build_backbone(params["backbone"], weights=params.get("weights"),
                          image_size=params.get("image_size"),
                          device=params.get("device", "cpu") if device is None else device,
                          seed=params.get("seed", 0), download_root=params.get("download_root"),
                          resize_mode=params.get("resize_mode", "pad"),
                          rn_last_stride=params.get("rn_last_stride", 2),
                          pixel_mean=params.get("pixel_mean"), pixel_std=params.get("pixel_std"),
                          download=params.get("download", True))
    if backbone.device.type == "cuda":
        configure_cuda(params.get("tf32", True))
        if params.get("channels_last", True):
            backbone.use_channels_last()
    return backbone



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
    if getattr(backbone, "last_stride", 2) != 2:  # same weights, another network
        h.update(f"rn_last_stride={backbone.last_stride}\0".encode())
    for key, tensor in sorted(backbone.clip.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]
