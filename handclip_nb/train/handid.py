"""CLIP-HandID on hands (Baisa et al., IPTA 2025; ``models/handid.py`` has the model).

Loss (``train_handID.py``): ``id_weight`` · Σ_branches label-smoothed CE (ε ``label_smoothing``,
BNNeck classifiers on the pre-projection and the projected feature) + ``handid_supcon_weight`` ·
[SupCon(image → text) + SupCon(text → image)] between the projected image feature and the text
feature of its composed prompt (``text_logits``: its ``losses/supcontrast.py`` is ``raw``,
temperature 1). Its weights are 1 and 1.

Optimiser: Adam, the image encoder at ``lr``, the inversion MLP and the head at ``lr_new``
(CLIP-HandID: 10 × lr), ``weight_decay`` on both; the warmup + multi-step schedule of stages 2
and 3. Batches: plain shuffled batches of ``batch_size``, the last incomplete one dropped
(:class:`~handclip_nb.data.sampler.ShuffledBatchSampler`), no P×K. Training images resized to
``train_resize`` and randomly cropped to ``image_size`` when it is set. Model selection as
``selection`` says (:func:`~handclip_nb.train.stage2.fit_image_model`), CLIP-HandID's own being
``best_accuracy``. The shared loop, checkpoints, resume and determinism are stage 2's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..data.images import image_source
from ..data.protocols import Protocol
from ..data.sampler import ShuffledBatchSampler
from ..data.transforms import AugmentConfig
from ..losses import cross_entropy_label_smooth, symmetric_supcon, text_logit_form
from ..models.handid import HandIDModel, HandIDOutput
from ..runs import seed_run
from .loop import FitResult, compiled
from .stage2 import ImageModelParts, epoch_batches, fit_image_model

__all__ = ["HandIDResult", "train_handid", "handid_loss", "shuffled_batches",
           "handid_train_source"]


@dataclass
class HandIDResult:
    model: HandIDModel
    fit: FitResult
    protocol: Protocol  # what the kept model was fitted on


def handid_loss(out: HandIDOutput, targets: torch.Tensor, params: Mapping,
                logit_scale) -> dict[str, torch.Tensor]:
    """The weighted CLIP-HandID loss; the total under ``"loss"``, and ``id`` and ``supcon``.
    With ``handid_inversion_grad`` false the text features carry no graph and the SupCon term
    trains the image side alone, as in the released code."""
    parts = {"id": sum(cross_entropy_label_smooth(lg, targets, params["label_smoothing"])
                       for lg in out.head.logits)}
    normalize, scale = text_logit_form(params["text_logits"], logit_scale)
    parts["supcon"] = symmetric_supcon(out.features.global_embedding, out.text, targets, scale,
                                       normalize=normalize)
    parts["loss"] = (params["id_weight"] * parts["id"]
                     + params["handid_supcon_weight"] * parts["supcon"])
    return parts


def handid_train_source(params: Mapping, backbone):
    """The training images' source: resized to ``train_resize`` and randomly cropped to the
    model's input (CLIP-HandID's ``Resize((256, 256))`` + ``RandomCrop((224, 224))``), or, with
    ``train_resize`` None, stage 2's resize + pad-10 crop; then the flip, jitter and erasing of
    ``params``."""
    preprocess = backbone.preprocess_config()
    flip, jitter = params["horizontal_flip"], params["color_jitter"]
    if params["train_resize"] is None:
        augment = AugmentConfig(erasing_p=params["random_erasing"], color_jitter=jitter,
                                hflip_p=flip)
        return image_source(preprocess, params, train=True, augment=augment)
    larger = tuple(int(v) for v in params["train_resize"])
    size = tuple(int(v) for v in preprocess.image_size)
    if larger[0] < size[0] or larger[1] < size[1]:
        raise ValueError(f"train_resize {list(larger)} is smaller than image_size {list(size)}: "
                         f"the random crop is taken from the resized image; make train_resize at "
                         f"least image_size (CLIP-HandID: [256, 256] for [224, 224])")
    augment = AugmentConfig(pad=0, crop=size, erasing_p=params["random_erasing"],
                            color_jitter=jitter, hflip_p=flip)
    return image_source(dataclasses.replace(preprocess, image_size=larger), params, train=True,
                        augment=augment)


def shuffled_batches(params: Mapping, protocol: Protocol, backbone, device: torch.device):
    """``batches(epoch)``: plain shuffled batches of ``batch_size`` fit images, the last
    incomplete one dropped; each image's augmentation seeded by (``seed``, epoch, image)."""
    sampler = ShuffledBatchSampler(len(protocol.fit), params["batch_size"], seed=params["seed"])
    return epoch_batches(params, protocol, handid_train_source(params, backbone), sampler, device)


def train_handid(params: Mapping, output_dir: str | Path, protocol: Protocol, backbone,
                 callbacks: Iterable[Callable[[dict], None]] = (),
                 progress: bool = True) -> HandIDResult:
    """Train CLIP-HandID; returns the model with the state ``params["selection"]`` keeps and the
    protocol it was fitted on."""
    seed_run(params)
    device = next(backbone.parameters()).device
    logit_scale = backbone.logit_scale.exp().detach()

    def build(fit_protocol: Protocol) -> ImageModelParts:
        backbone.requires_grad_(False)  # the text tower stays frozen (freeze_text_encoder)
        backbone.visual.requires_grad_(True)
        model = HandIDModel(backbone, fit_protocol.num_classes,
                            inversion_grad=params["handid_inversion_grad"],
                            token=params["handid_token"], heads=params["handid_heads"],
                            classifier=params["classifier"]).to(device)
        optimizer = torch.optim.Adam(model.param_groups(params["lr"], params["lr_new"],
                                                        params["weight_decay"]))
        forward = compiled(model, params.get("compile", False))

        def step(batch):
            images, targets = batch
            return handid_loss(forward(images, targets), targets, params, logit_scale)

        return ImageModelParts(model, model.trainable_modules(), optimizer, step, model.embed,
                               batches=shuffled_batches(params, fit_protocol, backbone, device),
                               classify=model.classify)

    fit, model, fitted_on = fit_image_model("handid", params, output_dir, protocol, backbone,
                                            build, callbacks, progress)
    return HandIDResult(model=model, fit=fit, protocol=fitted_on)
