"""The wall time of the CLIP-FH campaign (``params/grids/clipfh-11k.yaml`` + ``clipfh-hd.yaml``)
on one GPU, projected from the GPU check's measurements (benchmarks/README.md, "GPU check",
gives the formula with every assumption).

What the grids ask for comes from the grid and params files themselves
(:func:`campaign_runs`: every run's stage, backbone, dataset, aspect, epochs, P x K) and from the
protocols (:data:`PROTOCOL_IMAGES`: the images a run trains on per epoch and encodes to
evaluate, computed from the real datasets' metadata by :func:`protocol_images`; a test checks
the table against it, so the table cannot drift from the code that builds the protocols). What
the GPU does per second comes from the check (:class:`Measurements`). :func:`project` combines
them::

    gpu_s(run)  = sum over its stage's passes of images / (single-run images/s of that pass)
    host_s(run) = start_up_s + compile_s + checkpoints(run) x checkpoint_s
    checkpoints(run) = (ceil(epochs / checkpoint_every) if checkpoint_every else 1)
                       + floor(gpu_s(run) / (60 x checkpoint_minutes)) + 1
    wall_s(K)   = sum_runs gpu_s / speedup(K) + sum_runs host_s / K + decode_once_s

with ``speedup(K)`` = aggregate images/s of K concurrent runs on the GPU over one run's.

Runs without torch or clip: the check imports it, and so do the tests.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO = BENCHMARKS_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from handclip_nb.pipeline.grid import expand_grid, load_grid  # noqa: E402

__all__ = ["CAMPAIGN_GRIDS", "PROTOCOL_IMAGES", "DATASET_PHOTOS", "CampaignRun", "Measurements", "campaign_runs",
           "protocol_images", "project", "run_seconds", "checkpoint_count"]

#: The campaign: CLIP-FH's 11k and HD tables, with CLIP-HandID's rows (stage ``handid``).
CAMPAIGN_GRIDS = ("params/grids/clipfh-11k.yaml", "params/grids/clipfh-hd.yaml")

#: Images per protocol (dataset, aspect; P, K of stage 2/3 = 16, 4), from the real metadata
#: (``../shared/data/11k/HandInfo.csv``, ``../shared/data/hd/hd_listing.csv``) by
#: :func:`protocol_images` with the grids' settings (seed 0, 10 splits, 11k gallery ``all``):
#: ``train`` the training identities' images (stage 1's cached features per epoch; with
#: ``selection: last`` stages 2 and 3 train on all of them), ``pk_epoch`` the images one P x K
#: epoch draws (the sampler's epoch 0: whole chunks of K per identity, whole batches of P),
#: ``eval_fitted`` / ``eval_zero_shot`` the images encoded once to evaluate a trained / an
#: untrained model (every test split, the model-selection split and the open-set calibration
#: split, each image once); ``train_ids`` the training identities (CLIP-HandID's
#: ``selection: best_accuracy`` holds one image of each out of training and classifies them
#: after every epoch). tests/test_benchmarks.py recomputes them.
PROTOCOL_IMAGES: dict[tuple[str, str], dict[str, int]] = {
    ("11k", "dorsal_r"): {"train": 962, "train_ids": 72, "pk_epoch": 768, "eval_fitted": 2784,
                          "eval_zero_shot": 3508},
    ("11k", "dorsal_l"): {"train": 808, "train_ids": 73, "pk_epoch": 576, "eval_fitted": 2672,
                          "eval_zero_shot": 3344},
    ("11k", "palmar_r"): {"train": 977, "train_ids": 72, "pk_epoch": 704, "eval_fitted": 2681,
                          "eval_zero_shot": 3480},
    ("11k", "palmar_l"): {"train": 1004, "train_ids": 76, "pk_epoch": 768, "eval_fitted": 2729,
                          "eval_zero_shot": 3503},
    ("hd", "dorsal"): {"train": 2407, "train_ids": 251, "pk_epoch": 1984, "eval_fitted": 4063,
                       "eval_zero_shot": 5992},
}

#: Photos of each dataset (rows of its metadata file): the decoded-image cache holds each once
#: at the runs' geometry (the 11k grid's galleries take every aspect's photos).
DATASET_PHOTOS = {"11k": 11076, "hd": 5992}


@dataclass(frozen=True)
class CampaignRun:
    """One run of the campaign: what it trains and encodes."""

    grid: str
    name: str
    stage: str
    backbone: str
    dataset: str
    aspect: str
    epochs: int
    p_ids: int = 0
    k_images: int = 0
    batch_size: int = 0


def _aspect_key(values: Mapping) -> tuple[str, str]:
    dataset = str(values["dataset"])
    return (dataset, str(values["aspect"]) if dataset == "11k" else "dorsal")


def campaign_runs(grids: Sequence[str | Path] = CAMPAIGN_GRIDS) -> list[CampaignRun]:
    """Every run of ``grids`` (expanded as the grid runner does), with its epochs and P x K."""
    out = []
    for grid in grids:
        path = Path(grid) if Path(grid).is_absolute() else REPO / grid
        for run in expand_grid(load_grid(path)):
            values = run.values
            dataset, aspect = _aspect_key(values)
            out.append(CampaignRun(
                grid=path.stem, name=run.name, stage=run.stage, backbone=str(values["backbone"]),
                dataset=dataset, aspect=aspect,
                epochs=int(values.get("epochs", 0)) if run.stage != "stage0" else 0,
                p_ids=int(values.get("p_ids", 0) or 0), k_images=int(values.get("k_images", 0) or 0),
                batch_size=int(values.get("batch_size", 0) or 0)))
    return out


def protocol_images(dataset: str, aspect: str, records, p_ids: int = 16, k_images: int = 4,
                    num_splits: int = 10, seed: int = 0) -> dict[str, int]:
    """:data:`PROTOCOL_IMAGES`' entry for one protocol, from the dataset's ``records``
    (``read_handinfo`` / ``read_hd``), built as the grids' runs build it."""
    from handclip_nb.data.protocols import build_11k_protocol, build_hd_protocol
    from handclip_nb.data.sampler import PKSampler
    from handclip_nb.evaluate.protocol_eval import calibration_split, needed_indices

    if dataset == "11k":
        protocol = build_11k_protocol(records, aspect, seed=seed, num_splits=num_splits,
                                      gallery_mode="all")
    else:
        protocol = build_hd_protocol(records, seed=seed, num_splits=num_splits)
    train_people = set(protocol.train_people)
    labels = {person: i for i, person in enumerate(sorted(train_people))}
    train_labels = [labels[it.person] for it in protocol.items
                    if it.person in train_people and it.aspect == protocol.aspect
                    and not getattr(it, "distractor", False)]
    sampler = PKSampler(train_labels, p_ids, k_images, seed=seed)
    splits = list(protocol.test) + ([protocol.selection] if protocol.selection else [])

    def encoded(fitted: bool) -> int:
        return len(needed_indices(splits + [calibration_split(protocol, fitted)[0]]))

    return {"train": len(train_labels), "train_ids": len(train_people),
            "pk_epoch": len(sampler) * p_ids * k_images,
            "eval_fitted": encoded(True), "eval_zero_shot": encoded(False)}


