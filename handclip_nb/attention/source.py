"""Attention data of a trained PromptSG: the cross-attention maps of images under a prompt
mode, the summary statistics a stage-3 run records (``metrics["attention"]``), the attention
notebook's ``metrics.json``, and :class:`ModelAttentionSource`, which feeds the figures
(:mod:`.figures`) and the explorer (:mod:`.explorer`) from a real model."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..data.image_files import open_image
from ..data.protocols import Protocol
from ..data.images import image_source, orientation_of
from ..data.transforms import LetterboxResize
from ..evaluate.features import extract_features
from ..models.promptsg import PromptSG, attention_entropy, prompt_sensitivity
from ..device import Precision, run_precision
from ..runs import read_metrics, resolve_path
from .figures import Match

__all__ = ["attention_maps", "attention_summary", "attention_record", "gallery_relation",
           "ModelAttentionSource"]


@torch.no_grad()
def attention_maps(model: PromptSG, paths, params, mode: str,
                   precision: Precision | None = None) -> torch.Tensor:
    """[N, heads, patches] cross-attention of ``mode`` for the images at ``paths``, in
    ``precision`` (default: that of ``params``' ``amp`` / ``amp_dtype``)."""
    transform = image_source(model.backbone.preprocess_config(), params)
    device = next(model.parameters()).device
    maps = extract_features(model.backbone, paths, transform, batch_size=params["batch_size"],
                            device=device, normalize=False,
                            precision=precision or run_precision(params, device),
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
    composed = attention_maps(model, paths, params, "composed")
    simplified = attention_maps(model, paths, params, "simplified")
    chosen = composed if params["prompt_mode"] == "composed" else simplified
    return {"mean_entropy": float(attention_entropy(chosen).mean()),
            "max_entropy": float(np.log(chosen.shape[-1])),
            "prompt_sensitivity": float(prompt_sensitivity(composed, simplified)),
            "queries": len(queries), "prompt_mode": params["prompt_mode"]}


def gallery_relation(protocol: Protocol, query: int, gallery: int) -> tuple[bool, str, str]:
    """How gallery item ``gallery`` stands to query ``query`` (indices into
    ``protocol.items``) under the protocol: (correct, distractor, title).

    ``correct``: the same identity (what the ranking metrics count). ``distractor``: for the
    query's person under another identity (11k/custom ``gallery_mode: all`` merges every
    aspect's gallery and identities are per aspect, so the same person's other hand is a
    distractor) the reason, ``"same person, <aspect>"``; else empty. ``title``: the item's
    person and aspect, and "gallery-only distractor" for HD's ``502-712`` people."""
    q, g = protocol.items[query], protocol.items[gallery]
    correct = protocol.identities[gallery] == protocol.identities[query]
    distractor = ""
    if not correct and g.person == q.person:
        distractor = (f"same person, {g.aspect}" if g.aspect != q.aspect
                      else "same person, another identity")
    title = f"person {g.person} · {g.aspect}"
    if g.distractor:
        title += "\ngallery-only distractor"
    return correct, distractor, title


class ModelAttentionSource:
    """:class:`handclip_nb.attention.figures.AttentionSource` over a trained PromptSG and the first
    test split: query images, their heatmaps, their top-k gallery matches."""

    prompt_modes = ("composed", "simplified")

    def __init__(self, model: PromptSG, protocol: Protocol, params: Mapping, split: int = 0):
        self.model, self.protocol, self.params = model, protocol, params
        self.split = protocol.test[split]
        self.image_size = tuple(model.backbone.image_size)
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
        # read as the run's model reads it (its EXIF orientation policy)
        return self._letterbox(open_image(self.protocol.paths([index])[0],
                                          orientation_of(self.params)))

    def image(self, i: int):
        return self._image(self.split.query[i])

    def _maps(self, mode: str, indices) -> np.ndarray:
        key = (mode, tuple(indices))
        if key not in self._cache:
            maps = attention_maps(self.model, self.protocol.paths(indices), self.params, mode)
            self._cache[key] = maps.view(len(indices), maps.shape[1], *self.grid).numpy()
        return self._cache[key]

    def attention(self, i: int, prompt_mode: str) -> np.ndarray:
        return self._maps(prompt_mode, (self.split.query[i],))[0]

    def _ranking(self, prompt_mode: str) -> np.ndarray:
        key = ("rank", prompt_mode)
        if key not in self._cache:
            transform = image_source(self.model.backbone.preprocess_config(), self.params)
            idx = [*self.split.query, *self.split.gallery]
            device = next(self.model.parameters()).device
            feats = extract_features(self.model.backbone, self.protocol.paths(idx), transform,
                                     batch_size=self.params["batch_size"], device=device,
                                     precision=run_precision(self.params, device),
                                     encode=lambda x: self.model.embed(x, prompt_mode),
                                     desc="rank")
            q, g = feats[:len(self.split.query)], feats[len(self.split.query):]
            self._cache[key] = (1.0 - q @ g.T).numpy()
        return self._cache[key]

    def topk(self, i: int, k: int, prompt_mode: str):
        dist = self._ranking(prompt_mode)[i]
        order = np.argsort(dist, kind="stable")[:k]
        gallery = [self.split.gallery[j] for j in order]
        maps = self._maps(prompt_mode, tuple(gallery))
        q = self.split.query[i]
        out = []
        for n, (g, j) in enumerate(zip(gallery, order)):
            correct, distractor, title = gallery_relation(self.protocol, q, g)
            out.append(Match(image=self._image(g), attention=maps[n], distance=float(dist[j]),
                             correct=correct, title=title, distractor=distractor))
        return out

    def aggregate(self, prompt_mode: str, limit: int = 200) -> np.ndarray:
        return self._maps(prompt_mode, tuple(self.split.query[:limit]))


def attention_record(stage3_dir: str | Path, attention: Mapping, figures) -> dict:
    """``metrics.json`` of the attention notebook: the stage-3 run's test metrics and protocol
    sizes (so every run folder has the same schema), this run's attention figures and summary."""
    source = read_metrics(resolve_path(stage3_dir))
    keep = ("dataset", "aspect", "gallery_mode", "backbone", "backbone_display", "num_splits",
            "test", "data", "splits_hash", "test_splits_hash", "synthetic")
    record = {k: source[k] for k in keep if k in source}
    record.update(stage="attention", stage3_dir=str(stage3_dir), attention=dict(attention),
                  figures=[str(Path(f).name) for f in figures])
    return record
