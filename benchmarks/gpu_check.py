"""GPU check: one script for a lent GPU machine; one table printed, one JSON written.

Run it with ``make gpu-check`` (benchmarks/README.md, section "GPU check", gives the exact
command for the device tool), or here on the CPU as a smoke run:

    .venv/bin/python benchmarks/gpu_check.py --smoke --out outputs/gpu_check_smoke.json

Sections, in this order (each prints its elapsed time; a section that would start past
``--budget-s`` is skipped and says so, so the whole check stays under 8 minutes):

  cuda tests  ``pytest -m cuda`` over the test files that use the ``cuda`` marker, in a
              subprocess: passed / failed / skipped counts.
  parity      CPU vs GPU forward in fp32 (TF32 off) of the same random ViT-B/16 and RN50
              weights, a batch of 4: largest absolute difference of the global embeddings, that
              difference over the largest CPU value, and the smallest cosine; thresholds
              :data:`PARITY_MAX_RELATIVE` and :data:`PARITY_MIN_COSINE`.
  throughput  ViT-B/16 and RN50 at 224 x 288, batch 64: feature extraction (``encode_image``
              under ``no_grad``) and a stage-2 training step (``ReIDModel`` + ``reid_loss`` +
              Adam through the package's ``TrainLoop``), each in fp32 (TF32 on, as the runs'
              ``tf32`` default), fp16 autocast (with a GradScaler) and bf16 autocast; random
              batches already on the GPU, so the data loader is not what is timed; images/s over
              the timed iterations after warm-up, and the peak of ``max_memory_allocated``.
  checkpoint  seconds and bytes of one ``save_checkpoint`` of a stage-2 model (its trainable
              modules and Adam's state after a step), the median of 3.
  concurrency 1, 2, 4 and 8 ViT-B/16 stage-2 training runs at once on the one GPU (bf16,
              224 x 288, batch 64), each a process of its own capped at 1/K of the GPU's memory
              as ``--runs-per-gpu K`` caps it: aggregate images/s, the speed-up over one run,
              each run's peak memory, its start-up seconds; a K that runs out of memory says so.
  stages      stage 1 -> stage 2 -> stage 3 through ``train_stage1/2/3`` on synthetic 11k-layout
              photos of the real size (1600 x 1200), decode cache on, bf16, a few epochs: every
              epoch's loss finite and the last epoch's below the first; rank-1 / mAP of the
              stage-2 and stage-3 models on the test splits.
  projection  the wall time of clipfh-11k + clipfh-hd on this GPU for each measured K, from the
              figures above (``campaign.project``; benchmarks/README.md gives the formula and
              every assumption).

**Every model is untrained (random init)**: no CLIP weights exist offline.  ViT-B/16 and RN50
are OpenAI's architectures (``clip.model.CLIP`` with their constructor arguments, the ones
``bench_architectures.ARCHS`` holds) built from seed 0; timings depend on the architecture, not
the weight values; the rank-1 / mAP figures are those of models trained for seconds from
random weights on synthetic hands and mean nothing about CLIP.

``--smoke``: everything on the CPU with the tiny backbones (tiny-vit, tiny-rn) at 96 x 128,
small batches and photos, fp16 rows marked skipped (its GradScaler is CUDA only) and bf16 as
CPU autocast; CPU-vs-CPU "parity" (the code path only).  Under a minute here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO = BENCHMARKS_DIR.parent
sys.path.insert(0, str(REPO))  # the package from the source tree (the GPU machine installs none)
sys.path.insert(0, str(BENCHMARKS_DIR))  # the sibling benchmark scripts

try:
    with warnings.catch_warnings():  # openai-clip imports pkg_resources, which warns on import
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        import clip  # noqa: F401,E402 - first: the GPU machine has it only from the carried wheels
except ImportError as exc:  # pragma: no cover - only where the wheels were not installed
    raise SystemExit(f"gpu_check: cannot import openai-clip ({exc}); on the GPU machine run "
                     f"`make gpu-check` with .whl/ carried (benchmarks/README.md, 'GPU check')")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import campaign  # noqa: E402
from bench_architectures import ARCHS  # noqa: E402
from bench_training import throughput as steady_throughput  # noqa: E402
from handclip_nb.backbone_specs import (REAL_CLIP_IMAGE_SIZE, SMALL_IMAGE_SIZE,  # noqa: E402
                                        TINY_RN_ARCH, TINY_VIT_ARCH, get_backbone_spec)
from handclip_nb.checkpoint import save_checkpoint  # noqa: E402
from handclip_nb.data import build_protocol  # noqa: E402
from handclip_nb.device import (CPU_SHARE_ENV, GPU_SHARE_ENV, Precision,  # noqa: E402
                                configure_cuda, resolve_device)
from handclip_nb.models.backbones import ClipBackbone  # noqa: E402
from handclip_nb.models.clip_arch import build_arch  # noqa: E402
from handclip_nb.models.reid import ReIDModel  # noqa: E402
from handclip_nb.params import resolve_params  # noqa: E402
from handclip_nb.progress import tqdm  # noqa: E402
from handclip_nb.runs import git_commit, seed_everything  # noqa: E402
from handclip_nb.train.loop import TrainLoop  # noqa: E402
from handclip_nb.train.stage1 import train_stage1  # noqa: E402
from handclip_nb.train.stage2 import (evaluate_model, image_param_groups,  # noqa: E402
                                      reid_loss, train_stage2)
from handclip_nb.train.stage3 import evaluate_stage3, train_stage3  # noqa: E402

#: What every row says about the weights.
UNTRAINED = "untrained (random init)"
#: CPU-vs-GPU fp32 parity (TF32 off): max |gpu - cpu| / max |cpu| of the global embeddings ...
PARITY_MAX_RELATIVE = 1e-3
#: ... and the smallest cosine between a row's CPU and GPU embedding.
PARITY_MIN_COSINE = 0.99999
#: The marker the CUDA tests carry (pyproject.toml registers it).
CUDA_MARKER = "cuda"
SECTIONS = ("tests", "parity", "throughput", "checkpoint", "concurrency", "stages", "projection")
PRECISIONS = ("fp32", "fp16", "bf16")
MODES = ("extract", "train")
DEFAULT_BUDGET_S = 450.0
DEFAULT_OUT = REPO / "outputs" / "gpu_check.json"
JSON_SCHEMA = "handclip gpu_check/1"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Model:
    """A backbone architecture measured here: registry name, label, ``clip.model.CLIP`` kwargs."""

    name: str  # the registry entry (its preprocessing; a valid ``backbone`` parameter)
    label: str  # e.g. "ViT-B/16"
    arch: dict

    @property
    def described(self) -> str:
        return f"{self.label} {UNTRAINED}"


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the full one (a GPU) or the smoke one (this CPU)."""

    smoke: bool
    device: str
    models: tuple[Model, ...]
    image_size: tuple[int, int]
    batch: int
    warmup_iters: int
    timed_iters: int
    parity_batch: int
    stage_model: Model
    subjects: int
    images_per_subject: int
    photo_size: tuple[int, int]  # (width, height) of the synthetic JPEGs
    stage_epochs: dict = field(default_factory=dict)
    stage_lr: float = 1e-4
    p_ids: int = 8
    k_images: int = 4
    num_classes: int = 100  # identities of the throughput runs' classifier
    concurrency: tuple = (1, 2, 4, 8)  # runs at once on the one GPU
    # rough seconds per section, for the budget (measured figures replace them in the JSON)
    estimates: dict = field(default_factory=dict)


