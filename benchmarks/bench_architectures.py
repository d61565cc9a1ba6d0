"""Benchmark: the real CLIP image encoders (ViT-B/16, RN50) with RANDOM weights, at real input sizes.

A script that prints figures (not a test).  Run from the repository root:

    .venv/bin/python benchmarks/bench_architectures.py                  # CPU (+ GPU if present)
    .venv/bin/python benchmarks/bench_architectures.py --quick          # smoke run
    .venv/bin/python benchmarks/bench_architectures.py --json out.json

No CLIP weights are available offline, so every model here is ``clip.model.CLIP`` built with the
real ViT-B/16 or RN50 constructor arguments and *randomly initialised* (seed 0), wrapped in the
package's ``ClipBackbone`` with the label "random init (architecture benchmark only)".  Timings
depend on the architecture and input size, not on the weight values, so they stand for the
pretrained models' cost; the features themselves mean nothing.

For each architecture and input size (H x W: 224 x 288, the registry's default input size of the real
backbones, and 224 x 224) it measures

  extract  images/s of ``ClipBackbone.encode_image`` under ``torch.no_grad()`` in eval mode
           (what ``handclip_nb.evaluate.extract_features`` runs per batch);
  train    images/s of one training step of the image encoder: ``encode_image`` in train mode,
           a cosine classifier over 100 identities with label-smoothed CE, ``backward``, an
           ``AdamW`` step over the visual tower and the classifier (the text tower is frozen);
  memory   CPU: peak resident memory during the timed iterations above the resident memory of
           the built model (``ru_maxrss``, whose high-water mark is reset first through
           ``/proc/self/clear_refs`` on Linux), measured in a fresh subprocess per row;
           GPU: ``torch.cuda.max_memory_allocated`` during the timed iterations.

With CUDA, every row is also measured on the GPU in fp32 and with ``torch.autocast`` fp16
(with a ``GradScaler`` for training) and bf16, and the device name is printed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: ``clip.model.CLIP`` constructor arguments of OpenAI's releases (what ``clip.model.build_model``
#: reads out of ViT-B-16.pt and RN50.pt).
ARCHS: dict[str, dict] = {
    "vitb16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                   vision_patch_size=16, context_length=77, vocab_size=49408,
                   transformer_width=512, transformer_heads=8, transformer_layers=12),
    "rn50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, vocab_size=49408,
                 transformer_width=512, transformer_heads=8, transformer_layers=12),
}
WEIGHTS_LABEL = "random init (architecture benchmark only)"
NUM_CLASSES = 100
MODES = ("extract", "train")


def default_sizes() -> list[tuple[int, int]]:
    from handclip_nb.backbone_specs import get_backbone_spec

    return [tuple(get_backbone_spec("vitb16").default_image_size), (224, 224)]


# --------------------------------------------------------------------------- model


def build_random(arch: str, image_size, seed: int = 0):
    """A ``ClipBackbone`` around ``clip.model.CLIP(**ARCHS[arch])`` with random (seeded) weights."""
    import torch
    from clip.model import CLIP

    from handclip_nb.models.backbones import ClipBackbone

    kwargs = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**kwargs).float()
    bb = ClipBackbone(model, name=arch, pretrained=False, weights_label=WEIGHTS_LABEL, seed=seed,
                      arch=kwargs)
    bb.set_image_size(tuple(image_size))
    return bb


def describe(bb) -> str:
    """The row label: never mistakable for pretrained CLIP."""
    return f"{bb.name} ({WEIGHTS_LABEL}, seed {bb.seed})"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- memory


def _reset_cpu_peak() -> str:
    """Reset the process's resident high-water mark if the kernel allows it; the method name."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "ru_maxrss after clear_refs reset"
    except OSError:
        return "ru_maxrss delta (no reset: may under-count)"


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20  # macOS reports bytes


# --------------------------------------------------------------------------- one measurement


