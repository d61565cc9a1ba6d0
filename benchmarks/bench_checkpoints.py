"""Checkpoint cost: bytes written, file sizes and seconds per write of a real stage-2 run.

Two parts:

``run``    a stage-2 run (``train_stage2``, after a 1-epoch stage 1 for its prompts) of a
           random-weight ViT-B/16 loaded through the real weight path (an OpenAI-layout state
           dict saved to a ``.pt`` file and given as ``weights``) on the synthetic hands, for
           ``--epochs`` epochs (10) with the campaign's ``selection: last``. Every checkpoint
           the training loop writes is recorded (``TrainLoop._save`` wrapped: file, bytes,
           seconds from the state's copy to the renamed, fsynced file). ``--repo PATH`` runs
           the ``handclip_nb`` of another checkout (the commit before, for "before" figures);
           the checkpoint parameters are passed only where its schema has them.
           What shrinks the run and not the byte counts: the input (32 x 32, 4 patches), the
           data (8 synthetic people, 4 of them training identities, one 4 x 2 P x K batch per
           epoch); the checkpoints hold every ViT-B/16 weight whatever the input size.
``write``  seconds and Python-heap peak (tracemalloc: the serialised bytes held in memory) of
           writing one stage-2 ViT-B/16 ``last.pt`` payload (the image encoder, a 4-identity
           head and Adam's two moments: the run's file), ``--repeats`` times each, alternating:
           the streamed ``runs.atomic_torch_save`` against the former save (``torch.save`` into
           a ``BytesIO``, then its bytes written, fsynced and renamed), re-created here.
``sizes``  last.pt / best.pt per stage (1, 2, 3) and backbone (vitb16, rn50) from the tensors
           of the real architectures (random weights, CPU): the trained modules' state (the
           stage's ``TrainLoop`` modules), Adam's two moments per trained parameter, for
           ``--classes`` training identities; the serialisation adds well under 1 % (checked
           against the file the ``run`` part wrote).

Re-run (from the repository root):

    .venv/bin/python benchmarks/bench_checkpoints.py                 # every part, this checkout
    .venv/bin/python benchmarks/bench_checkpoints.py --part run --repo /tmp/before   # "before"
    .venv/bin/python benchmarks/bench_checkpoints.py --quick         # smoke: 2 epochs, sizes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: ``clip.model.CLIP`` constructor arguments of OpenAI's releases (as benchmarks/gpu_check.py).
ARCHS = {
    "vitb16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                   vision_patch_size=16, context_length=77, vocab_size=49408,
                   transformer_width=512, transformer_heads=8, transformer_layers=12),
    "rn50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3),
                 vision_width=64, vision_patch_size=None, context_length=77, vocab_size=49408,
                 transformer_width=512, transformer_heads=8, transformer_layers=12),
}


def _import_package(repo: Path):
    sys.path.insert(0, str(repo))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import handclip_nb
    if Path(handclip_nb.__file__).resolve().parent != (repo / "handclip_nb").resolve():
        raise SystemExit(f"imported {handclip_nb.__file__}, not {repo}/handclip_nb")
    return handclip_nb


def measure_run(repo: Path, epochs: int, work: Path) -> dict:
    """Train stage 2 for ``epochs`` epochs; every checkpoint write with its bytes and seconds."""
    _import_package(repo)
    import torch

    from handclip_nb.data import build_protocol
    from handclip_nb.models import build_backbone
    from handclip_nb.models.clip_arch import build_arch
    from handclip_nb.params import SCHEMA, resolve_params
    from handclip_nb.train.loop import TrainLoop
    from handclip_nb.train.stage1 import train_stage1
    from handclip_nb.train.stage2 import load_stage1_prompts, train_stage2
    from handclip_nb.runs import start_run

    os.environ["HANDCLIP_HOME"] = str(work)
    weights = work / "ViT-B-16-random.pt"  # the OpenAI layout: a CLIP state dict
    torch.save(build_arch(ARCHS["vitb16"], seed=0).state_dict(), weights)
    common = dict(backbone="vitb16", weights=str(weights), image_size=[32, 32],
                  synthetic_subjects=8, synthetic_images=3, num_splits=1, num_workers=0,
                  feature_cache=False, batch_size=8, seed=0, device="cpu")
    s1 = resolve_params({**common, "epochs": 1, "output_dir": str(work / "s1")}, stage="stage1")
    protocol = build_protocol(s1)
    start_run(s1)
    train_stage1(s1, s1.output_dir, protocol, build_backbone(
        "vitb16", weights=str(weights), image_size=s1.image_size), progress=False)

    values = {**common, "epochs": epochs, "warmup_epochs": 1, "milestones": [epochs],
              "p_ids": 4, "k_images": 2, "selection": "last", "output_dir": str(work / "s2"),
              "stage1_dir": str(work / "s1")}
    if "checkpoint_every" in SCHEMA:  # after: the schema defaults, stated in the output
        values.update(checkpoint_every=SCHEMA["checkpoint_every"].default,
                      checkpoint_minutes=SCHEMA["checkpoint_minutes"].default)
    s2 = resolve_params(values, stage="stage2")
    start_run(s2)
    backbone = build_backbone("vitb16", weights=str(weights), image_size=s2.image_size)
    prompts = load_stage1_prompts(s1.output_dir, backbone, protocol)

    writes = []
    original = TrainLoop._save

    def timed(self, path, *args, **kwargs):
        started = time.perf_counter()
        original(self, path, *args, **kwargs)
        writes.append({"file": Path(path).name, "bytes": Path(path).stat().st_size,
                       "seconds": time.perf_counter() - started})

    TrainLoop._save = timed
    started = time.perf_counter()
    fit = train_stage2(s2, s2.output_dir, protocol, backbone, prompts, progress=False).fit
    total = time.perf_counter() - started
    ckpt = Path(s2.output_dir) / "checkpoints"
    return {"repo": str(repo), "epochs": len(fit.history), "train_seconds": total,
            "checkpoint_every": values.get("checkpoint_every"),
            "checkpoint_minutes": values.get("checkpoint_minutes"), "writes": writes,
            "last_pt": (ckpt / "last.pt").stat().st_size,
            "best_pt": (ckpt / "best.pt").stat().st_size}


def measure_write(repeats: int, work: Path) -> dict:
    """Seconds and heap peak per last.pt write: streamed (now) against in-memory (before)."""
    _import_package(REPO)
    import io
    import tracemalloc

    import torch

    from handclip_nb.models.clip_arch import build_arch
    from handclip_nb.runs import atomic_torch_save, atomic_write_bytes

    visual = build_arch(ARCHS["vitb16"], seed=0).float().visual
    head = torch.nn.Linear(768, 4)
    params = [*visual.parameters(), *head.parameters()]
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                 "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(params)}
    payload = {"model": {"visual": visual.state_dict(), "head": head.state_dict()},
               "optimizer": {"state": state, "param_groups": [{"params": list(state)}]}}

    def before(obj, path):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return atomic_write_bytes(path, buf.getvalue())

    times: dict[str, list[float]] = {"streamed": [], "in memory": []}
    peaks: dict[str, int] = {}
    for _ in range(repeats):
        for name, save in (("streamed", atomic_torch_save), ("in memory", before)):
            path = work / f"{name.replace(' ', '-')}.pt"
            tracemalloc.start()
            started = time.perf_counter()
            save(payload, path)
            times[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks.get(name, 0), tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            size = path.stat().st_size
            path.unlink()
    return {"bytes": size, "seconds": times, "heap_peak": peaks}


def _tensor_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def measure_sizes(classes: int) -> list[dict]:
    """last.pt / best.pt of stages 1-3 for vitb16 and rn50, from the tensors they hold."""
    _import_package(REPO)
    import torch

    from handclip_nb.backbone_specs import get_backbone_spec
    from handclip_nb.models.backbones import ClipBackbone
    from handclip_nb.models.clip_arch import build_arch
    from handclip_nb.models.prompts import PromptLearner
    from handclip_nb.models.promptsg import PromptSG
    from handclip_nb.models.reid import ReIDModel

    rows = []
    for name, arch in ARCHS.items():
        spec = get_backbone_spec(name)
        size = tuple(spec.default_image_size)
        network = build_arch(arch, seed=0).float()
        backbone = ClipBackbone(network, name=name, pretrained=False, weights_label="random",
                                seed=0, arch=arch, preprocess=spec.preprocess(size))
        backbone.set_image_size(size)
        backbone.requires_grad_(False)
        learner = PromptLearner(backbone, num_classes=classes, n_ctx=4)
        backbone.visual.requires_grad_(True)
        stages = {"stage1": {"prompts": learner},
                  "stage2": ReIDModel(backbone, classes, "linear").trainable_modules(),
                  "stage3": PromptSG(backbone, classes, aspect="dorsal_r",
                                     classifier="linear").trainable_modules()}
        clip_bytes = _tensor_bytes(backbone.clip.state_dict())
        for stage, modules in stages.items():
            model = sum(_tensor_bytes(m.state_dict()) for m in modules.values())
            trained = sum(p.numel() * p.element_size() for m in modules.values()
                          for p in m.parameters() if p.requires_grad)
            frozen_params = clip_bytes - sum(
                _tensor_bytes(m.state_dict()) for m in modules.values()
                if any(m is c for c in backbone.clip.modules()))
            rows.append({"backbone": name, "stage": stage, "input": list(size),
                         "trained_params": trained // 4, "model_bytes": model,
                         "adam_bytes": 2 * trained, "last_pt": model + 2 * trained,
                         "best_pt": model, "best_pt_before": model + 2 * trained,
                         "frozen_bytes_not_saved": frozen_params})
        del backbone, network
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("run", "write", "sizes", "all"), default="all")
    ap.add_argument("--repeats", type=int, default=3, help="writes per method (write part)")
    ap.add_argument("--repo", type=Path, default=REPO,
                    help="checkout whose handclip_nb the run part measures (default: this one)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--classes", type=int, default=100,
                    help="training identities for the sizes part")
    ap.add_argument("--quick", action="store_true", help="2 epochs")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out: dict = {}
    if args.part in ("write", "all"):
        (REPO / "outputs").mkdir(exist_ok=True)  # the project's disk, not a RAM-backed /tmp
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=REPO / "outputs") as tmp:
            write = measure_write(1 if args.quick else args.repeats, Path(tmp))
        out["write"] = write
        print(f"one stage-2 ViT-B/16 last.pt ({_mb(write['bytes'])} MB), written to "
              f"{REPO / 'outputs'}:")
        for name, secs in write["seconds"].items():
            print(f"  {name:9s}: seconds {' '.join(f'{s:.2f}' for s in secs)} (median "
                  f"{sorted(secs)[len(secs) // 2]:.2f}); heap peak "
                  f"{_mb(write['heap_peak'][name])} MB")
    if args.part in ("sizes", "all"):
        rows = measure_sizes(args.classes)
        out["sizes"] = rows
        print(f"sizes for {args.classes} training identities (MB = 10^6 bytes; tensors only):")
        print("| backbone | stage | trained params | last.pt MB | best.pt MB before -> after |"
              " frozen MB named, not saved |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['backbone']} | {r['stage']} | {r['trained_params']:,} | "
                  f"{_mb(r['last_pt'])} | {_mb(r['best_pt_before'])} -> {_mb(r['best_pt'])} | "
                  f"{_mb(r['frozen_bytes_not_saved'])} |")
    if args.part in ("run", "all"):
        epochs = 2 if args.quick else args.epochs
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
            run = measure_run(args.repo.resolve(), epochs, Path(tmp))
        out["run"] = run
        last = [w for w in run["writes"] if w["file"] == "last.pt"]
        best = [w for w in run["writes"] if w["file"] == "best.pt"]
        written = sum(w["bytes"] for w in run["writes"])
        print(f"\nstage-2 run, random ViT-B/16 (OpenAI layout), {run['epochs']} epochs, "
              f"{run['repo']}: checkpoint_every={run['checkpoint_every']}, "
              f"checkpoint_minutes={run['checkpoint_minutes']}")
        print(f"  writes: {len(last)} last.pt + {len(best)} best.pt = {_mb(written)} MB written")
        print(f"  last.pt {_mb(run['last_pt'])} MB, best.pt {_mb(run['best_pt'])} MB")
        for kind, ws in (("last.pt", last), ("best.pt", best)):
            if ws:
                secs = sorted(w["seconds"] for w in ws)
                print(f"  seconds per {kind} write: median {secs[len(secs) // 2]:.2f}, "
                      f"max {secs[-1]:.2f} (state copy + torch.save + fsync + rename)")
        print(f"  training call {run['train_seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