def full_plan() -> Plan:
    vit = Model("vitb16", "ViT-B/16", dict(ARCHS["vitb16"]))
    rn = Model("rn50", "RN50", dict(ARCHS["rn50"]))
    return Plan(smoke=False, device="cuda", models=(vit, rn), image_size=REAL_CLIP_IMAGE_SIZE,
                batch=64, warmup_iters=5, timed_iters=20, parity_batch=4, stage_model=vit,
                subjects=48, images_per_subject=4, photo_size=(1600, 1200),
                stage_epochs={"stage1": 10, "stage2": 5, "stage3": 5}, stage_lr=1e-4,
                estimates={"tests": 60, "parity": 20, "throughput": 90, "checkpoint": 10,
                           "concurrency": 80, "stages": 150, "projection": 1})


def smoke_plan() -> Plan:
    vit = Model("tiny-vit", "tiny-vit", dict(TINY_VIT_ARCH))
    rn = Model("tiny-rn", "tiny-rn", dict(TINY_RN_ARCH))
    return Plan(smoke=True, device="cpu", models=(vit, rn), image_size=SMALL_IMAGE_SIZE,
                batch=8, warmup_iters=1, timed_iters=2, parity_batch=2, stage_model=vit,
                subjects=12, images_per_subject=4, photo_size=(160, 120),
                stage_epochs={"stage1": 3, "stage2": 3, "stage3": 3}, stage_lr=1e-3,
                p_ids=4, k_images=2, num_classes=10, concurrency=(1, 2),
                estimates={"tests": 20, "parity": 2, "throughput": 10, "checkpoint": 2,
                           "concurrency": 40, "stages": 20, "projection": 1})


class Budget:
    """Seconds since the start, against ``budget_s``: a section starts only if its estimate fits."""

    def __init__(self, budget_s: float):
        self.budget_s = float(budget_s)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return self.remaining() >= estimate_s


# --------------------------------------------------------------------------- models


def random_backbone(model: Model, image_size, device="cpu", seed: int = 0) -> ClipBackbone:
    """``clip.model.CLIP(**model.arch)`` from ``seed`` (untrained), wrapped as the registry's
    ``model.name`` with that entry's preprocessing, adapted to ``image_size``, fp32, eval mode.

    The OpenAI entries (vitb16, rn50) of the registry build only from a weight file, which does
    not exist offline; their architecture with random weights is built here instead."""
    spec = get_backbone_spec(model.name)
    network = build_arch(model.arch, seed).float().eval()
    backbone = ClipBackbone(network, name=model.name, pretrained=False, weights_label="untrained",
                            seed=seed, arch=model.arch,
                            preprocess=spec.preprocess(tuple(image_size)))
    backbone.set_image_size(tuple(image_size))
    return backbone.to(device).eval()


