"""CLIP-ReID stage 2 on hands: prompts and text encoder frozen, the image encoder learns.

Loss = ``id_weight`` · Σ_branches label-smoothed CE (BNNeck classifiers on the pre-projection
and the projected feature) + ``triplet_weight`` · Σ_branches batch-hard triplet (pre-BN
features) + ``i2t_weight`` · CE(image · text_allᵀ) against every training identity's text
feature (computed once from stage 1's prompts) [+ ``center_weight`` · center loss].
P×K batches, warmup + multi-step learning rate per epoch, gradient clipping before the step,
AMP on CUDA only, validation on held-out *training* identities, best state copied and saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch.utils.data import DataLoader

from ..data.datasets import ImageListDataset
from ..data.protocols import Protocol
from ..data.sampler import PKSampler
from ..data.transforms import AugmentConfig, build_transform
from ..evaluate.protocol_eval import EvalResult, evaluate_backbone, evaluate_splits
from ..evaluate.features import extract_features
from ..losses import CenterLoss, batch_hard_triplet, cross_entropy_label_smooth, image_to_text_ce
from ..models.prompts import check_compatible
from ..models.reid import ReIDModel
from ..run_loader import RunFolderError, load_run
from ..runs import seed_everything
from .loop import FitResult, TrainLoop
from .schedulers import warmup_multistep

__all__ = ["Stage2Result", "load_stage1_prompts", "train_stage2", "evaluate_model", "reid_loss",
           "train_batches", "validate_selection", "fit_image_model"]


@dataclass
class Stage2Result:
    model: ReIDModel
    fit: FitResult


def reid_loss(out, feats, targets, params: Mapping, text_all=None, logit_scale=None,
              center: CenterLoss | None = None,
              image_mean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted stage-2/3 loss; returns the total under ``"loss"`` and each part.

    ``image_mean`` (saved by stage 1 with ``center_features``) is subtracted from the image
    feature before the image→text loss, so it compares images and prompts in the space the
    prompts were learned in.
    """
    parts: dict[str, torch.Tensor] = {}
    parts["id"] = sum(cross_entropy_label_smooth(lg, targets, params["label_smoothing"])
                      for lg in out.logits)
    margin = params["triplet_margin"]
    parts["triplet"] = sum(batch_hard_triplet(f, targets, margin=margin)[0]
                           for f in out.features_for_triplet)
    total = params["id_weight"] * parts["id"] + params["triplet_weight"] * parts["triplet"]
    if text_all is not None and params.get("i2t_weight", 0) > 0:
        image = feats.global_embedding
        if image_mean is not None:
            image = image - image_mean.to(image.device, image.dtype)
        parts["i2t"] = image_to_text_ce(image, text_all, targets, logit_scale, normalize=True)
        total = total + params["i2t_weight"] * parts["i2t"]
    if center is not None:
        parts["center"] = center(out.features_for_triplet[0], targets)
        total = total + params["center_weight"] * parts["center"]
    parts["loss"] = total
    return parts


def train_batches(params: Mapping, protocol: Protocol, backbone, device: torch.device):
    """P×K batches of augmented fit images, preprocessed as ``backbone`` expects;
    ``batches(epoch)`` for :class:`TrainLoop`."""
    transform = build_transform(backbone.preprocess_config(), train=True,
                                augment=AugmentConfig(erasing_p=params["random_erasing"],
                                                      color_jitter=params["color_jitter"]))
    sampler = PKSampler(protocol.fit_labels, p=params["p_ids"], k=params["k_images"],
                        seed=params["seed"])
    loader = DataLoader(ImageListDataset(protocol.paths(protocol.fit), protocol.fit_labels,
                                         transform),
                        batch_sampler=sampler, num_workers=params["num_workers"])

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            yield images.to(device), labels.to(device)

    return batches


def validate_selection(model, protocol: Protocol, params: Mapping, device,
                       encode=None) -> dict:
    """Mean metrics (percent) of ``encode`` (default ``model.embed``) on the model-selection
    split: held-out *training* identities only (docs/mistakes.md #1)."""
    transform = build_transform(model.backbone.preprocess_config(), train=False)
    split = protocol.selection
    indices = sorted({*split.query, *split.gallery})
    feats = extract_features(model.backbone, protocol.paths(indices), transform,
                             batch_size=params["batch_size"], device=device,
                             encode=encode or model.embed, desc="validate")
    res = evaluate_splits(feats, {i: r for r, i in enumerate(indices)}, protocol, [split],
                          "val", max_rank=params["max_rank"], ap_mode=params["ap_mode"])
    return {k: v["mean"] for k, v in res.summary.items()}


