"""CLIP-ReID stage 2 on hands: prompts and text encoder frozen, the image encoder learns.

Loss = ``id_weight`` · Σ_branches label-smoothed CE (BNNeck classifiers on the pre-projection
and the projected feature) + ``triplet_weight`` · Σ batch-hard triplet (pre-BN features; with
``triplet_features: clipreid`` also the intermediate feature, as CLIP-ReID) + ``i2t_weight`` ·
CE(image · text_allᵀ) against every training identity's text feature (computed once from stage
1's prompts; ``text_logits``, ``i2t_label_smoothing``) [+ ``center_weight`` · center loss].
Optimiser: Adam with ``bias_lr_factor`` / ``weight_decay_bias`` for bias parameters.
P×K batches, warmup + multi-step learning rate per epoch, gradient clipping before the step,
AMP on CUDA only, validation on held-out *training* identities, best state copied and saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..constants import AP_METRIC
from ..data.datasets import ImageListDataset, build_protocol, make_loader
from ..data.protocols import Protocol
from ..data.sampler import PKSampler
from ..data.images import image_source
from ..data.transforms import AugmentConfig
from ..evaluate.protocol_eval import EvalResult, evaluate_backbone, evaluate_splits
from ..evaluate.features import extract_features
from ..losses import (CenterLoss, batch_hard_triplet, cross_entropy_label_smooth,
                      image_to_text_ce, text_logit_form)
from ..models.prompts import check_compatible
from ..models.reid import ReIDModel
from ..params import SELECTION_POLICIES
from ..run_loader import RunFolderError, load_run
from ..runs import seed_run
from .loop import FitResult, TrainLoop, clone_state, compiled, run_precision
from .schedulers import image_stage_scheduler

__all__ = ["Stage2Result", "ImageModelParts", "train_stage2", "fit_image_model", "evaluate_model",
           "reid_loss", "train_batches", "epoch_batches", "validate_selection", "validate_accuracy",
           "selection_record",
           "load_stage1_prompts", "image_param_groups"]


@dataclass
class Stage2Result:
    model: ReIDModel
    fit: FitResult
    protocol: Protocol  # what the kept model was fitted on (all training identities unless 'best')


def reid_loss(out, feats, targets, params: Mapping, text_all=None, logit_scale=None,
              center: CenterLoss | None = None,
              image_mean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted stage-2 loss; returns the total under ``"loss"`` and each part.

    ``out.features_for_triplet`` holds two features, or three with ``triplet_features:
    clipreid`` (the head's choice); each gets its own triplet term, summed. The image→text CE
    compares the projected image feature with every identity's text feature in the form
    ``params["text_logits"]`` names (``losses.text_logit_form``: ``raw`` = CLIP-ReID's raw dot
    products, ``cosine`` = L2-normalised × ``logit_scale``), label-smoothed by
    ``i2t_label_smoothing`` (CLIP-ReID 0.1). ``image_mean`` (saved by stage 1 with
    ``center_features``) is subtracted from the image feature first, so it compares images and
    prompts in the space the prompts were learned in.
    """
    parts: dict[str, torch.Tensor] = {}
    parts["id"] = sum(cross_entropy_label_smooth(lg, targets, params["label_smoothing"])
                      for lg in out.logits)
    margin = params["triplet_margin"]
    parts["triplet"] = sum(batch_hard_triplet(f, targets, margin=margin, stats=False)[0]
                           for f in out.features_for_triplet)
    total = params["id_weight"] * parts["id"] + params["triplet_weight"] * parts["triplet"]
    if text_all is not None and params.get("i2t_weight", 0) > 0:
        image = feats.global_embedding
        if image_mean is not None:
            image = image - image_mean.to(image.device, image.dtype)
        normalize, scale = text_logit_form(params.get("text_logits", "cosine"), logit_scale)
        parts["i2t"] = image_to_text_ce(image, text_all, targets, scale, normalize=normalize,
                                        epsilon=params.get("i2t_label_smoothing", 0.0))
        total = total + params["i2t_weight"] * parts["i2t"]
    if center is not None:
        parts["center"] = center(feats.pre_projection, targets)  # the first branch's feature
        total = total + params["center_weight"] * parts["center"]
    parts["loss"] = total
    return parts


