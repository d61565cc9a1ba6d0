"""Pretraining ``handclip-mini``: a small CLIP trained image↔text on captioned synthetic hands.

Why: offline there are no CLIP weights, and a randomly initialised text encoder makes zero-shot
ranking and prompt learning meaningless. A small ``clip.model.CLIP`` (both towers, the real BPE
tokenizer and its 49,408-token vocabulary) pretrained with CLIP's own objective on captioned
synthetic hands behaves like the real thing on the workbench's data: zero-shot ranking above
chance, a text side that carries meaning.

Data (:mod:`handclip_nb.data.captioned`): a captioned pretraining population
(``pretrain_seed``, person numbers from :data:`~handclip_nb.data.captioned.PRETRAIN_ID_OFFSET`)
whose seed and identities are disjoint from every dataset the demo and the tests evaluate on
(those use ``synthetic_seed`` 0-99 and person numbers below 10^6);
:func:`~handclip_nb.data.captioned.check_disjoint` enforces it. ``pretrain_heldout`` further
people of the same population are never trained on: retrieval and attribute probes
(:mod:`handclip_nb.evaluate.probes`) are measured on them.

Objective: symmetric InfoNCE with CLIP's learnable temperature
(:func:`handclip_nb.losses.clip_contrastive_loss`). Batches hold at most one photo per person,
so no batch contains two photos with the same caption (a false negative CLIP's plain random
batches would have here). Captions are varied in training: the view phrase stays, attribute
phrases are shuffled and each dropped with probability ``caption_dropout``.

This module holds the training: the architecture (:func:`mini_arch`), a fresh model
(:func:`new_mini_backbone`), the training run (:func:`pretrain_mini`) and the notebook's
run-level steps (:func:`prepare_pretraining`, :func:`pretrain_record`). Shipping the weights and
the model card: :mod:`handclip_nb.train.model_card`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..backbone_specs import HANDCLIP_MINI_NAME, get_backbone_spec
from ..data.captioned import (PRETRAIN_ID_OFFSET, CaptionedImages, distinct_person_batches,
                              pretraining_data)
from ..data.captions import caption_variant
from ..device import configure_cuda
from ..evaluate.probes import probes_record, retrieval_metrics
from ..losses import clip_contrastive_loss
from ..models.backbones import ClipBackbone
from ..models.clip_arch import build_arch
from .loop import FitResult, TrainLoop, run_precision
from .schedulers import warmup_cosine

__all__ = ["mini_arch", "new_mini_backbone", "PretrainResult", "pretrain_mini",
           "prepare_pretraining", "pretrain_record"]


def mini_arch(vision_arch: str = "rn", vision_width: int = 16, vision_layers: int = 1,
              text_width: int = 128, text_layers: int = 3, embed_dim: int = 128) -> dict:
    """``clip.model.CLIP`` kwargs of a handclip-mini, with CLIP's vocabulary and 77-token
    context so ``clip.tokenize`` works.

    ``vision_arch="rn"``: CLIP's ModifiedResNet with ``vision_layers`` blocks in each of its
    four stages and stem width ``vision_width`` (attention pool on ``32 * width`` channels).
    ``"vit"``: a ViT-16 of that width and depth. The shipped model is the ResNet: measured on
    the same 1,440 captioned images and learning rate, it lowered the contrastive loss in 3
    epochs as far as the ViT did in 10 (a ViT trained from scratch needs more data than a CPU
    budget affords). Both are built at 128 px and re-gridded to 96x128 before training.
    """
    common = dict(embed_dim=int(embed_dim), image_resolution=128, context_length=77,
                  vocab_size=49408, transformer_width=int(text_width),
                  transformer_heads=max(1, int(text_width) // 64),
                  transformer_layers=int(text_layers))
    if vision_arch == "rn":
        return dict(common, vision_layers=(int(vision_layers),) * 4,
                    vision_width=int(vision_width), vision_patch_size=None)
    if vision_arch == "vit":
        return dict(common, vision_layers=int(vision_layers), vision_width=int(vision_width),
                    vision_patch_size=16)
    raise ValueError(f"vision_arch must be 'rn' or 'vit', got {vision_arch!r}")


def _arch_of_params(params: Mapping) -> dict:
    return mini_arch(params["vision_arch"], params["vision_width"], params["vision_layers"],
                     params["text_width"], params["text_layers"], params["embed_dim"])


@dataclass
class PretrainResult:
    backbone: ClipBackbone
    fit: FitResult
    retrieval_before: dict
    retrieval_after: dict


def new_mini_backbone(params: Mapping) -> ClipBackbone:
    """A randomly initialised (seeded) handclip-mini at ``params['image_size']``."""
    arch = _arch_of_params(params)
    model = build_arch(arch, int(params["seed"]))
    backbone = ClipBackbone(model, name=HANDCLIP_MINI_NAME, pretrained=False,
                            weights_label="untrained", seed=int(params["seed"]), arch=arch)
    return backbone.set_image_size(params["image_size"]).eval()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """CLIP's split: weight decay on matrices, none on gains, biases, embeddings, temperature."""
    no_decay_names = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale")
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(n in name for n in no_decay_names):
            plain.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def pretrain_mini(params: Mapping, output_dir: str | os.PathLike, train: CaptionedImages,
                  heldout: CaptionedImages, device: torch.device | str = "cpu") -> PretrainResult:
    """Train a handclip-mini with CLIP's objective; keep the epoch with the best held-out
    caption→image mAP. Resumable (``params['resume']``) through the shared training loop."""
    device = torch.device(device)
    if device.type == "cuda":
        configure_cuda(params.get("tf32", True))
    backbone = new_mini_backbone(params).to(device)
    before = retrieval_metrics(backbone, heldout)
    optimizer = torch.optim.AdamW(_param_groups(backbone.clip, params["weight_decay"]),
                                  lr=params["lr"], betas=(0.9, 0.98), eps=1e-6)
    scheduler = warmup_cosine(optimizer, params["epochs"], params["warmup_epochs"])
    log_max_scale = float(np.log(100.0))

    def batches(epoch: int):
        # The batch plan depends only on (seed, epoch): a resumed run sees the same batches.
        rng = np.random.default_rng([int(params["seed"]), epoch])
        caption_rng = np.random.default_rng([int(params["seed"]), epoch, 1])
        for index in distinct_person_batches(train.people, params["batch_size"], rng):
            texts = [caption_variant(train.captions[i], caption_rng, params["caption_dropout"])
                     for i in index]
            yield train.images(torch.as_tensor(index)), backbone.tokenize(texts, truncate=True)

    def step(batch):
        with torch.no_grad():  # CLIP clips the learnable temperature at 1/100
            backbone.logit_scale.clamp_(0, log_max_scale)
        images, tokens = batch
        img = backbone.encode_image(images.to(device)).global_embedding
        txt = backbone.encode_text(tokens)
        scale = backbone.logit_scale.exp()
        loss = clip_contrastive_loss(img, txt, scale)
        return {"loss": loss, "temperature": 1.0 / scale.detach()}

    def validate():
        m = retrieval_metrics(backbone, heldout)
        return {**m, "rank1": m["i2t_R1"], "mAP": m["t2i_mAP"]}

    loop = TrainLoop(stage="pretrain", output_dir=output_dir, modules={"clip": backbone.clip},
                     optimizer=optimizer, scheduler=scheduler, step=step, batches=batches,
                     validate=validate, select_metric="mAP", eval_every=params["eval_every"],
                     device=device, precision=run_precision(params, device), params=params,
                     meta={"arch": _arch_of_params(params), "train_images": len(train)},
                     checkpoint_every=params["checkpoint_every"],
                     checkpoint_minutes=params["checkpoint_minutes"])
    fit = loop.fit(params["epochs"], resume=params["resume"])
    if fit.best_state is not None:
        backbone.clip.load_state_dict(fit.best_state["clip"])
    backbone.eval()
    after = retrieval_metrics(backbone, heldout)
    backbone.pretrained = True
    backbone.weights_label = f"pretrained on captioned synthetic hands (run {Path(output_dir).name})"
    return PretrainResult(backbone, fit, before, after)


