"""Benchmark: the decoded-image cache on real-size photos (1600x1200 JPEGs, as 11k Hands).

A script that prints figures (not a test).  Run from the repository root:

    .venv/bin/python benchmarks/bench_data.py                  # full (~3-5 min on 2 cores)
    .venv/bin/python benchmarks/bench_data.py --quick          # smoke run (tiny counts)
    .venv/bin/python benchmarks/bench_data.py --people 80 --images 6 --json out.json

Everything runs on a synthetic hands dataset written at the real photos' size
(``handclip_nb.data.synthetic.generate_dataset(..., image_size=(1600, 1200))``, 11k layout:
``--people`` people x 4 aspects x ``--images`` photos), at CLIP-ReID's ViT-B/16 input
224 x 288 (height x width), ``resize_mode="pad"`` (letterbox), CLIP mean/std
(``PreprocessConfig(image_size=(224, 288))``), with stage 2's default augmentation
(``AugmentConfig`` from ``resolve_params(stage="stage2")``: pad 10 + random crop, no erasing,
no jitter, no flip).  All temporary data (photos, caches, run folders) lives in a
``tempfile.TemporaryDirectory``; ``HANDCLIP_HOME`` points into it while the package's own
training and evaluation run, so their default decode cache (``outputs/.decode_cache``) never
lands in the repository.

Part 1, training-data images/s per core (one process, ``torch.set_num_threads(1)``, no loader
workers), each path called directly on the same photos, round-robin in chunks so that a change
of machine load hits all of them alike:
  (a) pre-cache:   ``build_transform(preprocess, train=True, augment=...)`` on
                   ``Image.open(p).convert("RGB")`` (full decode + letterbox + augmentation)
  (b) cache off:   ``ImageSource(preprocess, train=True, augment=..., cache=False)``
                   (reduced-scale JPEG decode + letterbox + augmentation)
  (c) cache on:    ``ImageSource(..., cache=True, cache_root=...)`` with every entry built
                   (warm: memory-mapped ``.npy`` read + augmentation)
  (c') the same through ``ImageListDataset(..., seed=0)[i]`` -- what a training epoch calls per
                   image (adds the per-item seeded generator)
Part 2, building the cache: ``DecodeCache.prepare`` with 1 worker and with every core
(``available_cpus()``) into empty cache folders; seconds, images/s, bytes per entry.
Part 3, a stage-2 epoch: ``train_stage2`` (tiny-vit, untrained, random init) at 224 x 288,
``num_workers=0``, ``decode_cache`` off vs on (the cache built beforehand and timed apart);
seconds per epoch from ``FitResult.history``.
Part 4, equality: ``evaluate_backbone`` with ``decode_cache`` on vs off (test summaries must be
identical), and ``reduced_jpeg_decode`` on vs off (the stated tolerance of reduced-scale
decoding: metric differences, pixel differences, cosine similarity of features).
Part 5, the cache's disk size for the whole 11k dataset at 224 x 288: the image count of the
real ``HandInfo.csv`` x the measured bytes of one entry (and rounded up to 4 KiB blocks).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE_SIZE = (224, 288)  # (height, width): CLIP-ReID's ViT-B/16 input
PHOTO_SIZE = (1600, 1200)  # (width, height) of the real 11k Hands photos
DEFAULT_HANDINFO = REPO.parent / "shared" / "data" / "11k" / "HandInfo.csv"
BACKBONE = "tiny-vit"
BLOCK = 4096
SEED = 0


# --------------------------------------------------------------------------- setup


def sizes(quick: bool) -> dict:
    """Dataset and run sizes.  Full: 40 people x 4 aspects x 6 photos (960 photos, 70-130 s to
    write); the dorsal_r protocol then fits 20 people (P x K = 8 x 4: 64 images per stage-2
    epoch) and tests on 20."""
    if quick:
        return dict(people=12, images=3, loading=24, chunk=4, warm_repeats=2, epochs=1,
                    p_ids=4, k_images=2, num_splits=2)
    return dict(people=40, images=6, loading=240, chunk=8, warm_repeats=3, epochs=3,
                p_ids=8, k_images=4, num_splits=10)


def preprocess_config(image_size=IMAGE_SIZE):
    """Letterbox (``pad``) to ``image_size`` with CLIP's mean and std."""
    from handclip_nb.backbone_specs import PreprocessConfig

    return PreprocessConfig(image_size=tuple(int(s) for s in image_size))


def stage2_augment():
    """Stage 2's default training augmentation, read from the parameter schema as
    ``train_batches`` builds it (random erasing, colour jitter, flip at their defaults)."""
    from handclip_nb.data.transforms import AugmentConfig
    from handclip_nb.params import resolve_params

    p = resolve_params({}, stage="stage2")
    return AugmentConfig(erasing_p=p["random_erasing"], color_jitter=p["color_jitter"],
                         hflip_p=p.get("horizontal_flip", 0.0))


