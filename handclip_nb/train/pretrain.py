"""Pretraining ``handclip-mini``: a small CLIP trained image↔text on captioned synthetic hands.

Why: offline there are no CLIP weights, and a randomly initialised text encoder makes zero-shot
ranking and prompt learning meaningless. A small ``clip.model.CLIP`` (both towers, the real BPE
tokenizer and its 49,408-token vocabulary) pretrained with CLIP's own objective on captioned
synthetic hands behaves like the real thing on the workbench's data: zero-shot ranking above
chance, a text side that carries meaning.

Data: a captioned pretraining population (``pretrain_seed``, person numbers from
:data:`PRETRAIN_ID_OFFSET`) whose seed and identities are disjoint from every dataset the demo
and the tests evaluate on (those use ``synthetic_seed`` 0-99 and person numbers below 10^6);
:func:`check_disjoint` enforces it. ``pretrain_heldout`` further people of the same population
are never trained on: retrieval and attribute probes are measured on them.

Objective: symmetric InfoNCE with CLIP's learnable temperature
(:func:`handclip_nb.losses.clip_contrastive_loss`). Batches hold at most one photo per person,
so no batch contains two photos with the same caption (a false negative CLIP's plain random
batches would have here). Captions are varied in training: the view phrase stays, attribute
phrases are shuffled and each dropped with probability ``caption_dropout``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.captions import caption_variant, read_captions
from ..data.handinfo import read_handinfo
from ..data.transforms import build_transform
from ..evaluate.metrics import rank_metrics
from ..losses import clip_contrastive_loss
from ..models.backbones import (CLIP_MEAN, CLIP_STD, ClipBackbone, HANDCLIP_MINI_NAME,
                                _build_arch, _describe_arch)
from ..progress import tqdm
from ..runs import atomic_write_json, atomic_write_text, resolve_path
from .loop import FitResult, TrainLoop
from .schedulers import warmup_cosine

__all__ = ["PRETRAIN_ID_OFFSET", "EVALUATED_SEEDS", "PretrainData", "CaptionedImages",
           "mini_arch", "check_disjoint", "build_pretraining_data", "distinct_person_batches",
           "retrieval_metrics", "PROBES", "attribute_probes", "pretrain_mini",
           "export_mini_weights", "file_sha256", "compare_with_card", "write_model_card",
           "CARD_TOLERANCE", "pretraining_data_root", "prepare_pretraining", "pretrain_record",
           "ship_weights", "read_card", "new_mini_backbone", "PretrainResult",
           "reproduction_check", "TRAINING_SETTINGS", "probes_record", "zero_shot_probes",
           "CAPTION_HEADS", "remeasure_card", "pretraining_data", "card_params"]

#: First person number of the pretraining population (evaluated datasets stay far below it).
PRETRAIN_ID_OFFSET = 5_000_000
#: ``synthetic_seed`` values the demo, smoke runs and tests evaluate on; pretraining refuses them.
EVALUATED_SEEDS = range(0, 100)


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


def check_disjoint(pretrain_seed: int, people: int, heldout: int) -> None:
    """Refuse a pretraining population that could overlap an evaluated dataset."""
    if int(pretrain_seed) in EVALUATED_SEEDS:
        raise ValueError(
            f"pretrain_seed {pretrain_seed} is a seed evaluated datasets use "
            f"({EVALUATED_SEEDS.start}-{EVALUATED_SEEDS.stop - 1}); pick a seed outside that "
            f"range (the default is 104729) so pretraining never sees evaluated people")
    if PRETRAIN_ID_OFFSET + people + heldout > 10_000_000:
        raise ValueError("pretrain_people + pretrain_heldout is too large for 7-digit ids")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainData:
    train_root: Path
    heldout_root: Path


def build_pretraining_data(root: str | os.PathLike, people: int, images_per_person: int,
                           heldout_people: int, seed: int, difficulty: float = 0.5,
                           accessory_rate: float = 0.3) -> PretrainData:
    """Generate (once) the captioned pretraining and held-out sets under ``root``.

    11k layout with ``captions.csv``; train people are numbers ``PRETRAIN_ID_OFFSET + i``,
    held-out people follow them. A ``settings.json`` marker written last makes a rerun with the
    same settings skip generation; different settings regenerate.
    """
    from ..data.synthetic import generate_dataset

    check_disjoint(seed, people, heldout_people)
    root = resolve_path(root)
    settings = {"people": int(people), "images_per_person": int(images_per_person),
                "heldout_people": int(heldout_people), "seed": int(seed),
                "difficulty": float(difficulty), "accessory_rate": float(accessory_rate),
                "id_offset": PRETRAIN_ID_OFFSET, "format": 1}
    marker = root / "settings.json"
    data = PretrainData(root / "train", root / "heldout")
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return data
    if marker.exists():
        marker.unlink()
    common = dict(images_per_subject=int(images_per_person), seed=int(seed),
                  difficulty=float(difficulty), accessory_rate=float(accessory_rate))
    generate_dataset(data.train_root, subjects=int(people), id_offset=PRETRAIN_ID_OFFSET, **common)
    generate_dataset(data.heldout_root, subjects=int(heldout_people),
                     id_offset=PRETRAIN_ID_OFFSET + int(people), **common)
    atomic_write_json(marker, settings)
    return data


class CaptionedImages:
    """Every image of an 11k-layout root, letterboxed once into memory (uint8), with captions.

    Decoding and resizing once is what makes CPU pretraining fit its budget: an epoch then
    costs only the model. ``records`` are the HandInfo rows (the probes' ground truth),
    ``people`` their identities (for distinct-person batches), ``captions`` the rows' captions
    from ``captions.csv`` (``with_captions=False`` for data without one, e.g. the real 11k
    Hands, where only the attribute probes apply).
    """

    def __init__(self, root: str | os.PathLike, image_size: Sequence[int],
                 with_captions: bool = True, progress: bool = True):
        self.root = resolve_path(root)
        self.records = read_handinfo(self.root / "HandInfo.csv")
        if with_captions:
            captions = read_captions(self.root)
            missing = [r.path for r in self.records if r.path not in captions]
            if missing:
                raise ValueError(f"{self.root / 'captions.csv'} has no caption for "
                                 f"{len(missing)} images, e.g. {missing[0]!r}")
            self.captions = [captions[r.path] for r in self.records]
        else:
            self.captions = [""] * len(self.records)
        self.people = np.asarray([r.person for r in self.records])
        transform = build_transform(list(image_size), train=False)
        self._mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(3, 1, 1)
        pixels = []
        for r in tqdm(self.records, desc=f"loading {self.root.name}", disable=not progress):
            with Image.open(self.root / r.path) as im:
                x = transform(im.convert("RGB"))  # normalised float tensor
            pixels.append(torch.round((x * self._std + self._mean) * 255).clamp(0, 255)
                          .to(torch.uint8))
        self.pixels = torch.stack(pixels)

    def __len__(self) -> int:
        return len(self.records)

    def images(self, index) -> torch.Tensor:
        """Normalised float images for ``index`` (what the backbone expects)."""
        return (self.pixels[index].float() / 255.0 - self._mean) / self._std


def distinct_person_batches(people: np.ndarray, batch_size: int,
                            rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches in which no person appears twice.

    Rounds take one random not-yet-used photo of every person (people in random order); each
    round is cut into batches, and a round's tail shorter than half a batch is dropped (a few
    photos per epoch, different ones each epoch).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {batch_size}")
    by_person: dict[str, list[int]] = {}
    for i, p in enumerate(people):
        by_person.setdefault(str(p), []).append(i)
    queues = {p: list(rng.permutation(ix)) for p, ix in by_person.items()}
    batches: list[np.ndarray] = []
    while any(queues.values()):
        names = [p for p in queues if queues[p]]
        order = rng.permutation(len(names))
        picked = np.asarray([queues[names[j]].pop() for j in order])
        # a tail below half a batch is dropped; "a batch" is at most the people available
        min_size = max(2, min(batch_size, len(by_person)) // 2)
        for start in range(0, len(picked), batch_size):
            chunk = picked[start:start + batch_size]
            if len(chunk) >= min_size:
                batches.append(chunk)
    return batches


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


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
    ``data`` may be a dataset root (11k layout; no captions needed).
    """
    import pandas as pd

    if not isinstance(data, CaptionedImages):
        data = CaptionedImages(data, image_size or backbone.image_size, with_captions=False)
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


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    backbone: ClipBackbone
    fit: FitResult
    retrieval_before: dict
    retrieval_after: dict


def new_mini_backbone(params: Mapping) -> ClipBackbone:
    """A randomly initialised (seeded) handclip-mini at ``params['image_size']``."""
    arch = _arch_of_params(params)
    model = _build_arch(arch, int(params["seed"]))
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
                     device=device, amp=params["amp"], params=params,
                     meta={"arch": _arch_of_params(params), "train_images": len(train)})
    fit = loop.fit(params["epochs"], resume=params["resume"])
    if fit.best_state is not None:
        backbone.clip.load_state_dict(fit.best_state["clip"])
    backbone.eval()
    after = retrieval_metrics(backbone, heldout)
    backbone.pretrained = True
    backbone.weights_label = f"pretrained on captioned synthetic hands (run {Path(output_dir).name})"
    return PretrainResult(backbone, fit, before, after)