def image_param_groups(modules: Mapping[str, torch.nn.Module], params: Mapping) -> list[dict]:
    """Adam parameter groups of stage 2's trainable ``modules``: every parameter with
    ``requires_grad`` (the frozen BNNeck biases and text tower stay out) at ``lr`` /
    ``weight_decay``, except those whose name contains ``"bias"``, which get
    ``bias_lr_factor`` × lr and ``weight_decay_bias`` (None = ``weight_decay``), as CLIP-ReID's
    ``solver/make_optimizer_prompt.py`` (``make_optimizer_2stage``: ``BIAS_LR_FACTOR`` 2).
    With factor 1 and the same decay there is one group, exactly as before the option existed.
    """
    lr, wd = float(params["lr"]), float(params["weight_decay"])
    factor = float(params.get("bias_lr_factor", 1.0))
    wd_bias = params.get("weight_decay_bias")
    wd_bias = wd if wd_bias is None else float(wd_bias)
    named = [(f"{key}.{name}", p) for key, m in modules.items()
             for name, p in m.named_parameters() if p.requires_grad]
    if factor == 1.0 and wd_bias == wd:
        return [{"params": [p for _, p in named], "lr": lr, "weight_decay": wd}]
    rest = [p for name, p in named if "bias" not in name]
    bias = [p for name, p in named if "bias" in name]
    groups = [{"name": "weights", "params": rest, "lr": lr, "weight_decay": wd},
              {"name": "bias", "params": bias, "lr": lr * factor, "weight_decay": wd_bias}]
    return [g for g in groups if g["params"]]


def train_batches(params: Mapping, protocol: Protocol, backbone, device: torch.device):
    """P×K batches of augmented fit images, preprocessed as ``backbone`` expects;
    ``batches(epoch)`` for :class:`TrainLoop`.

    Each image is decoded and resized once (``decode_cache``: filled here, in parallel, before
    the first epoch); every epoch augments the decoded pixels, each draw of the P×K sampler
    from its own seed (``seed``, epoch, image, how often the epoch drew the image before), so
    the batches do not depend on ``num_workers`` and an image drawn twice into a batch (an
    identity with fewer than ``k_images`` images) is augmented twice, independently."""
    source = image_source(backbone.preprocess_config(), params, train=True,
                          augment=AugmentConfig(erasing_p=params["random_erasing"],
                                                color_jitter=params["color_jitter"],
                                                hflip_p=params.get("horizontal_flip", 0.0)))
    sampler = PKSampler(protocol.fit_labels, p=params["p_ids"], k=params["k_images"],
                        seed=params["seed"])
    return epoch_batches(params, protocol, source, sampler, device)


def epoch_batches(params: Mapping, protocol: Protocol, source, sampler, device: torch.device):
    """``batches(epoch)`` for :class:`TrainLoop` from any batch ``sampler`` of the fit images
    (``set_epoch`` and index batches) and their ``source`` (decoded once, filled here before
    the first epoch; every draw augmented from its own seed)."""
    paths = protocol.paths(protocol.fit)
    report = source.prepare(paths)
    if report is not None and report.built:
        print(report.describe())
    dataset = ImageListDataset(paths, protocol.fit_labels, source, seed=params["seed"])
    loader = make_loader(dataset, device, params["num_workers"], batch_sampler=sampler)

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for images, labels, _ in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return batches


def validate_selection(model, protocol: Protocol, params: Mapping, device,
                       encode=None) -> dict:
    """Mean metrics (percent) of ``encode`` (default ``model.embed``) on the model-selection
    split: held-out *training* identities only (docs/mistakes.md #1)."""
    transform = image_source(model.backbone.preprocess_config(), params)
    split = protocol.selection
    indices = sorted({*split.query, *split.gallery})
    feats = extract_features(model.backbone, protocol.paths(indices), transform,
                             batch_size=params["batch_size"], device=device,
                             encode=encode or model.embed, desc="validate",
                             precision=run_precision(params, device))
    res = evaluate_splits(feats, {i: r for r, i in enumerate(indices)}, protocol, [split],
                          "val", max_rank=params["max_rank"], ap_mode=params["ap_mode"],
                          verification=False)  # epochs are chosen by re-ID metrics alone
    return {k: v["mean"] for k, v in res.summary.items()}