def train_stage2(params: Mapping, output_dir: str | Path, protocol: Protocol, backbone,
                 learner, callbacks: Iterable[Callable[[dict], None]] = (),
                 progress: bool = True) -> Stage2Result:
    """Fine-tune the image encoder; returns the model with its *best* state loaded."""
    seed_everything(params["seed"])  # the head's init and the batches depend only on `seed`
    device = next(backbone.parameters()).device
    if protocol.selection is None:
        raise ValueError("stage 2 selects its model on held-out training identities: set "
                         "val_fraction > 0 (default 0.2)")
    with torch.no_grad():  # every identity's text feature, once; prompts stay frozen
        text_all = learner.all_text_features().float().to(device)
    backbone.requires_grad_(False)
    backbone.visual.requires_grad_(True)
    model = ReIDModel(backbone, protocol.num_classes, params["classifier"]).to(device)
    modules = model.trainable_modules()
    center = None
    if params["center_weight"] > 0:
        center = CenterLoss(protocol.num_classes, backbone.visual_width).to(device)
        modules["center"] = center
    trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=params["lr"], weight_decay=params["weight_decay"])
    logit_scale = backbone.logit_scale.exp().detach()
    image_mean = getattr(learner, "image_mean", None)

    def step(batch):
        images, targets = batch
        feats, out = model(images, targets)
        return reid_loss(out, feats, targets, params, text_all, logit_scale, center, image_mean)

    fit = fit_image_model("stage2", params, output_dir, protocol, model, modules, optimizer,
                          step, model.embed, callbacks, progress)
    return Stage2Result(model=model, fit=fit)


def fit_image_model(stage: str, params: Mapping, output_dir, protocol: Protocol, model,
                    modules: dict, optimizer, step, encode, callbacks=(),
                    progress: bool = True) -> FitResult:
    """What stages 2 and 3 share: warmup + multi-step schedule, P×K batches, validation of
    ``encode`` on held-out training identities, the loop, then the best state loaded."""
    device = next(model.parameters()).device
    scheduler = warmup_multistep(optimizer, params["milestones"], params["gamma"],
                                 params["warmup_epochs"])
    meta = {"backbone": model.backbone.name, "num_classes": protocol.num_classes,
            "classifier": params["classifier"], "splits": protocol.source_hash}
    loop = TrainLoop(stage=stage, output_dir=output_dir, modules=modules, optimizer=optimizer,
                     scheduler=scheduler, step=step,
                     batches=train_batches(params, protocol, model.backbone, device),
                     validate=lambda: validate_selection(model, protocol, params, device, encode),
                     eval_every=params["eval_every"], patience=params["patience"] or None,
                     grad_clip=params["grad_clip"] or None, device=device, amp=params["amp"],
                     params=params, meta=meta, callbacks=callbacks, progress=progress)
    fit = loop.fit(params["epochs"], resume=params["resume"])
    if fit.best_state is not None:
        for name, module in modules.items():
            module.load_state_dict(fit.best_state[name])
    model.eval()
    return fit


def evaluate_model(model, protocol: Protocol, params: Mapping,
                   encode=None) -> dict[str, EvalResult]:
    """Test (all splits) and val results of a trained model's ranking feature."""
    model.eval()
    return evaluate_backbone(model.backbone, protocol, params, encode=encode or model.embed)


def load_stage1_prompts(stage1_dir: str | Path, backbone, protocol: Protocol):
    """Stage 1's prompts (a PromptLearner on ``backbone``) for exactly this protocol's training
    identities, in order, learned on the same data file; a clear error otherwise."""
    try:
        loaded = load_run(stage1_dir, backbone=backbone, require_finished=False,
                          stages=("stage1",))
    except RunFolderError as exc:
        raise FileNotFoundError(
            f"{exc}\nstage 2 reads the prompts of a stage-1 run: run "
            f"notebooks/stage1_prompt.ipynb with the same dataset, aspect, backbone and seed "
            f"first, or set stage1_dir to that run's output_dir") from None
    meta = loaded.meta
    if meta.get("splits") not in (None, protocol.source_hash) or \
            meta.get("dataset") not in (None, protocol.dataset):
        raise ValueError(f"the prompts in {stage1_dir} were learned on another dataset or data "
                         f"file ({meta.get('dataset')}, {str(meta.get('splits', ''))[:12]}) than "
                         f"this run ({protocol.dataset}, {protocol.source_hash[:12]}); re-run "
                         f"stage 1 on it")
    learner = loaded.model
    try:
        check_compatible(meta, backbone.name, protocol.num_classes,
                         embed_width=learner.width, identities=protocol.fit_people)
    except ValueError as exc:
        raise ValueError(f"the prompts in {stage1_dir} do not fit this run: {exc}") from None
    return learner
