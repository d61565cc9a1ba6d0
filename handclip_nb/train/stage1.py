"""CLIP-ReID stage 1 on hands: learn one prompt per training identity, both encoders frozen.

The training images are encoded once, without augmentation, and cached (the image encoder is
frozen, so every epoch would compute the same features); batches are drawn from the cache.
Loss: SupCon(image→text) + SupCon(text→image), with ``text_logits="cosine"`` on L2-normalised
features scaled by CLIP's logit scale, with ``"raw"`` on the raw features at temperature 1
(CLIP-ReID's ``loss/supcontrast.py``).  With ``center_features`` the mean training image feature
is subtracted first and saved with the prompts (stage 2's image→text loss subtracts the same
vector): the image features of a randomly initialised CLIP are nearly collinear (mean pairwise
cosine 0.9986 for tiny-vit, 1.0000 for tiny-rn on the synthetic hands), so without centring
every prompt sees the same image direction and learns almost nothing.  Learning rate: warmup
then cosine, stepped per epoch (``train/schedulers.py``: ``lr_schedule``, ``warmup_lr_init``,
``lr_min``).  CLIP-ReID keeps the prompts
of the last epoch; so do we (the per-epoch prompt retrieval numbers are for monitoring).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from ..data.protocols import Protocol
from ..data.images import image_source
from ..evaluate.features import extract_features
from ..evaluate.metrics import rank_metrics
from ..losses import symmetric_supcon, text_logit_form
from ..models.prompts import PromptLearner
from ..runs import PROMPTS_FILE, atomic_torch_save, feature_cache_dir, seed_run
from .loop import FitResult, TrainLoop, run_precision
from .schedulers import stage1_scheduler

__all__ = ["Stage1Result", "image_space", "prompt_retrieval", "train_stage1"]


@dataclass
class Stage1Result:
    learner: PromptLearner
    fit: FitResult
    before: dict  # prompt text→image retrieval with the untrained prompts (percent)
    after: dict  # ... with the learned prompts
    image_features: torch.Tensor
    image_labels: torch.Tensor
    prompts_path: Path


def image_space(features: torch.Tensor, image_mean: torch.Tensor | None) -> torch.Tensor:
    """The image features the prompts are learned against: centred (optional), L2-normalised."""
    if image_mean is not None:
        features = features - image_mean.to(features.device, features.dtype)
    return torch.nn.functional.normalize(features, dim=-1)


def prompt_retrieval(learner: PromptLearner, image_features: torch.Tensor,
                     image_labels: torch.Tensor) -> dict[str, float]:
    """Each identity's prompt as a query over the training images (percent; higher = better)."""
    with torch.no_grad():
        text = torch.nn.functional.normalize(learner.all_text_features().float().cpu(), dim=1)
    dist = (1.0 - text @ image_features.T).numpy()
    m = rank_metrics(dist, np.arange(text.shape[0]), image_labels.numpy(),
                     max_rank=min(10, dist.shape[1]))
    return {"rank1": 100 * float(m["cmc"][0]), "mAP": 100 * float(m["mAP"]),
            "chance_mAP": 100 * _chance_map(image_labels.numpy())}


def _chance_map(labels: np.ndarray) -> float:
    """Expected AP of a random ranking ≈ fraction of the gallery that matches (per query)."""
    counts = np.bincount(labels)
    return float(np.mean(counts[counts > 0] / len(labels)))


def train_stage1(params: Mapping, output_dir: str | Path, protocol: Protocol, backbone,
                 callbacks: Iterable[Callable[[dict], None]] = (),
                 progress: bool = True) -> Stage1Result:
    seed_run(params)  # the head's init and the batches depend only on `seed`
    device = next(backbone.parameters()).device
    backbone.requires_grad_(False)  # both encoders frozen: only the context vectors learn
    backbone.eval()
    transform = image_source(backbone.preprocess_config(), params)
    raw = extract_features(backbone, protocol.paths(protocol.fit), transform,
                           batch_size=params["batch_size"], device=device,
                           cache_dir=feature_cache_dir() if params["feature_cache"] else None,
                           num_workers=params["num_workers"], desc="cache training features",
                           normalize=False, precision=run_precision(params, device))
    image_mean = raw.mean(dim=0) if params["center_features"] else None
    feats = image_space(raw, image_mean)  # what retrieval ranks (and the cosine loss sees)
    normalize, scale = text_logit_form(params["text_logits"], backbone.logit_scale.exp().detach())
    if normalize:
        loss_feats = feats
    else:  # CLIP-ReID: the raw (optionally centred) features
        loss_feats = raw if image_mean is None else raw - image_mean
    labels = torch.as_tensor(protocol.fit_labels, dtype=torch.long)
    learner = PromptLearner(backbone, num_classes=protocol.num_classes, n_ctx=params["n_ctx"],
                            template=params["prompt_template"], aspect=protocol.aspect,
                            seed=params["seed"]).to(device)
    learner.image_mean = image_mean
    before = prompt_retrieval(learner, feats, labels)
    optimizer = torch.optim.Adam(learner.parameters(), lr=params["lr"],
                                 weight_decay=params["weight_decay"])
    scheduler = stage1_scheduler(optimizer, params)
    feats_dev, labels_dev = loss_feats.to(device), labels.to(device)

    def batches(epoch: int):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
            params["seed"] * 100003 + epoch))
        for start in range(0, len(order), params["batch_size"]):
            idx = order[start:start + params["batch_size"]]
            yield feats_dev[idx], labels_dev[idx]

    def step(batch):
        image, target = batch
        text = learner(target)
        loss = symmetric_supcon(image, text, target, scale, normalize=normalize)
        return {"loss": loss}

    meta = {"backbone": backbone.name, "num_classes": protocol.num_classes,
            "n_ctx": params["n_ctx"], "splits": protocol.source_hash}
    loop = TrainLoop(stage="stage1", output_dir=output_dir, modules={"prompts": learner},
                     optimizer=optimizer, scheduler=scheduler, step=step, batches=batches,
                     validate=lambda: prompt_retrieval(learner, feats, labels),
                     eval_every=params["eval_every"], device=device, amp=False,
                     params=params, meta=meta, callbacks=callbacks, progress=progress,
                     checkpoint_every=params["checkpoint_every"],
                     checkpoint_minutes=params["checkpoint_minutes"],
                     frozen={"clip": backbone.clip})
    fit = loop.fit(params["epochs"], resume=params["resume"])
    after = prompt_retrieval(learner, feats, labels)
    state = learner.state_for_checkpoint(identities=protocol.fit_people)
    state["meta"]["dataset"] = protocol.dataset
    state["meta"]["splits"] = protocol.source_hash
    state["image_mean"] = image_mean
    path = atomic_torch_save(state, Path(output_dir) / PROMPTS_FILE)
    learner.identities = [str(p) for p in protocol.fit_people]  # class order, as stage 2 reads it
    return Stage1Result(learner=learner, fit=fit, before=before, after=after,
                        image_features=feats, image_labels=labels, prompts_path=path)
