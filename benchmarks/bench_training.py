"""Benchmark: training throughput of stages 1-3, and the cost of running a stage through papermill.

A script that prints figures (not a test).  Run from the repository root:

    .venv/bin/python benchmarks/bench_training.py                         # full
    .venv/bin/python benchmarks/bench_training.py --quick                 # smoke run
    .venv/bin/python benchmarks/bench_training.py --backbones tiny-rn --no-papermill

Part 1, throughput.  For each backbone (default: whichever of tiny-vit, tiny-rn and
handclip-mini can be built here; a backbone that is not registered yet or whose weights are
missing is skipped with a note) and each training stage, the package's own training function
runs on a synthetic hands dataset (``handclip_nb.data.synthetic.generate_dataset``) with the
backbone's default input size, on CPU:

  stage 1  ``train_stage1``: prompt learning.  The frozen image encoder encodes the training
           images once (not in the figure); each epoch pushes the cached features through the
           prompt learner and the text encoder, so its images/s counts cached features.
  stage 2  ``train_stage2`` (with stage 1's prompts): the image encoder learns on augmented
           P x K batches (data loading with ``num_workers=0`` included).
  stage 3  ``train_stage3``: PromptSG, same batches.

images/s = images / seconds summed over the steady epochs: the ``history`` records of epochs
2..N-1 (the first epoch is warmup; validation runs only on the last one, ``eval_every`` is set
beyond the run).  ``FitResult.seconds_per_epoch`` (every epoch, the validated one included) and
the wall time of the whole call (feature caching, model building, checkpoints) are printed too.

Part 2, papermill.  ``notebooks/stage2_image.ipynb`` through ``handclip_nb.pipeline.run_notebook``
against, in the same process and on the same data and resolved parameters,
  direct train  ``build_protocol`` + ``backbone_from_params`` + ``load_stage1_prompts`` + ``train_stage2``;
  direct cells  the notebook's own code cells executed in this process (``exec``; training,
                evaluation, figures saved to disk, metrics.json): the same work, without a
                kernel, papermill or inline rendering.
Ratios: notebook / direct train (what a notebook run costs over calling the training function)
and notebook / direct cells (papermill's own overhead).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CANDIDATE_BACKBONES = ("tiny-vit", "tiny-rn", "handclip-mini")
STAGES = ("stage1", "stage2", "stage3")
NEVER = 10**6  # eval_every beyond the run: validate only on the last epoch


# --------------------------------------------------------------------------- setup


def sizes(quick: bool) -> dict:
    """Dataset and run lengths.  Full: 60 people x 8 images per aspect (dorsal_r: 30 training
    identities, 24 of them fitted, ~180 images), enough epochs that the steady ones last seconds."""
    if quick:
        return dict(subjects=16, images=4, epochs={"stage1": 4, "stage2": 3, "stage3": 3},
                    nb_epochs=2, p_ids=4, k_images=2)
    return dict(subjects=60, images=8, epochs={"stage1": 30, "stage2": 8, "stage3": 8},
                nb_epochs=5, p_ids=8, k_images=4)


def make_dataset(root: Path, subjects: int, images: int, seed: int = 0) -> Path:
    from handclip_nb.data.synthetic import generate_dataset

    return generate_dataset(root, subjects=subjects, images_per_subject=images, seed=seed)


def stage_params(stage: str, data_root, output_dir, backbone: str, epochs: int, p_ids: int = 8,
                 k_images: int = 4, **kw):
    """Resolved parameters for a throughput run (validation only on the last epoch)."""
    from handclip_nb.params import resolve_params

    base = dict(data_root=str(data_root), backbone=backbone, num_splits=1, epochs=epochs,
                output_dir=str(output_dir), feature_cache=False, warmup_epochs=1,
                eval_every=NEVER, device="cpu", batch_size=32)
    if stage == "stage1":
        base.update(lr=1e-2, center_features=True)
    else:
        base.update(lr=3e-3, p_ids=p_ids, k_images=k_images, milestones=[max(1, epochs - 1)],
                    random_erasing=0.5)
    if stage == "stage3":
        base.update(lr_new=3e-3)
    base.update(kw)
    return resolve_params(base, stage=stage)


def check_backbones(names) -> tuple[list[str], list[str]]:
    """(the names that can be built here, a note for each one skipped)."""
    from handclip_nb.backbone_specs import BACKBONES
    from handclip_nb.models import WeightsNotFoundError, build_backbone

    ok, notes = [], []
    for name in names:
        if name not in BACKBONES:
            notes.append(f"{name}: skipped, not in the backbone registry (handclip_nb.backbone_specs)")
            continue
        try:
            build_backbone(name)  # at the registry's default input size
        except WeightsNotFoundError as exc:
            notes.append(f"{name}: skipped, weights missing ({str(exc).splitlines()[0]})")
            continue
        except ValueError as exc:  # not registered in handclip_nb.models.backbones
            notes.append(f"{name}: skipped, cannot be built ({str(exc).splitlines()[0]})")
            continue
        ok.append(name)
    return ok, notes


# --------------------------------------------------------------------------- throughput


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def throughput(history: list[dict]) -> tuple[float, int, float, int]:
    """(images/s, images, seconds, epochs) over the steady epochs of a ``FitResult.history``:
    not the first (warmup) and not validated ones; falls back to what there is."""
    steady = [h for h in history[1:] if "val" not in h]
    if not steady:
        steady = [h for h in history if "val" not in h] or list(history)
    images = sum(int(h["images"]) for h in steady)
    seconds = sum(float(h["seconds"]) for h in steady)
    return (images / seconds if seconds > 0 else float("nan")), images, seconds, len(steady)


def _row(stage, backbone, fit, wall, note=""):
    ips, images, seconds, n = throughput(fit.history)
    return {"stage": stage, "backbone": backbone, "images_per_s": ips, "steady_epochs": n,
            "steady_images": images, "steady_seconds": seconds,
            "seconds_per_epoch": fit.seconds_per_epoch, "epochs": fit.epochs_run,
            "images_per_epoch": fit.history[-1]["images"] if fit.history else 0,
            "wall_s": wall, "note": note}


def measure_backbone(backbone: str, data_root, workdir: Path, epochs: dict,
                     stages=STAGES, p_ids: int = 8, k_images: int = 4, log=print) -> list[dict]:
    """One row per stage: the package's training functions, timed."""
    from handclip_nb.data import build_protocol
    from handclip_nb.models import build_backbone
    from handclip_nb.train.stage1 import train_stage1
    from handclip_nb.train.stage2 import train_stage2
    from handclip_nb.train.stage3 import train_stage3
    import torch

    rows, learner = [], None
    for stage in STAGES:
        if stage not in stages and not (stage == "stage1" and "stage2" in stages):
            continue
        p = stage_params(stage, data_root, workdir / f"{stage}-{backbone}", backbone,
                         epochs[stage], p_ids, k_images)
        protocol = build_protocol(p)
        bb = build_backbone(backbone, image_size=p.image_size, seed=p.seed, device="cpu")
        t0 = time.perf_counter()
        with _quiet():  # the loop prints a line per epoch, feature extraction a bar
            if stage == "stage1":
                res = train_stage1(p, p.output_dir, protocol, bb, progress=False)
                learner = res.learner
            elif stage == "stage2":
                res = train_stage2(p, p.output_dir, protocol, bb, learner, progress=False)
            else:
                res = train_stage3(p, p.output_dir, protocol, bb, progress=False)
        wall = time.perf_counter() - t0
        if stage not in stages:
            continue
        note = "cached features through prompts + text encoder" if stage == "stage1" else \
            f"P x K = {p.p_ids} x {p.k_images}, augmented, num_workers 0"
        row = _row(stage, bb.display_name, res.fit, wall, note)
        row.update(backbone_name=backbone, image_size=list(p.image_size),
                   threads=torch.get_num_threads(), load_1min=round(os.getloadavg()[0], 2))
        log(f"  {backbone:13s} {stage}: {row['images_per_s']:8.1f} images/s "
            f"({row['steady_images']} images in {row['steady_seconds']:.2f} s over "
            f"{row['steady_epochs']} steady epochs); {row['seconds_per_epoch']:.2f} s/epoch "
            f"with validation; call {wall:.1f} s; load {row['load_1min']}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- papermill


def notebook_code_cells(notebook: str) -> tuple[str, list[str]]:
    """(the parameters cell, the other code cells) of ``notebooks/<notebook>``."""
    nb = json.loads((REPO / "notebooks" / notebook).read_text())
    params_cell, cells = None, []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            params_cell = src
        else:
            cells.append(src)
    if params_cell is None:
        raise ValueError(f"{notebook} has no cell tagged 'parameters'")
    return params_cell, cells


def notebook_params(notebook: str, parameters: dict, stage: str):
    """The parameters the notebook resolves: its parameters cell's values, then ``parameters``
    (as papermill injects them), through ``params_from_namespace`` like its second cell."""
    from handclip_nb.params import params_from_namespace

    ns: dict = {}
    exec(compile(notebook_code_cells(notebook)[0], f"{notebook}:parameters", "exec"), ns)
    ns.update(parameters)
    return params_from_namespace(ns, stage=stage)


def run_cells_in_process(notebook: str, parameters: dict) -> None:
    """Execute a notebook's code cells here, as papermill would in a kernel (parameters cell,
    then the injected overrides, then the rest); output is swallowed, figures closed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    params_cell, cells = notebook_code_cells(notebook)
    ns: dict = {"__name__": "__benchmark_notebook__"}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(params_cell, f"{notebook}:parameters", "exec"), ns)
        ns.update(parameters)
        for i, src in enumerate(cells):
            exec(compile(src, f"{notebook}:cell{i}", "exec"), ns)
    plt.close("all")


def measure_papermill(backbone: str, data_root, workdir: Path, epochs: int, p_ids: int = 8,
                      k_images: int = 4, log=print) -> dict:
    """Wall times of stage 2 three ways (see the module docstring) and their ratios."""
    from handclip_nb.data import build_protocol
    from handclip_nb.models import build_backbone
    from handclip_nb.pipeline import run_notebook
    from handclip_nb.models import backbone_from_params
    from handclip_nb.runs import start_run
    from handclip_nb.train.stage1 import train_stage1
    from handclip_nb.train.stage2 import load_stage1_prompts, train_stage2

    s1 = stage_params("stage1", data_root, workdir / "nb-stage1", backbone, 2, num_splits=2)
    with _quiet():
        start_run(s1)  # params.yaml: stage 2 rebuilds the stage-1 run from it
        train_stage1(s1, s1.output_dir, build_protocol(s1), build_backbone(
            backbone, image_size=s1.image_size, seed=s1.seed), progress=False)
    given = dict(data_root=str(data_root), backbone=backbone, num_splits=2, epochs=epochs,
                 warmup_epochs=1, milestones=[max(1, epochs - 1)], p_ids=p_ids, k_images=k_images,
                 batch_size=32, feature_cache=False, device="cpu", stage1_dir=s1.output_dir)

    def out(name):
        return {"output_dir": str(workdir / name)}

    # direct train: the notebook's resolved parameters (its own defaults + ``given``), then the
    # calls of its protocol, backbone, prompts and training cells, nothing else
    t0 = time.perf_counter()
    p = notebook_params("stage2_image.ipynb", {**given, **out("direct-train")}, "stage2")
    protocol = build_protocol(p)
    bb = backbone_from_params(p)
    with _quiet():
        res = train_stage2(p, p.output_dir, protocol, bb,
                           load_stage1_prompts(p.stage1_dir, bb, protocol), progress=False)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_cells_in_process("stage2_image.ipynb", {**given, **out("direct-cells")})
    t_cells = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_notebook("stage2_image.ipynb", workdir / "stage2.ipynb", {**given, **out("papermill")},
                 progress=False)
    t_nb = time.perf_counter() - t0

    for name in ("direct-cells", "papermill"):
        if not (workdir / name / "metrics.json").is_file():
            raise RuntimeError(f"{name} run wrote no metrics.json")
    row = {"notebook": "stage2_image.ipynb", "backbone": backbone, "epochs": epochs,
           "train_images_per_epoch": res.fit.history[-1]["images"] if res.fit.history else 0,
           "papermill_s": t_nb, "direct_train_s": t_train, "direct_cells_s": t_cells,
           "ratio_vs_train": t_nb / t_train, "ratio_vs_cells": t_nb / t_cells,
           "papermill_overhead_s": t_nb - t_cells, "load_1min": round(os.getloadavg()[0], 2)}
    log(f"  papermill {t_nb:.1f} s | direct train_stage2 {t_train:.1f} s | notebook cells "
        f"in-process {t_cells:.1f} s")
    return row


# --------------------------------------------------------------------------- report


def environment() -> dict:
    import torch

    return {"date": str(datetime.date.today()), "python": platform.python_version(),
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def throughput_table(rows) -> str:
    lines = ["| backbone | input H×W | stage | images/s | steady images / s | "
             "s/epoch (with val) | call wall s | load (1 min) |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['image_size'][0]}×{r['image_size'][1]} "
                     f"| {r['stage']} | {r['images_per_s']:.1f} "
                     f"| {r['steady_images']} / {r['steady_seconds']:.2f} "
                     f"| {r['seconds_per_epoch']:.2f} | {r['wall_s']:.1f} "
                     f"| {r.get('load_1min', '')} |")
    return "\n".join(lines)


def papermill_table(row) -> str:
    return "\n".join([
        "| notebook | backbone | epochs | papermill s | direct train s | direct cells s "
        "| papermill / train | papermill / cells | overhead s | load (1 min) |",
        "|" + "---|" * 10,
        f"| {row['notebook']} | {row['backbone']} | {row['epochs']} | {row['papermill_s']:.1f} "
        f"| {row['direct_train_s']:.1f} | {row['direct_cells_s']:.1f} "
        f"| {row['ratio_vs_train']:.2f} | {row['ratio_vs_cells']:.2f} "
        f"| {row['papermill_overhead_s']:.1f} | {row['load_1min']} |"])


def run(backbones, quick: bool, workdir: Path, data_root=None, stages=STAGES,
        papermill: bool = True, nb_epochs: int | None = None, log=print) -> dict:
    """Everything ``main`` prints, as a dict (the smoke test calls this)."""
    cfg = sizes(quick)
    if nb_epochs is not None:
        cfg["nb_epochs"] = nb_epochs
    ok, notes = check_backbones(backbones)
    for n in notes:
        log(f"note: {n}")
    if data_root is None:
        t0 = time.perf_counter()
        data_root = make_dataset(workdir / "hands", cfg["subjects"], cfg["images"])
        log(f"synthetic hands: {cfg['subjects']} people x {cfg['images']} images per aspect "
            f"({time.perf_counter() - t0:.1f} s to generate)")
    rows = []
    for name in ok:
        rows.extend(measure_backbone(name, data_root, workdir, cfg["epochs"], stages,
                                     cfg["p_ids"], cfg["k_images"], log=log))
    nb = None
    if papermill and ok:
        nb = measure_papermill(ok[0], data_root, workdir, cfg["nb_epochs"], cfg["p_ids"],
                               cfg["k_images"], log=log)
    return {"backbones": ok, "notes": notes, "throughput": rows, "papermill": nb,
            "epochs": cfg["epochs"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small dataset, few epochs (smoke run)")
    ap.add_argument("--backbones", nargs="+", default=list(CANDIDATE_BACKBONES),
                    help="backbones to try (default: %(default)s; unbuildable ones are skipped)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--data-root", help="an existing synthetic/11k dataset (default: generate one)")
    ap.add_argument("--no-papermill", action="store_true", help="skip part 2")
    ap.add_argument("--nb-epochs", type=int, default=None,
                    help="stage-2 epochs in part 2 (default 5, quick 2)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads here and in the notebook kernel (default: "
                         "torch's, one per core; 1 is steadier on a shared, loaded machine)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the papermill kernel
    env = environment()
    print(f"training benchmark  {env['date']}  python {env['python']}  torch {env['torch']}  "
          f"{env['machine']}  cpus {env['cpus']}  torch threads {env['torch_threads']}  "
          f"load {env['load_avg']}  {'QUICK' if args.quick else 'full'}\n")
    workdir = Path(tempfile.mkdtemp(prefix="handclip-bench-"))
    old_home = os.environ.get("HANDCLIP_HOME")
    os.environ["HANDCLIP_HOME"] = str(workdir)  # the kernel and any default path stay in workdir
    started = time.perf_counter()
    try:
        res = run(args.backbones, args.quick, workdir, args.data_root, args.stages,
                  papermill=not args.no_papermill, nb_epochs=args.nb_epochs)
    finally:
        if old_home is None:
            os.environ.pop("HANDCLIP_HOME", None)
        else:
            os.environ["HANDCLIP_HOME"] = old_home
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + throughput_table(res["throughput"]))
    if res["papermill"]:
        print("\n" + papermill_table(res["papermill"]))
    env["total_s"] = time.perf_counter() - started
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\ntotal {env['total_s']:.0f} s; load average at the end {env['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, **res}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
