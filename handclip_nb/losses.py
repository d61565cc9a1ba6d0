"""Losses for CLIP-ReID (stages 1 and 2) and PromptSG: pure, shape-checked torch functions.

Every function says which paper / reference code it follows.  None of them keeps state except
:class:`CenterLoss` (its centres are parameters).

Scale convention (one rule for the whole module)
------------------------------------------------
``logit_scale`` is always the **multiplicative** factor applied to the dot products, i.e. what
CLIP's own ``forward`` calls ``logit_scale`` *after* ``self.logit_scale.exp()`` (about 100 for
trained OpenAI weights).  It is ``1 / temperature``.  Passing CLIP's raw ``nn.Parameter``
(the *log* scale, about 4.6) is a classic silent bug, so an ``nn.Parameter`` is refused with a
message; pass ``clip_model.logit_scale.exp()`` (a plain tensor, gradients still flow) or a float.

Normalisation
-------------
The contrastive losses take ``normalize=`` explicitly.  :func:`supcon_loss` and
:func:`image_to_text_ce` default to ``normalize=False, logit_scale=1.0`` -- exactly what the
official CLIP-ReID code does (``loss/supcontrast.py`` with ``temperature = 1.0`` and
``processor_clipreid_stage2.py``: ``logits = image_features @ text_features.t()``, raw, un-normalised
features, in both stages).  :func:`symmetric_supcon` defaults to the CLIP-style form described in
docs/methods.md (L2-normalised features, logits multiplied by CLIP's scale); set ``normalize=False,
logit_scale=1.0`` there to reproduce the reference code bit for bit.

Contents
--------
* :func:`supcon_loss`, :func:`symmetric_supcon` -- supervised contrastive loss between two sets
  (Khosla et al. NeurIPS 2020 as adapted by CLIP-ReID, Li et al. AAAI 2023, ``loss/supcontrast.py``).
* :func:`cross_entropy_label_smooth` -- torchreid's ``CrossEntropyLabelSmooth`` (Szegedy et al. 2016).
* :func:`batch_hard_triplet` -- batch-hard triplet loss (Hermans et al. 2017, "In Defense of the
  Triplet Loss"), hard or soft margin, with statistics.
* :class:`CenterLoss` -- Wen et al. ECCV 2016, as in torchreid / CLIP-ReID.
* :func:`image_to_text_ce` -- CLIP-ReID stage-2 image-to-text cross entropy.
* :data:`TEXT_LOGITS`, :func:`text_logit_form` -- the two image-text logit forms the stages offer
  (``text_logits``): ``"raw"`` = CLIP-ReID's, ``"cosine"`` = CLIP's.
* :func:`clip_contrastive_loss` -- CLIP's symmetric InfoNCE over matched image-text pairs
  (Radford et al. ICML 2021, the pseudo-code of Fig. 3), used to pretrain ``handclip-mini``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "supcon_loss",
    "symmetric_supcon",
    "cross_entropy_label_smooth",
    "TripletStats",
    "batch_hard_triplet",
    "pairwise_euclidean",
    "CenterLoss",
    "image_to_text_ce",
    "clip_contrastive_loss",
    "TEXT_LOGITS",
    "text_logit_form",
]

Scale = Union[float, torch.Tensor]

# Squared distances are clamped to this before the square root (CLIP-ReID / torchreid use 1e-12).
_DIST_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _check_features(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_labels(name: str, labels: torch.Tensor, n: int, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [batch], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but {what} has {n} rows")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor of identity labels, got {labels.dtype}")


def _reads_on_host(x: torch.Tensor) -> bool:
    """Whether a check may read ``x``'s values in Python: only on the CPU. Reading a GPU
    tensor's value (``int``, ``float``, ``bool``) waits for every kernel queued before it, and a
    loss checked at every training step would make the loop wait on the device at every step;
    there the checks run on the device instead (``torch._assert_async``): a violation stops the
    run with the same message at the next synchronisation, as a device-side assertion."""
    return x.device.type == "cpu"


def _check_class_range(name: str, labels: torch.Tensor, num_classes: int) -> None:
    if not labels.numel():
        return
    if not _reads_on_host(labels):
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"{name} must lie in [0, {num_classes}) (a label outside it on the "
                            f"device)")
        return
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 → float32 (autocast outputs); float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_scale(logit_scale: Scale) -> None:
    if isinstance(logit_scale, nn.Parameter):
        raise TypeError(
            "logit_scale is an nn.Parameter -- probably CLIP's *log* scale (about 4.6). This module "
            "takes the multiplicative scale: pass clip_model.logit_scale.exp() (gradients still "
            "flow) or a float.")
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        if not _reads_on_host(logit_scale):
            scale = logit_scale.detach().reshape(())
            torch._assert_async((scale > 0) & torch.isfinite(scale),
                                "logit_scale must be a finite positive number (on the device)")
            return
        value = float(logit_scale.detach())
    else:
        value = float(logit_scale)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"logit_scale must be a finite positive number, got {value}")


#: valid values of the stages' ``text_logits`` parameter
TEXT_LOGITS = ("cosine", "raw")


def text_logit_form(mode: str, clip_scale: Scale) -> tuple[bool, Scale]:
    """``(normalize, logit_scale)`` of an image-text logit form for :func:`supcon_loss`,
    :func:`symmetric_supcon` and :func:`image_to_text_ce`.

    * ``"raw"``: CLIP-ReID's ``loss/supcontrast.py`` (temperature 1) and
      ``processor_clipreid_stage2.py`` (``image_features @ text_features.t()``): raw dot products
      of un-normalised features, ``(False, 1.0)``;
    * ``"cosine"``: CLIP's own form, L2-normalised features times CLIP's multiplicative scale
      ``clip_scale`` (``logit_scale.exp()``), ``(True, clip_scale)``.
    """
    if mode == "raw":
        return False, 1.0
    if mode == "cosine":
        return True, clip_scale
    raise ValueError(f"unknown text_logits {mode!r}; valid: {', '.join(TEXT_LOGITS)}")


# --------------------------------------------------------------------------------------------------
# supervised contrastive loss (CLIP-ReID stage 1, PromptSG)
# --------------------------------------------------------------------------------------------------


def supcon_loss(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    labels_a: torch.Tensor,
    labels_b: torch.Tensor,
    *,
    logit_scale: Scale = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Supervised contrastive loss of anchors ``a`` against contrast set ``b`` (one direction).

    Follows CLIP-ReID's ``SupConLoss.forward(features, contrast_features, labels, targets)``::

        logits[i, j] = logit_scale * <a_i, b_j>                 (a, b L2-normalised if normalize)
        mask[i, j]   = labels_a[i] == labels_b[j]
        loss         = -mean_i  sum_j mask[i, j] * log_softmax_j(logits[i])  /  sum_j mask[i, j]

    Every anchor may have several positives in ``b`` (each counts, averaged), and the two label
    sets need not be equal or even of the same length.  Anchors without any positive in ``b`` are
    left out of the mean (the reference code would produce NaN); if no anchor has a positive a
    :class:`ValueError` is raised, because that is always a batching bug.

    Args:
        features_a: [Na, D] anchors (e.g. image features for image→text).
        features_b: [Nb, D] contrast features (e.g. text features).
        labels_a: [Na] integer identities of the anchors.
        labels_b: [Nb] integer identities of the contrast features.
        logit_scale: multiplicative scale = 1/temperature (see the module docstring); the
            reference code uses 1.0 on raw features.
        normalize: L2-normalise both feature sets first (CLIP style).  The reference code does not.

    Returns:
        scalar loss tensor.
    """
    _check_features("features_a", features_a)
    _check_features("features_b", features_b)
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"features_a and features_b must have the same dim, got {features_a.shape[1]} "
            f"and {features_b.shape[1]}")
    _check_labels("labels_a", labels_a, features_a.shape[0], "features_a")
    _check_labels("labels_b", labels_b, features_b.shape[0], "features_b")
    _check_scale(logit_scale)
    if normalize:
        features_a = F.normalize(features_a, dim=1)
        features_b = F.normalize(features_b, dim=1)
    logits = logit_scale * (features_a @ features_b.t())
    log_prob = F.log_softmax(_upcast(logits), dim=1)  # max-subtracted internally: stable
    mask = (labels_a.view(-1, 1) == labels_b.view(1, -1)).to(log_prob.dtype)
    num_pos = mask.sum(1)
    has_pos = num_pos > 0
    no_positive = ("supcon_loss: no anchor in features_a has a positive (same label) in "
                   "features_b; check the labels / batch composition")
    if not _reads_on_host(has_pos):
        # no host read: the anchors without a positive weigh 0 in a masked mean (boolean
        # indexing would wait for the device to count them)
        torch._assert_async(has_pos.any(), no_positive)
        per_anchor = (mask * log_prob).sum(1) / num_pos.clamp_min(1)
        return -torch.where(has_pos, per_anchor, 0.0).sum() / has_pos.sum()
    if not bool(has_pos.any()):
        raise ValueError(no_positive)
    mean_log_prob_pos = (mask * log_prob).sum(1)[has_pos] / num_pos[has_pos]
    return -mean_log_prob_pos.mean()


