"""Re-ID heads: BNNeck, identity classifiers and CLIP-ReID's two-branch head.

References
----------
* BNNeck: Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-identification"
  (CVPRW 2019): a BatchNorm1d between the metric-learning feature (triplet loss, before BN) and the
  identity classifier (after BN), its bias frozen at 0.  Init as in their ``weights_init_kaiming``
  (which CLIP-ReID copies): BN weight 1, bias 0.
* Linear classifier: ``nn.Linear(dim, num_classes, bias=False)``, weights ``N(0, 0.001²)``
  (bag-of-tricks / CLIP-ReID ``weights_init_classifier``).
* ArcFace: Deng et al., "ArcFace: Additive Angular Margin Loss" (CVPR 2019), in the form of the
  common reference implementation (``ArcMarginProduct``, ronghuaiyang/arcface-pytorch): logits
  ``s·cos(θ_y + m)`` for the target class and ``s·cos θ_j`` otherwise, with the usual fallback
  when ``θ + m`` passes π.
* :class:`ReIDHead`: CLIP-ReID's ``build_transformer`` head -- one BNNeck + classifier on the
  pre-projection feature (ViT CLS after ``ln_post`` / RN pooled last stage) and one on the
  projected CLIP embedding; ID loss on both logits, triplet loss on both pre-BN features
  (``triplet_features="two"``) or, as CLIP-ReID's ``loss/make_loss.py`` does, on those two and
  the feature one stage earlier (``"clipreid"``: ViT 11th-layer CLS, RN pooled third stage).

Every classifier has the signature ``forward(features [B, dim], targets=None) -> logits [B, C]``;
only ArcFace uses ``targets`` (margin in training mode only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BNNeck",
    "LinearClassifier",
    "ArcFaceClassifier",
    "CLASSIFIERS",
    "build_classifier",
    "ReIDHeadOutput",
    "ReIDHead",
    "TEST_FEATURES",
    "TRIPLET_FEATURES",
]


def _check_2d(name: str, x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [batch, {dim}], got {tuple(x.shape)}")


class BNNeck(nn.BatchNorm1d):
    """BatchNorm1d(dim) with weight 1, bias 0 and the bias frozen (``requires_grad=False``)."""

    def __init__(self, dim: int):
        super().__init__(int(dim))
        nn.init.constant_(self.weight, 1.0)
        nn.init.constant_(self.bias, 0.0)
        self.bias.requires_grad_(False)


class LinearClassifier(nn.Module):
    """Bias-free linear identity classifier, weights ``N(0, 0.001²)`` (bag-of-tricks / CLIP-ReID)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.dim, self.num_classes = int(dim), int(num_classes)
        if self.dim < 1 or self.num_classes < 1:
            raise ValueError(f"dim and num_classes must be >= 1, got {dim}, {num_classes}")
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.dim))
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, features: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features [B, dim] → logits [B, num_classes]; ``targets`` is ignored."""
        _check_2d("features", features, self.dim)
        return F.linear(features, self.weight)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}"


class ArcFaceClassifier(nn.Module):
    """Additive angular margin classifier (ArcFace).

    ``cos θ_ij = <x_i/|x_i|, w_j/|w_j|>``.  In training mode *with* ``targets``, the target logit
    becomes ``s · φ`` with ``φ = cos(θ + m) = cos θ cos m - sin θ sin m``, and every other logit is
    ``s · cos θ``.  Otherwise (eval mode, or no targets) the logits are ``s · cos θ`` -- so the
    classifier's predictions at test time carry no margin.

    Beyond ``θ + m > π`` the function ``cos(θ + m)`` would rise again; as in the reference
    implementation, the target logit then falls back to ``cos θ - m·sin m``
    (``easy_margin=False``, default) or, with ``easy_margin=True``, the margin is applied only
    where ``cos θ > 0``.  Weights: Xavier-uniform, as in the reference.
    """

    def __init__(self, dim: int, num_classes: int, s: float = 30.0, m: float = 0.5,
                 easy_margin: bool = False):
        super().__init__()
        self.dim, self.num_classes = int(dim), int(num_classes)
        if self.dim < 1 or self.num_classes < 1:
            raise ValueError(f"dim and num_classes must be >= 1, got {dim}, {num_classes}")
        if not s > 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"margin m must be in [0, pi/2), got {m}")
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.dim))
        nn.init.xavier_uniform_(self.weight)
        self._cos_m, self._sin_m = math.cos(self.m), math.sin(self.m)
        self._th = math.cos(math.pi - self.m)         # cos θ > th  <=>  θ + m < π
        self._mm = math.sin(math.pi - self.m) * self.m

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """[B, num_classes] cosine similarities between features and class weights."""
        _check_2d("features", features, self.dim)
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, features: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        cos = self.cosine(features)
        if targets is None or not self.training:
            return self.s * cos
        if targets.dim() != 1 or targets.shape[0] != features.shape[0]:
            raise ValueError(f"targets must have shape [{features.shape[0]}], got "
                             f"{tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise ValueError(f"targets must lie in [0, {self.num_classes})")
        # clamp keeps sqrt's gradient finite at |cos| = 1
        sin = (1.0 - cos.pow(2)).clamp(min=1e-12).sqrt()
        phi = cos * self._cos_m - sin * self._sin_m
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > self._th, phi, cos - self._mm)
        one_hot = F.one_hot(targets.long(), self.num_classes).to(cos.dtype)
        return self.s * (one_hot * phi + (1.0 - one_hot) * cos)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_classes={self.num_classes}, s={self.s}, m={self.m}, "
                f"easy_margin={self.easy_margin}")


#: valid ``kind`` values of :func:`build_classifier`
CLASSIFIERS = ("linear", "arcface")


def build_classifier(kind: str, dim: int, num_classes: int, **kwargs) -> nn.Module:
    """``"linear"`` → :class:`LinearClassifier`, ``"arcface"`` → :class:`ArcFaceClassifier`
    (``kwargs``: ``s``, ``m``, ``easy_margin``)."""
    if kind == "linear":
        if kwargs:
            raise TypeError(f"the linear classifier takes no options, got {sorted(kwargs)}")
        return LinearClassifier(dim, num_classes)
    if kind == "arcface":
        return ArcFaceClassifier(dim, num_classes, **kwargs)
    raise ValueError(f"unknown classifier kind {kind!r}; valid kinds: {', '.join(CLASSIFIERS)}")


#: valid ``test_feature`` values of :class:`ReIDHead`
TEST_FEATURES = ("pre_bn", "post_bn")

#: valid ``triplet_features`` values of :class:`ReIDHead`: ``"two"`` = the two branches' pre-BN
#: features; ``"clipreid"`` = the intermediate feature first, then the two branches (CLIP-ReID's
#: ``[img_feature_last, img_feature, img_feature_proj]``, ``model/make_model_clipreid.py``)
TRIPLET_FEATURES = ("two", "clipreid")


@dataclass
class ReIDHeadOutput:
    """Output of :class:`ReIDHead` (one entry per branch in every list, in ``in_dims`` order)."""

    #: [B, num_classes] per branch -- the ID loss goes on each
    logits: list[torch.Tensor]
    #: [B, d_k] pre-BNNeck features per branch -- the triplet loss goes on each; with
    #: ``triplet_features="clipreid"`` the intermediate feature comes first (3 entries)
    features_for_triplet: list[torch.Tensor]
    #: [B, d_k] BNNeck outputs per branch (classifier inputs)
    bn_features: list[torch.Tensor]
    #: [B, sum(in_dims)] concatenation chosen by ``test_feature``; *not* L2-normalised
    embedding_for_test: torch.Tensor


class ReIDHead(nn.Module):
    """CLIP-ReID's re-ID head: one BNNeck + classifier per input feature.

    Typical use with a :class:`~handclip_nb.models.backbones.ImageFeatures` ``f``:
    ``ReIDHead((C, D), num_classes)(f)`` -- the branches are ``f.pre_projection`` [B, C]
    (CLIP-ReID's ``img_feature``) and ``f.global_embedding`` [B, D] (``img_feature_proj``).  A list
    or tuple of tensors matching ``in_dims`` is accepted as well (any number of branches).

    ``test_feature`` picks ``embedding_for_test``:

    * ``"pre_bn"`` (default; CLIP-ReID ``TEST.NECK_FEAT: 'before'``): ``cat(features_for_triplet)``,
    * ``"post_bn"`` (``'after'``): ``cat(bn_features)`` (BN with running statistics in eval mode).

    The concatenation is returned un-normalised; like CLIP-ReID (``TEST.FEAT_NORM: 'yes'``) the
    evaluation L2-normalises the whole concatenated vector (docs/methods.md), which
    ``handclip_nb.evaluate.features`` does.  Logits are computed in eval mode too (without margin).

    ``triplet_features`` picks ``features_for_triplet``: ``"two"`` (default) the branches' pre-BN
    features; ``"clipreid"`` the intermediate feature (``ImageFeatures.intermediate``, or the
    ``intermediate=`` argument with a list input) followed by them. It has no BNNeck and no
    classifier and never enters ``embedding_for_test``.
    """

    def __init__(self, in_dims: Sequence[int], num_classes: int, classifier: str = "linear",
                 test_feature: str = "pre_bn", triplet_features: str = "two",
                 **classifier_kwargs):
        super().__init__()
        if isinstance(in_dims, int):
            in_dims = (in_dims,)
        self.in_dims = tuple(int(d) for d in in_dims)
        if not self.in_dims or any(d < 1 for d in self.in_dims):
            raise ValueError(f"in_dims must be a non-empty sequence of positive ints, got {in_dims}")
        if test_feature not in TEST_FEATURES:
            raise ValueError(f"unknown test_feature {test_feature!r}; valid: {', '.join(TEST_FEATURES)}")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier kind {classifier!r}; valid kinds: "
                             f"{', '.join(CLASSIFIERS)}")
        if triplet_features not in TRIPLET_FEATURES:
            raise ValueError(f"unknown triplet_features {triplet_features!r}; valid: "
                             f"{', '.join(TRIPLET_FEATURES)}")
        self.triplet_features = triplet_features
        self.num_classes = int(num_classes)
        self.classifier_kind = classifier
        self.test_feature = test_feature
        self.necks = nn.ModuleList(BNNeck(d) for d in self.in_dims)
        self.classifiers = nn.ModuleList(
            build_classifier(classifier, d, self.num_classes, **classifier_kwargs)
            for d in self.in_dims)

    @property
    def embedding_dim(self) -> int:
        """Size of ``embedding_for_test``: ``sum(in_dims)``."""
        return sum(self.in_dims)

    def _branches(self, features) -> list[torch.Tensor]:
        if hasattr(features, "pre_projection") and hasattr(features, "global_embedding"):
            if len(self.in_dims) != 2:
                raise ValueError(f"an ImageFeatures input gives 2 branches (pre_projection, "
                                 f"global_embedding) but the head has in_dims={self.in_dims}")
            branches = [features.pre_projection, features.global_embedding]
            names = ["pre_projection", "global_embedding"]
        elif isinstance(features, (list, tuple)):
            branches = list(features)
            names = [f"features[{k}]" for k in range(len(branches))]
            if len(branches) != len(self.in_dims):
                raise ValueError(f"got {len(branches)} feature tensors, the head expects "
                                 f"{len(self.in_dims)} (in_dims={self.in_dims})")
        else:
            raise TypeError("ReIDHead takes an ImageFeatures or a list/tuple of [B, d] tensors, got "
                            f"{type(features).__name__}")
        for name, x, d in zip(names, branches, self.in_dims):
            _check_2d(name, x, d)
        if len({x.shape[0] for x in branches}) != 1:
            raise ValueError(f"branches have different batch sizes: {[x.shape[0] for x in branches]}")
        return branches

    def _triplet(self, features, branches: list[torch.Tensor],
                 intermediate: Optional[torch.Tensor]) -> list[torch.Tensor]:
        if self.triplet_features == "two":
            return branches
        if intermediate is None:
            intermediate = getattr(features, "intermediate", None)
        if intermediate is None:
            raise ValueError("triplet_features='clipreid' needs the intermediate feature "
                             "(ImageFeatures.intermediate, or intermediate= with a list input)")
        if not isinstance(intermediate, torch.Tensor) or intermediate.dim() != 2 \
                or intermediate.shape[0] != branches[0].shape[0]:
            raise ValueError(f"intermediate must be [{branches[0].shape[0]}, d], got "
                             f"{tuple(getattr(intermediate, 'shape', ()))}")
        return [intermediate, *branches]

    def forward(self, features: Union[Sequence[torch.Tensor], object],
                targets: Optional[torch.Tensor] = None,
                intermediate: Optional[torch.Tensor] = None) -> ReIDHeadOutput:
        """``features``: ImageFeatures or list of [B, d_k]; ``targets`` [B] (used by ArcFace in
        training); ``intermediate`` [B, d] (``triplet_features="clipreid"`` with a list input)
        → :class:`ReIDHeadOutput`."""
        branches = self._branches(features)
        bn = [neck(x) for neck, x in zip(self.necks, branches)]
        logits = [clf(f, targets) for clf, f in zip(self.classifiers, bn)]
        chosen = branches if self.test_feature == "pre_bn" else bn
        return ReIDHeadOutput(logits=logits,
                              features_for_triplet=self._triplet(features, branches, intermediate),
                              bn_features=bn, embedding_for_test=torch.cat(chosen, dim=1))

    def extra_repr(self) -> str:
        return (f"in_dims={self.in_dims}, num_classes={self.num_classes}, "
                f"classifier={self.classifier_kind!r}, test_feature={self.test_feature!r}, "
                f"triplet_features={self.triplet_features!r}")