def validate_accuracy(classify: Callable, protocol: Protocol, params: Mapping, device,
                      backbone) -> dict:
    """``{"accuracy": percent}``: top-1 accuracy of ``classify`` (images -> logits over the fit
    identities) on the held-out val images, one per *training* identity
    (``selection='best_accuracy'``, CLIP-HandID's ``train_handID.py`` val phase). Every val
    image counts; no test image is read."""
    if not protocol.val_held_out:
        raise ValueError("validate_accuracy reads the val images, which this protocol still "
                         "trains on: build it with selection='best_accuracy' "
                         "(build_protocol(params))")
    label_of = {person: label for label, person in enumerate(protocol.fit_people)}
    images = protocol.val_images
    labels = [label_of[protocol.items[i].person] for i in images]
    source = image_source(backbone.preprocess_config(), params)
    loader = make_loader(ImageListDataset(protocol.paths(images), labels, source), device,
                         params["num_workers"], batch_size=params["batch_size"], shuffle=False)
    precision = run_precision(params, device)
    correct = 0
    for batch, targets, _ in loader:
        with precision.autocast():
            logits = classify(batch.to(device, non_blocking=True))
        correct += int((logits.argmax(dim=1).cpu() == targets).sum())
    return {"accuracy": 100.0 * correct / max(1, len(images))}


def train_stage2(params: Mapping, output_dir: str | Path, protocol: Protocol, backbone,
                 learner, callbacks: Iterable[Callable[[dict], None]] = (),
                 progress: bool = True) -> Stage2Result:
    """Fine-tune the image encoder; returns the model with the state that ``params["selection"]``
    keeps (see :func:`fit_image_model`) and the protocol it was fitted on."""
    seed_run(params)  # the head's init and the batches depend only on `seed`
    device = next(backbone.parameters()).device
    identities = getattr(learner, "identities", None) or list(protocol.fit_people)
    with torch.no_grad():  # every identity's text feature, once; prompts stay frozen
        text_by_person = dict(zip(map(str, identities),
                                  learner.all_text_features().float().to(device)))
    image_mean = getattr(learner, "image_mean", None)

    def build(fit_protocol: Protocol) -> ImageModelParts:
        missing = [p for p in map(str, fit_protocol.fit_people) if p not in text_by_person]
        if missing:
            raise ValueError(f"stage 1's prompts lack {len(missing)} training identities of this "
                             f"run (e.g. {missing[:3]}); run stage 1 with the same data and "
                             f"selection policy")
        # the image->text classes are the fitted identities, in label order
        text_all = torch.stack([text_by_person[str(p)] for p in fit_protocol.fit_people])
        backbone.requires_grad_(False)
        backbone.visual.requires_grad_(True)
        model = ReIDModel(backbone, fit_protocol.num_classes, params["classifier"],
                          triplet_features=params["triplet_features"]).to(device)
        modules = model.trainable_modules()
        center = None
        if params["center_weight"] > 0:
            center = CenterLoss(fit_protocol.num_classes, backbone.visual_width).to(device)
            modules["center"] = center
        optimizer = torch.optim.Adam(image_param_groups(modules, params))
        logit_scale = backbone.logit_scale.exp().detach()
        forward = compiled(model, params.get("compile", False))

        def step(batch):
            images, targets = batch
            feats, out = forward(images, targets)
            return reid_loss(out, feats, targets, params, text_all, logit_scale, center,
                             image_mean)

        return ImageModelParts(model, modules, optimizer, step, model.embed)

    fit, model, fitted_on = fit_image_model("stage2", params, output_dir, protocol, backbone,
                                            build, callbacks, progress)
    return Stage2Result(model=model, fit=fit, protocol=fitted_on)


@dataclass
class ImageModelParts:
    """What one fit of an image model needs (built per protocol: retraining on all training
    identities rebuilds the head for their number)."""

    model: torch.nn.Module
    modules: dict
    optimizer: torch.optim.Optimizer
    step: Callable
    encode: Callable
    #: ``batches(epoch)`` for the loop; None = stage 2's P×K batches (:func:`train_batches`)
    batches: Callable | None = None
    #: images -> identity logits, for ``selection='best_accuracy'`` (None: not offered)
    classify: Callable | None = None


