"""CLIP-HandID (Baisa et al., IPTA 2025, arXiv 2506.12447; code github nathanlem1/CLIP-HandID).

Pipeline (one image batch), as ``model/make_model_handID.py`` builds it (docs/methods.md has the
file:line table)::

    f = backbone.encode_image(images)              # pre_projection [B, C], global_embedding [B, D]
    head = ReIDHead((C, D), test_feature="post_bn")  # a BNNeck + bias-free classifier on each
    token = inversion(f.global_embedding)          # [B, width]: one pseudo-token per image
    text = composer(token)                         # "A photo of a sks hand" with sks replaced,
                                                   #   the frozen text encoder, read at EOT [B, D]

Ranking feature: ``cat(BN(pre_projection), BN(global_embedding))`` (the BN outputs,
``eval_query_gallery_handID.py``'s ``features2[1]``); the evaluation adds the mirrored image's
(``flip_tta``) and L2-normalises.

Two behaviours of the text side (:class:`HandIDModel` ``inversion_grad`` / ``token``):

* the paper's method (``inversion_grad=True``, ``token="whole"``): the pseudo-token replaces the
  placeholder's embedding whole and the SupCon loss trains the inversion MLP through the frozen
  text encoder;
* the released code's (``inversion_grad=False``, ``token="mean"``): ``encode_text_with_placeholders``
  is decorated ``@torch.no_grad()``, so the MLP never receives a gradient, and it writes
  ``pseudo_token_embeddings[b].mean(dim=0, keepdim=True)`` into the slot: the mean of the token's
  entries, one scalar broadcast over the embedding, which after the MLP's final LayerNorm is 0 up to
  rounding for every image (its weight 1 and bias 0 never train). Every image then gets the same
  text feature.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .backbones import ClipBackbone, ImageFeatures, encoder_and_new_param_groups
from .heads import ReIDHead, ReIDHeadOutput
from .prompts import PromptComposer

__all__ = ["HANDID_TEMPLATE", "HANDID_PLACEHOLDER", "TOKEN_MODES", "HEAD_MODES", "InversionMLP",
           "HandIDOutput", "HandIDModel"]

#: CLIP-HandID's prompt (``encode_text_with_placeholders``: "A photo of a sks hand", no period)
HANDID_TEMPLATE = "A photo of a {token} hand"
#: its placeholder word, whose token embedding the pseudo-token replaces
HANDID_PLACEHOLDER = "sks"
#: valid ``token`` values: the paper's whole pseudo-token, or the released code's mean
TOKEN_MODES = ("whole", "mean")
#: The BNNeck heads: both of CLIP-HandID's code, or (an ablation) the projected feature's alone.
HEAD_MODES = ("two", "projected")


class InversionMLP(nn.Sequential):
    """CLIP-HandID's ``InversionNetworkMLP``: ``Linear → LayerNorm → GELU → Dropout`` twice, then
    ``Linear → LayerNorm``; from the projected image feature [B, in_dim] to one pseudo-token
    [B, out_dim] in the text encoder's token-embedding space. ``hidden`` is 4 × in_dim in its
    code (``InversionNetworkMLP(self.in_planes_proj, self.in_planes_proj * 4)``); dropout 0.5."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Optional[int] = None,
                 dropout: float = 0.5):
        in_dim, out_dim = int(in_dim), int(out_dim)
        hidden = 4 * in_dim if hidden is None else int(hidden)
        if min(in_dim, out_dim, hidden) < 1:
            raise ValueError(f"in_dim, out_dim and hidden must be >= 1, got {in_dim}, {out_dim}, "
                             f"{hidden}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__(
            nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, out_dim), nn.LayerNorm(out_dim),
        )
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"InversionMLP expects [B, {self.in_dim}] image features, got "
                             f"{tuple(x.shape)}")
        return super().forward(x)


class HandIDOutput(NamedTuple):
    features: ImageFeatures
    head: ReIDHeadOutput
    #: [B, width] the inversion MLP's pseudo-tokens
    tokens: torch.Tensor
    #: [B, D] the composed prompts' text features (no graph when ``inversion_grad`` is False)
    text: torch.Tensor


