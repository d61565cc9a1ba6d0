"""PromptSG on hands: an inversion network writes each image's pseudo-word S* into the prompt
"A photo of a S* {aspect} hand.", and language-guided cross-attention (text as query, patch
tokens as key/value) re-weights the visual features (Yang et al., CVPR 2024).

Training reuses stage 2's loop, P×K batches, validation on held-out training identities,
checkpoints, resume and determinism; only the model and the loss differ.  Inference uses
``prompt_mode``: the simplified prompt (encoded once, the inversion network is not run) or
each image's composed prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from ..checkpoint import CheckpointError
from ..data.protocols import Protocol
from ..losses import batch_hard_triplet, cross_entropy_label_smooth, symmetric_supcon
from ..models.promptsg import PromptSG, PromptSGOutput
from ..run_loader import RunFolderError, load_run
from ..runs import BEST_CHECKPOINT, seed_run
from .loop import FitResult, compiled
from .stage2 import ImageModelParts, evaluate_model, fit_image_model

__all__ = ["Stage3Result", "train_stage3", "evaluate_stage3", "promptsg_loss"]


@dataclass
class Stage3Result:
    model: PromptSG
    fit: FitResult
    warm_started_from: str | None
    protocol: Protocol  # what the kept model was fitted on (all training identities unless 'best')


def _warm_start(backbone, init_from: str, protocol: Protocol) -> str:
    """Load the image encoder of a stage-2 run's kept checkpoint into ``backbone`` (through
    the one run loader; the heads differ and are not copied)."""
    # rebuilding the run's head draws random numbers: keep the training's RNG stream untouched
    with torch.random.fork_rng(devices=[]):
        try:
            loaded = load_run(init_from, backbone=backbone, require_finished=False,
                              stages=("stage2",))
        except RunFolderError as exc:
            raise FileNotFoundError(f"init_from={init_from!r}: {exc}\nRun "
                                    f"notebooks/stage2_image.ipynb first or set "
                                    f"init_from=None") from None
    if loaded.meta.get("splits") != protocol.source_hash:
        raise CheckpointError(
            f"init_from={init_from!r}: that stage-2 run was trained on another data file "
            f"(splits {str(loaded.meta.get('splits'))[:12]}) than this run "
            f"({protocol.source_hash[:12]}); warm-start from a run on the same data")
    return str(Path(loaded.info.folder) / BEST_CHECKPOINT)


def train_stage3(params: Mapping, output_dir: str | Path, protocol: Protocol, backbone,
                 callbacks: Iterable[Callable[[dict], None]] = (),
                 progress: bool = True) -> Stage3Result:
    """Train PromptSG; returns the model with the state ``params["selection"]`` keeps (see
    :func:`~handclip_nb.train.stage2.fit_image_model`) and the protocol it was fitted on."""
    seed_run(params)
    device = next(backbone.parameters()).device
    warm = _warm_start(backbone, params["init_from"], protocol) if params["init_from"] else None
    logit_scale = backbone.logit_scale.exp().detach()

    def build(fit_protocol: Protocol) -> ImageModelParts:
        backbone.requires_grad_(False)  # the text tower stays frozen; S* still gets gradients
        backbone.visual.requires_grad_(True)
        model = PromptSG(backbone, fit_protocol.num_classes, aspect=fit_protocol.aspect,
                         classifier=params["classifier"]).to(device)
        optimizer = torch.optim.Adam(model.param_groups(params["lr"], params["lr_new"],
                                                        params["weight_decay"]))
        forward = compiled(model, params.get("compile", False))

        def step(batch):
            images, targets = batch
            out = forward(images, targets, prompt_mode="composed")
            return promptsg_loss(out, targets, id_weight=params["id_weight"],
                                 triplet_weight=params["triplet_weight"],
                                 supcon_weight=params["supcon_weight"],
                                 label_smoothing=params["label_smoothing"],
                                 triplet_margin=params["triplet_margin"],
                                 logit_scale=logit_scale,
                                 triplet_features=params["triplet_features"])

        def encode(images):
            return model.embed(images, prompt_mode=params["prompt_mode"])

        return ImageModelParts(model, model.trainable_modules(), optimizer, step, encode)

    fit, model, fitted_on = fit_image_model("stage3", params, output_dir, protocol, backbone,
                                            build, callbacks, progress)
    return Stage3Result(model=model, fit=fit, warm_started_from=warm, protocol=fitted_on)


def evaluate_stage3(model: PromptSG, protocol: Protocol, params: Mapping):
    """Test and val results with the ranking feature of ``params["prompt_mode"]``."""
    return evaluate_model(model, protocol, params,
                          encode=lambda x: model.embed(x, prompt_mode=params["prompt_mode"]))


def promptsg_loss(out: PromptSGOutput, targets: torch.Tensor, *, id_weight: float = 1.0,
                  triplet_weight: float = 1.0, supcon_weight: float = 0.5, label_smoothing: float = 0.1,
                  triplet_margin: Optional[float] = 0.3,
                  logit_scale: Union[float, torch.Tensor],
                  triplet_features: str = "two") -> dict[str, torch.Tensor]:
    """PromptSG's loss; returns ``{"loss": total, "id", "triplet", "supcon"}``.

    * ``id`` = Σ over the head's branches of label-smoothed CE (``label_smoothing``),
    * ``triplet`` = Σ over branches of batch-hard triplet (``triplet_margin``) on the pre-BN features,
      with ``triplet_features="clipreid"`` plus one on the backbone's intermediate feature
      (``out.features.intermediate``: ViT 11th-layer CLS, RN pooled third stage), as CLIP-ReID
      adds it to its two,
    * ``supcon`` = symmetric SupCon(global image embedding, composed text feature, targets,
      ``logit_scale``; L2-normalised) -- needs ``prompt_mode="composed"`` when ``supcon_weight > 0``
      (the simplified prompt is one text for every image).  With ``supcon_weight == 0`` it is still
      reported (detached) in composed mode, and left out in simplified mode.

    ``total = id_weight·id + triplet_weight·triplet + supcon_weight·supcon``.
    """
    for name, w in (("id_weight", id_weight), ("triplet_weight", triplet_weight), ("supcon_weight", supcon_weight)):
        if float(w) < 0:
            raise ValueError(f"{name} must be >= 0, got {w}")
    targets = targets.to(out.fused.device)
    parts: dict[str, torch.Tensor] = {}
    parts["id"] = sum(cross_entropy_label_smooth(lg, targets, label_smoothing) for lg in out.head.logits)
    if triplet_features not in ("two", "clipreid"):
        raise ValueError(f"unknown triplet_features {triplet_features!r}; valid: two, clipreid")
    triplet_inputs = list(out.head.features_for_triplet)
    if triplet_features == "clipreid":
        if out.features.intermediate is None:
            raise ValueError("triplet_features='clipreid' needs ImageFeatures.intermediate")
        triplet_inputs.insert(0, out.features.intermediate)
    parts["triplet"] = sum(batch_hard_triplet(f, targets, margin=triplet_margin, stats=False)[0]
                           for f in triplet_inputs)
    total = id_weight * parts["id"] + triplet_weight * parts["triplet"]
    composed = out.pseudo_words is not None
    if float(supcon_weight) > 0:
        if not composed:
            raise ValueError("the SupCon term needs composed prompts (one text per image); train with "
                             "prompt_mode='composed' or set supcon_weight=0")
        parts["supcon"] = symmetric_supcon(out.features.global_embedding, out.text, targets, logit_scale)
        total = total + supcon_weight * parts["supcon"]
    elif composed:
        with torch.no_grad():
            parts["supcon"] = symmetric_supcon(out.features.global_embedding.detach(), out.text.detach(),
                                               targets, logit_scale)
    parts["loss"] = total
    return parts