def fit_image_model(stage: str, params: Mapping, output_dir, protocol: Protocol, backbone,
                    build: Callable[[Protocol], ImageModelParts], callbacks=(),
                    progress: bool = True):
    """What stages 2 and 3 share: warmup + multi-step schedule, P×K batches and the model
    selection policy ``params["selection"]``:

    * ``last`` -- the literature's: every training identity is fitted (``protocol`` holds no
      selection split), for the fixed schedule; the last epoch is kept;
    * ``best`` -- ``val_fraction`` of the training identities are held out; ``encode`` is
      validated on them every ``eval_every`` epochs and the best epoch is kept;
    * ``retrain`` -- as ``best`` in ``output_dir/selection/`` to choose the number of epochs,
      then ``backbone``'s image encoder is reset and the model retrained from scratch on every
      training identity for that many epochs; the last epoch is kept;
    * ``best_accuracy`` -- CLIP-HandID's: every training identity is fitted except one image
      each (``protocol.val_images``, held out by ``build_protocol``); ``classify`` is validated
      on them and the epoch with the best top-1 accuracy is kept, a tie going to the later
      epoch (``train_handID.py``: ``epoch_acc >= best_acc``).

    Test identities are touched by none of them. Returns (fit, model, the protocol the kept
    model was fitted on); ``checkpoints/best.pt`` holds the kept state in every case.
    """
    policy = params["selection"]
    if policy not in SELECTION_POLICIES:
        raise ValueError(f"unknown selection {policy!r}; valid: {', '.join(SELECTION_POLICIES)}")
    if policy in ("best", "retrain") and protocol.selection is None:
        raise ValueError(f"selection={policy!r} chooses epochs on held-out training identities: "
                         f"set val_fraction > 0 (default 0.2), or use selection='last'")
    if policy == "best_accuracy" and not protocol.val_held_out:
        raise ValueError("selection='best_accuracy' validates on every training identity's val "
                         "image, which this protocol still trains on; build it with the same "
                         "parameters (build_protocol(params))")
    if policy in ("last", "best_accuracy") and protocol.selection is not None:
        raise ValueError(f"selection={policy!r} fits every training identity, but the protocol holds "
                         "some out; build it with the same parameters (build_protocol(params))")
    if policy != "retrain":
        fit, model = _fit_once(stage, params, output_dir, protocol, build,
                               validate=policy in ("best", "best_accuracy"),
                               epochs=params["epochs"],
                               callbacks=callbacks, progress=progress)
        return fit, model, protocol
    backbone_start = clone_state({"visual": backbone.visual})
    chosen, _ = _fit_once(stage, params, Path(output_dir) / "selection", protocol, build,
                          validate=True, epochs=params["epochs"], callbacks=callbacks,
                          progress=progress)
    epochs = int(chosen.best_epoch or params["epochs"])
    print(f"[{stage}] selection: best epoch {epochs} of {params['epochs']} on held-out "
          f"training identities; retraining on all of them for {epochs} epochs")
    full = build_protocol({**params, "selection": "last"}, verify=False)
    seed_run(params)  # the retraining is a fresh run with selection='last'
    fit, model = _fit_once(stage, params, output_dir, full, build, validate=False,
                           epochs=epochs, callbacks=callbacks, progress=progress,
                           reset=backbone_start)
    fit.extra["selection"] = {"policy": "retrain", "best_epoch": chosen.best_epoch,
                              "best_score": chosen.best_score, "metric": chosen.best_metric,
                              "history": chosen.history,
                              "held_out_people": len(protocol.selection_people)}
    return fit, model, full