def prepare_pretraining(params: Mapping, progress: bool = True):
    """Generate (once) and load the pretraining and held-out sets: (train, heldout)."""
    if params["backbone"] != HANDCLIP_MINI_NAME:
        raise ValueError(f"the pretrain notebook trains {HANDCLIP_MINI_NAME!r} (a new small CLIP); "
                         f"got backbone={params['backbone']!r}: set -p backbone {HANDCLIP_MINI_NAME}")
    data = pretraining_data(params)
    preprocess = get_backbone_spec(HANDCLIP_MINI_NAME).preprocess(params["image_size"])
    train = CaptionedImages(data.train_root, preprocess, progress=progress)
    heldout = CaptionedImages(data.heldout_root, preprocess, progress=progress)
    return train, heldout


def pretrain_record(params: Mapping, result: PretrainResult, probes, train: CaptionedImages,
                    heldout: CaptionedImages) -> dict:
    """The run's ``metrics.json`` content (stage ``pretrain``)."""
    k = params["probe_k"]
    return {
        "stage": "pretrain", "backbone": HANDCLIP_MINI_NAME,
        "backbone_display": result.backbone.display_name,
        "retrieval": {"before": result.retrieval_before, "after": result.retrieval_after},
        "probes": probes_record(probes),
        "probe_k": k,
        "best_epoch": result.fit.best_epoch,
        "seconds_per_epoch": result.fit.seconds_per_epoch,
        "data": {"train_people": int(len(set(train.people))), "train_images": len(train),
                 "heldout_people": int(len(set(heldout.people))), "heldout_images": len(heldout),
                 "pretrain_seed": params["pretrain_seed"], "id_offset": PRETRAIN_ID_OFFSET},
    }


if __name__ == "__main__":
    # This module has no command line: say where the model-card one went instead of doing nothing.
    sys.exit("the handclip-mini model-card command line moved: "
             "python -m handclip_nb.train.model_card --remeasure-card [--weights FILE]")