def private_home(folder: Path) -> Path:
    """A project root for ``HANDCLIP_HOME`` (``runs.project_root``): outputs/ go there."""
    for name in ("handclip_nb", "notebooks", "outputs"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def handclip_home(folder: Path):
    """``HANDCLIP_HOME=folder`` for the duration (restored afterwards)."""
    old = os.environ.get("HANDCLIP_HOME")
    os.environ["HANDCLIP_HOME"] = str(private_home(folder))
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("HANDCLIP_HOME", None)
        else:
            os.environ["HANDCLIP_HOME"] = old


@contextlib.contextmanager
def torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_dataset(root: Path, people: int, images: int, photo_size=PHOTO_SIZE, seed: int = SEED,
                 progress: bool = True) -> Path:
    """The synthetic 11k-layout dataset (``people`` x 4 aspects x ``images`` photos of
    ``photo_size`` = (width, height)); a bar counts the photos written."""
    from handclip_nb.data.synthetic import generate_dataset
    from handclip_nb.progress import tqdm

    total = int(people) * 4 * int(images)
    done = threading.Event()

    def watch():
        hands = Path(root) / "Hands"
        with tqdm(total=total, desc="write photos", unit="photo", disable=not progress,
                  leave=False) as bar:
            while not done.wait(0.5):
                n = len(os.listdir(hands)) if hands.is_dir() else 0
                bar.update(min(n, total) - bar.n)
            bar.update(total - bar.n)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return generate_dataset(root, subjects=people, images_per_subject=images, seed=seed,
                                image_size=tuple(photo_size))
    finally:
        done.set()
        watcher.join()


def photo_paths(root: Path) -> list[str]:
    """Every photo of the dataset, in HandInfo.csv's order (all four aspects)."""
    from handclip_nb.data.handinfo import read_handinfo

    return [str(Path(root) / r.path) for r in read_handinfo(Path(root) / "HandInfo.csv")]


# --------------------------------------------------------------------------- part 1


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def measure_loading(paths, cache_root, preprocess=None, augment=None, chunk: int = 8,
                    warm_repeats: int = 3, warmup: int = 2, seed: int = SEED, threads: int = 1,
                    progress: bool = True) -> dict:
    """Images/s of the four ways from a file to a training tensor (module docstring, part 1),
    on one core (``threads`` torch threads, no workers).  The cache under ``cache_root`` is
    filled first (untimed; ``prepared_now`` says how many entries that built).  Timing is
    round-robin: for each chunk of ``chunk`` paths, (a), (b), then (c) and (c') ``warm_repeats``
    times each; ``warmup`` images of each path go untimed first."""
    import torch
    from PIL import Image

    from handclip_nb.data.datasets import ImageListDataset
    from handclip_nb.data.images import ImageSource
    from handclip_nb.data.transforms import build_transform
    from handclip_nb.progress import tqdm

    paths = [str(p) for p in paths]
    preprocess = preprocess or preprocess_config()
    augment = augment or stage2_augment()
    full = build_transform(preprocess, train=True, augment=augment)

    def newcomer(p):
        with Image.open(p) as im:
            return full(im.convert("RGB"))

    off = ImageSource(preprocess, train=True, augment=augment, cache=False)
    on = ImageSource(preprocess, train=True, augment=augment, cache=True, cache_root=cache_root)
    report = on.prepare(paths, progress=progress)
    dataset = ImageListDataset(paths, [0] * len(paths), on, seed=seed)
    index = {p: i for i, p in enumerate(paths)}
    ways = {"a_precache": newcomer, "b_cache_off": off, "c_cache_on": on,
            "c_dataset": lambda p: dataset[index[p]]}
    repeats = {"a_precache": 1, "b_cache_off": 1, "c_cache_on": warm_repeats,
               "c_dataset": warm_repeats}
    images = dict.fromkeys(ways, 0)
    seconds = dict.fromkeys(ways, 0.0)
    cpu = dict.fromkeys(ways, 0.0)  # this thread's CPU time: what a shared machine's load hides
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), max(1, chunk))]
    with torch_threads(threads):
        torch.manual_seed(seed)
        for fn in ways.values():  # first-call costs (imports, allocations) out of the figures
            for p in paths[:warmup]:
                fn(p)
        torch.manual_seed(seed)
        for part in tqdm(chunks, desc="load images 4 ways", unit="chunk", disable=not progress,
                         leave=False):
            for name, fn in ways.items():
                started, cpu_started = time.perf_counter(), time.thread_time()
                for _ in range(repeats[name]):
                    for p in part:
                        fn(p)
                seconds[name] += time.perf_counter() - started
                cpu[name] += time.thread_time() - cpu_started
                images[name] += repeats[name] * len(part)
        used = torch.get_num_threads()
    rate = {k: _rate(images[k], seconds[k]) for k in ways}
    cpu_rate = {k: _rate(images[k], cpu[k]) for k in ways}
    return {"paths": len(paths), "threads": used, "chunk": chunk, "warm_repeats": warm_repeats,
            "prepared_now": report.built if report else 0,
            "images": images, "seconds": seconds, "images_per_s": rate,
            "cpu_seconds": cpu, "images_per_cpu_s": cpu_rate,
            "ratio_c_over_b": rate["c_cache_on"] / rate["b_cache_off"],
            "ratio_c_over_a": rate["c_cache_on"] / rate["a_precache"],
            "ratio_b_over_a": rate["b_cache_off"] / rate["a_precache"],
            "ratio_cdataset_over_b": rate["c_dataset"] / rate["b_cache_off"],
            "cpu_ratio_c_over_b": cpu_rate["c_cache_on"] / cpu_rate["b_cache_off"],
            "cpu_ratio_c_over_a": cpu_rate["c_cache_on"] / cpu_rate["a_precache"],
            "cpu_ratio_cdataset_over_b": cpu_rate["c_dataset"] / cpu_rate["b_cache_off"],
            "load_1min": _load()[0]}


