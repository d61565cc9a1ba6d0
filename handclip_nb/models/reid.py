"""CLIP-ReID's image model: a CLIP backbone with the BNNeck re-ID head (stage 2).

Ranking feature (``embed``): the concatenated pre-BN features of the two branches (CLIP-ReID
``TEST.NECK_FEAT: 'before'``: ``cat[img_feature, img_feature_proj]``), returned un-normalised;
the evaluation L2-normalises the whole vector once (``TEST.FEAT_NORM: 'yes'``), as CLIP-ReID's
``utils/metrics.py`` does.
"""
from __future__ import annotations

import torch
from torch import nn

from .heads import ReIDHead

__all__ = ["ReIDModel"]


class ReIDModel(nn.Module):
    """A CLIP backbone with CLIP-ReID's head; ``embed`` gives the ranking feature."""

    def __init__(self, backbone, num_classes: int, classifier: str = "linear",
                 triplet_features: str = "two"):
        super().__init__()
        self.backbone = backbone
        # triplet_features only changes what the loss sees (no parameters): a checkpoint loads
        # into either, and the ranking feature is the same
        self.head = ReIDHead((backbone.visual_width, backbone.embed_dim), num_classes,
                             classifier=classifier, triplet_features=triplet_features)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        feats = self.backbone.encode_image(images)
        return feats, self.head(feats, targets)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.encode_image(images)).embedding_for_test

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What stage 2 trains and checkpoints (the text tower stays frozen and is not saved)."""
        return {"visual": self.backbone.visual, "head": self.head}