def as_runs_use_it(backbone: ClipBackbone, device: torch.device) -> ClipBackbone:
    """Channels-last ResNet towers on CUDA, as ``backbone_from_params`` sets them up
    (``channels_last`` defaults to true)."""
    if device.type == "cuda":
        backbone.use_channels_last()
    return backbone


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def precision_of(name: str, device: torch.device) -> Precision:
    dtype = {"fp32": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    return Precision(device.type, enabled=name != "fp32", dtype=dtype)


@contextlib.contextmanager
def tf32_disabled():
    """fp32 matrix products and convolutions in full fp32 on CUDA for the block; restored after."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    configure_cuda(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def quiet():
    """Swallow the training loop's per-epoch lines (the check prints its own)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------- section: cuda tests


def cuda_test_files(tests_dir: Path = REPO / "tests") -> list[Path]:
    """The test files that use the ``cuda`` marker."""
    pattern = re.compile(rf"mark\.{CUDA_MARKER}\b")
    return sorted(p for p in tests_dir.glob("test_*.py") if pattern.search(p.read_text()))


def run_cuda_tests(timeout_s: float, workdir: Path, log=print) -> dict:
    """``pytest -m cuda`` over :func:`cuda_test_files` in a subprocess; counts from its JUnit
    XML.  Only those files are collected: the others import packages a GPU machine may lack."""
    files = cuda_test_files()
    report = workdir / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", CUDA_MARKER, "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", *[str(f.relative_to(REPO)) for f in files]]
    log("  " + " ".join(cmd[1:]))
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              timeout=max(10.0, timeout_s))
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = None
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += f"\n[gpu_check] pytest stopped after {timeout_s:.0f} s"
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    if report.is_file():
        root = ElementTree.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            for key, attr in (("tests", "tests"), ("failed", "failures"), ("errors", "errors"),
                              ("skipped", "skipped")):
                counts[key] += int(suite.get(attr, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failures.append(f"{case.get('classname')}::{case.get('name')}")
        counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    last_line = next((line for line in reversed(output.strip().splitlines()) if line.strip()), "")
    ok = returncode == 0 and counts["failed"] == 0 and counts["errors"] == 0
    return {"ok": ok, "returncode": returncode, "files": [str(f.relative_to(REPO)) for f in files],
            **counts, "failures": failures, "summary": last_line,
            "output_tail": output[-4000:], "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- section: parity


def measure_parity(model: Model, plan: Plan, device: torch.device, seed: int = 0) -> dict:
    """fp32 global embeddings of one batch on the CPU and on ``device`` (TF32 off), same weights."""
    reference = random_backbone(model, plan.image_size, "cpu", seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(plan.parity_batch, 3, *plan.image_size, generator=generator)
    with torch.no_grad(), tf32_disabled():
        expected = reference.encode_image(images).global_embedding.float()
        tested = as_runs_use_it(copy.deepcopy(reference).to(device), device)
        actual = tested.encode_image(images.to(device)).global_embedding.float().cpu()
    max_abs = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    relative = max_abs / scale if scale > 0 else float("inf")
    min_cos = float(F.cosine_similarity(actual, expected, dim=1).min())
    ok = relative <= PARITY_MAX_RELATIVE and min_cos >= PARITY_MIN_COSINE
    del reference, tested
    free_memory(device)
    return {"model": model.described, "arch": model.name, "devices": f"cpu vs {device.type}",
            "channels_last": bool(device.type == "cuda" and "rn" in model.name),
            "batch": plan.parity_batch, "image_size": list(plan.image_size),
            "max_abs_diff": max_abs, "max_abs_cpu": scale, "relative_diff": relative,
            "min_cosine": min_cos, "max_relative_allowed": PARITY_MAX_RELATIVE,
            "min_cosine_allowed": PARITY_MIN_COSINE, "ok": ok}


# --------------------------------------------------------------------------- section: throughput


def stage2_params(model: Model, device: torch.device, **values):
    """Stage 2's resolved parameters (its defaults: loss weights, classifier, grad clip ...)."""
    return resolve_params({"backbone": model.name, "device": device.type, **values},
                          stage="stage2")


def measure_extraction(backbone, images, precision: Precision, plan: Plan,
                       device: torch.device) -> float:
    """Seconds of ``plan.timed_iters`` batches of ``encode_image`` under ``no_grad`` (after warm-up)."""
    backbone.eval()

    def one_batch():
        with torch.no_grad(), precision.autocast():
            return backbone.encode_image(images).global_embedding

    for _ in range(plan.warmup_iters):
        one_batch()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(plan.timed_iters):
        one_batch()
    synchronize(device)
    return time.perf_counter() - started


def measure_training(backbone, images, labels, precision: Precision, plan: Plan, model: Model,
                     device: torch.device, workdir: Path, barrier=None,
                     clock: dict | None = None) -> tuple[float, float]:
    """(seconds of ``plan.timed_iters`` stage-2 training steps after warm-up, the epoch's mean
    loss) through the package's :class:`TrainLoop`: zero_grad, autocast forward of ``ReIDModel``
    and ``reid_loss`` (ID + triplet + image-to-text CE against random text features), scaled
    backward for fp16, gradient clipping, Adam step. ``barrier``: called after the warm-up,
    before the clock starts (the concurrency section's runs start their timed steps
    together); ``clock`` gets the wall-clock stamps ``start_wall`` / ``end_wall``."""
    params = stage2_params(model, device)
    backbone.requires_grad_(False)
    backbone.visual.requires_grad_(True)
    reid = ReIDModel(backbone, plan.num_classes, params["classifier"],
                     triplet_features=params["triplet_features"]).to(device)
    modules = reid.trainable_modules()
    optimizer = torch.optim.Adam(image_param_groups(modules, params))
    generator = torch.Generator().manual_seed(1)
    text_all = F.normalize(torch.randn(plan.num_classes, backbone.embed_dim, generator=generator),
                           dim=-1).to(device)
    logit_scale = backbone.logit_scale.exp().detach()
    clock = {} if clock is None else clock

    def batches(epoch: int):
        for index in range(plan.warmup_iters + plan.timed_iters):
            if index == plan.warmup_iters:
                synchronize(device)
                if barrier is not None:
                    barrier()
                clock["start"], clock["start_wall"] = time.perf_counter(), time.time()
            yield images, labels
        synchronize(device)
        clock["end"], clock["end_wall"] = time.perf_counter(), time.time()

    def step(batch):
        batch_images, targets = batch
        feats, out = reid(batch_images, targets)
        return reid_loss(out, feats, targets, params, text_all, logit_scale)

    loop = TrainLoop(stage="stage2", output_dir=workdir, modules=modules, optimizer=optimizer,
                     scheduler=None, step=step, batches=batches,
                     grad_clip=params["grad_clip"] or None, device=device, precision=precision,
                     params=dict(params), progress=False)
    with quiet():
        fit = loop.fit(1)
    master_dtypes = {str(p.dtype) for g in optimizer.param_groups for p in g["params"]}
    if master_dtypes != {"torch.float32"}:
        raise AssertionError(f"{precision.describe()}: master weights are {master_dtypes}")
    shutil.rmtree(workdir, ignore_errors=True)  # last.pt of the visual tower and Adam's moments
    return clock["end"] - clock["start"], float(fit.history[-1]["loss"]["loss"])


def measure_throughput(model: Model, template: ClipBackbone, mode: str, precision_name: str,
                       plan: Plan, device: torch.device, workdir: Path) -> dict:
    """One row: images/s and peak device memory of ``mode`` in ``precision_name``."""
    row = {"model": model.described, "arch": model.name, "mode": mode,
           "precision": precision_name, "device": device.type, "batch": plan.batch,
           "image_size": list(plan.image_size), "warmup_iters": plan.warmup_iters,
           "timed_iters": plan.timed_iters}
    if precision_name == "fp16" and device.type != "cuda":
        return {**row, "skipped": "fp16 autocast with a GradScaler is CUDA only"}
    precision = precision_of(precision_name, device)
    backbone = as_runs_use_it(copy.deepcopy(template).to(device), device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(plan.batch, 3, *plan.image_size, generator=generator).to(device)
    identities = torch.randperm(plan.num_classes, generator=generator)[:plan.batch // plan.k_images]
    labels = identities.repeat_interleave(plan.k_images).to(device)  # P x K: triplets have positives
    synchronize(device)
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        row["model_gib"] = torch.cuda.memory_allocated(device) / 2**30
    loss = None
    if mode == "extract":
        seconds = measure_extraction(backbone, images, precision, plan, device)
    else:
        seconds, loss = measure_training(backbone, images, labels, precision, plan, model,
                                         device, workdir / f"{model.name}-{precision_name}")
    row.update(images_per_s=plan.batch * plan.timed_iters / seconds,
               s_per_iter=seconds / plan.timed_iters, precision_described=precision.describe(),
               channels_last=bool(backbone.channels_last))
    if loss is not None:
        row.update(loss=loss, loss_finite=math.isfinite(loss))
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del backbone, images, labels
    free_memory(device)
    return row


# --------------------------------------------------------------------------- section: checkpoint


def measure_checkpoint(plan: Plan, device: torch.device, workdir: Path, repeats: int = 3) -> dict:
    """Seconds and bytes of ``save_checkpoint`` of a stage-2 model as the training loop saves
    it: the trainable modules' state dicts and Adam's state after one step (both moments),
    written to ``workdir`` (this machine's local disk); the median of ``repeats``."""
    model = plan.stage_model
    params = stage2_params(model, device)
    backbone = as_runs_use_it(random_backbone(model, plan.image_size, device), device)
    backbone.requires_grad_(False)
    backbone.visual.requires_grad_(True)
    reid = ReIDModel(backbone, plan.num_classes, params["classifier"],
                     triplet_features=params["triplet_features"]).to(device)
    modules = reid.trainable_modules()
    optimizer = torch.optim.Adam(image_param_groups(modules, params))
    for group in optimizer.param_groups:  # one step: Adam's two moments exist, as in a run
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    workdir.mkdir(parents=True, exist_ok=True)
    seconds, size = [], 0
    for index in range(repeats):
        path = workdir / f"checkpoint-{index}.pt"
        synchronize(device)
        started = time.perf_counter()
        save_checkpoint(path, stage="stage2", epoch=1,
                        model={name: module.state_dict() for name, module in modules.items()},
                        optimizer=optimizer, params=dict(params))
        seconds.append(time.perf_counter() - started)
        size = path.stat().st_size
        path.unlink()
    del reid, backbone, optimizer, modules
    free_memory(device)
    return {"model": model.described, "arch": model.name, "trainable_parameters": trainable,
            "bytes": size, "seconds": sorted(seconds)[len(seconds) // 2], "all_seconds": seconds,
            "repeats": repeats, "mb_per_s": size / 1e6 / max(1e-9, sorted(seconds)[len(seconds) // 2])}


# --------------------------------------------------------------------------- section: concurrency


#: How long a concurrency worker waits for the others to be ready before it gives up.
BARRIER_TIMEOUT_S = 240.0


def concurrency_worker(spec_path: Path) -> int:
    """One of K concurrent runs (``--concurrency-worker SPEC``): build the stage-2 ViT-B/16 on
    the GPU (capped at its memory share by ``resolve_device``), warm up, wait until every run
    is warm, then time ``plan.timed_iters`` bf16 training steps; its figures go to
    ``spec["out"]`` (an error too: an out-of-memory run must not hang the others)."""
    imported = time.time()
    spec = json.loads(Path(spec_path).read_text())
    ready_dir = Path(spec["ready_dir"])
    record = {"index": spec["index"], "k": spec["k"], "launched": spec["launched"],
              "imported_s": imported - spec["launched"]}

    def arrive(tag: str) -> None:
        (ready_dir / f"{spec['index']}.{tag}").write_text("")

    def barrier() -> None:
        record["ready_s"] = time.time() - spec["launched"]
        arrive("ready")
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while len(list(ready_dir.iterdir())) < spec["k"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the other runs were not ready in {BARRIER_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    try:
        plan = smoke_plan() if spec["smoke"] else full_plan()
        device = resolve_device(plan.device)  # applies HANDCLIP_GPU_MEMORY_FRACTION
        seed_everything(0, deterministic=False)  # as the campaign grids run (deterministic false)
        if device.type == "cuda":
            configure_cuda(True)
            torch.cuda.reset_peak_memory_stats(device)
        model = plan.stage_model
        backbone = as_runs_use_it(random_backbone(model, plan.image_size, device), device)
        generator = torch.Generator().manual_seed(spec["index"])
        images = torch.randn(plan.batch, 3, *plan.image_size, generator=generator).to(device)
        identities = torch.randperm(plan.num_classes, generator=generator)[
            :plan.batch // plan.k_images]
        labels = identities.repeat_interleave(plan.k_images).to(device)
        record["built_s"] = time.time() - spec["launched"]
        clock: dict = {}
        seconds, loss = measure_training(backbone, images, labels, precision_of("bf16", device),
                                         plan, model, device, Path(spec["workdir"]),
                                         barrier=barrier, clock=clock)
        record.update(seconds=seconds, start_wall=clock["start_wall"],
                      end_wall=clock["end_wall"], images=plan.batch * plan.timed_iters,
                      images_per_s=plan.batch * plan.timed_iters / seconds, loss=loss,
                      memory_fraction=os.environ.get(GPU_SHARE_ENV) or None)
        if device.type == "cuda":
            record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as exc:  # noqa: BLE001 - recorded; the parent reports it
        out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
        record.update(error=repr(exc)[:500], out_of_memory=bool(out_of_memory))
        if "ready_s" not in record:
            arrive("failed")  # counted as arrived: the others time without this run
    Path(spec["out"]).write_text(json.dumps(record, default=str))
    return 0 if "error" not in record else 1


def measure_concurrency(k: int, plan: Plan, workdir: Path, timeout_s: float) -> dict:
    """K :func:`concurrency_worker` processes at once, each with its share of the GPU's memory
    (1/K, as ``--runs-per-gpu K`` gives it) and of the cores; the aggregate images/s of their
    timed steps (all images over the span from the first start to the last end)."""
    folder = workdir / f"k{k}"
    ready_dir = folder / "ready"
    ready_dir.mkdir(parents=True, exist_ok=True)
    cores = max(1, (os.cpu_count() or 1) // k)
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), CPU_SHARE_ENV: str(cores),
           "PYTHONUNBUFFERED": "1"}
    env.pop(GPU_SHARE_ENV, None)
    if k > 1 and not plan.smoke:
        env[GPU_SHARE_ENV] = repr(1.0 / k)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    workers = []
    for index in range(k):
        spec = {"index": index, "k": k, "smoke": plan.smoke, "ready_dir": str(ready_dir),
                "workdir": str(folder / f"run{index}"), "out": str(folder / f"{index}.json"),
                "launched": time.time()}
        spec_path = folder / f"{index}.spec.json"
        spec_path.write_text(json.dumps(spec))
        log = open(folder / f"{index}.log", "w")
        workers.append((subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                          "--concurrency-worker", str(spec_path)],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT),
                        log, index))
    deadline = time.monotonic() + max(10.0, timeout_s)
    for process, log, _ in workers:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    runs = []
    for _, _, index in workers:
        out = folder / f"{index}.json"
        if out.is_file():
            runs.append(json.loads(out.read_text()))
        else:
            tail = (folder / f"{index}.log").read_text()[-500:]
            runs.append({"index": index, "error": f"no result (killed at the time limit?): "
                                                  f"{tail}"})
    done = [r for r in runs if "error" not in r]
    row = {"k": k, "model": plan.stage_model.described, "precision": "bf16",
           "batch": plan.batch, "image_size": list(plan.image_size),
           "timed_iters": plan.timed_iters, "memory_fraction": env.get(GPU_SHARE_ENV),
           "cores_per_run": cores, "runs": runs, "completed": len(done),
           "out_of_memory": sum(bool(r.get("out_of_memory")) for r in runs)}
    if done:
        span = max(r["end_wall"] for r in done) - min(r["start_wall"] for r in done)
        row.update(aggregate_images_per_s=sum(r["images"] for r in done) / span,
                   per_run_images_per_s=sum(r["images_per_s"] for r in done) / len(done),
                   start_up_s=sum(r["ready_s"] for r in done) / len(done))
        peaks = [r["peak_gib"] for r in done if "peak_gib" in r]
        if peaks:
            row.update(peak_gib_per_run=max(peaks), peak_gib_total=sum(peaks))
    return row


# --------------------------------------------------------------------------- section: projection


#: A run's fixed cost outside the worker's own start-up: the papermill kernel's start, the
#: notebook's imports and parameters cell, the protocol and the loaders. Assumed from this
#: CPU: a tiny-vit stage-1 grid run of 2 epochs takes 18-20 s end to end here
#: (tests/test_runs_per_gpu.py), nearly all of it that fixed cost.
NOTEBOOK_OVERHEAD_S = 20.0
#: Photos decoded per CPU-second into the decoded-image cache (benchmarks/README.md, "Decoded-
#: image cache on real-size photos", part 2: ~95 on this CPU), times 8 loader workers.
DECODE_PHOTOS_PER_S = 95.0 * 8
#: Photos the campaign decodes once: every 11k photo and every HD photo.
CAMPAIGN_PHOTOS = sum(campaign.DATASET_PHOTOS.values())


def projection_inputs(sections: dict, plan: Plan) -> campaign.Measurements:
    """:class:`campaign.Measurements` from the sections that ran: each figure from its row,
    each missing one named in ``assumed``. The smoke run's tiny-vit / tiny-rn stand for
    ViT-B/16 / RN50 (its figures mean nothing for the GPU)."""
    names = {plan.models[0].name: "vitb16", plan.models[1].name: "rn50"}
    m = campaign.Measurements()
    rows = [r for r in sections.get("throughput", {}).get("rows", [])
            if r.get("precision") == "bf16" and "images_per_s" in r]
    for row in rows:
        backbone = names.get(row["arch"])
        if row["mode"] == "extract":
            m.extract_images_s[backbone] = row["images_per_s"]
        else:
            m.train_images_s[("stage2", backbone)] = row["images_per_s"]
    missing = [b for b in ("vitb16", "rn50") if b not in m.extract_images_s
               or ("stage2", b) not in m.train_images_s]
    if missing:
        raise ValueError(f"no bf16 throughput rows for {', '.join(missing)}: the projection "
                         f"needs the throughput section")
    stages = {r["stage"]: r for r in sections.get("stages", {}).get("runs", [])}
    if "stage1" in stages:
        m.train_images_s[("stage1", "vitb16")] = stages["stage1"]["images_per_s"]
    else:
        m.train_images_s[("stage1", "vitb16")] = m.extract_images_s["vitb16"]
        m.assumed.append("stage 1 (prompt learning on cached features) at the ViT-B/16 "
                         "extraction rate: the stages section did not run")
    # both CLIP models have the same text transformer (width 512, 12 layers), which is what
    # stage 1 trains through
    m.train_images_s[("stage1", "rn50")] = m.train_images_s[("stage1", "vitb16")]
    m.assumed.append("stage 1 of RN50 at ViT-B/16's rate (the same text encoder does the work)")
    if "stage3" in stages and "stage2" in stages:
        ratio = stages["stage3"]["images_per_s"] / stages["stage2"]["images_per_s"]
    else:
        ratio = 1.0
        m.assumed.append("stage 3 at stage 2's rate: the stages section did not measure both")
    for backbone in ("vitb16", "rn50"):
        m.train_images_s[("stage3", backbone)] = m.train_images_s[("stage2", backbone)] * ratio
    m.assumed.append(f"stage 3 / stage 2 speed {ratio:.2f} (ViT-B/16, stages section) for RN50 "
                     f"too")
    for backbone in ("vitb16", "rn50"):
        m.train_images_s[("handid", backbone)] = m.train_images_s[("stage2", backbone)]
    m.assumed.append("CLIP-HandID at stage 2's rate: the same image tower forward and backward; "
                     "its text encoder runs forward only in the reference recipe (the released "
                     "behaviour, no gradient to the inversion MLP)")
    base = None
    for row in sections.get("concurrency", {}).get("rows", []):
        if row.get("completed") == row["k"] and not row.get("out_of_memory"):
            if row["k"] == 1:
                base = row["aggregate_images_per_s"]
                m.start_up_s = row["start_up_s"] + NOTEBOOK_OVERHEAD_S
            if base:
                m.speedup[row["k"]] = row["aggregate_images_per_s"] / base
    if base is None:
        m.start_up_s = NOTEBOOK_OVERHEAD_S
        m.assumed.append("no concurrency row for one run: start-up without the model's build "
                         "and warm-up")
    m.speedup[1] = 1.0
    m.assumed.append(f"every run's speed-up with K runs per GPU is ViT-B/16 stage 2's "
                     f"(concurrency section); plus {NOTEBOOK_OVERHEAD_S:.0f} s of notebook "
                     f"start per run (assumed from this CPU)")
    checkpoint = sections.get("checkpoint", {})
    if "seconds" in checkpoint.get("result", {}):
        m.checkpoint_s = checkpoint["result"]["seconds"]
    else:
        m.assumed.append("checkpoints free: the checkpoint section did not run")
    m.assumed.append("stage 3's checkpoint costs stage 2's (the ViT-B/16 one measured) and "
                     "RN50's too, and CLIP-HandID's; the schema's checkpoint defaults")
    m.decode_once_s = CAMPAIGN_PHOTOS / DECODE_PHOTOS_PER_S
    m.assumed.append(f"the decoded-image cache filled once, {CAMPAIGN_PHOTOS} photos at "
                     f"{DECODE_PHOTOS_PER_S:.0f}/s (8 workers at this CPU's rate)")
    m.compile_s = 0.0
    m.assumed.append("no torch.compile (the grids leave compile false)")
    return m


def project_campaign(sections: dict, plan: Plan) -> dict:
    """The campaign's projected wall time for every K the concurrency section measured."""
    m = projection_inputs(sections, plan)
    runs = campaign.campaign_runs()
    rows = [campaign.project(runs, m, k) for k in sorted(m.speedup)]
    return {"measurements": {"train_images_s": {f"{s}/{b}": v for (s, b), v
                                                in m.train_images_s.items()},
                             "extract_images_s": m.extract_images_s, "speedup": m.speedup,
                             "start_up_s": m.start_up_s, "checkpoint_s": m.checkpoint_s,
                             "decode_once_s": m.decode_once_s, "compile_s": m.compile_s},
            "assumed": m.assumed, "rows": rows,
            "best": min(rows, key=lambda r: r["wall_s"]) if rows else None}


# --------------------------------------------------------------------------- section: stages


def start_dataset(root: Path, plan: Plan) -> subprocess.Popen:
    """Generate the synthetic 11k-layout photos in a background process (the CPU works while
    the GPU sections run); :func:`wait_dataset` collects it."""
    root.mkdir(parents=True, exist_ok=True)
    width, height = plan.photo_size
    cmd = [sys.executable, "-m", "handclip_nb.data.synthetic", "--root", str(root),
           "--subjects", str(plan.subjects), "--images-per-subject", str(plan.images_per_subject),
           "--seed", "0", "--photo-size", f"{width}x{height}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log_file = open(root.parent / "synthetic.log", "w")
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    process.log_file = log_file  # closed by wait_dataset
    process.started = time.perf_counter()
    return process


def wait_dataset(process: subprocess.Popen, timeout_s: float) -> float:
    """Wait for :func:`start_dataset`'s process; its wall seconds (a failure raises)."""
    try:
        process.wait(timeout=max(1.0, timeout_s))
    finally:
        process.log_file.close()
    if process.returncode != 0:
        log = Path(process.log_file.name).read_text()[-2000:]
        raise RuntimeError(f"synthetic dataset generation failed ({process.returncode}):\n{log}")
    return time.perf_counter() - process.started


def stage_values(plan: Plan, data_root: Path, device: torch.device) -> dict:
    """What the three stages share: the generated photos, the random-init backbone at its
    size, decode cache on (and no feature cache: every run computes fresh features), bf16."""
    return dict(dataset="11k", data_root=str(data_root), aspect="dorsal_r",
                backbone=plan.stage_model.name, image_size=list(plan.image_size),
                device=device.type, num_splits=2, seed=0, batch_size=64, decode_cache=True,
                feature_cache=False, amp=True, amp_dtype="bfloat16", tf32=True,
                channels_last=True, selection="last",
                # no warm-up: every epoch at the full lr, so "the last epoch's loss is below the
                # first's" compares like with like (a warm-up epoch at 0.1 x lr can end lower)
                warmup_epochs=0)


def loss_record(stage: str, fit, wall_s: float) -> dict:
    """Per-epoch losses of a ``FitResult``, the finite / falling checks and its throughput."""
    losses = [float(h["loss"]["loss"]) for h in fit.history]
    images_per_s, images, seconds, epochs = steady_throughput(fit.history)
    return {"stage": stage, "losses": losses, "finite": all(map(math.isfinite, losses)),
            "falling": len(losses) >= 2 and losses[-1] < losses[0],
            "epochs": len(losses), "images_per_epoch": fit.history[-1]["images"] if fit.history else 0,
            "images_per_s": images_per_s, "seconds_per_epoch": fit.seconds_per_epoch,
            "wall_s": wall_s}


def run_stages(plan: Plan, data_root: Path, workdir: Path, device: torch.device,
               budget: Budget, log=print) -> dict:
    """Stage 1 -> 2 -> 3 on the photos under ``data_root``; stage 3 starts fresh from the same
    random init (a warm start needs a finished stage-2 run folder)."""
    common = stage_values(plan, data_root, device)
    model = plan.stage_model
    records, evaluation = [], {}

    def backbone():
        return as_runs_use_it(random_backbone(model, plan.image_size, device), device)

    if device.type == "cuda":
        configure_cuda(True)  # the runs' tf32 default, as backbone_from_params applies it
    p1 = resolve_params({**common, "epochs": plan.stage_epochs["stage1"],
                         "output_dir": str(workdir / "stage1")}, stage="stage1")
    protocol = build_protocol(p1)
    started = time.perf_counter()
    with quiet():
        first = train_stage1(p1, p1.output_dir, protocol, backbone(), progress=False)
    records.append(loss_record("stage1", first.fit, time.perf_counter() - started))
    log(f"  stage1: losses {_losses(records[-1])} ({records[-1]['wall_s']:.1f} s, "
        f"decode cache built for {len(protocol.fit)} fit images)")

    stage_common = dict(lr=plan.stage_lr, p_ids=plan.p_ids, k_images=plan.k_images,
                        random_erasing=0.0, milestones=[100])
    p2 = resolve_params({**common, **stage_common, "epochs": plan.stage_epochs["stage2"],
                         "output_dir": str(workdir / "stage2")}, stage="stage2")
    started = time.perf_counter()
    with quiet():
        second = train_stage2(p2, p2.output_dir, build_protocol(p2), backbone(), first.learner,
                              progress=False)
    records.append(loss_record("stage2", second.fit, time.perf_counter() - started))
    with quiet():
        result = evaluate_model(second.model, second.protocol, p2)["test"]
    evaluation["stage2"] = {"rank1": result.summary["rank1"]["mean"],
                            "mAP": result.summary["mAP"]["mean"]}
    log(f"  stage2: losses {_losses(records[-1])} ({records[-1]['wall_s']:.1f} s); test rank-1 "
        f"{evaluation['stage2']['rank1']:.1f} mAP {evaluation['stage2']['mAP']:.1f} "
        f"({UNTRAINED} start, synthetic)")
    del second
    free_memory(device)

    if not budget.allows(plan.estimates["stages"] / 3):
        log("  stage3: skipped (budget)")
        return {"runs": records, "evaluation": evaluation, "skipped": ["stage3 (budget)"]}
    p3 = resolve_params({**common, **stage_common, "lr_new": plan.stage_lr * 10,
                         "epochs": plan.stage_epochs["stage3"],
                         "output_dir": str(workdir / "stage3")}, stage="stage3")
    started = time.perf_counter()
    with quiet():
        third = train_stage3(p3, p3.output_dir, build_protocol(p3), backbone(), progress=False)
    records.append(loss_record("stage3", third.fit, time.perf_counter() - started))
    with quiet():
        result = evaluate_stage3(third.model, third.protocol, p3)["test"]
    evaluation["stage3"] = {"rank1": result.summary["rank1"]["mean"],
                            "mAP": result.summary["mAP"]["mean"]}
    log(f"  stage3: losses {_losses(records[-1])} ({records[-1]['wall_s']:.1f} s); test rank-1 "
        f"{evaluation['stage3']['rank1']:.1f} mAP {evaluation['stage3']['mAP']:.1f}")
    del third
    free_memory(device)
    return {"runs": records, "evaluation": evaluation, "skipped": []}


def _losses(record: dict) -> str:
    return " -> ".join(f"{v:.3f}" for v in record["losses"])


# --------------------------------------------------------------------------- report


def environment(plan: Plan) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "git_commit": git_commit(REPO), "cuda_available": torch.cuda.is_available(),
            "device": plan.device, "mode": "smoke" if plan.smoke else "full"}
    try:
        import torchvision  # here: only its version is recorded, nothing of it is used

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=properties.total_memory / 2**30,
                    compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def table_rows(result: dict) -> list[list[str]]:
    """(section, item, value, notes) rows of everything measured."""
    rows = []
    sections = result["sections"]
    tests = sections.get("tests", {})
    if "passed" in tests:
        rows.append(["cuda tests", "pytest -m cuda",
                     f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
                     f"errors, {tests['skipped']} skipped",
                     ("OK" if tests["ok"] else "FAILED") + f"; {', '.join(tests['files'])}"])
    for row in sections.get("parity", {}).get("rows", []):
        if "error" in row:
            rows.append(["parity", f"{row['model']} fp32", "error", row["error"]])
            continue
        rows.append(["parity", f"{row['model']} fp32 {row['devices']}",
                     f"max abs {row['max_abs_diff']:.2e} (rel {row['relative_diff']:.2e}), "
                     f"min cos {row['min_cosine']:.7f}",
                     ("OK" if row["ok"] else "FAILED") + f" (rel <= {row['max_relative_allowed']:g},"
                     f" cos >= {row['min_cosine_allowed']}; TF32 off; batch {row['batch']})"])
    for row in sections.get("throughput", {}).get("rows", []):
        item = f"{row['model']} {row['mode']} {row['precision']}"
        if "skipped" in row or "error" in row:
            rows.append(["throughput", item, "skipped" if "skipped" in row else "error",
                         row.get("skipped") or row["error"]])
            continue
        size = "×".join(map(str, row["image_size"]))
        notes = [f"batch {row['batch']}, {size}, {row['device']}"]
        if "peak_gib" in row:
            notes.append(f"peak {row['peak_gib']:.2f} GiB")
        if "loss" in row:
            notes.append(f"loss {row['loss']:.3f}")
        if row.get("channels_last"):
            notes.append("channels_last")
        rows.append(["throughput", item, f"{row['images_per_s']:.1f} images/s", "; ".join(notes)])
    checkpoint = sections.get("checkpoint", {}).get("result")
    if checkpoint:
        rows.append(["checkpoint", f"{checkpoint['model']} stage 2 save_checkpoint",
                     f"{checkpoint['seconds']:.2f} s",
                     f"{checkpoint['bytes'] / 1e6:.0f} MB, {checkpoint['mb_per_s']:.0f} MB/s; "
                     f"{checkpoint['trainable_parameters'] / 1e6:.1f} M trainable + Adam; "
                     f"median of {checkpoint['repeats']}"])
    for row in sections.get("concurrency", {}).get("rows", []):
        item = f"{row['k']} stage-2 run(s) at once"
        if "aggregate_images_per_s" not in row:
            errors = [r.get("error") for r in row.get("runs", []) if r.get("error")]
            rows.append(["concurrency", item, row.get("skipped") and "skipped" or "failed",
                         row.get("skipped") or row.get("error") or (errors[0][:200] if errors
                                                                     else "")])
            continue
        notes = [f"{row['completed']} of {row['k']} completed",
                 f"{row['per_run_images_per_s']:.1f} images/s per run",
                 f"start-up {row['start_up_s']:.1f} s"]
        if "peak_gib_per_run" in row:
            notes.append(f"peak {row['peak_gib_per_run']:.2f} GiB per run, "
                         f"{row['peak_gib_total']:.2f} in all")
        if row.get("out_of_memory"):
            notes.append(f"{row['out_of_memory']} out of memory")
        rows.append(["concurrency", item, f"{row['aggregate_images_per_s']:.1f} images/s",
                     "; ".join(notes)])
    for row in sections.get("projection", {}).get("rows", []):
        grids = ", ".join(f"{name} {g['wall_s'] / 3600:.2f} h"
                          for name, g in row["grids"].items())
        rows.append(["projection", f"clipfh-11k + clipfh-hd, {row['runs_per_gpu']} per GPU",
                     f"{row['wall_s'] / 3600:.2f} h",
                     f"{row['runs']} runs; GPU {row['gpu_s'] / 3600:.2f} h / speed-up "
                     f"{row['speedup']:.2f}; host {row['host_s'] / 3600:.2f} h / "
                     f"{row['runs_per_gpu']}; {grids}"])
    stages = sections.get("stages", {})
    if "dataset" in stages:
        data = stages["dataset"]
        rows.append(["stages", "synthetic 11k photos",
                     f"{data['photos']} photos {data['photo_size'][0]}×{data['photo_size'][1]}",
                     f"generated in {data['seconds']:.0f} s (background); decode cache on"])
    for run in stages.get("runs", []):
        verdict = "OK" if run["finite"] and run["falling"] else "FAILED"
        counted = "cached features/s" if run["stage"] == "stage1" else "images/s steady"
        rows.append(["stages", f"{run['stage']} {stages['model']}", _losses(run),
                     f"{verdict} (finite, last < first); {run['images_per_s']:.1f} {counted}; "
                     f"{run['seconds_per_epoch']:.1f} s/epoch"])
    for stage, metrics in stages.get("evaluation", {}).items():
        rows.append(["stages", f"{stage} test rank-1 / mAP",
                     f"{metrics['rank1']:.1f} / {metrics['mAP']:.1f} %",
                     f"{UNTRAINED} start, trained seconds on synthetic hands: means nothing"])
    for name, section in sections.items():
        status = section.get("status")
        if status and status != "ran":
            rows.append([name, "section", status, ""])
        elif "seconds" in section:
            rows.append([name, "elapsed", f"{section['seconds']:.1f} s", ""])
    return rows


def markdown_table(rows) -> str:
    lines = ["| section | item | value | notes |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def checks_of(result: dict) -> list[dict]:
    """Every pass/fail check of the sections that ran."""
    checks = []
    sections = result["sections"]
    tests = sections.get("tests", {})
    if "passed" in tests:
        checks.append({"name": "cuda tests", "ok": tests["ok"], "detail": tests["summary"]})
    for row in sections.get("parity", {}).get("rows", []):
        checks.append({"name": f"parity {row['arch']}", "ok": row["ok"],
                       "detail": row.get("error") or f"rel {row['relative_diff']:.2e}, "
                                                     f"cos {row['min_cosine']:.7f}"})
    for row in sections.get("throughput", {}).get("rows", []):
        if "error" in row:
            checks.append({"name": f"throughput {row['arch']} {row['mode']} {row['precision']} "
                                   f"ran", "ok": False, "detail": row["error"]})
        if "loss" in row:
            checks.append({"name": f"throughput {row['arch']} train {row['precision']} loss finite",
                           "ok": row["loss_finite"], "detail": f"{row['loss']}"})
    for row in sections.get("concurrency", {}).get("rows", []):
        if "skipped" in row:
            continue
        # running out of memory at a K is a finding (that K does not fit), not a failure
        failed = [r for r in row.get("runs", []) if r.get("error") and not r.get("out_of_memory")]
        checks.append({"name": f"concurrency {row['k']} ran", "ok": not failed and "error" not in row,
                       "detail": row.get("error") or (failed[0]["error"] if failed else
                                                      f"{row.get('completed')} of {row['k']}")})
    for run in sections.get("stages", {}).get("runs", []):
        checks.append({"name": f"{run['stage']} losses finite and falling",
                       "ok": run["finite"] and run["falling"], "detail": _losses(run)})
    for name, section in sections.items():
        if section.get("error"):
            checks.append({"name": f"{name} ran", "ok": False, "detail": section["error"]})
    return checks


# --------------------------------------------------------------------------- main


def run_check(plan: Plan, budget: Budget, workdir: Path, skip=(), log=print,
              save=lambda result: None, env: dict | None = None) -> dict:
    """Every section in order; the result dict that becomes the JSON (``save`` gets it after
    each section, so a run stopped at its time limit still leaves the sections it finished)."""
    device = torch.device(plan.device)
    result = {"schema": JSON_SCHEMA, "environment": env or environment(plan),
              "budget_s": budget.budget_s,
              "weights": f"{UNTRAINED}: real ViT-B/16 / RN50 architectures, seed 0"
              if not plan.smoke else f"{UNTRAINED}: tiny-vit / tiny-rn (smoke run)",
              "sections": {}}
    sections = result["sections"]
    data_root = workdir / "hands"
    dataset_process = None
    if "stages" not in skip and budget.allows(sum(plan.estimates.values())):
        # started first, so that the CPU renders photos while the GPU sections run
        dataset_process = start_dataset(data_root, plan)

    def section(name: str) -> bool:
        """Whether ``name`` runs; records why not."""
        if name in skip:
            sections[name] = {"status": "skipped (--skip)"}
            return False
        if not budget.allows(plan.estimates[name]):
            sections[name] = {"status": f"skipped (budget: {budget.remaining():.0f} s left of "
                                        f"{budget.budget_s:.0f}, needs ~{plan.estimates[name]} s)"}
            log(f"\n== {name}: {sections[name]['status']}")
            return False
        log(f"\n== {name} (at {budget.elapsed():.0f} s)")
        sections[name] = {"status": "ran"}
        return True

    def finish(name: str, started: float) -> None:
        sections[name]["seconds"] = time.perf_counter() - started
        log(f"  ({sections[name]['seconds']:.1f} s)")
        save(summarise(result, budget))

    if section("tests"):
        started = time.perf_counter()
        try:
            sections["tests"].update(run_cuda_tests(min(240.0, budget.remaining()), workdir, log))
            log(f"  {sections['tests']['summary']}")
        except Exception as exc:  # noqa: BLE001 - recorded; the JSON must still be written
            sections["tests"].update(error=repr(exc), ok=False)
            log(f"  error: {exc!r}")
        finish("tests", started)

    if section("parity"):
        started = time.perf_counter()
        sections["parity"]["rows"] = []
        for model in tqdm(plan.models, desc="parity", leave=False):
            try:
                row = measure_parity(model, plan, device)
                log(f"  {row['model']}: max abs {row['max_abs_diff']:.2e} rel "
                    f"{row['relative_diff']:.2e} min cos {row['min_cosine']:.7f} "
                    f"{'OK' if row['ok'] else 'FAILED'}")
            except Exception as exc:  # noqa: BLE001 - recorded as a failed row
                row = {"model": model.described, "arch": model.name, "error": repr(exc),
                       "ok": False}
                log(f"  {model.described}: error {exc!r}")
                free_memory(device)
            sections["parity"]["rows"].append(row)
        finish("parity", started)

    if section("throughput"):
        started = time.perf_counter()
        sections["throughput"].update(rows=[], tf32=device.type == "cuda",
                                      cudnn_deterministic=True)
        seed_everything(0)  # as every training run: cuDNN deterministic, no autotuning
        if device.type == "cuda":
            configure_cuda(True)  # the runs' tf32 default: "fp32" rows use TF32 matrix products
        configs = [(m, mode, p) for m in plan.models for mode in MODES for p in PRECISIONS]
        template = None
        for model, mode, precision_name in tqdm(configs, desc="throughput", leave=False):
            described = {"model": model.described, "arch": model.name, "mode": mode,
                         "precision": precision_name}
            if not budget.allows(5):
                sections["throughput"]["rows"].append({**described, "skipped": "budget"})
                continue
            try:
                if template is None or template.name != model.name:
                    template = None  # the previous architecture's weights go first
                    template = random_backbone(model, plan.image_size, "cpu")
                row = measure_throughput(model, template, mode, precision_name, plan, device,
                                         workdir / "throughput")
            except Exception as exc:  # noqa: BLE001 - recorded as a failed row
                row = {**described, "error": repr(exc)}
                free_memory(device)
            sections["throughput"]["rows"].append(row)
            if "skipped" in row or "error" in row:
                log(f"  {model.described} {mode} {precision_name}: "
                    f"{row.get('skipped') or 'error ' + row['error']}")
            else:
                peak = f", peak {row['peak_gib']:.2f} GiB" if "peak_gib" in row else ""
                log(f"  {model.described} {mode} {precision_name}: "
                    f"{row['images_per_s']:.1f} images/s{peak}")
        template = None
        free_memory(device)
        finish("throughput", started)

    if section("checkpoint"):
        started = time.perf_counter()
        try:
            sections["checkpoint"]["result"] = measure_checkpoint(plan, device,
                                                                  workdir / "checkpoint")
            done = sections["checkpoint"]["result"]
            log(f"  {done['model']}: {done['bytes'] / 1e6:.0f} MB in {done['seconds']:.2f} s "
                f"({done['mb_per_s']:.0f} MB/s)")
        except Exception as exc:  # noqa: BLE001 - recorded; the JSON must still be written
            sections["checkpoint"]["error"] = repr(exc)
            log(f"  error: {exc!r}")
            free_memory(device)
        finish("checkpoint", started)

    if section("concurrency"):
        started = time.perf_counter()
        sections["concurrency"]["rows"] = []
        for k in plan.concurrency:
            # a K's estimate: start-up plus K runs' steps; the whole section's share each
            if not budget.allows(plan.estimates["concurrency"] / len(plan.concurrency)):
                sections["concurrency"]["rows"].append({"k": k, "skipped": "budget"})
                log(f"  {k} at once: skipped (budget)")
                continue
            try:
                row = measure_concurrency(k, plan, workdir / "concurrency",
                                          timeout_s=min(180.0, budget.remaining()))
            except Exception as exc:  # noqa: BLE001 - recorded as a failed row
                row = {"k": k, "error": repr(exc)}
            sections["concurrency"]["rows"].append(row)
            if "aggregate_images_per_s" in row:
                peak = (f", peak {row['peak_gib_per_run']:.2f} GiB per run "
                        f"({row['peak_gib_total']:.2f} in all)" if "peak_gib_per_run" in row
                        else "")
                log(f"  {k} at once: {row['aggregate_images_per_s']:.1f} images/s in all, "
                    f"{row['completed']} of {k} completed{peak}")
            else:
                errors = [r.get("error") for r in row.get("runs", []) if r.get("error")]
                log(f"  {k} at once: {row.get('error') or (errors[0] if errors else '?')}")
        finish("concurrency", started)

    if section("stages"):
        started = time.perf_counter()
        sections["stages"]["model"] = plan.stage_model.described
        try:
            if dataset_process is None:  # the budget looked too short for it at the start
                dataset_process = start_dataset(data_root, plan)
            generation_s = wait_dataset(dataset_process, budget.remaining())
            photos = len(list((data_root / "Hands").glob("*.jpg")))
            sections["stages"]["dataset"] = {
                "photos": photos, "photo_size": list(plan.photo_size), "subjects": plan.subjects,
                "images_per_subject_and_aspect": plan.images_per_subject,
                "seconds": generation_s}
            log(f"  {photos} synthetic photos at {plan.photo_size[0]}x{plan.photo_size[1]} "
                f"(generated in {generation_s:.0f} s in the background)")
            sections["stages"].update(run_stages(plan, data_root, workdir / "runs", device,
                                                 budget, log))
        except Exception as exc:  # noqa: BLE001 - recorded; the JSON must still be written
            sections["stages"]["error"] = repr(exc)
            log(f"  error: {exc!r}")
        finish("stages", started)
    elif dataset_process is not None:
        dataset_process.kill()
        dataset_process.wait()
        dataset_process.log_file.close()

    if section("projection"):
        started = time.perf_counter()
        try:
            sections["projection"].update(project_campaign(sections, plan))
            for row in sections["projection"]["rows"]:
                log(f"  {row['runs_per_gpu']} run(s) per GPU: {row['wall_s'] / 3600:.2f} h "
                    f"(GPU {row['gpu_s'] / 3600:.2f} h / speed-up {row['speedup']:.2f}, host "
                    f"{row['host_s'] / 3600:.2f} h / {row['runs_per_gpu']}, decode "
                    f"{row['decode_once_s']:.0f} s)")
        except Exception as exc:  # noqa: BLE001 - recorded; the JSON must still be written
            sections["projection"]["error"] = repr(exc)
            log(f"  error: {exc!r}")
        finish("projection", started)
    return summarise(result, budget)


def summarise(result: dict, budget: Budget) -> dict:
    """``result`` with its checks, verdict, elapsed time and table filled in."""
    result["checks"] = checks_of(result)
    result["ok"] = bool(result["checks"]) and all(c["ok"] for c in result["checks"])
    result["elapsed_s"] = budget.elapsed()
    result["table"] = table_rows(result)
    return result


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="the JSON to write (default: %(default)s; on the device tool "
                             "$OUT/gpu_check.json comes back)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke run: tiny backbones, small sizes (under a minute)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="skip the sections that would start past this many seconds "
                             "(default %(default)s: the whole check under 8 minutes)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS,
                        help="sections not to run")
    parser.add_argument("--workdir", default=None,
                        help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--concurrency-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.concurrency_worker:  # one of the concurrency section's K runs
        return concurrency_worker(Path(args.concurrency_worker))

    plan = smoke_plan() if args.smoke else full_plan()
    if not plan.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); the full check "
              "needs a GPU. On this CPU: --smoke", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    previous_home = os.environ.get("HANDCLIP_HOME")
    os.environ["HANDCLIP_HOME"] = str(workdir)  # decode cache and default paths stay in workdir
    previous_threads = torch.get_num_threads()
    if plan.smoke:  # tiny tensors: more intra-op threads only add barrier waits on a busy CPU
        torch.set_num_threads(1)
    env = environment(plan)
    print(f"GPU check ({env['mode']})  {env['date']}  torch {env['torch']} (CUDA "
          f"{env['torch_cuda']}, cuDNN {env['cudnn']})  python {env['python']}  "
          f"commit {env['git_commit']}")
    print(f"device: {env.get('gpu', 'cpu')}; models: every one {UNTRAINED}; "
          f"budget {args.budget_s:.0f} s")
    out = Path(args.out)
    try:
        result = run_check(plan, budget, workdir, skip=set(args.skip), env=env,
                           save=lambda partial: write_json(partial, out))
    finally:
        torch.set_num_threads(previous_threads)
        if previous_home is None:
            os.environ.pop("HANDCLIP_HOME", None)
        else:
            os.environ["HANDCLIP_HOME"] = previous_home
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + markdown_table(result["table"]))
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    print(f"\n{'OK' if result['ok'] else 'FAILED'}: {len(result['checks']) - len(failed)} of "
          f"{len(result['checks'])} checks passed{'; failed: ' + ', '.join(failed) if failed else ''}"
          f"; {result['elapsed_s']:.0f} s in all")
    write_json(result, out)
    print(f"wrote {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