# ------------------------------------------------------------------------------------------------
# Shipping: fp16 weights, SHA-256, model card
# ------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_mini_weights(backbone: ClipBackbone, path: str | os.PathLike) -> tuple[Path, str]:
    """Write ``backbone`` as fp16 weights in the backbone file format (atomic) and its SHA-256
    beside it (``<name>.sha256``, ``sha256sum`` format); return (path, sha256)."""
    path = resolve_path(path)
    backbone.save_weights(path, dtype=torch.float16)
    digest = file_sha256(path)
    atomic_write_text(path.with_suffix(".sha256"), f"{digest}  {path.name}\n")
    return path, digest


def write_model_card(weights_path: str | os.PathLike, card: Mapping) -> Path:
    """``<weights>.json`` (machine-readable card, read by :func:`compare_with_card`) and
    ``<weights>.md`` (the human model card)."""
    weights_path = resolve_path(weights_path)
    atomic_write_json(weights_path.with_suffix(".json"), dict(card))
    lines = [f"# Model card: {card['name']}", "",
             f"**Trained on synthetic hands only.** {card['limits']}", "",
             "## What it is", "", card["description"], "",
             f"- architecture: {card['architecture']}",
             f"- parameters: {card['parameters']:,}; file: {card['file']} "
             f"({card['file_mb']:.1f} MB, fp16), SHA-256 `{card['sha256']}`",
             f"- input: {card['image_size'][0]}x{card['image_size'][1]} (H x W), CLIP "
             f"normalisation; text: CLIP BPE tokenizer, 77 tokens", "",
             "## Data", "", card["data"], "",
             "## How it was made", "", f"```\n{card['command']}\n```", "",
             f"seed {card['seed']}; {card['epochs']} epochs; {card['train_seconds']:.0f} s of "
             f"training on {card['machine']}; git commit {card['git_commit']}.", "",
             "## Metrics (held-out synthetic people, never trained on)", "",
             *([f"_{card['measured']}._", ""] if card.get("measured") else []),
             "| retrieval | before (random init) | after |", "|---|---|---|"]
    for key in ("i2t_R1", "i2t_mAP", "t2i_R1", "t2i_mAP"):
        lines.append(f"| {key} | {card['retrieval_before'][key]:.1f} | "
                     f"{card['retrieval_after'][key]:.1f} |")
    k = card["probe_k"]
    lines += ["", f"| attribute probe | pool | base rate % | precision@{k} % |", "|---|---|---|---|"]
    for name, row in card["probes"].items():
        lines.append(f"| {name} | {row['pool']} | {row['base_rate']:.1f} | "
                     f"{row[f'precision@{k}']:.1f} |")
    lines += ["", "## Reproducing", "", card["reproduce"], ""]
    return atomic_write_text(weights_path.with_suffix(".md"), "\n".join(lines))


