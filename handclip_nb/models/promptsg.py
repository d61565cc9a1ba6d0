"""PromptSG for hands: "A Pedestrian is Worth One Prompt" (Yang et al., CVPR 2024), adapted.

Pipeline (one image batch)::

    f = backbone.encode_image(images)                # ImageFeatures: global [B,D], patch tokens [B,N,D]
    S* = inversion(f.global_embedding)               # [B, width]: one pseudo-word per image
    t = composer(S*)                                 # "A photo of a S* {aspect} hand." -> [B, D]
                                                     #   (frozen text encoder, gradients reach S*)
    v, attn = fusion(t, f.patch_tokens)              # language-guided cross-attention + 2 blocks
    head = ReIDHead((D, D))([v, f.global_embedding]) # two BNNeck branches, like CLIP-ReID

* :class:`InversionNetwork` -- PromptSG's 3-layer MLP (Linear-BN-ReLU, Linear-BN-ReLU, Linear;
  hidden 512) from the global image embedding to one pseudo-word S* in the token-embedding space
  of the text encoder (textual inversion, as Pic2Word / SEARLE).  Its BatchNorms need a training
  batch of >= 2 images (P x K batches always are).
* :class:`LanguageGuidedFusion` -- the paper's multimodal interaction module: a cross-attention
  whose **query is the text feature** [B, 1, D] and whose keys / values are the image's **patch
  tokens** [B, N, D] (ViT patch tokens, or the ResNet's N = h*w spatial positions -- MaskCLIP dense
  tokens, see ``backbones``), so the text decides *where* the model looks; then ``num_blocks``
  (paper: 2) pre-norm transformer blocks over the sequence ``[cross-attention output; patch
  tokens]``; the first output token (after a final LayerNorm) is the fused visual feature ``v``.
  Design choices the paper leaves open, documented here: LayerNorms on the query and on the
  keys/values before the cross-attention (text features and patch tokens have different scales);
  **no** residual from the text query into ``v`` (``v`` is a re-weighted *visual* feature, so the
  ranking feature cannot be a copy of the prompt); GELU blocks with MLP ratio 4 and no dropout;
  ``heads = max(1, D // 32)`` by default (the largest divisor of D not above it: tiny D = 64 -> 2,
  ViT-B/16 D = 512 -> 16).  The per-head attention weights ``[B, heads, N]`` are returned for
  heatmaps and statistics.  A single key (N = 1) is refused: softmax over one key is 1, the text
  would have no effect (docs/mistakes.md #4, the earlier implementation's bug).
* ``prompt_mode``: ``"composed"`` (each image's own prompt, used in training) or ``"simplified"``
  (the fixed prompt "A photo of a {aspect} hand." for every image: the paper's fast inference).
  The simplified text feature is encoded **once** under ``no_grad`` and cached; it is re-encoded
  only when the device / dtype changes or a text-encoder tensor is modified in place (e.g. loading
  weights), detected from the tensors' version counters.  The inversion network is never called in
  this mode.  ``clear_text_cache()`` forces a re-encode.

Loss (:func:`promptsg_loss`, docs/methods.md): ``id_weight`` · Σ_branches label-smoothed CE (ε = 0.1)
+ ``triplet_weight`` · Σ_branches batch-hard triplet (margin 0.3, pre-BN features)
+ ``supcon_weight`` (λ = 0.5) · symmetric SupCon(global image embedding, composed text, labels,
``logit_scale``).  The inversion network receives gradients from both the SupCon term and, through
the composed cross-attention query, from the ID and triplet terms -- so it also learns with
``supcon_weight = 0`` (docs/mistakes.md #4).

Training setup: the caller freezes the text tower (``backbone.requires_grad_(False);
backbone.visual.requires_grad_(True)``, or :meth:`PromptSG.freeze_text_encoder`), then
``Adam(model.param_groups(lr_backbone=5e-6, lr_new=5e-5, weight_decay=1e-4))``.  The backbone is a
submodule (``model.to(device)`` moves it); :meth:`PromptSG.trainable_modules` names what is trained
and checkpointed (``visual``, ``inversion``, ``fusion``, ``head``; the frozen text tower is not).

Attention statistics (pure functions): :func:`attention_entropy` and :func:`prompt_sensitivity`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .backbones import ClipBackbone, ImageFeatures, encoder_and_new_param_groups
from .heads import ReIDHead, ReIDHeadOutput
from .prompts import COMPOSER_TEMPLATE, SIMPLIFIED_TEMPLATE, PromptComposer

__all__ = [
    "PROMPT_MODES",
    "InversionNetwork",
    "LanguageGuidedFusion",
    "PromptSGOutput",
    "PromptSG",
    "default_num_heads",
    "attention_entropy",
    "prompt_sensitivity",
]

#: valid ``prompt_mode`` values
PROMPT_MODES = ("composed", "simplified")


def _check_mode(prompt_mode: str) -> str:
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt_mode {prompt_mode!r}; valid modes: {', '.join(map(repr, PROMPT_MODES))} "
                         f"('composed': each image's prompt with its pseudo-word S*; 'simplified': the fixed "
                         f"prompt 'A photo of a {{aspect}} hand.')")
    return prompt_mode


def default_num_heads(dim: int) -> int:
    """``max(1, dim // 32)``, lowered to the nearest divisor of ``dim`` (heads must divide dim)."""
    heads = max(1, int(dim) // 32)
    while int(dim) % heads:
        heads -= 1
    return heads


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class InversionNetwork(nn.Sequential):
    """PromptSG's inversion network: ``Linear → BN → ReLU → Linear → BN → ReLU → Linear``.

    Maps a global image embedding [B, in_dim] to one pseudo-word S* [B, out_dim] in the text
    encoder's token-embedding space (``out_dim`` = token-embedding width).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512):
        in_dim, out_dim, hidden = int(in_dim), int(out_dim), int(hidden)
        if min(in_dim, out_dim, hidden) < 1:
            raise ValueError(f"in_dim, out_dim and hidden must be >= 1, got {in_dim}, {out_dim}, {hidden}")
        super().__init__(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"InversionNetwork expects [B, {self.in_dim}] image embeddings, got {tuple(x.shape)}")
        if self.training and x.shape[0] < 2:
            raise ValueError("InversionNetwork in training mode needs a batch of >= 2 images (BatchNorm); "
                             "call model.eval() for single images")
        return super().forward(x)


class LanguageGuidedFusion(nn.Module):
    """Cross-attention (query = text [B,1,D], key/value = patch tokens [B,N,D]) then ``num_blocks``
    pre-norm transformer blocks over ``[cross-attention output; patch tokens]``.

    ``forward(text [B, D], tokens [B, N, D]) -> (fused [B, D], attention [B, heads, N])``; each
    attention row is a softmax over the N patches (sums to 1).  See the module docstring.
    """

    def __init__(self, dim: int, num_heads: Optional[int] = None, num_blocks: int = 2, mlp_ratio: int = 4):
        super().__init__()
        dim = int(dim)
        heads = default_num_heads(dim) if num_heads is None else int(num_heads)
        if heads < 1 or dim % heads:
            raise ValueError(f"num_heads={num_heads!r} must be >= 1 and divide the embedding dim {dim}")
        if int(num_blocks) < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.dim, self.num_heads, self.num_blocks = dim, heads, int(num_blocks)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(self.num_blocks))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.ndim != 3 or tokens.shape[2] != self.dim:
            raise ValueError(f"patch tokens must be [B, N, {self.dim}], got {tuple(tokens.shape)}")
        b, n, _ = tokens.shape
        if n < 2:
            raise ValueError(f"cross-attention needs N > 1 patch tokens, got N = {n}: softmax over a single key "
                             f"is 1, so the text would have no effect (docs/mistakes.md #4); use a larger input size")
        if text.ndim != 2 or tuple(text.shape) != (b, self.dim):
            raise ValueError(f"text features must be [{b}, {self.dim}], got {tuple(text.shape)}")
        text = text.to(tokens.dtype)
        q = self.norm_query(text)[:, None, :]
        kv = self.norm_tokens(tokens)
        x, attn = self.cross_attn(q, kv, kv, need_weights=True, average_attn_weights=False)  # [B,1,D], [B,h,1,N]
        seq = torch.cat([x, tokens], dim=1)
        for block in self.blocks:
            seq = block(seq)
        return self.norm_out(seq[:, 0]), attn[:, :, 0, :].float()  # fp32 weights even under autocast

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_blocks={self.num_blocks}"


@dataclass
class PromptSGOutput:
    """Output of :meth:`PromptSG.forward`."""

    #: the backbone's ImageFeatures (global_embedding [B, D], patch_tokens [B, N, D], grid, pre_projection)
    features: ImageFeatures
    #: [B, width] pseudo-words S* (composed mode); None in simplified mode
    pseudo_words: Optional[torch.Tensor]
    #: [B, D] text features: the composed prompts, or the simplified prompt's feature expanded to B
    text: torch.Tensor
    #: [B, heads, N] cross-attention weights over the patch tokens (rows sum to 1)
    attention: torch.Tensor
    #: (h, w), N = h * w
    grid: tuple[int, int]
    #: [B, D] fused visual feature (first output token of the fusion blocks)
    fused: torch.Tensor
    #: the two-branch head on [fused, global_embedding]; ``head.embedding_for_test`` ranks
    head: ReIDHeadOutput
    #: "composed" or "simplified"
    prompt_mode: str = "composed"


class PromptSG(nn.Module):
    """PromptSG on a :class:`ClipBackbone` (see the module docstring).

    Args:
        backbone: the CLIP backbone (becomes the submodule ``backbone``).
        num_classes: training identities (ID classifiers).
        aspect: hand aspect for the prompts (e.g. ``"dorsal_r"``).
        classifier: ``"linear"`` or ``"arcface"`` (``ReIDHead``).
        num_heads: cross-attention / block heads (default :func:`default_num_heads` of D).
        num_blocks: transformer blocks after the cross-attention (paper: 2).
        inversion_hidden: hidden width of the inversion MLP (paper: 512).
    """

    def __init__(self, backbone: ClipBackbone, num_classes: int, aspect: str = "dorsal_r",
                 classifier: str = "linear", num_heads: Optional[int] = None, num_blocks: int = 2,
                 inversion_hidden: int = 512):
        super().__init__()
        if not isinstance(backbone, ClipBackbone):
            raise TypeError(f"expected a ClipBackbone, got {type(backbone).__name__}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.aspect = aspect
        dim = backbone.embed_dim
        self.composer = PromptComposer(backbone, template=COMPOSER_TEMPLATE, aspect=aspect,
                                       simplified_template=SIMPLIFIED_TEMPLATE)
        self.inversion = InversionNetwork(dim, self.composer.width, hidden=inversion_hidden)
        self.fusion = LanguageGuidedFusion(dim, num_heads=num_heads, num_blocks=num_blocks)
        self.head = ReIDHead((dim, dim), num_classes, classifier=classifier)
        # dtype/device of the new modules follow the backbone's
        device = backbone.device
        for m in (self.inversion, self.fusion, self.head):
            m.to(device)
        self._text_cache: Optional[tuple[tuple, torch.Tensor]] = None

    # -- introspection ---------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.fusion.num_heads

    @property
    def prompt_text(self) -> str:
        """The composed prompt with its placeholder, e.g. ``'A photo of a X dorsal right hand.'``."""
        return self.composer.prompt_text

    @property
    def simplified_text(self) -> str:
        return self.composer.simplified_text

    @property
    def embedding_dim(self) -> int:
        """Size of the ranking feature (``2 * D``)."""
        return self.head.embedding_dim

    # -- modules and optimisation ------------------------------------------------------------------
    def new_modules(self) -> dict[str, nn.Module]:
        """The modules PromptSG adds to CLIP (trained with ``lr_new``)."""
        return {"inversion": self.inversion, "fusion": self.fusion, "head": self.head}

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What is trained and checkpointed: the image encoder and the new modules (the frozen
        text tower and the prompt buffers are rebuilt from the backbone, not saved)."""
        return {"visual": self.backbone.visual, **self.new_modules()}

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        """Every backbone parameter outside the image encoder (token/positional embeddings, text
        transformer, ln_final, text_projection, logit_scale)."""
        visual = {id(p) for p in self.backbone.visual.parameters()}
        return [p for p in self.backbone.parameters() if id(p) not in visual]

    def freeze_text_encoder(self) -> "PromptSG":
        """``requires_grad_(False)`` on every text-side parameter; the image encoder is untouched."""
        for p in self.text_encoder_parameters():
            p.requires_grad_(False)
        return self

    def param_groups(self, lr_backbone: float, lr_new: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer param groups: ``"backbone"`` (image encoder, ``lr_backbone``) and ``"new"``
        (inversion, fusion, head, ``lr_new``), only parameters with ``requires_grad`` (the frozen
        text tower and the BNNeck biases are left out); an empty group is dropped."""
        groups = encoder_and_new_param_groups(self.backbone, self.new_modules().values(),
                                              lr_backbone, lr_new, weight_decay)
        if not groups:
            raise ValueError("PromptSG.param_groups: no trainable parameters (everything is frozen)")
        return groups

    # -- text ----------------------------------------------------------------------------------------
    def _text_cache_key(self) -> tuple:
        ref = self.backbone.text_projection
        versions = tuple(p._version for p in self.text_encoder_parameters())
        return (ref.device, ref.dtype, versions, self.composer.simplified_tokens.device)

    def clear_text_cache(self) -> None:
        self._text_cache = None

    def simplified_text_feature(self) -> torch.Tensor:
        """[1, D] feature of the simplified prompt: encoded once (no_grad, fp32 outside autocast)
        and cached; re-encoded only when the device/dtype changes or the text encoder's weights are
        modified in place."""
        key = self._text_cache_key()
        if self._text_cache is None or self._text_cache[0] != key:
            dev = self.backbone.text_projection.device
            with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                feat = self.composer.simplified_text_feature().detach()
            self._text_cache = (key, feat)
        return self._text_cache[1]

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None,
                prompt_mode: str = "composed") -> PromptSGOutput:
        """``images`` [B, 3, H, W], ``targets`` [B] (ArcFace margin in training) -> :class:`PromptSGOutput`."""
        _check_mode(prompt_mode)
        feats = self.backbone.encode_image(images)
        b = images.shape[0]
        if prompt_mode == "composed":
            pseudo = self.inversion(feats.global_embedding)
            text = self.composer(pseudo)
        else:
            pseudo = None
            text = self.simplified_text_feature().expand(b, -1)
        fused, attn = self.fusion(text, feats.patch_tokens)
        head = self.head([fused, feats.global_embedding], targets)
        return PromptSGOutput(features=feats, pseudo_words=pseudo, text=text, attention=attn,
                              grid=tuple(feats.grid), fused=fused, head=head, prompt_mode=prompt_mode)

    def embed(self, images: torch.Tensor, prompt_mode: str = "simplified") -> torch.Tensor:
        """Ranking feature [B, 2D] (``head.embedding_for_test``, not L2-normalised)."""
        return self(images, prompt_mode=prompt_mode).head.embedding_for_test

    def attention_maps(self, images: torch.Tensor, prompt_mode: str = "simplified") -> torch.Tensor:
        """Cross-attention as maps [B, heads, h, w] (row-major over the backbone's grid)."""
        out = self(images, prompt_mode=prompt_mode)
        h, w = out.grid
        return out.attention.reshape(out.attention.shape[0], out.attention.shape[1], h, w)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, aspect={self.aspect!r}, prompt={self.prompt_text!r}, "
                f"simplified={self.simplified_text!r}")


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Attention statistics
# --------------------------------------------------------------------------------------------------


def _as_heads(name: str, attn: torch.Tensor) -> torch.Tensor:
    attn = torch.as_tensor(attn)
    if attn.ndim == 2:  # [B, N]: one head
        attn = attn[:, None, :]
    if attn.ndim != 3:
        raise ValueError(f"{name} must be [B, heads, N] (or [B, N]), got shape {tuple(attn.shape)}")
    return attn


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Per-image attention entropy [B]: mean over heads of ``-Σ_n a_n log a_n`` (natural log, nats).

    ``attn`` [B, heads, N] (or [B, N]), each row a distribution over the N patches; ``0·log 0 = 0``.
    Ranges from 0 (all weight on one patch) to ``log N`` (uniform attention).
    """
    a = _as_heads("attn", attn)
    dtype = a.dtype if a.is_floating_point() else torch.float32
    a = a.double()
    return (-torch.special.xlogy(a, a).sum(-1)).mean(-1).to(dtype)


def prompt_sensitivity(attn_a: torch.Tensor, attn_b: torch.Tensor) -> float:
    """Mean (over images and heads) total-variation distance ``½ Σ_n |a_n − b_n|`` between two sets
    of attention maps of the same images (e.g. composed vs simplified prompt): 0 = the text has no
    effect on where the model looks, 1 = disjoint attention."""
    a, b = _as_heads("attn_a", attn_a), _as_heads("attn_b", attn_b)
    if a.shape != b.shape:
        raise ValueError(f"attention maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(0.5 * (a.double() - b.double()).abs().sum(-1).mean())
