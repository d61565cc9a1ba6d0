"""Demo: the workbench on a custom folder dataset, end to end, then gallery search.

A reproducible script that prints figures (not a test). Run from the repository root:

    .venv/bin/python benchmarks/custom_search_demo.py                    # full (minutes)
    .venv/bin/python benchmarks/custom_search_demo.py --quick            # smoke run
    .venv/bin/python benchmarks/custom_search_demo.py --json out.json --keep

1. **A custom dataset** (``dataset: custom``, docs/protocols.md#custom-datasets): synthetic
   hands (``handclip_nb.data.synthetic.generate_dataset``: 40 people x 4 aspects x 5 photos at
   the default 160 x 120, seed 1, so not the embedded demo's people) linked into
   ``<root>/<person>/<aspect>/<image>`` folders. The custom protocol sorts the people and tests
   on the second half (20 people).
2. **Stages 0-3** through papermill (``handclip_nb.pipeline.run_notebook``), backbone
   handclip-mini, aspect dorsal_r, 10 epochs each for stages 1-3 (the demo's learning rates,
   milestone at epoch 8, ``selection: last``), 10 test splits. Per stage: test rank-1 and mAP,
   verification (ROC AUC, EER, TAR at FAR 1e-2) and the open-set threshold: the FAR it was
   calibrated for and measured at on training identities against the FAR it gives on the test
   identities (``metrics.json`` ``open_set.test.far_mean``).
3. **Search** (``notebooks/search.ipynb``) with the stage-0, 2 and 3 run folders:
   identification, gallery = one dorsal_r photo per test person (the first by name), queries =
   their other dorsal_r photos: top-1 accuracy, and with the run's calibrated threshold how many
   queries are matched (and matched to the right person). Text: gallery = every photo of the
   test people (all aspects), three texts in handclip-mini's caption phrasing (as
   ``evaluate/probes.py``): precision@10 against the ``HandInfo.csv`` labels of the gallery
   images, next to the base rate.

The report is one table (rows: measurements; columns: stages) and, with ``--json``, a JSON file.
``--quick`` (8 people x 3 photos, 1 epoch, 1 split) is the smoke run of
``tests/test_benchmarks.py``; there the notebooks' code cells run in this process
(``papermill=False``), the same code without kernel start-ups.
"""
from __future__ import annotations

import argparse
import csv
import datetime
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from bench_training import run_cells_in_process  # noqa: E402  (one in-process notebook runner)

STAGES = ("stage0", "stage1", "stage2", "stage3")
NOTEBOOKS = {"stage0": "stage0_zeroshot.ipynb", "stage1": "stage1_prompt.ipynb",
             "stage2": "stage2_image.ipynb", "stage3": "stage3.ipynb", "search": "search.ipynb"}
#: Stages whose run folder the search notebook takes.
SEARCH_STAGES = ("stage0", "stage2", "stage3")
ASPECT = "dorsal_r"
#: Text queries in the caption format handclip-mini was pretrained on (evaluate/probes.py), and
#: the HandInfo.csv ground truth each should retrieve.
TEXTS = {
    "nail polish": ("a photo of the dorsal side of a woman's right hand, red nail polish",
                    lambda r: r.nail_polish == 1),
    "dark skin": ("a photo of the dorsal side of a man's right hand, dark skin",
                  lambda r: r.skin_color == "dark"),
    "palm side": ("a photo of the palm side of a woman's right hand",
                  lambda r: r.aspect.startswith("palmar")),
}
PRECISION_AT = 10


def sizes(quick: bool) -> dict:
    if quick:  # the search with the stage-2 run only
        return dict(subjects=8, images=3, epochs=1, warmup=1, milestones=[1], num_splits=1,
                    p_ids=4, k_images=2, search_stages=("stage2",))
    return dict(subjects=40, images=5, epochs=10, warmup=2, milestones=[8], num_splits=10,
                p_ids=8, k_images=4, search_stages=SEARCH_STAGES)


# --------------------------------------------------------------------------- data


def make_custom_dataset(workdir: Path, subjects: int, images: int, seed: int = 1):
    """Synthetic hands (11k layout) linked into ``custom/<person>/<aspect>/<image>``; returns
    (custom root, {image file name: HandImage record})."""
    from handclip_nb.data.handinfo import read_handinfo
    from handclip_nb.data.synthetic import generate_dataset

    src = generate_dataset(workdir / "synthetic", subjects=subjects, images_per_subject=images,
                           seed=seed)
    root = workdir / "custom"
    records = read_handinfo(src / "HandInfo.csv")
    for r in records:
        dest = root / r.person / r.aspect / Path(r.path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src / r.path, dest)
    return root, {Path(r.path).name: r for r in records}


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dest)