def compare_with_card(probes: "pandas.DataFrame", card: Mapping,  # noqa: F821
                      tolerance: float) -> "pandas.DataFrame":  # noqa: F821
    """Probe precision@k of a (re)trained model next to the card's, with ``within`` = the
    absolute difference is at most ``tolerance`` percentage points."""
    import pandas as pd

    k = card["probe_k"]
    col = f"precision@{k}"
    rows = []
    for name, ref in card["probes"].items():
        got = float(probes.loc[name, col]) if name in probes.index else float("nan")
        rows.append({"probe": name, "card": ref[col], "now": got,
                     "difference": got - ref[col], "within": abs(got - ref[col]) <= tolerance})
    return pd.DataFrame(rows).set_index("probe")


# ------------------------------------------------------------------------------------------------
# Run-level helpers for the notebook
# ------------------------------------------------------------------------------------------------

#: Tolerance of the reproduction check: probe precision@10 of a re-run (other CPU, other thread
#: count, so other float rounding) must be within this many percentage points of the card's.
CARD_TOLERANCE = 10.0
RETRAIN_COMMAND = ("papermill notebooks/pretrain_mini.ipynb outputs/pretrain_mini.ipynb "
                   "-f params/pretrain_mini.yaml")
SHIP_COMMAND = RETRAIN_COMMAND + " -p export_weights handclip_nb/models/weights/handclip_mini.pt"