@dataclass
class Measurements:
    """What one GPU does, as the GPU check measures it (each field says which figure), and the
    stated assumptions where the check measures nothing (``assumed`` lists them).

    ``train_images_s[(stage, backbone)]``: one run's training images/s (stage 1: cached
    features/s); ``extract_images_s[backbone]``: images/s of feature extraction;
    ``speedup[K]``: aggregate images/s of K concurrent runs over one run's (1 -> 1.0);
    ``start_up_s``: one run's fixed cost (kernel, imports, model build, data, first steps);
    ``compile_s``: ``torch.compile``'s cost per run (0: the grids do not compile);
    ``checkpoint_s``: one stage-2 ``save_checkpoint``; ``checkpoint_every`` /
    ``checkpoint_minutes``: the loop's two triggers of a ``last.pt`` (the schema's defaults: 0 =
    off, and every 10 minutes), besides the one at the end of training; ``decode_once_s``: filling the decoded-
    image cache once for the whole campaign (every later run reads it), on the CPU."""

    train_images_s: dict = field(default_factory=dict)
    extract_images_s: dict = field(default_factory=dict)
    speedup: dict = field(default_factory=lambda: {1: 1.0})
    start_up_s: float = 0.0
    compile_s: float = 0.0
    checkpoint_s: float = 0.0
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    decode_once_s: float = 0.0
    assumed: list = field(default_factory=list)