def make_search_folders(workdir: Path, custom_root: Path, test_people) -> dict:
    """``gallery/<person>/<image>``: the first dorsal_r photo of each test person;
    ``queries/<person>/<image>``: their other dorsal_r photos; ``text_gallery``: every photo of
    the test people (``<person>/<aspect>/<image>``)."""
    out = {name: workdir / "search" / name for name in ("gallery", "queries", "text_gallery")}
    for person in test_people:
        photos = sorted((custom_root / person / ASPECT).iterdir())
        _link(photos[0], out["gallery"] / person / photos[0].name)
        for p in photos[1:]:
            _link(p, out["queries"] / person / p.name)
        for aspect_dir in sorted((custom_root / person).iterdir()):
            for p in sorted(aspect_dir.iterdir()):
                _link(p, out["text_gallery"] / person / aspect_dir.name / p.name)
    return out


# --------------------------------------------------------------------------- notebooks


def run_step(name: str, notebook: str, parameters: dict, workdir: Path, papermill: bool,
             log=print) -> float:
    from handclip_nb.pipeline import run_notebook

    started = time.perf_counter()
    if papermill:
        run_notebook(notebook, workdir / "executed" / f"{name}.ipynb", parameters,
                     progress=False)
    else:
        run_cells_in_process(notebook, parameters)
    seconds = time.perf_counter() - started
    log(f"  {name:<22} {seconds:6.1f} s")
    return seconds


def stage_parameters(stage: str, custom_root: Path, runs_dir: Path, s: dict) -> dict:
    common = dict(dataset="custom", data_root=str(custom_root), aspect=ASPECT,
                  backbone="handclip-mini", num_splits=s["num_splits"], batch_size=64, seed=0,
                  output_dir=str(runs_dir / stage))
    train = dict(epochs=s["epochs"], warmup_epochs=s["warmup"], selection="last")
    image = dict(lr=3e-4, milestones=s["milestones"], p_ids=s["p_ids"], k_images=s["k_images"],
                 random_erasing=0.0)
    return {"stage0": common,
            "stage1": {**common, **train, "lr": 1e-2, "center_features": True},
            "stage2": {**common, **train, **image, "stage1_dir": str(runs_dir / "stage1")},
            "stage3": {**common, **train, **image, "lr_new": 3e-3}}[stage]


# --------------------------------------------------------------------------- figures


def stage_figures(metrics: dict) -> dict:
    """Test rank-1 and mAP, verification, and the open-set threshold's FARs (percent)."""
    test = metrics.get("test", {})
    ver = (metrics.get("verification") or {}).get("metrics", {})
    open_set = metrics.get("open_set") or {}
    out = {"rank1": test.get("rank1", {}).get("mean"), "mAP": test.get("mAP", {}).get("mean"),
           "roc_auc": ver.get("roc_auc", {}).get("mean"), "eer": ver.get("eer", {}).get("mean"),
           "tar_at_far1e-2": ver.get("tar_at_far1e-2", {}).get("mean")}
    if open_set:
        test_os = open_set.get("test") or {}
        out.update({"threshold": open_set.get("threshold"),
                    "far_target": 100 * open_set["far_target"],
                    "far_calibrated": 100 * open_set["far_measured"],
                    "far_test": 100 * test_os["far_mean"] if test_os else None,
                    "tar_test": 100 * test_os["tar_mean"] if test_os else None})
    return out


def precision_at(rankings_csv: Path, labels: dict, k: int = PRECISION_AT) -> dict:
    """Per text query: precision@k of its ranking against ``TEXTS``' ground truth, and the base
    rate over the gallery (percent)."""
    with open(rankings_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["query_type"] == "text"]
    out = {}
    for name, (text, positive) in TEXTS.items():
        top = [r for r in rows if r["query"] == text and int(r["rank"]) <= k]
        hits = [bool(positive(labels[Path(r["gallery_image"]).name])) for r in top]
        out[name] = 100.0 * sum(hits) / len(hits) if hits else None
    return out


def base_rates(gallery: Path, labels: dict) -> dict:
    names = [p.name for p in gallery.rglob("*.jpg")]
    return {name: 100.0 * sum(bool(positive(labels[n])) for n in names) / len(names)
            for name, (_, positive) in TEXTS.items()}


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}"


def table(res: dict) -> str:
    """One markdown table: measurements (rows) by stage (columns)."""
    st, se, tx = res["stages"], res["search"], res["text"]
    rows = [("test rank-1 %", lambda s: st[s]["rank1"]),
            ("test mAP %", lambda s: st[s]["mAP"]),
            ("ROC AUC %", lambda s: st[s]["roc_auc"]),
            ("EER %", lambda s: st[s]["eer"]),
            ("TAR @ FAR 1e-2 %", lambda s: st[s]["tar_at_far1e-2"]),
            ("open-set threshold (cosine distance)",
             lambda s: _fmt(st[s].get("threshold"), 4) if "threshold" in st[s] else None),
            ("FAR target % (calibrated on training ids)", lambda s: st[s].get("far_target")),
            ("FAR % measured at calibration", lambda s: st[s].get("far_calibrated")),
            ("FAR % on test identities (mean of splits)", lambda s: st[s].get("far_test")),
            ("TAR % on test identities (mean of splits)", lambda s: st[s].get("tar_test")),
            (f"search top-1 accuracy % ({res['search_sizes']})",
             lambda s: se[s]["top1_accuracy"] if s in se else None),
            ("search: queries matched % (calibrated threshold)",
             lambda s: se[s]["matched"] if s in se else None),
            ("search: matched to the right person %",
             lambda s: se[s]["open_set_accuracy"] if s in se else None)]
    for name in TEXTS:
        rows.append((f"text '{name}' P@{PRECISION_AT} % (base rate {res['base_rates'][name]:.1f})",
                     lambda s, n=name: tx[s][n] if s in tx else None))
    lines = ["| measurement | " + " | ".join(STAGES) + " |",
             "|---|" + "---|" * len(STAGES)]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(get(s)) for s in STAGES) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the demo