def pretraining_data_root(params: Mapping) -> Path:
    """Where the captioned pretraining population for these parameters lives."""
    from ..runs import project_root

    name = (f"pretrain-seed{params['pretrain_seed']}-{params['pretrain_people']}x"
            f"{params['pretrain_images']}-h{params['pretrain_heldout']}"
            f"-a{params['pretrain_accessory_rate']:g}")
    return project_root() / "outputs" / "data" / name


def pretraining_data(params: Mapping) -> PretrainData:
    """The captioned pretraining and held-out sets the parameters describe (generated once)."""
    return build_pretraining_data(pretraining_data_root(params), params["pretrain_people"],
                                  params["pretrain_images"], params["pretrain_heldout"],
                                  params["pretrain_seed"],
                                  accessory_rate=params["pretrain_accessory_rate"])


def card_params(card: Mapping):
    """The resolved pretraining parameters a model card was trained with."""
    from ..params import resolve_params

    return resolve_params(stage="pretrain", **{k: v for k, v in card["params"].items()
                                               if k in TRAINING_SETTINGS})


def prepare_pretraining(params: Mapping, progress: bool = True):
    """Generate (once) and load the pretraining and held-out sets: (train, heldout)."""
    if params["backbone"] != HANDCLIP_MINI_NAME:
        raise ValueError(f"the pretrain notebook trains {HANDCLIP_MINI_NAME!r} (a new small CLIP); "
                         f"got backbone={params['backbone']!r}: set -p backbone {HANDCLIP_MINI_NAME}")
    data = pretraining_data(params)
    train = CaptionedImages(data.train_root, params["image_size"], progress=progress)
    heldout = CaptionedImages(data.heldout_root, params["image_size"], progress=progress)
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


def ship_weights(params: Mapping, result: PretrainResult, record: Mapping, run) -> dict:
    """Export fp16 weights + SHA-256 + model card to ``params['export_weights']``."""
    import platform

    path, digest = export_mini_weights(result.backbone, params["export_weights"])
    n_params = sum(p.numel() for p in result.backbone.clip.parameters())
    arch = result.backbone.arch
    seconds = sum(h.get("seconds", 0.0) for h in result.fit.history)
    card = {
        "name": HANDCLIP_MINI_NAME,
        "description": ("A small CLIP (clip.model.CLIP: both towers, OpenAI's BPE tokenizer and "
                        "49,408-token vocabulary) trained from random initialisation with CLIP's "
                        "symmetric InfoNCE and learnable temperature on captioned synthetic hands."),
        "limits": ("It has never seen a real hand: on photos of real hands expect features of "
                   "little use, and never report its numbers as CLIP results. It knows only the "
                   "caption vocabulary of the synthetic generator (view and side, gender, skin "
                   "tone, nail polish, proportions, accessories, marks)."),
        "architecture": _describe_arch(arch),
        "arch": dict(arch), "parameters": int(n_params),
        "file": path.name, "file_mb": path.stat().st_size / 1e6, "sha256": digest,
        "image_size": list(result.backbone.image_size),
        "data": (f"{record['data']['train_people']} synthetic people x 4 aspects x "
                 f"{params['pretrain_images']} photos = {record['data']['train_images']} captioned "
                 f"images (handclip_nb.data.synthetic, population seed {params['pretrain_seed']}, "
                 f"person numbers from {PRETRAIN_ID_OFFSET}, accessory rate "
                 f"{params['pretrain_accessory_rate']}); disjoint in seed and identity from every "
                 f"dataset the demo and tests evaluate on. Metrics below: "
                 f"{record['data']['heldout_people']} further people of the same population "
                 f"({record['data']['heldout_images']} images), never trained on."),
        "command": SHIP_COMMAND, "seed": params["seed"], "epochs": params["epochs"],
        "params": {k: v for k, v in params.items() if k not in ("export_weights", "output_dir")},
        "train_seconds": seconds,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "git_commit": run.environment.get("git_commit", "unknown"),
        "retrieval_before": record["retrieval"]["before"],
        "retrieval_after": record["retrieval"]["after"],
        "probes": record["probes"], "probe_k": record["probe_k"],
        "tolerance_points": CARD_TOLERANCE,
        "reproduce": (f"`{RETRAIN_COMMAND}` "
                      f"retrains from scratch (same seed, same data); `make check-mini` does it and "
                      f"compares the probes with this card: each precision@{record['probe_k']} "
                      f"must be within {CARD_TOLERANCE:g} points (float rounding differs between "
                      f"CPUs and thread counts). The test suite checks the shipped file's SHA-256 "
                      f"and re-measures these probes from the shipped weights."),
    }
    write_model_card(path, card)
    return {"weights": str(path), "sha256": digest, "card": str(path.with_suffix(".md")),
            "file_mb": card["file_mb"]}