def _fit_once(stage, params, output_dir, protocol, build, *, validate: bool, epochs: int,
              callbacks, progress, reset=None):
    parts = build(protocol)
    if reset is not None:  # the image encoder as it was before the selection run
        parts.model.backbone.visual.load_state_dict(reset["visual"])
    model, modules, optimizer = parts.model, parts.modules, parts.optimizer
    device = next(model.parameters()).device
    scheduler = image_stage_scheduler(optimizer, params)  # lr_schedule, warmup_factor
    meta = {"backbone": model.backbone.name, "num_classes": protocol.num_classes,
            "classifier": params["classifier"], "splits": protocol.source_hash}
    by_accuracy = params["selection"] == "best_accuracy"
    if by_accuracy and parts.classify is None:
        raise ValueError(f"selection='best_accuracy' needs a classifier to validate; {stage} "
                         f"offers none: use 'best' (held-out mAP)")
    check = None
    if validate and by_accuracy:
        def check():
            return validate_accuracy(parts.classify, protocol, params, device, model.backbone)
    elif validate:
        def check():
            return validate_selection(model, protocol, params, device, parts.encode)
    batches = parts.batches or train_batches(params, protocol, model.backbone, device)
    loop = TrainLoop(stage=stage, output_dir=output_dir, modules=modules, optimizer=optimizer,
                     scheduler=scheduler, step=parts.step, batches=batches,
                     validate=check,
                     select_metric="accuracy" if by_accuracy else AP_METRIC[params["ap_mode"]],
                     ties_keep_later=by_accuracy, eval_every=params["eval_every"],
                     patience=(params["patience"] or None) if validate else None,
                     grad_clip=params["grad_clip"] or None, device=device,
                     precision=run_precision(params, device),
                     params=params, meta=meta, callbacks=callbacks, progress=progress,
                     checkpoint_every=params["checkpoint_every"],
                     checkpoint_minutes=params["checkpoint_minutes"],
                     frozen={"clip": model.backbone.clip})
    fit = loop.fit(epochs, resume=params["resume"])
    if validate and fit.best_state is not None:
        for name, module in modules.items():
            module.load_state_dict(fit.best_state[name])
    elif not validate:
        loop.save_kept(fit)  # the last epoch is the kept state: best.pt for every reader
    model.eval()
    return fit, model


def evaluate_model(model, protocol: Protocol, params: Mapping,
                   encode=None) -> dict[str, EvalResult]:
    """Test (all splits) and val results of a trained model's ranking feature."""
    model.eval()
    return evaluate_backbone(model.backbone, protocol, params, encode=encode or model.embed)


def selection_record(params: Mapping, fit: FitResult) -> dict:
    """``metrics["selection"]``: the policy, and what it chose."""
    record = {"policy": params["selection"], "epochs_trained": fit.epochs_run,
              "kept_epoch": fit.best_epoch if fit.best_score is not None
              else (fit.history[-1]["epoch"] if fit.history else None)}
    if fit.best_score is not None:  # 'best': chosen on held-out training identities
        record.update(best_epoch=fit.best_epoch, best_val=fit.best_score,
                      best_val_metric=fit.best_metric)
    chosen = fit.extra.get("selection")
    if chosen:  # 'retrain': the selection run's choice
        record.update(best_epoch=chosen["best_epoch"], best_val=chosen["best_score"],
                      best_val_metric=chosen["metric"], held_out_people=chosen["held_out_people"])
    return record


def load_stage1_prompts(stage1_dir: str | Path, backbone, protocol: Protocol):
    """Stage 1's prompts (a PromptLearner on ``backbone``, ``.identities`` naming its classes)
    for every identity this protocol fits, learned on the same data file; a clear error
    otherwise. (With ``selection='retrain'`` stage 1 learned every training identity and the
    selection run fits a subset of them.)"""
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
        check_compatible(meta, backbone.name, embed_width=learner.width)
    except ValueError as exc:
        raise ValueError(f"the prompts in {stage1_dir} do not fit this run: {exc}") from None
    learned = [str(p) for p in meta.get("identities") or []]
    missing = sorted(set(map(str, protocol.fit_people)) - set(learned))
    if missing:
        raise ValueError(
            f"the prompts in {stage1_dir} do not fit this run: they cover {len(learned)} "
            f"identities but this run fits {protocol.num_classes}, {len(missing)} of them without "
            f"a prompt (e.g. {', '.join(missing[:3])}); run stage 1 with the same data, "
            f"split_seed and selection policy")
    learner.identities = learned
    return learner