def symmetric_supcon(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: Scale,
    *,
    normalize: bool = True,
    text_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``SupCon(image→text) + SupCon(text→image)``: CLIP-ReID stage 1 / PromptSG's contrastive term.

    CLIP-ReID stage 1 (``processor_clipreid_stage1.py``) computes
    ``xent(img, txt, target, target) + xent(txt, img, target, target)``, one text feature per image
    (the prompt of that image's identity).  PromptSG weights this sum by 0.5 (docs/methods.md); the
    weight is the caller's.

    Args:
        image_features: [N, D] image features.
        text_features: [M, D] text features (usually M = N, one per image).
        labels: [N] identities of the images.
        logit_scale: multiplicative scale (``clip_model.logit_scale.exp()``, ~100), required so the
            choice is explicit.  Use 1.0 with ``normalize=False`` for the reference code's exact form.
        normalize: L2-normalise both sides first (default True, CLIP style).
        text_labels: [M] identities of the texts; defaults to ``labels`` (then M must equal N).

    Returns:
        scalar loss tensor (the sum of the two directions, not their mean).
    """
    if text_labels is None:
        text_labels = labels
    kw = dict(logit_scale=logit_scale, normalize=normalize)
    return (supcon_loss(image_features, text_features, labels, text_labels, **kw)
            + supcon_loss(text_features, image_features, text_labels, labels, **kw))


# --------------------------------------------------------------------------------------------------
# identity losses
# --------------------------------------------------------------------------------------------------


def cross_entropy_label_smooth(
    logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1
) -> torch.Tensor:
    """Cross entropy with label smoothing, torchreid's / CLIP-ReID's ``CrossEntropyLabelSmooth``.

    Szegedy et al. CVPR 2016: target distribution ``q = (1 - ε)·onehot(y) + ε / C`` over the
    ``C = logits.shape[1]`` classes, ``loss = mean_i sum_c -q_ic · log_softmax(logits_i)_c``.
    ``epsilon=0`` is the plain cross entropy.  (Numerically the same as
    ``F.cross_entropy(..., label_smoothing=ε)``.)

    Args:
        logits: [B, C] unnormalised class scores.
        targets: [B] integer labels in [0, C).
        epsilon: smoothing weight in [0, 1).

    Returns:
        scalar loss tensor (mean over the batch).
    """
    _check_features("logits", logits)
    _check_labels("targets", targets, logits.shape[0], "logits")
    num_classes = logits.shape[1]
    _check_class_range("targets", targets, num_classes)
    if not 0.0 <= float(epsilon) < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    log_probs = F.log_softmax(_upcast(logits), dim=1)
    q = torch.full_like(log_probs, float(epsilon) / num_classes)
    q.scatter_add_(1, targets.view(-1, 1).long(),
                   torch.full_like(log_probs[:, :1], 1.0 - float(epsilon)))
    return (-q * log_probs).sum(1).mean()


def image_to_text_ce(
    image_features: torch.Tensor,
    text_features_all: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: Scale = 1.0,
    *,
    normalize: bool = False,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """CLIP-ReID stage-2 image→text loss: cross entropy over ``image · text_allᵀ`` logits.

    ``text_features_all[c]`` is the text feature of identity ``c``, computed once for all
    identities before stage 2 and kept frozen (pass it detached / under ``no_grad``).  The
    reference (``processor_clipreid_stage2.py``) uses raw features and no scale:
    ``logits = image_features @ text_features.t()`` -- the defaults here.  It then applies its
    ID criterion, which is label-smoothed (ε = 0.1) when ``IF_LABELSMOOTH`` is on (its shipped
    configs); pass ``epsilon=0.1`` to match that, the default 0 is the plain CE.

    Args:
        image_features: [B, D] projected image features (CLIP-ReID's ``img_feature_proj``).
        text_features_all: [C, D] one text feature per identity (row c = identity c).
        labels: [B] identities in [0, C).
        logit_scale: multiplicative scale (see module docstring).
        normalize: L2-normalise both sides first.
        epsilon: label smoothing (see :func:`cross_entropy_label_smooth`).

    Returns:
        scalar loss tensor.
    """
    _check_features("image_features", image_features)
    _check_features("text_features_all", text_features_all)
    if image_features.shape[1] != text_features_all.shape[1]:
        raise ValueError(
            f"image_features dim {image_features.shape[1]} != text_features_all dim "
            f"{text_features_all.shape[1]} (use the projected image feature)")
    _check_labels("labels", labels, image_features.shape[0], "image_features")
    _check_class_range("labels", labels, text_features_all.shape[0])
    _check_scale(logit_scale)
    if normalize:
        image_features = F.normalize(image_features, dim=1)
        text_features_all = F.normalize(text_features_all, dim=1)
    logits = logit_scale * (image_features @ text_features_all.t())
    return cross_entropy_label_smooth(logits, labels, epsilon=epsilon)


# --------------------------------------------------------------------------------------------------
# batch-hard triplet loss
# --------------------------------------------------------------------------------------------------


def pairwise_euclidean(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[M, N] Euclidean distances, ``sqrt(clamp(|x|² + |y|² - 2 x·y, min=1e-12))``.

    The clamp keeps the square root away from 0, so the gradient stays finite (it is exactly 0)
    for coincident points -- duplicates are common with a P×K sampler drawing with replacement.
    Consequently a zero distance reads as 1e-6.
    """
    y = x if y is None else y
    x2 = x.pow(2).sum(1, keepdim=True)
    y2 = y.pow(2).sum(1, keepdim=True).t()
    d2 = x2 + y2 - 2.0 * (x @ y.t())
    return d2.clamp(min=_DIST_EPS).sqrt()


@dataclass
class TripletStats:
    """Diagnostics of one :func:`batch_hard_triplet` call (floats / ints, detached)."""

    #: batch size
    num_anchors: int
    #: anchors that entered the loss (have a positive and a negative)
    num_valid: int
    #: anchors skipped because no *other* sample of their label is in the batch
    num_skipped_no_positive: int
    #: anchors skipped because every sample of the batch has their label
    num_skipped_no_negative: int
    #: num anchors with a positive / num_anchors
    frac_with_positive: float
    #: mean hardest-positive distance over valid anchors (nan if none)
    mean_pos_dist: float
    #: mean hardest-negative distance over valid anchors (nan if none)
    mean_neg_dist: float
    #: fraction of valid anchors whose triplet is active: ``d_ap - d_an + margin > 0`` (hard margin),
    #: ``d_ap >= d_an`` (soft margin); nan if none
    frac_active: float
    #: [B] index of each anchor's hardest positive, -1 where skipped (never the anchor itself)
    positive_index: torch.Tensor
    #: [B] index of each anchor's hardest negative, -1 where skipped
    negative_index: torch.Tensor


def batch_hard_triplet(
    features: torch.Tensor,
    labels: torch.Tensor,
    margin: Optional[float] = 0.3,
    normalize: bool = False,
    stats: bool = True,
) -> tuple[torch.Tensor, Optional[TripletStats]]:
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017), as used by CLIP-ReID / TransReID.

    For each anchor ``i``: hardest positive = the *farthest* sample ``j != i`` with the same label,
    hardest negative = the *closest* sample with another label; Euclidean distances
    (:func:`pairwise_euclidean`).  Per-anchor loss:

    * ``margin > 0``: ``relu(d_ap - d_an + margin)`` (``nn.MarginRankingLoss``),
    * ``margin in (None, 0)``: soft margin ``softplus(d_ap - d_an)`` (``nn.SoftMarginLoss``),

    averaged over the valid anchors.  Unlike the reference ``hard_example_mining`` the anchor is
    never its own positive: an anchor whose label appears only once in the batch is skipped (and
    counted in the stats) instead of entering with ``d_ap ≈ 0``; anchors with no negative are
    skipped too.  The reference code also assumes equal samples per label; this does not.  With
    no valid anchor the loss is a zero that still belongs to the graph.

    Args:
        features: [B, D] features (CLIP-ReID: the pre-BNNeck features, one call per feature).
        labels: [B] integer identities.
        margin: margin (CLIP-ReID 0.3); ``None`` or 0 selects the soft-margin variant.
        normalize: L2-normalise the features first.
        stats: compute the :class:`TripletStats` (they read the device: a training step that
            only needs the loss passes False, and off the CPU the loss then reads no device
            value at all: a masked mean over the valid anchors instead of boolean indexing).

    Returns:
        ``(loss, stats)``: scalar loss tensor and a :class:`TripletStats` (None with
        ``stats=False``).
    """
    _check_features("features", features)
    _check_labels("labels", labels, features.shape[0], "features")
    if margin is not None and (not math.isfinite(float(margin)) or float(margin) < 0):
        raise ValueError(f"margin must be None or a finite number >= 0, got {margin}")
    soft = margin is None or float(margin) == 0.0
    if features.shape[0] == 0:
        raise ValueError("batch_hard_triplet: empty batch")
    if normalize:
        features = F.normalize(features, dim=1)
    b = features.shape[0]
    dist = pairwise_euclidean(_upcast(features))
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(b, dtype=torch.bool, device=features.device)
    is_pos = same & ~eye
    is_neg = ~same
    has_pos = is_pos.any(1)
    has_neg = is_neg.any(1)
    valid = has_pos & has_neg

    # Hardest positive: max over positives (non-positives pushed to -inf); hardest negative: min
    # over negatives (non-negatives pushed to +inf).  Skipped anchors pick a dummy, masked below.
    neg_inf = torch.tensor(float("-inf"), dtype=dist.dtype, device=dist.device)
    pos_inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    d_ap_all, p_idx = torch.where(is_pos, dist, neg_inf).max(1)
    d_an_all, n_idx = torch.where(is_neg, dist, pos_inf).min(1)
    if not stats and not _reads_on_host(features):
        # skipped anchors hold -inf or +inf distances: their per-anchor loss is 0 either way,
        # and the mask keeps them out of the mean and of the gradient
        gap = d_ap_all - d_an_all
        per_anchor_all = F.softplus(gap) if soft else F.relu(gap + float(margin))
        masked = torch.where(valid, per_anchor_all, torch.zeros_like(per_anchor_all))
        return masked.sum() / valid.sum().clamp_min(1).to(masked.dtype), None
    d_ap = d_ap_all[valid]
    d_an = d_an_all[valid]
    if soft:
        per_anchor = F.softplus(d_ap - d_an)
        active = d_ap >= d_an
    else:
        per_anchor = F.relu(d_ap - d_an + float(margin))
        active = per_anchor > 0
    num_valid = int(valid.sum())
    if num_valid:
        loss = per_anchor.mean()
    else:
        loss = features.sum() * 0.0
    if not stats:
        return loss, None

    nan = float("nan")
    minus_one = torch.full_like(p_idx, -1)
    stats = TripletStats(
        num_anchors=b,
        num_valid=num_valid,
        num_skipped_no_positive=int((~has_pos).sum()),
        num_skipped_no_negative=int((has_pos & ~has_neg).sum()),
        frac_with_positive=float(has_pos.float().mean()) if b else nan,
        mean_pos_dist=float(d_ap.detach().mean()) if num_valid else nan,
        mean_neg_dist=float(d_an.detach().mean()) if num_valid else nan,
        frac_active=float(active.float().mean()) if num_valid else nan,
        positive_index=torch.where(valid, p_idx, minus_one).detach(),
        negative_index=torch.where(valid, n_idx, minus_one).detach(),
    )
    return loss, stats


# --------------------------------------------------------------------------------------------------
# center loss
# --------------------------------------------------------------------------------------------------


class CenterLoss(nn.Module):
    """Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016), in torchreid's / CLIP-ReID's form::

        loss = (1/B) · sum_i ||x_i - c_{y_i}||²

    (torchreid drops the paper's factor 1/2.)  The centres ``self.centers`` [num_classes, feat_dim]
    are parameters initialised ``N(0, 1)`` and learned by their own optimiser (CLIP-ReID: SGD
    lr 0.5, gradients rescaled by ``1 / CENTER_LOSS_WEIGHT``).  The squared distance is computed
    as a direct difference (exact; no clamping needed).
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        if int(num_classes) < 1 or int(feat_dim) < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        self.num_classes = int(num_classes)
        self.feat_dim = int(feat_dim)
        self.centers = nn.Parameter(torch.randn(self.num_classes, self.feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """features [B, feat_dim], labels [B] in [0, num_classes) → scalar loss."""
        _check_features("features", features)
        if features.shape[1] != self.feat_dim:
            raise ValueError(f"features have dim {features.shape[1]}, CenterLoss expects "
                             f"feat_dim={self.feat_dim}")
        _check_labels("labels", labels, features.shape[0], "features")
        _check_class_range("labels", labels, self.num_classes)
        diff = features - self.centers[labels.long()]
        return diff.pow(2).sum(1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}"


# --------------------------------------------------------------------------------------------------
# CLIP pretraining
# --------------------------------------------------------------------------------------------------


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: Scale) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: row ``i`` of each input is a matched pair.

    ``logits = scale * norm(img) @ norm(txt).T``; the loss is the mean of the image→text and
    text→image cross entropies with targets ``arange(B)`` (Radford et al. 2021, Fig. 3).
    ``logit_scale`` is the multiplicative factor (``clip.logit_scale.exp()``, a learnable
    temperature when passed as that tensor), never the raw log-parameter.
    """
    _check_features("image_features", image_features)
    _check_features("text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must pair up row by row, got shapes "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    _check_scale(logit_scale)
    img = F.normalize(_upcast(image_features), dim=-1)
    txt = F.normalize(_upcast(text_features), dim=-1)
    logits = logit_scale * img @ txt.t()
    targets = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