# --------------------------------------------------------------------------- part 2


def measure_prepare(paths, cache_root, workers: int, preprocess=None,
                    progress: bool = True) -> dict:
    """``DecodeCache.prepare`` of every path into an empty ``cache_root`` with ``workers``
    threads: seconds, images/s, bytes per entry (file size and allocated blocks)."""
    from handclip_nb.data.images import DecodeCache, DecodeGeometry

    cache = DecodeCache(DecodeGeometry.from_preprocess(preprocess or preprocess_config()),
                        cache_root)
    cpu_started = time.process_time()
    report = cache.prepare(list(map(str, paths)), workers=workers, progress=progress)
    cpu = time.process_time() - cpu_started
    entries = [cache.entry_path(p) for p in paths]
    allocated = sum(e.stat().st_blocks * 512 for e in entries)
    return {"workers": workers, "images": report.images, "built": report.built,
            "seconds": report.seconds, "images_per_s": _rate(report.built, report.seconds),
            "cpu_seconds": cpu, "images_per_cpu_s": _rate(report.built, cpu),
            "bytes": report.bytes, "entry_bytes": report.bytes / max(1, report.images),
            "entry_allocated_bytes": allocated / max(1, len(entries)),
            "load_1min": _load()[0]}


# --------------------------------------------------------------------------- part 3


def stage2_params(data_root, output_dir, decode_cache: bool, epochs: int, p_ids: int = 8,
                  k_images: int = 4, num_splits: int = 10, **kw):
    """Resolved stage-2 parameters for a timing run (``selection='last'``: no validation)."""
    from handclip_nb.params import resolve_params

    base = dict(data_root=str(data_root), output_dir=str(output_dir), backbone=BACKBONE,
                image_size=list(IMAGE_SIZE), epochs=epochs, warmup_epochs=1,
                milestones=[max(1, epochs)], p_ids=p_ids, k_images=k_images,
                num_splits=num_splits, num_workers=0, device="cpu", batch_size=32,
                feature_cache=False, decode_cache=bool(decode_cache), seed=SEED)
    base.update(kw)
    return resolve_params(base, stage="stage2")


def untrained_backbone(params):
    from handclip_nb.models import build_backbone

    return build_backbone(BACKBONE, image_size=params["image_size"], seed=params["seed"],
                          device="cpu")


def untrained_learner(backbone, protocol, params):
    """An untrained prompt learner over the protocol's fitted identities (stage 2 only reads
    its text features; their values do not change the time)."""
    from handclip_nb.models.prompts import PromptLearner

    learner = PromptLearner(backbone, num_classes=protocol.num_classes, aspect=params["aspect"],
                            seed=params["seed"])
    learner.identities = list(protocol.fit_people)
    return learner


def build_train_cache(params, protocol, backbone, progress: bool = True) -> dict:
    """Fill the run's default decode cache with the fit images, as ``train_batches`` would
    (``image_source(backbone.preprocess_config(), params)``), timed."""
    from handclip_nb.data.images import image_source

    source = image_source(backbone.preprocess_config(), params, train=True)
    report = source.prepare(protocol.paths(protocol.fit), progress=progress)
    return {"images": report.images, "built": report.built, "seconds": report.seconds,
            "images_per_s": _rate(report.built, report.seconds), "bytes": report.bytes,
            "cache": str(source.cache.folder)}