class HandIDModel(nn.Module):
    """CLIP-HandID on a :class:`ClipBackbone` (module docstring).

    ``trainable_modules`` (what is trained and checkpointed): ``visual``, ``inversion``, ``head``;
    the text tower stays frozen and is rebuilt from the backbone."""

    def __init__(self, backbone: ClipBackbone, num_classes: int, inversion_grad: bool = True,
                 token: str = "whole", classifier: str = "linear", heads: str = "two"):
        super().__init__()
        if not isinstance(backbone, ClipBackbone):
            raise TypeError(f"expected a ClipBackbone, got {type(backbone).__name__}")
        if token not in TOKEN_MODES:
            raise ValueError(f"unknown handid_token {token!r}; valid: {', '.join(TOKEN_MODES)} "
                             f"('whole' = the paper's pseudo-token, 'mean' = the released "
                             f"code's scalar mean)")
        if heads not in HEAD_MODES:
            raise ValueError(f"unknown handid_heads {heads!r}; valid: {', '.join(HEAD_MODES)} "
                             f"('two' = CLIP-HandID's CLS and projected heads, 'projected' = "
                             f"the projected feature's alone)")
        self.backbone = backbone
        self.inversion_grad, self.token, self.heads = bool(inversion_grad), token, heads
        self.composer = PromptComposer(backbone, template=HANDID_TEMPLATE, aspect=None,
                                       placeholder=HANDID_PLACEHOLDER,
                                       simplified_template="A photo of a hand")
        dim = backbone.embed_dim
        self.inversion = InversionMLP(dim, self.composer.width)
        in_dims = (backbone.visual_width, dim) if heads == "two" else (dim,)
        self.head = ReIDHead(in_dims, num_classes, classifier=classifier, test_feature="post_bn")
        for m in (self.inversion, self.head):
            m.to(backbone.device)

    @property
    def prompt_text(self) -> str:
        return self.composer.prompt_text

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"visual": self.backbone.visual, "inversion": self.inversion, "head": self.head}

    def new_modules(self) -> dict[str, nn.Module]:
        """The layers CLIP-HandID adds to CLIP (its second parameter group, 10 × lr)."""
        return {"inversion": self.inversion, "head": self.head}

    def param_groups(self, lr_backbone: float, lr_new: float, weight_decay: float) -> list[dict]:
        """``train_handID.py``'s two Adam groups: the image encoder at ``lr_backbone``, every
        other trainable parameter at ``lr_new``; frozen parameters (text tower, BNNeck biases)
        left out."""
        return encoder_and_new_param_groups(self.backbone, self.new_modules().values(),
                                            lr_backbone, lr_new, weight_decay)

    def slot_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """What enters the placeholder's slot [B, width]: the pseudo-token, or (``mean``) the
        mean of its entries broadcast over the width, as ``encode_text_with_placeholders``
        assigns ``pseudo_token_embeddings[b].mean(dim=0, keepdim=True)`` to a width-long slot."""
        if self.token == "whole":
            return tokens
        return tokens.mean(dim=1, keepdim=True).expand_as(tokens)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, D] text features of the prompts holding ``tokens``; without a graph when
        ``inversion_grad`` is False (the released code's ``@torch.no_grad()``)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.inversion_grad):
            return self.composer(self.slot_embedding(tokens))

    def _head(self, feats: ImageFeatures, targets: Optional[torch.Tensor] = None):
        if self.heads == "two":
            return self.head(feats, targets)
        return self.head([feats.global_embedding], targets)

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> HandIDOutput:
        feats = self.backbone.encode_image(images)
        head = self._head(feats, targets)
        tokens = self.inversion(feats.global_embedding)
        return HandIDOutput(features=feats, head=head, tokens=tokens,
                            text=self.text_features(tokens))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Ranking feature [B, C + D]: the two BN outputs ([B, D] with ``heads="projected"``;
        not L2-normalised; the text side is not run)."""
        return self._head(self.backbone.encode_image(images)).embedding_for_test

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, classes] logits of the projected feature's classifier, what ``train_handID.py``
        measures its validation accuracy with (``score[1]``, "Use the score_proj")."""
        return self._head(self.backbone.encode_image(images)).logits[-1]

    def extra_repr(self) -> str:
        return (f"prompt={self.prompt_text!r}, inversion_grad={self.inversion_grad}, "
                f"token={self.token!r}, heads={self.heads!r}")
