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
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import yaml

from ..data.protocols import Protocol
from ..data.transforms import LetterboxResize, build_transform
from ..evaluate.features import extract_features
from ..models.promptsg import PromptSG, attention_entropy, prompt_sensitivity, promptsg_loss
from ..runs import resolve_path, seed_everything
from .checkpoint import CheckpointError, check_meta, load_checkpoint
from .loop import FitResult
from .stage2 import evaluate_model, fit_image_model

__all__ = ["Stage3Result", "train_stage3", "evaluate_stage3", "attention_summary", "attention_record",
           "load_stage3_run", "ModelAttentionSource"]


@dataclass
class Stage3Result:
    model: PromptSG
    fit: FitResult
    warm_started_from: str | None


def _warm_start(model: PromptSG, init_from: str, protocol: Protocol, backbone) -> str:
    """Copy the image encoder of a stage-2 run's best checkpoint (heads differ: not copied)."""
    path = resolve_path(init_from) / "checkpoints" / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"init_from={init_from!r}: no stage-2 checkpoint at {path}; run "
                                f"notebooks/stage2_image.ipynb first or set init_from=None")
    ckpt = load_checkpoint(path, stage="stage2")
    check_meta(path, ckpt["meta"], {"backbone": backbone.name, "splits": protocol.source_hash})
    try:
        model.backbone.visual.load_state_dict(ckpt["model"]["visual"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its image encoder does not fit this backbone "
                              f"({str(exc).splitlines()[0]})") from None
    return str(path)


def train_stage3(params: Mapping, output_dir: str | Path, protocol: Protocol, backbone,
                 callbacks: Iterable[Callable[[dict], None]] = (),
                 progress: bool = True) -> Stage3Result:
    """Train PromptSG; returns the model with its *best* state (by val mAP) loaded."""
    seed_everything(params["seed"])
    device = next(backbone.parameters()).device
    if protocol.selection is None:
        raise ValueError("stage 3 selects its model on held-out training identities: set "
                         "val_fraction > 0 (default 0.2)")
    backbone.requires_grad_(False)  # the text tower stays frozen; S* still gets gradients
    backbone.visual.requires_grad_(True)
    model = PromptSG(backbone, protocol.num_classes, aspect=protocol.aspect,
                     classifier=params["classifier"]).to(device)
    warm = _warm_start(model, params["init_from"], protocol, backbone) \
        if params["init_from"] else None
    modules = model.trainable_modules()
    optimizer = torch.optim.Adam(model.param_groups(params["lr"], params["lr_new"],
                                                    params["weight_decay"]))
    logit_scale = backbone.logit_scale.exp().detach()

    def step(batch):
        images, targets = batch
        out = model(images, targets, prompt_mode="composed")
        return promptsg_loss(out, targets, id_weight=params["id_weight"],
                             triplet_weight=params["triplet_weight"],
                             supcon_weight=params["supcon_weight"],
                             label_smoothing=params["label_smoothing"],
                             triplet_margin=params["triplet_margin"], logit_scale=logit_scale)

    def encode(images):
        return model.embed(images, prompt_mode=params["prompt_mode"])

    fit = fit_image_model("stage3", params, output_dir, protocol, model, modules, optimizer,
                          step, encode, callbacks, progress)
    return Stage3Result(model=model, fit=fit, warm_started_from=warm)


def evaluate_stage3(model: PromptSG, protocol: Protocol, params: Mapping):
    """Test and val results with the ranking feature of ``params["prompt_mode"]``."""
    return evaluate_model(model, protocol, params,
                          encode=lambda x: model.embed(x, prompt_mode=params["prompt_mode"]))


@torch.no_grad()
def _attention(model: PromptSG, paths, params, mode: str) -> torch.Tensor:
    """[N, heads, patches] cross-attention of ``mode`` for the images at ``paths``."""
    transform = build_transform(params["image_size"], train=False,
                                resize_mode=params["resize_mode"])
    maps = extract_features(model.backbone, paths, transform, batch_size=params["batch_size"],
                            device=next(model.parameters()).device, normalize=False,
                            encode=lambda x: model(x, prompt_mode=mode).attention.flatten(1),
                            desc=f"attention ({mode})")
    return maps.view(len(paths), -1, model.backbone.grid[0] * model.backbone.grid[1])


def attention_summary(model: PromptSG, protocol: Protocol, params: Mapping,
                      limit: int | None = None) -> dict[str, float]:
    """``metrics["attention"]`` over the first split's test queries: the mean entropy of the
    inference mode's maps and the prompt sensitivity (mean total-variation distance between
    the composed and the simplified prompt's maps; 0 would mean the text has no effect)."""
    queries = list(protocol.test[0].query)[:limit]
    paths = protocol.paths(queries)
    composed = _attention(model, paths, params, "composed")
    simplified = _attention(model, paths, params, "simplified")
    chosen = composed if params["prompt_mode"] == "composed" else simplified
    return {"mean_entropy": float(attention_entropy(chosen).mean()),
            "max_entropy": float(np.log(chosen.shape[-1])),
            "prompt_sensitivity": float(prompt_sensitivity(composed, simplified)),
            "queries": len(queries), "prompt_mode": params["prompt_mode"]}


def load_stage3_run(stage3_dir: str | Path, device: str = "auto"):
    """Rebuild a finished stage-3 run: (its params, protocol, PromptSG with the best state)."""
    from ..data.datasets import build_protocol
    from ..models.backbones import build_backbone, resolve_device

    folder = resolve_path(stage3_dir)
    params_path = folder / "params.yaml"
    best = folder / "checkpoints" / "best.pt"
    if not params_path.is_file() or not best.is_file():
        raise FileNotFoundError(
            f"stage3_dir={str(stage3_dir)!r} is not a finished stage-3 run (looked for "
            f"{params_path} and {best}); run notebooks/stage3.ipynb first")
    params = yaml.safe_load(params_path.read_text())["params"]
    if params.get("stage") != "stage3":
        raise ValueError(f"{folder} is a {params.get('stage')} run, not a stage-3 run")
    params["device"] = str(resolve_device(device))
    protocol = build_protocol(params)
    backbone = build_backbone(params["backbone"], weights=params["weights"],
                              image_size=params["image_size"], device=params["device"],
                              seed=params["seed"], download_root=params["download_root"])
    model = PromptSG(backbone, protocol.num_classes, aspect=protocol.aspect,
                     classifier=params["classifier"]).to(params["device"])
    ckpt = load_checkpoint(best, stage="stage3")
    check_meta(best, ckpt["meta"], {"backbone": backbone.name,
                                    "num_classes": protocol.num_classes})
    for name, module in model.trainable_modules().items():
        module.load_state_dict(ckpt["model"][name])
    model.eval()
    return params, protocol, model


class ModelAttentionSource:
    """:class:`handclip_nb.attention_viz.AttentionSource` over a trained PromptSG and the first
    test split: query images, their heatmaps, their top-k gallery matches."""

    prompt_modes = ("composed", "simplified")

    def __init__(self, model: PromptSG, protocol: Protocol, params: Mapping, split: int = 0):
        self.model, self.protocol, self.params = model, protocol, params
        self.split = protocol.test[split]
        self.image_size = tuple(params["image_size"])
        self.grid = model.backbone.grid
        self._letterbox = LetterboxResize(self.image_size)
        self._cache: dict = {}

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    def query_ids(self) -> list[int]:
        return list(range(len(self.split.query)))

    def query_title(self, i: int) -> str:
        item = self.protocol.items[self.split.query[i]]
        return f"query {i}: person {item.person} ({item.aspect})"

    def _image(self, index: int):
        from PIL import Image

        with Image.open(self.protocol.paths([index])[0]) as im:
            return self._letterbox(im.convert("RGB"))

    def image(self, i: int):
        return self._image(self.split.query[i])

    def _maps(self, mode: str, indices) -> np.ndarray:
        key = (mode, tuple(indices))
        if key not in self._cache:
            maps = _attention(self.model, self.protocol.paths(indices), self.params, mode)
            self._cache[key] = maps.view(len(indices), maps.shape[1], *self.grid).numpy()
        return self._cache[key]

    def attention(self, i: int, prompt_mode: str) -> np.ndarray:
        return self._maps(prompt_mode, (self.split.query[i],))[0]

    def _ranking(self, prompt_mode: str) -> np.ndarray:
        key = ("rank", prompt_mode)
        if key not in self._cache:
            transform = build_transform(self.params["image_size"], train=False,
                                        resize_mode=self.params["resize_mode"])
            idx = [*self.split.query, *self.split.gallery]
            feats = extract_features(self.model.backbone, self.protocol.paths(idx), transform,
                                     batch_size=self.params["batch_size"],
                                     device=next(self.model.parameters()).device,
                                     encode=lambda x: self.model.embed(x, prompt_mode),
                                     desc="rank")
            q, g = feats[:len(self.split.query)], feats[len(self.split.query):]
            self._cache[key] = (1.0 - q @ g.T).numpy()
        return self._cache[key]

    def topk(self, i: int, k: int, prompt_mode: str):
        from ..attention_viz import Match

        dist = self._ranking(prompt_mode)[i]
        order = np.argsort(dist, kind="stable")[:k]
        gallery = [self.split.gallery[j] for j in order]
        maps = self._maps(prompt_mode, tuple(gallery))
        q_id = self.protocol.identities[self.split.query[i]]
        return [Match(image=self._image(g), attention=maps[n], distance=float(dist[j]),
                      correct=self.protocol.identities[g] == q_id,
                      title=f"#{n + 1} person {self.protocol.items[g].person}")
                for n, (g, j) in enumerate(zip(gallery, order))]

    def aggregate(self, prompt_mode: str, limit: int = 200) -> np.ndarray:
        return self._maps(prompt_mode, tuple(self.split.query[:limit]))


def attention_record(stage3_dir: str | Path, attention: Mapping, figures) -> dict:
    """``metrics.json`` of the attention notebook: the stage-3 run's test metrics and protocol
    sizes (so every run folder has the same schema), this run's attention figures and summary."""
    from ..runs import read_metrics

    source = read_metrics(resolve_path(stage3_dir))
    keep = ("dataset", "aspect", "gallery_mode", "backbone", "backbone_display", "num_splits",
            "test", "data", "splits_hash")
    record = {k: source[k] for k in keep if k in source}
    record.update(stage="attention", stage3_dir=str(stage3_dir), attention=dict(attention),
                  figures=[str(Path(f).name) for f in figures])
    return record