def steady_seconds(history) -> tuple[float, int]:
    """(mean seconds per epoch, epochs) over epochs 2..N, or all of them when N = 1."""
    rows = history[1:] or history
    return sum(float(h["seconds"]) for h in rows) / max(1, len(rows)), len(rows)


def measure_epoch(params, protocol, progress: bool = True, threads: int | None = 1) -> dict:
    """``train_stage2`` with ``params`` (an untrained tiny-vit and prompt learner), timed by
    epoch.  Returns the figures and, under ``"result"``, the Stage2Result (not for JSON)."""
    from handclip_nb.train.stage2 import train_stage2

    with torch_threads(threads):
        import torch

        backbone = untrained_backbone(params)
        learner = untrained_learner(backbone, protocol, params)
        cpu_marks = [time.process_time()]  # then one at the end of every epoch
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # one line per epoch; the bars stay
            res = train_stage2(params, params["output_dir"], protocol, backbone, learner,
                               callbacks=[lambda record: cpu_marks.append(time.process_time())],
                               progress=progress)
        wall = time.perf_counter() - started
        used = torch.get_num_threads()
    per_epoch, n = steady_seconds(res.fit.history)
    images = int(res.fit.history[-1]["images"]) if res.fit.history else 0
    # CPU seconds between the ends of consecutive epochs (an epoch and its checkpoint write);
    # with one epoch, from the call's start (model building included)
    cpu_epochs = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    cpu_steady = cpu_epochs[1:] or cpu_epochs
    cpu_per_epoch = sum(cpu_steady) / max(1, len(cpu_steady))
    return {"decode_cache": bool(params["decode_cache"]), "backbone": backbone.display_name,
            "image_size": list(params["image_size"]), "threads": used,
            "epochs": res.fit.epochs_run, "timed_epochs": n, "images_per_epoch": images,
            "seconds_per_epoch": per_epoch, "images_per_s": _rate(images, per_epoch),
            "cpu_seconds_per_epoch": cpu_per_epoch, "cpu_epoch_seconds": cpu_epochs,
            "epoch_seconds": [float(h["seconds"]) for h in res.fit.history],
            "losses": [float(h["loss"]["loss"]) for h in res.fit.history],
            "wall_s": wall, "load_1min": _load()[0], "result": res}


# --------------------------------------------------------------------------- part 4


def summary_difference(a: dict, b: dict) -> dict[str, float]:
    """Per metric, the largest absolute difference of two ``EvalResult.summary`` dicts (over
    the mean, the std and every split's value)."""
    out = {}
    for name in a:
        x, y = a[name], b[name]
        values = [abs(x["mean"] - y["mean"]), abs(x["std"] - y["std"])]
        values += [abs(u - v) for u, v in zip(x["per_split"], y["per_split"])]
        out[name] = max(values)
    return out


def _numbers(value, prefix: str = ""):
    """(dotted key, float) for every number in nested dicts / lists / objects with
    ``record()`` (e.g. ``EvalResult.verification``); other values are skipped."""
    if hasattr(value, "record") and callable(value.record):
        value = value.record()
    if isinstance(value, bool):
        yield prefix, float(value)
    elif isinstance(value, (int, float)):
        yield prefix, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{prefix}[{i}]")


