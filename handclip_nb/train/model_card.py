"""Shipping handclip-mini: fp16 weights, their SHA-256, the model card, and its checks.

:func:`export_mini_weights` and :func:`file_sha256` write and hash the weights file,
:func:`write_model_card` its card (``<weights>.json`` and ``<weights>.md``), :func:`ship_weights`
does all three for a pretraining run. :func:`read_card`, :func:`card_params`,
:func:`compare_with_card` and :func:`reproduction_check` compare a re-run with the shipped card
(within :data:`CARD_TOLERANCE` points); :func:`remeasure_card` re-measures the shipped weights
into their card without retraining::

    python -m handclip_nb.train.model_card --remeasure-card [--weights FILE]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..backbone_specs import HANDCLIP_MINI_NAME, get_backbone_spec
from ..data.captioned import PRETRAIN_ID_OFFSET, CaptionedImages, pretraining_data
from ..evaluate.probes import attribute_probes, probes_record, retrieval_metrics
from ..models.backbones import ClipBackbone, build_backbone
from ..models.clip_arch import describe_arch
from ..params import resolve_params
from ..runs import atomic_write_json, atomic_write_text, resolve_path
from .pretrain import PretrainResult

__all__ = ["file_sha256", "export_mini_weights", "write_model_card", "compare_with_card",
           "CARD_TOLERANCE", "RETRAIN_COMMAND", "SHIP_COMMAND", "card_params", "ship_weights",
           "read_card", "TRAINING_SETTINGS", "reproduction_check", "remeasure_card", "main"]

#: Tolerance of the reproduction check: probe precision@10 of a re-run (other CPU, other thread
#: count, so other float rounding) must be within this many percentage points of the card's.
CARD_TOLERANCE = 10.0
RETRAIN_COMMAND = ("papermill notebooks/pretrain_mini.ipynb outputs/pretrain_mini.ipynb "
                   "-f params/pretrain_mini.yaml")
SHIP_COMMAND = RETRAIN_COMMAND + " -p export_weights handclip_nb/models/weights/handclip_mini.pt"


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
    import pandas as pd  # pandas costs ~0.3 s to import; only this comparison needs it

    k = card["probe_k"]
    col = f"precision@{k}"
    rows = []
    for name, ref in card["probes"].items():
        got = float(probes.loc[name, col]) if name in probes.index else float("nan")
        rows.append({"probe": name, "card": ref[col], "now": got,
                     "difference": got - ref[col], "within": abs(got - ref[col]) <= tolerance})
    return pd.DataFrame(rows).set_index("probe")


def card_params(card: Mapping):
    """The resolved pretraining parameters a model card was trained with."""
    return resolve_params(stage="pretrain", **{k: v for k, v in card["params"].items()
                                               if k in TRAINING_SETTINGS})


def ship_weights(params: Mapping, result: PretrainResult, record: Mapping, run) -> dict:
    """Export fp16 weights + SHA-256 + model card to ``params['export_weights']``."""
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
        "architecture": describe_arch(arch),
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


def remeasure_card(weights_path: str | os.PathLike | None = None) -> dict:
    """Re-measure a shipped model's held-out retrieval and probes from its (fp16) weights and
    rewrite its card; the weights, their SHA-256 and the training record stay as they are.

    For when the *measurement* changes (e.g. the probe set), not the model: no retraining.
    ``python -m handclip_nb.train.model_card --remeasure-card``.
    """
    path = Path(weights_path or get_backbone_spec(HANDCLIP_MINI_NAME).weights_file)
    card = read_card(path)
    params = card_params(card)
    data = pretraining_data(params, parts=("heldout",))  # the probes read only these people
    backbone = build_backbone(HANDCLIP_MINI_NAME, weights=path, image_size=params["image_size"])
    heldout = CaptionedImages(data.heldout_root, backbone.preprocess_config(), progress=False)
    card["retrieval_after"] = retrieval_metrics(backbone, heldout)
    card["probes"] = probes_record(attribute_probes(backbone, heldout, k=card["probe_k"]))
    card["measured"] = (f"held-out retrieval and probes re-measured from the shipped fp16 "
                        f"weights on {time.strftime('%Y-%m-%d')} (remeasure_card)")
    write_model_card(path, card)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``--remeasure-card [--weights FILE]`` (exit status 2 without it)."""
    parser = argparse.ArgumentParser(description="handclip-mini model-card maintenance")
    parser.add_argument("--remeasure-card", action="store_true",
                        help="re-measure the shipped model's held-out metrics into its card")
    parser.add_argument("--weights", default=None, help="weights file (default: the shipped one)")
    args = parser.parse_args(argv)
    if not args.remeasure_card:
        parser.print_help()
        return 2
    remeasured = remeasure_card(args.weights)
    print(json.dumps({"retrieval_after": remeasured["retrieval_after"],
                      "probes": remeasured["probes"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
