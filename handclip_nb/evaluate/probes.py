"""Measurements of a CLIP backbone on captioned hands: retrieval and attribute probes.

Zero-shot image<->caption retrieval (:func:`retrieval_metrics`) and text probes over the 11k
metadata columns (:data:`PROBES`, :func:`attribute_probes`; they also run on the real 11k
Hands, which has no captions), plus the probe table as JSON (:func:`probes_record`) and the
probes a zero-shot run reports (:func:`zero_shot_probes`). Used by handclip-mini's pretraining
(:mod:`handclip_nb.train.pretrain`), its model card (:mod:`handclip_nb.train.model_card`) and the
stage-0 notebook.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from ..data.captioned import CaptionedImages
from ..models.backbones import ClipBackbone
from .metrics import rank_metrics

__all__ = ["retrieval_metrics", "Probe", "CAPTION_HEADS", "PROBES", "attribute_probes",
           "probes_record", "zero_shot_probes"]


@torch.no_grad()
def _embed_images(backbone: ClipBackbone, data: CaptionedImages, batch_size: int = 256):
    feats = []
    for start in range(0, len(data), batch_size):
        x = data.images(slice(start, start + batch_size)).to(backbone.device)
        feats.append(backbone.encode_image(x).global_embedding.float().cpu())
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def _embed_texts(backbone: ClipBackbone, texts: Sequence[str], batch_size: int = 256):
    feats = []
    for start in range(0, len(texts), batch_size):
        tokens = backbone.tokenize(list(texts[start:start + batch_size]), truncate=True)
        feats.append(backbone.encode_text(tokens).float().cpu())
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


def retrieval_metrics(backbone: ClipBackbone, data: CaptionedImages) -> dict[str, float]:
    """Zero-shot image→caption and caption→image retrieval (percent).

    The gallery of image→caption is the set of distinct captions; a caption is correct for an
    image when it is that image's caption (photos of one person and view share one unless an
    accessory differs), so both directions are multi-positive retrieval scored by the one
    metrics module (:func:`rank_metrics`): R@1, R@5 and mAP. Chance R@1 is about 1 / #captions.
    """
    was_training = backbone.training
    backbone.eval()
    unique = sorted(set(data.captions))
    label_of = {c: i for i, c in enumerate(unique)}
    image_labels = np.asarray([label_of[c] for c in data.captions])
    text_labels = np.arange(len(unique))
    img = _embed_images(backbone, data)
    txt = _embed_texts(backbone, unique)
    sim = (img @ txt.t()).numpy()
    out = {}
    for name, dist, q, g in (("i2t", -sim, image_labels, text_labels),
                             ("t2i", -sim.T, text_labels, image_labels)):
        m = rank_metrics(dist, q, g, max_rank=5)
        out[f"{name}_R1"] = 100 * float(m["cmc"][0])
        out[f"{name}_R5"] = 100 * float(m["cmc"][min(4, len(m["cmc"]) - 1)])
        out[f"{name}_mAP"] = 100 * float(m["mAP"])
    out["captions"] = float(len(unique))
    backbone.train(was_training)
    return out


@dataclass(frozen=True)
class Probe:
    """A text query and the HandInfo ground truth it should retrieve."""

    name: str
    texts: tuple[str, ...]  # averaged (prompt ensembling, as CLIP's zero-shot classifiers do)
    positive: object  # HandImage -> bool
    pool: object = None  # HandImage -> bool: which images take part (None = all)
    pool_note: str = "all images"


#: The caption heads the pretraining captions start with (view, gender, side).
CAPTION_HEADS = tuple(f"a photo of the {view} of a {owner} {side} hand"
                      for view in ("dorsal side", "palm side") for owner in ("woman's", "man's")
                      for side in ("right", "left"))


def _ensemble(phrases: Sequence[str], keep=lambda head: True) -> tuple[str, ...]:
    """Each attribute phrase behind each caption head (CLIP's prompt ensembling, in the caption
    format the model was trained on: a bare "a hand, dark skin" is out of its distribution)."""
    heads = [h for h in CAPTION_HEADS if keep(h)]
    return tuple(f"{h}, {p}" if p else h for h in heads for p in phrases)


#: Attribute probes over the 11k metadata columns (so they also run on the real 11k Hands).
PROBES: tuple[Probe, ...] = (
    Probe("nail polish", _ensemble([f"{c} nail polish" for c in ("red", "pink", "purple",
                                                                  "black", "blue", "coral")],
                                   lambda h: "dorsal" in h),
          lambda r: r.nail_polish == 1, lambda r: r.aspect.startswith("dorsal"),
          "dorsal images (nails show on the back of the hand)"),
    Probe("accessory", _ensemble(["a gold ring on the ring finger", "a silver ring on the index "
                                  "finger", "a gold bracelet", "a silver bracelet",
                                  "a wristwatch"]),
          lambda r: r.accessories == 1),
    Probe("dark skin", _ensemble(["dark skin"]), lambda r: r.skin_color == "dark"),
    Probe("very fair skin", _ensemble(["very fair skin"]), lambda r: r.skin_color == "very fair"),
    Probe("male", _ensemble([""], lambda h: " man's" in h), lambda r: r.gender == "male"),
    Probe("palm side", _ensemble([""], lambda h: "palm side" in h),
          lambda r: r.aspect.startswith("palmar")),
    Probe("left hand", _ensemble([""], lambda h: "left" in h), lambda r: r.aspect.endswith("_l")),
)


def attribute_probes(backbone: ClipBackbone, data: CaptionedImages | str | os.PathLike,
                     k: int = 10, probes: Sequence[Probe] = PROBES,
                     image_size: Sequence[int] | None = None) -> "pandas.DataFrame":  # noqa: F821
    """Precision@k of each text probe against its base rate, from HandInfo ground truth.

    For each probe the images of its pool are ranked by cosine similarity to the probe's
    (ensembled) text; precision@k is the share of the top k with the attribute, the base rate
    the share in the pool (what a random ranking scores). ``lift`` = precision / base rate.
    ``data`` may be a dataset root (11k layout; no captions needed), loaded with the backbone's
    preprocessing at ``image_size`` (default: the backbone's input size).
    """
    import pandas as pd  # pandas costs ~0.3 s to import; only the probe table needs it

    if not isinstance(data, CaptionedImages):
        preprocess = backbone.preprocess_config()
        if image_size:
            preprocess = replace(preprocess, image_size=(int(image_size[0]), int(image_size[1])))
        data = CaptionedImages(data, preprocess, with_captions=False)
    img = _embed_images(backbone, data)
    rows = []
    for probe in probes:
        pool = np.asarray([probe.pool(r) if probe.pool else True for r in data.records])
        truth = np.asarray([bool(probe.positive(r)) for r in data.records])[pool]
        txt = _embed_texts(backbone, probe.texts).mean(0)
        scores = (img[torch.as_tensor(pool)] @ txt).numpy()
        kk = min(int(k), len(scores))
        top = np.argsort(-scores, kind="stable")[:kk]
        base = float(truth.mean()) if len(truth) else 0.0
        prec = float(truth[top].mean()) if kk else 0.0
        rows.append({"probe": probe.name, "pool": probe.pool_note, "images": int(pool.sum()),
                     "positives": int(truth.sum()), "base_rate": 100 * base,
                     f"precision@{kk}": 100 * prec,
                     "lift": (prec / base) if base > 0 else float("nan")})
    return pd.DataFrame(rows).set_index("probe")


def probes_record(probes) -> dict:
    """A probe table as plain JSON (for ``metrics.json``)."""
    return {name: {c: (v if isinstance(v, str) else float(v)) for c, v in row.items()}
            for name, row in probes.to_dict(orient="index").items()}


def zero_shot_probes(backbone: ClipBackbone, protocol, params: Mapping):
    """The attribute probes on every image of an 11k-layout dataset (HandInfo ground truth);
    None for HD, which has no attribute metadata."""
    if protocol.dataset != "11k":
        return None
    return attribute_probes(backbone, protocol.root, k=params["probe_k"],
                            image_size=params["image_size"])