def measure(arch: str, image_size, mode: str, batch: int, iters: int, warmup: int = 1,
            device: str = "cpu", amp: str | None = None, seed: int = 0,
            threads: int | None = None) -> dict:
    """Time ``iters`` iterations (after ``warmup``) of ``mode`` and return one result row.

    Meant to run in a fresh process (see :func:`measure_in_subprocess`) so that the CPU memory
    figure covers this measurement only.
    """
    import torch
    import torch.nn.functional as F

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if amp not in (None, "fp16", "bf16"):
        raise ValueError(f"amp must be None, 'fp16' or 'bf16', got {amp!r}")
    dev = torch.device(device)
    if amp is not None and dev.type != "cuda":
        raise ValueError("autocast is measured on CUDA only")
    if threads:
        torch.set_num_threads(int(threads))
    bb = build_random(arch, image_size, seed).to(dev)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *image_size, generator=gen).to(dev)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(dev)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp else (
        lambda: torch.autocast(dev.type, enabled=False))

    if mode == "extract":
        bb.eval()

        def one():
            with torch.no_grad(), autocast():
                return bb.encode_image(images).global_embedding
    else:
        bb.train()
        bb.requires_grad_(False)
        bb.visual.requires_grad_(True)
        head = torch.nn.Linear(bb.embed_dim, NUM_CLASSES, bias=False).to(dev)
        params = [p for p in bb.visual.parameters()] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

        def one():
            opt.zero_grad(set_to_none=True)
            with autocast():
                feat = F.normalize(bb.encode_image(images).global_embedding.float(), dim=-1)
                logits = 30.0 * feat @ F.normalize(head.weight.float(), dim=-1).T
                loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # Memory baseline: the built model (and inputs) on the device, before any iteration; the
    # peak covers warmup and timed iterations, so "above model" includes activations, gradients
    # and the optimizer state (allocated by the first step).
    sync()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_mb = torch.cuda.memory_allocated(dev) / 2**20
        mem_method = "torch.cuda.max_memory_allocated"
    else:
        mem_method = _reset_cpu_peak()
        base_mb = _maxrss_mb()  # after a reset: the current resident size
    for _ in range(warmup):  # first calls allocate buffers / optimizer state, pick kernels
        one()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        one()
        sync()
        times.append(time.perf_counter() - t0)
    peak_mb = (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else _maxrss_mb()
    s_iter = statistics.median(times)
    return {
        "arch": arch, "model": describe(bb), "weights": WEIGHTS_LABEL, "pretrained": False,
        "image_size": list(image_size), "mode": mode, "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "precision": amp or "fp32", "batch": batch, "iters": iters, "warmup": warmup,
        "s_per_iter": s_iter, "images_per_s": batch / s_iter,
        "peak_mb": peak_mb, "model_mb": base_mb, "delta_mb": max(0.0, peak_mb - base_mb),
        "mem_method": mem_method, "threads": torch.get_num_threads(),
    }


def measure_in_subprocess(config: dict, timeout: float = 600) -> dict:
    """:func:`measure` in a fresh Python process (clean memory high-water mark)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {config}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- plan


def plan(quick: bool, archs, sizes, cuda: bool, threads: int | None = None) -> list[dict]:
    """The measurements to take: CPU rows, then (with CUDA) fp32 / fp16 / bf16 GPU rows."""
    rows = []
    for arch in archs:
        for size in sizes:
            for mode in MODES:
                if quick:
                    batch, iters = 2, 1
                else:
                    batch, iters = (8, 3) if mode == "extract" else (4, 3)
                rows.append(dict(arch=arch, image_size=list(size), mode=mode, batch=batch,
                                 iters=iters, warmup=1 if quick else 2, device="cpu", amp=None,
                                 threads=threads))
    if cuda:
        for arch in archs:
            for size in sizes:
                for mode in MODES:
                    batch = (64 if mode == "extract" else 32) if not quick else 8
                    iters = 3 if quick else 10
                    for amp in (None, "fp16", "bf16"):
                        rows.append(dict(arch=arch, image_size=list(size), mode=mode, batch=batch,
                                         iters=iters, warmup=2, device="cuda", amp=amp))
    return rows


def run(configs, subprocess_per_row: bool = True, log=print) -> list[dict]:
    results = []
    for cfg in configs:
        started = time.perf_counter()
        row = measure_in_subprocess(cfg) if subprocess_per_row else measure(**cfg)
        row["wall_s"] = time.perf_counter() - started
        row["load_1min"] = round(os.getloadavg()[0], 2)  # other jobs on the machine
        log(f"  {row['arch']:6s} {row['image_size'][0]}x{row['image_size'][1]} {row['mode']:7s} "
            f"{row['device']} {row['precision']:4s} batch {row['batch']:3d} threads {row['threads']}: "
            f"{row['images_per_s']:8.2f} images/s, peak {row['peak_mb']:.0f} MB "
            f"(+{row['delta_mb']:.0f}) [{row['wall_s']:.0f} s, load {row['load_1min']}]")
        results.append(row)
    return results


def table(results) -> str:
    lines = ["| model | input H×W | mode | device | precision | threads | batch | images/s "
             "| s/iter | peak MB | MB above model | load (1 min) |",
             "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['image_size'][0]}×{r['image_size'][1]} | {r['mode']} "
            f"| {r['device']} | {r['precision']} | {r['threads']} | {r['batch']} "
            f"| {r['images_per_s']:.2f} | {r['s_per_iter']:.3f} | {r['peak_mb']:.0f} "
            f"| {r['delta_mb']:.0f} | {r.get('load_1min', '')} |")
    return "\n".join(lines)


def environment() -> dict:
    import torch

    env = {
        "date": str(datetime.date.today()), "python": platform.python_version(),
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
    }
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: batch 2, one timed iteration, the default size only")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--sizes", nargs="+", default=None, metavar="HxW",
                    help="input sizes, e.g. 224x288 224x224 (default: both)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the GPU rows even with CUDA")
    ap.add_argument("--in-process", action="store_true",
                    help="measure in this process (faster; CPU memory figures then cover "
                         "everything run before)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for the CPU rows (default: torch's, one per "
                         "core; 1 is steadier on a shared, loaded machine)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.sizes] if args.sizes
             else default_sizes()[:1] if args.quick else default_sizes())
    cuda = torch.cuda.is_available() and not args.no_cuda
    env = environment()
    print(f"CLIP architecture benchmark  {env['date']}  python {env['python']}  torch {env['torch']}  "
          f"{env['machine']} ({env['cpu']})  cpus {env['cpus']}  torch threads {env['torch_threads']}  "
          f"load {env['load_avg']}")
    print(f"WEIGHTS: {WEIGHTS_LABEL} -- real ViT-B/16 / RN50 architectures with random weights; "
          f"timings only, no accuracy")
    print("GPU: " + (env["gpu"] if cuda else
                     "none (torch.cuda.is_available() is False): GPU figures not measured"
                     if not torch.cuda.is_available() else "skipped (--no-cuda)"))
    print(f"{'QUICK' if args.quick else 'full'} run; memory per row in a "
          f"{'fresh subprocess' if not args.in_process else 'shared process'}\n")
    started = time.perf_counter()
    results = run(plan(args.quick, args.archs, sizes, cuda, args.threads),
                  subprocess_per_row=not args.in_process)
    print()
    print(table(results))
    env["total_s"] = time.perf_counter() - started
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\ntotal {env['total_s']:.0f} s; load average at the end {env['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "weights": WEIGHTS_LABEL,
                                               "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