def read_card(weights_path: str | os.PathLike | None = None) -> dict:
    """The machine-readable model card of the shipped (or given) handclip-mini weights."""
    from ..models.backbones import get_backbone_spec

    path = Path(weights_path or get_backbone_spec(HANDCLIP_MINI_NAME).weights_file)
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} not found: the model card is written next to the "
                                f"weights by notebooks/pretrain_mini.ipynb (-p export_weights)")
    return json.loads(card_path.read_text())


#: The parameters that decide the trained model (a re-run with these equal must match the card).
TRAINING_SETTINGS = ("pretrain_people", "pretrain_images", "pretrain_heldout", "pretrain_seed",
                     "pretrain_accessory_rate", "caption_dropout", "vision_arch", "vision_width",
                     "vision_layers",
                     "text_width", "text_layers", "embed_dim", "epochs", "lr", "weight_decay",
                     "warmup_epochs", "batch_size", "eval_every", "seed", "image_size", "probe_k")


def reproduction_check(params: Mapping, probes, weights_path=None):
    """Compare this run's probes with the shipped card when the run used the card's settings
    (AssertionError when a probe is off by more than :data:`CARD_TOLERANCE` points); None when
    there is no card or the settings differ (nothing to compare)."""
    try:
        card = read_card(weights_path)
    except FileNotFoundError:
        return None
    same = all(card["params"].get(k) == params.get(k) for k in TRAINING_SETTINGS)
    if not same:
        return None
    comparison = compare_with_card(probes, card, CARD_TOLERANCE)
    if not comparison["within"].all():
        raise AssertionError(
            f"this run used the shipped model's settings but its probes differ from the card by "
            f"more than {CARD_TOLERANCE:g} points:\n{comparison.round(2).to_string()}")
    return comparison


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


def remeasure_card(weights_path: str | os.PathLike | None = None) -> dict:
    """Re-measure a shipped model's held-out retrieval and probes from its (fp16) weights and
    rewrite its card; the weights, their SHA-256 and the training record stay as they are.

    For when the *measurement* changes (e.g. the probe set), not the model: no retraining.
    ``python -m handclip_nb.train.pretrain --remeasure-card``.
    """
    import time

    from ..models.backbones import build_backbone, get_backbone_spec

    path = Path(weights_path or get_backbone_spec(HANDCLIP_MINI_NAME).weights_file)
    card = read_card(path)
    params = card_params(card)
    data = pretraining_data(params)
    heldout = CaptionedImages(data.heldout_root, params["image_size"], progress=False)
    backbone = build_backbone(HANDCLIP_MINI_NAME, weights=path, image_size=params["image_size"])
    card["retrieval_after"] = retrieval_metrics(backbone, heldout)
    card["probes"] = probes_record(attribute_probes(backbone, heldout, k=card["probe_k"]))
    card["measured"] = (f"held-out retrieval and probes re-measured from the shipped fp16 "
                        f"weights on {time.strftime('%Y-%m-%d')} (remeasure_card)")
    write_model_card(path, card)
    return card


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="handclip-mini model-card maintenance")
    parser.add_argument("--remeasure-card", action="store_true",
                        help="re-measure the shipped model's held-out metrics into its card")
    parser.add_argument("--weights", default=None, help="weights file (default: the shipped one)")
    args = parser.parse_args()
    if not args.remeasure_card:
        parser.print_help()
        sys.exit(2)
    remeasured = remeasure_card(args.weights)
    print(json.dumps({"retrieval_after": remeasured["retrieval_after"],
                      "probes": remeasured["probes"]}, indent=1))