def extras_difference(a, b) -> dict[str, float]:
    """Largest absolute difference of the test result's other metrics, where
    ``evaluate_backbone`` fills them: ``verification`` (its summary metrics; the ROC points are
    left out, their count follows the distinct distances) and ``open_set``.  NaN on both sides
    counts as equal; a number on one side only makes the difference NaN."""
    out = {}
    for name in ("verification", "open_set"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        if x is None and y is None:
            continue
        x, y = getattr(x, "summary", x), getattr(y, "summary", y)
        xs, ys = dict(_numbers(x)), dict(_numbers(y))
        worst = 0.0
        for key in xs.keys() | ys.keys():
            u, v = xs.get(key), ys.get(key)
            if u is None or v is None:
                worst = math.nan
                break
            if not (math.isnan(u) and math.isnan(v)):
                worst = max(worst, abs(u - v))
        out[name] = worst
    return out


def compare_decodes(paths, preprocess=None, cache_root=None) -> dict:
    """Mean and max absolute pixel difference (0-255) between the reduced-scale and the full
    JPEG decode of ``paths`` at ``preprocess``'s geometry (through the decode cache at
    ``cache_root``, default the run's, so images already decoded are not decoded again)."""
    import numpy as np

    from handclip_nb.data.images import DecodeCache, DecodeGeometry

    pre = preprocess or preprocess_config()
    reduced = DecodeCache(DecodeGeometry.from_preprocess(pre, True), cache_root)
    full = DecodeCache(DecodeGeometry.from_preprocess(pre, False), cache_root)
    total, count, worst = 0.0, 0, 0
    for p in paths:
        d = np.abs(np.asarray(reduced.get(p), dtype=np.int16)
                   - np.asarray(full.get(p), dtype=np.int16))
        total += float(d.sum())
        count += d.size
        worst = max(worst, int(d.max()))
    return {"images": len(paths), "mean_abs": total / max(1, count), "max_abs": worst}


def measure_equality(backbone, protocol, params, progress: bool = True,
                     threads: int | None = 1) -> dict:
    """Part 4: ``evaluate_backbone`` three times -- decode cache on, off (reduced decode on
    both), and cache on with ``reduced_jpeg_decode`` off -- and the differences.
    (``progress`` is unused: the package's evaluation shows its bars itself.)"""
    from handclip_nb.data.images import image_source
    from handclip_nb.evaluate.features import extract_features
    from handclip_nb.evaluate.protocol_eval import evaluate_backbone, needed_indices

    variants = {"cache_on": dict(decode_cache=True, reduced_jpeg_decode=True),
                "cache_off": dict(decode_cache=False, reduced_jpeg_decode=True),
                "full_decode": dict(decode_cache=True, reduced_jpeg_decode=False)}
    results, seconds = {}, {}
    with torch_threads(threads):
        for name, change in variants.items():
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                results[name] = evaluate_backbone(backbone, protocol, {**params, **change})
            seconds[name] = time.perf_counter() - started
        splits = list(protocol.test) + ([protocol.selection] if protocol.selection else [])
        paths = protocol.paths(needed_indices(splits))
        pre = backbone.preprocess_config()
        feats = {name: extract_features(backbone, paths,
                                        image_source(pre, {**params, **variants[name]}),
                                        batch_size=params["batch_size"], device="cpu",
                                        num_workers=0, desc=f"features ({name})")
                 for name in ("cache_on", "full_decode")}
    cosine = (feats["cache_on"] * feats["full_decode"]).sum(dim=1)  # rows are L2-normalised
    cache_diff = summary_difference(results["cache_on"]["test"].summary,
                                    results["cache_off"]["test"].summary)
    reduced_diff = summary_difference(results["cache_on"]["test"].summary,
                                      results["full_decode"]["test"].summary)
    cache_extras = extras_difference(results["cache_on"]["test"], results["cache_off"]["test"])
    reduced_extras = extras_difference(results["cache_on"]["test"],
                                       results["full_decode"]["test"])
    pixels = compare_decodes(paths, pre)  # the run's default cache: both decodes are in it
    return {"images": len(paths), "splits": len(protocol.test),
            "test": {k: {m: v["mean"] for m, v in r["test"].summary.items()}
                     for k, r in results.items()},
            "cache_on_vs_off": cache_diff,
            "cache_on_vs_off_other": cache_extras,
            "cache_identical": all(v == 0.0 for v in [*cache_diff.values(),
                                                      *cache_extras.values()]),
            "reduced_vs_full": reduced_diff, "reduced_vs_full_other": reduced_extras,
            "pixels": pixels,
            "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "seconds": seconds, "load_1min": _load()[0]}


# --------------------------------------------------------------------------- part 5


def cache_size_11k(handinfo, entry_bytes: float, block: int = BLOCK) -> dict | None:
    """The decode cache of every image of the real 11k ``HandInfo.csv``: its image count x
    ``entry_bytes`` (file sizes), and x ``entry_bytes`` rounded up to ``block``-byte blocks;
    None when the file is missing."""
    from handclip_nb.data.handinfo import read_handinfo

    handinfo = Path(handinfo)
    if not handinfo.is_file():
        return None
    n = len(read_handinfo(handinfo))
    rounded = math.ceil(entry_bytes / block) * block
    total, total_blocks = n * entry_bytes, n * rounded
    return {"handinfo": str(handinfo), "images": n, "entry_bytes": entry_bytes,
            "entry_bytes_in_blocks": rounded, "block": block,
            "bytes": total, "GB": total / 1e9, "GiB": total / 2**30,
            "bytes_in_blocks": total_blocks, "GB_in_blocks": total_blocks / 1e9,
            "GiB_in_blocks": total_blocks / 2**30}


# --------------------------------------------------------------------------- run


def _load() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [round(x, 2) for x in os.getloadavg()]


def run(workdir: Path, quick: bool = False, people: int | None = None,
        images: int | None = None, photo_size=PHOTO_SIZE, handinfo=DEFAULT_HANDINFO,
        threads: int | None = 1, loading: int | None = None, progress: bool = True,
        log=print) -> dict:
    """Everything ``main`` prints, as a dict (the smoke test calls this on tiny inputs);
    ``loading`` photos in part 1 (default by ``quick``)."""
    from handclip_nb.data import build_protocol
    from handclip_nb.device import available_cpus

    cfg = sizes(quick)
    people = people or cfg["people"]
    images = images or cfg["images"]
    workdir = Path(workdir)
    out: dict = {"people": people, "images_per_person_aspect": images,
                 "photo_size": list(photo_size), "image_size": list(IMAGE_SIZE),
                 "augment": dataclasses.asdict(stage2_augment())}

    t0 = time.perf_counter()
    root = make_dataset(workdir / "hands", people, images, photo_size, progress=progress)
    paths = photo_paths(root)
    out["photos"] = len(paths)
    out["generate_s"] = time.perf_counter() - t0
    log(f"synthetic hands: {people} people x 4 aspects x {images} photos = {len(paths)} photos "
        f"of {photo_size[0]}x{photo_size[1]} ({out['generate_s']:.0f} s to write)")

    # part 2 first: its 1-worker cache is part 1's warm cache
    cpus = available_cpus()
    prepare = []
    for workers in dict.fromkeys((1, cpus)):
        row = measure_prepare(paths, workdir / f"cache-{workers}w", workers, progress=progress)
        row["cores"] = cpus
        prepare.append(row)
        log(f"part 2: prepare, {workers} worker(s): {row['images']} images in "
            f"{row['seconds']:.1f} s = {row['images_per_s']:.1f} images/s")
    out["prepare"] = prepare

    sample = paths[:loading or cfg["loading"]]
    loading = measure_loading(sample, workdir / "cache-1w", chunk=cfg["chunk"],
                              warm_repeats=cfg["warm_repeats"], progress=progress)
    out["loading"] = loading
    log(f"part 1: (a) {loading['images_per_s']['a_precache']:.1f}, (b) "
        f"{loading['images_per_s']['b_cache_off']:.1f}, (c) "
        f"{loading['images_per_s']['c_cache_on']:.1f} images/s per core")

    with handclip_home(workdir / "home"):
        runs = workdir / "runs"
        common = dict(epochs=cfg["epochs"], p_ids=cfg["p_ids"], k_images=cfg["k_images"],
                      num_splits=cfg["num_splits"])
        p_off = stage2_params(root, runs / "cache-off", False, **common)
        p_on = stage2_params(root, runs / "cache-on", True, **common)
        protocol = build_protocol(p_off)
        epoch_off = measure_epoch(p_off, protocol, progress=progress, threads=threads)
        log(f"part 3: cache off {epoch_off['seconds_per_epoch']:.2f} s/epoch")
        with torch_threads(threads):
            built = build_train_cache(p_on, protocol, untrained_backbone(p_on),
                                      progress=progress)
        epoch_on = measure_epoch(p_on, protocol, progress=progress, threads=threads)
        log(f"part 3: cache on {epoch_on['seconds_per_epoch']:.2f} s/epoch "
            f"(cache built before: {built['built']} images in {built['seconds']:.1f} s)")
        trained = epoch_on.pop("result")
        epoch_off.pop("result")
        out["epoch"] = {"cache_off": epoch_off, "cache_on": epoch_on, "cache_build": built,
                        "ratio_off_over_on": epoch_off["seconds_per_epoch"]
                        / epoch_on["seconds_per_epoch"],
                        "cpu_ratio_off_over_on": epoch_off["cpu_seconds_per_epoch"]
                        / epoch_on["cpu_seconds_per_epoch"],
                        "loss_max_abs_diff": max(abs(a - b) for a, b in
                                                 zip(epoch_off["losses"], epoch_on["losses"])),
                        "fit_people": len(protocol.fit_people)}

        equality = measure_equality(trained.model.backbone, protocol, p_on, progress=progress,
                                    threads=threads)
        equality["model"] = f"{epoch_on['backbone']} + {epoch_on['epochs']} stage-2 epoch(s)"
        out["equality"] = equality
        log(f"part 4: cache on vs off identical: {equality['cache_identical']}")

    entry = prepare[0]["entry_bytes"]
    out["size_11k"] = cache_size_11k(handinfo, entry) if handinfo else None
    if out["size_11k"] is None:
        out["size_11k_note"] = f"{handinfo}: missing, part 5 skipped"
        log(f"part 5: {out['size_11k_note']}")
    return out


# --------------------------------------------------------------------------- report


LOADING_ROWS = (("a_precache", "(a) pre-cache: full decode + letterbox + augmentation"),
                ("b_cache_off", "(b) cache off: reduced-scale decode + resize + augmentation"),
                ("c_cache_on", "(c) cache on, warm: .npy read + augmentation"),
                ("c_dataset", "(c') cache on, via ImageListDataset(seed)[i] (an epoch's call)"))


def loading_table(r: dict) -> str:
    lines = [f"Part 1 - training-data images/s per core ({r['threads']} torch thread, no "
             f"workers; {r['paths']} photos, round-robin in chunks of {r['chunk']}; "
             f"load {r['load_1min']})", "",
             "| path | images | wall s | images/s (wall) | vs (a) | vs (b) | CPU s "
             "| images/CPU-s | vs (a) | vs (b) |", "|" + "---|" * 10]
    ips, cps = r["images_per_s"], r["images_per_cpu_s"]
    for key, label in LOADING_ROWS:
        lines.append(f"| {label} | {r['images'][key]} | {r['seconds'][key]:.2f} "
                     f"| {ips[key]:.1f} | {ips[key] / ips['a_precache']:.1f}× "
                     f"| {ips[key] / ips['b_cache_off']:.1f}× | {r['cpu_seconds'][key]:.2f} "
                     f"| {cps[key]:.1f} | {cps[key] / cps['a_precache']:.1f}× "
                     f"| {cps[key] / cps['b_cache_off']:.1f}× |")
    lines.append("")
    lines.append(f"wall: (c)/(b) = {r['ratio_c_over_b']:.1f}×   (c)/(a) = "
                 f"{r['ratio_c_over_a']:.1f}×   (b)/(a) = {r['ratio_b_over_a']:.1f}×   "
                 f"(c')/(b) = {r['ratio_cdataset_over_b']:.1f}×   [target (c)/(b) >= 10: "
                 f"{'met' if r['ratio_c_over_b'] >= 10 else 'NOT met'}]")
    lines.append(f"CPU time (this thread's; what the machine's load does not change): (c)/(b) = "
                 f"{r['cpu_ratio_c_over_b']:.1f}×   (c)/(a) = {r['cpu_ratio_c_over_a']:.1f}×   "
                 f"(c')/(b) = {r['cpu_ratio_cdataset_over_b']:.1f}×")
    return "\n".join(lines)


def prepare_table(rows) -> str:
    lines = ["Part 2 - building the cache (DecodeCache.prepare into an empty folder)", "",
             "| workers | images | wall s | images/s (wall) | CPU s | images/CPU-s | bytes/entry "
             "| allocated/entry | MiB in all | load (1 min) |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['workers']} of {r['cores']} cores | {r['images']} "
                     f"| {r['seconds']:.2f} | {r['images_per_s']:.1f} | {r['cpu_seconds']:.2f} "
                     f"| {r['images_per_cpu_s']:.1f} | {r['entry_bytes']:.0f} "
                     f"| {r['entry_allocated_bytes']:.0f} | {r['bytes'] / 2**20:.1f} "
                     f"| {r['load_1min']} |")
    if len(rows) > 1:
        lines += ["", f"speed-up with {rows[-1]['workers']} workers: "
                      f"{rows[-1]['images_per_s'] / rows[0]['images_per_s']:.2f}×"]
    return "\n".join(lines)


def epoch_table(e: dict) -> str:
    off, on, built = e["cache_off"], e["cache_on"], e["cache_build"]
    lines = [f"Part 3 - stage-2 epoch, {on['backbone']} at {on['image_size'][0]}×"
             f"{on['image_size'][1]}, num_workers 0, {on['threads']} torch thread(s), "
             f"{e['fit_people']} fitted people", "",
             "| decode_cache | images/epoch | s/epoch (epochs timed) | images/s | epoch seconds "
             "| CPU s/epoch | call wall s | load (1 min) |", "|" + "---|" * 8]
    for r in (off, on):
        lines.append(f"| {'on' if r['decode_cache'] else 'off'} | {r['images_per_epoch']} "
                     f"| {r['seconds_per_epoch']:.2f} ({r['timed_epochs']}) "
                     f"| {r['images_per_s']:.1f} "
                     f"| {', '.join(f'{s:.2f}' for s in r['epoch_seconds'])} "
                     f"| {r['cpu_seconds_per_epoch']:.2f} "
                     f"| {r['wall_s']:.1f} | {r['load_1min']} |")
    lines += ["", f"epoch off / on = {e['ratio_off_over_on']:.2f}× (CPU time "
                  f"{e['cpu_ratio_off_over_on']:.2f}×); cache built beforehand: "
                  f"{built['built']} of {built['images']} images in {built['seconds']:.2f} s "
                  f"({built['images_per_s']:.1f} images/s, all cores); largest loss difference "
                  f"off vs on {e['loss_max_abs_diff']:.3g}"]
    return "\n".join(lines)


def equality_table(q: dict) -> str:
    names = list(q["cache_on_vs_off"])
    lines = [f"Part 4 - evaluation ({q['model']}; {q['images']} test images, {q['splits']} "
             f"splits): max |difference| of each test metric (percent; mean, std and every split)",
             "", "| comparison | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1),
             "| decode_cache on vs off | "
             + " | ".join(f"{q['cache_on_vs_off'][n]:.3g}" for n in names) + " |",
             "| reduced_jpeg_decode on vs off | "
             + " | ".join(f"{q['reduced_vs_full'][n]:.3g}" for n in names) + " |", "",
             "| test means | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for k, row in q["test"].items():
        lines.append(f"| {k} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    px = q["pixels"]
    for key, label in (("cache_on_vs_off_other", "decode_cache on vs off"),
                       ("reduced_vs_full_other", "reduced_jpeg_decode on vs off")):
        if q.get(key):
            lines.append(f"{label}, other test records: " + ", ".join(
                f"{k} max |diff| {v:.3g}" for k, v in q[key].items()))
    lines += ["", f"cache on vs off identical (every metric): {q['cache_identical']}",
              f"reduced vs full decode: pixels |diff| mean {px['mean_abs']:.3f}, max "
              f"{px['max_abs']} (0-255, {px['images']} images); feature cosine min "
              f"{q['cosine_min']:.8f} (1 - min = {1 - q['cosine_min']:.2e}), mean "
              f"{q['cosine_mean']:.8f}",
              "evaluate_backbone seconds: " + ", ".join(f"{k} {v:.1f}"
                                                        for k, v in q["seconds"].items())]
    return "\n".join(lines)


def size_table(s: dict | None, note: str = "") -> str:
    if s is None:
        return f"Part 5 - 11k cache size: skipped ({note})"
    return "\n".join([
        f"Part 5 - decode cache of the whole 11k dataset at {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} "
        f"({s['handinfo']})", "",
        "| images | bytes/entry | total GB | total GiB | entry in 4 KiB blocks | "
        "total GB (blocks) | total GiB (blocks) |", "|" + "---|" * 7,
        f"| {s['images']} | {s['entry_bytes']:.0f} | {s['GB']:.3f} | {s['GiB']:.3f} "
        f"| {s['entry_bytes_in_blocks']} | {s['GB_in_blocks']:.3f} | {s['GiB_in_blocks']:.3f} |"])


def environment() -> dict:
    import PIL
    import numpy
    import torch

    from handclip_nb.device import available_cpus
    from handclip_nb.runs import git_commit

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = git_commit(REPO)
    return {"date": str(datetime.date.today()), "python": platform.python_version(),
            "torch": torch.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
            "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "available_cpus": available_cpus(), "commit": commit[:7] + commit[40:],
            "load_avg_start": _load()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (smoke run, ~1 min)")
    ap.add_argument("--people", type=int, default=None,
                    help="synthetic people (default 40, quick 12)")
    ap.add_argument("--images", type=int, default=None,
                    help="photos per person and aspect (default 6, quick 3)")
    ap.add_argument("--photo-size", default="1600x1200",
                    help="WIDTHxHEIGHT of the photos (default %(default)s, 11k's)")
    ap.add_argument("--handinfo", default=str(DEFAULT_HANDINFO),
                    help="the real 11k HandInfo.csv for part 5 (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in parts 3-4 (default 1; part 1 always uses 1)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = ap.parse_args(argv)
    photo = tuple(int(v) for v in args.photo_size.lower().split("x"))

    import random

    import numpy as np
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    env = environment()
    print(f"data benchmark  {env['date']}  python {env['python']}  torch {env['torch']}  "
          f"pillow {env['pillow']}  {env['machine']} ({env['cpu']})  cores "
          f"{env['available_cpus']}  commit {env['commit']}  load {env['load_avg_start']}  "
          f"{'QUICK' if args.quick else 'full'}\n")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="handclip-bench-data-") as tmp:
        res = run(Path(tmp), quick=args.quick, people=args.people, images=args.images,
                  photo_size=photo, handinfo=args.handinfo, threads=args.threads)
    env["total_s"] = time.perf_counter() - started
    env["load_avg_end"] = _load()
    print("\n" + loading_table(res["loading"]))
    print("\n" + prepare_table(res["prepare"]))
    print("\n" + epoch_table(res["epoch"]))
    print("\n" + equality_table(res["equality"]))
    print("\n" + size_table(res["size_11k"], res.get("size_11k_note", "")))
    print(f"\ntotal {env['total_s']:.0f} s; load average at the start {env['load_avg_start']}, "
          f"at the end {env['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, **res}, indent=2,
                                              default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