def run(workdir: Path, quick: bool = False, papermill: bool = True, log=print) -> dict:
    """Everything above in ``workdir`` (HANDCLIP_HOME should point there); returns the figures."""
    from handclip_nb.runs import read_metrics

    s = sizes(quick)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    custom_root, labels = make_custom_dataset(workdir, s["subjects"], s["images"])
    seconds["data"] = time.perf_counter() - t0
    log(f"custom dataset {custom_root}: {s['subjects']} people x 4 aspects x {s['images']} "
        f"photos ({seconds['data']:.1f} s)")
    runs_dir = workdir / "runs"
    for stage in STAGES:
        seconds[stage] = run_step(stage, NOTEBOOKS[stage],
                                  stage_parameters(stage, custom_root, runs_dir, s), workdir,
                                  papermill, log)
    metrics = {stage: read_metrics(runs_dir / stage) for stage in STAGES}
    test_people = json.loads((runs_dir / "stage2" / "splits.json").read_text())["test_people"]
    folders = make_search_folders(workdir, custom_root, test_people)
    n_queries = sum(1 for _ in folders["queries"].rglob("*.jpg"))
    res = {"settings": {**s, "aspect": ASPECT, "backbone": "handclip-mini", "quick": quick,
                        "papermill": papermill, "test_people": len(test_people),
                        "texts": {k: v[0] for k, v in TEXTS.items()}},
           "stages": {stage: stage_figures(m) for stage, m in metrics.items()},
           "search": {}, "text": {}, "base_rates": base_rates(folders["text_gallery"], labels),
           "search_sizes": f"{len(test_people)} gallery photos, {n_queries} queries"}
    for stage in s["search_stages"]:
        common = dict(run_dir=str(runs_dir / stage), batch_size=64)
        out = workdir / "search-runs" / f"id-{stage}"
        seconds[f"search-{stage}"] = run_step(
            f"search {stage}", NOTEBOOKS["search"],
            {**common, "gallery_dir": str(folders["gallery"]), "query": str(folders["queries"]),
             "output_dir": str(out)}, workdir, papermill, log)
        summary = read_metrics(out)["summary"]
        res["search"][stage] = {
            "top1_accuracy": summary["top1_accuracy"],
            "matched": 100.0 * summary["matches"] / summary["image_queries"],
            "open_set_accuracy": summary["open_set_accuracy"], "summary": summary}
        out = workdir / "search-runs" / f"text-{stage}"
        seconds[f"text-{stage}"] = run_step(
            f"text search {stage}", NOTEBOOKS["search"],
            {**common, "gallery_dir": str(folders["text_gallery"]),
             "query_text": [t for t, _ in TEXTS.values()], "top_k": PRECISION_AT,
             "output_dir": str(out)}, workdir, papermill, log)
        res["text"][stage] = precision_at(out / "rankings.csv", labels)
    res["seconds"] = seconds
    res["table"] = table(res)
    return res


def environment() -> dict:
    import torch

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 people, 1 epoch (smoke run)")
    ap.add_argument("--no-papermill", action="store_true",
                    help="run the notebooks' cells in this process instead of papermill kernels")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    env = environment()
    print(f"custom dataset + search demo  {env['date']}  python {env['python']}  torch "
          f"{env['torch']}  cpus {env['cpus']}  load {env['load_avg']}  "
          f"{'QUICK' if args.quick else 'full'}\n")
    workdir = Path(tempfile.mkdtemp(prefix="handclip-custom-search-"))
    old_home = os.environ.get("HANDCLIP_HOME")
    os.environ["HANDCLIP_HOME"] = str(workdir)  # caches and default paths stay in workdir
    started = time.perf_counter()
    try:
        res = run(workdir, quick=args.quick, papermill=not args.no_papermill)
    finally:
        if old_home is None:
            os.environ.pop("HANDCLIP_HOME", None)
        else:
            os.environ["HANDCLIP_HOME"] = old_home
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    env["total_s"] = time.perf_counter() - started
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print("\n" + res["table"])
    print(f"\ntotal {env['total_s']:.0f} s; load average at the end {env['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, **res}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