def run_seconds(run: CampaignRun, m: Measurements,
                images: Mapping[tuple[str, str], Mapping[str, int]] = PROTOCOL_IMAGES
                ) -> tuple[float, float]:
    """(GPU seconds, host seconds) of ``run`` alone on the GPU: see the module docstring.

    * stage 0: encode ``eval_zero_shot`` images;
    * stage 1: encode the ``train`` images once (cached features), ``epochs`` x ``train``
      cached features through prompt learning, then encode ``eval_zero_shot`` (its image
      encoder never trained);
    * stages 2 and 3: ``epochs`` x ``pk_epoch`` training images, then ``eval_fitted``;
    * ``handid``: ``epochs`` x the whole batches of ``batch_size`` in ``train`` less one held-out
      image per identity (plain shuffled batches, the last incomplete one dropped), the
      ``train_ids`` held-out images encoded after every epoch, then ``eval_fitted``;
    * host: start-up + compile, and for stages 2 and 3 the checkpoints the loop writes: one
      ``last.pt`` per ``checkpoint_every`` epochs (when set; else the one at the end of
      training), one per ``checkpoint_minutes`` of the run's GPU time, and ``best.pt`` (a third
      of the bytes, counted whole: an upper bound). Stage 1's prompt checkpoints are a few kB: 0."""
    sizes = images[(run.dataset, run.aspect)]
    extract = m.extract_images_s[run.backbone]
    host = m.start_up_s + m.compile_s
    if run.stage == "stage0":
        return sizes["eval_zero_shot"] / extract, host
    if run.stage == "stage1":
        gpu = (sizes["train"] / extract
               + run.epochs * sizes["train"] / m.train_images_s[("stage1", run.backbone)]
               + sizes["eval_zero_shot"] / extract)
        return gpu, host
    if run.stage == "handid":
        fitted = sizes["train"] - sizes["train_ids"]
        epoch_images = fitted // run.batch_size * run.batch_size
        gpu = (run.epochs * epoch_images / m.train_images_s[("handid", run.backbone)]
               + run.epochs * sizes["train_ids"] / extract + sizes["eval_fitted"] / extract)
    else:
        gpu = (run.epochs * sizes["pk_epoch"] / m.train_images_s[(run.stage, run.backbone)]
               + sizes["eval_fitted"] / extract)
    return gpu, host + checkpoint_count(run.epochs, gpu, m) * m.checkpoint_s


def checkpoint_count(epochs: int, gpu_s: float, m: Measurements) -> int:
    """The checkpoints a stage-2/3 run of ``epochs`` epochs and ``gpu_s`` seconds writes
    (``train/loop.py``): ``last.pt`` every ``checkpoint_every`` epochs when set, else once at
    the end; one more per ``checkpoint_minutes`` elapsed; and ``best.pt`` once."""
    every = int(m.checkpoint_every)
    periodic = math.ceil(epochs / every) if every > 0 else 1
    timed = math.floor(gpu_s / (60.0 * m.checkpoint_minutes)) if m.checkpoint_minutes > 0 else 0
    return periodic + timed + 1


def project(runs: Iterable[CampaignRun], m: Measurements, runs_per_gpu: int = 1,
            images: Mapping[tuple[str, str], Mapping[str, int]] = PROTOCOL_IMAGES) -> dict:
    """The campaign's wall seconds on one GPU with ``runs_per_gpu`` runs at a time::

        wall = sum(gpu_s) / speedup[K] + sum(host_s) / K + decode_once_s

    (K slots kept busy from the first run to the last: the GPU work of K runs shares the GPU
    at the measured aggregate speed-up, and each run's host time overlaps the others' GPU
    work). Returns the total and its parts, per grid too."""
    k = int(runs_per_gpu)
    if k not in m.speedup:
        raise ValueError(f"no measured speed-up for {k} runs per GPU (have "
                         f"{sorted(m.speedup)}): the GPU check measures K = 1, 2, 4, 8")
    runs = list(runs)
    parts = {"gpu_s": 0.0, "host_s": 0.0, "runs": len(runs)}
    per_grid: dict[str, dict] = {}
    for run in runs:
        gpu, host = run_seconds(run, m, images)
        parts["gpu_s"] += gpu
        parts["host_s"] += host
        grid = per_grid.setdefault(run.grid, {"gpu_s": 0.0, "host_s": 0.0, "runs": 0})
        grid["gpu_s"] += gpu
        grid["host_s"] += host
        grid["runs"] += 1
    speedup = float(m.speedup[k])
    for record in (*per_grid.values(),):
        record["wall_s"] = record["gpu_s"] / speedup + record["host_s"] / k
    parts["decode_once_s"] = float(m.decode_once_s)
    parts["wall_s"] = parts["gpu_s"] / speedup + parts["host_s"] / k + m.decode_once_s
    return {**parts, "runs_per_gpu": k, "speedup": speedup, "grids": per_grid,
            "assumed": list(m.assumed)}
