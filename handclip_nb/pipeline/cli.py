"""``python -m handclip_nb.pipeline``: the demo (default), a grid, or one grid run.

    python -m handclip_nb.pipeline --output outputs/demo                      # the demo
    python -m handclip_nb.pipeline --grid params/grids/smoke.yaml --output outputs/grid-smoke \\
        --executor local --jobs 2                                             # a grid, here
    python -m handclip_nb.pipeline --grid params/grids/clipfh-11k.yaml --output outputs/11k \\
        --executor slurm --slurm-partition gpu --slurm-gpus 1 --slurm-time 04:00:00
    python -m handclip_nb.pipeline --grid params/grids/clipfh-11k.yaml --output outputs/11k \\
        --executor slurm --detach --slurm-option account=myproject   # submit all, then exit
    python -m handclip_nb.pipeline --grid params/grids/clipfh-11k.yaml --output outputs/11k \
        --executor local --runs-per-gpu 4                  # 4 runs side by side on each GPU
    python -m handclip_nb.pipeline --grid ... --output outputs/11k --status   # each run's state
    python -m handclip_nb.pipeline --grid ... --output outputs/11k --cancel   # stop a campaign
    python -m handclip_nb.pipeline --run-step SPEC.json    # one grid run (the local worker)
"""
from __future__ import annotations

import argparse
import json
import time

import yaml

from ..constants import METRIC_LABELS
from ..evaluate.tables import markdown_table
from ..runs import atomic_write_text, resolve_path
from .executors import EXECUTORS
from .grid import GridError
from .runner import cancel_grid, grid_status, run_grid, running_per_device
from .steps import demo_table, execute_spec, run_pipeline

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m handclip_nb.pipeline",
                                     description="Run the demo, or a grid of runs, through "
                                                 "papermill.")
    parser.add_argument("--output", default=None,
                        help="folder for run folders and executed notebooks (demo: outputs/demo)")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="demo: extra parameter for every step")
    parser.add_argument("--force", action="store_true",
                        help="re-run every step even when its inputs did not change")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--grid", help="a grid file, e.g. params/grids/smoke.yaml")
    grid.add_argument("--executor", choices=EXECUTORS, default="local",
                      help="local: here, --jobs at a time; slurm: one Slurm job per run")
    grid.add_argument("--jobs", type=int, default=1,
                      help="runs at a time (local: the cores are split between them; slurm: "
                           "the most jobs queued at once, default unlimited)")
    grid.add_argument("--threads", type=int,
                      help="local: CPU threads per run (default: the cores split between the "
                           "jobs); results depend on it in the last bits, which long training "
                           "runs amplify, so pin it to compare runs made with different --jobs")
    grid.add_argument("--runs-per-gpu", type=int, metavar="K",
                      help="local: K runs side by side on each visible GPU (K on the CPU "
                           "without one), each with 1/K of the GPU's memory and of the cores; "
                           "refused with the numbers when K cannot fit")
    grid.add_argument("--slurm-runs-per-job", type=int, default=1, metavar="K",
                      help="slurm: K runs in each job, side by side on its GPU, each with "
                           "1/K of its memory and of the job's CPUs (default 1)")
    grid.add_argument("--run-memory-gib", type=float, metavar="GIB",
                      help="GPU memory one run needs (the GPU check measures it): K runs "
                           "that would need more than the GPU has are refused")
    grid.add_argument("--slurm-partition", help="Slurm partition (else the grid file's)")
    grid.add_argument("--slurm-gpus", type=int, help="GPUs per job")
    grid.add_argument("--slurm-time", help="time limit per job: minutes or [D-]HH:MM[:SS]")
    grid.add_argument("--slurm-mem", help="memory per job, e.g. 32G")
    grid.add_argument("--slurm-cpus", type=int, help="CPUs per job")
    grid.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                      help="any other sbatch option, e.g. account=proj, qos=high, "
                           "constraint=a100, reservation=mine (repeatable; beats the grid "
                           "file's slurm: mapping)")
    grid.add_argument("--slurm-python", help="the Python the jobs run on the compute nodes "
                                             "(default: this one, which must exist there)")
    grid.add_argument("--slurm-kernel", help="the Jupyter kernel the notebooks run in "
                                             "(default: python3)")
    grid.add_argument("--detach", action="store_true",
                      help="slurm: submit every run at once with dependencies and exit; the "
                           "campaign goes on without this command (see --status, --cancel; "
                           "run the command again to collect the results)")
    grid.add_argument("--status", action="store_true",
                      help="print each run's state (pending / running / finished / failed / "
                           "cancelled / stale) and exit")
    grid.add_argument("--cancel", action="store_true",
                      help="cancel the grid's queued and running jobs and exit")
    grid.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--run-step", metavar="SPEC", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run_step:
        with open(args.run_step) as f:
            execute_spec(json.load(f))
        return 0
    if args.grid:
        if args.output is None:
            parser.error("--grid needs --output, the folder the grid writes into")
        if args.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {args.jobs}")
        if args.runs_per_gpu is not None and args.runs_per_gpu < 1:
            parser.error(f"--runs-per-gpu must be >= 1, got {args.runs_per_gpu}")
        if args.slurm_runs_per_job < 1:
            parser.error(f"--slurm-runs-per-job must be >= 1, got {args.slurm_runs_per_job}")
        if args.run_memory_gib is not None and not args.run_memory_gib > 0:
            parser.error(f"--run-memory-gib must be > 0 (GiB one run needs on the GPU), got "
                         f"{args.run_memory_gib}")
        slurm = {"partition": args.slurm_partition, "gpus": args.slurm_gpus,
                 "time": args.slurm_time, "mem": args.slurm_mem, "cpus": args.slurm_cpus,
                 "python": args.slurm_python, "kernel": args.slurm_kernel}
        for option in args.slurm_option:
            key, sep, value = option.partition("=")
            if not sep or not key.strip():
                parser.error(f"--slurm-option {option!r}: expected KEY=VALUE, e.g. "
                             f"account=myproject")
            slurm[key.strip()] = value.strip()
        try:
            if args.status:
                rows = grid_status(args.grid, args.output)
                width = max([len(r["run"]) for r in rows] + [3])
                for row in rows:
                    print(f"{row['run']:<{width}}  {row['status']:<11}  {row['detail']}")
                shared = running_per_device(rows)
                if shared:
                    print(f"running per GPU / job: {shared}")
                return 0
            if args.cancel:
                for line in cancel_grid(args.grid, args.output) or ["nothing to cancel"]:
                    print(f"[grid] {line}")
                return 0
            summary = run_grid(args.grid, args.output, executor=args.executor, jobs=args.jobs,
                               slurm=slurm, force=args.force, progress=not args.no_progress,
                               threads=args.threads, detach=args.detach,
                               runs_per_gpu=args.runs_per_gpu,
                               slurm_runs_per_job=args.slurm_runs_per_job,
                               run_memory_gib=args.run_memory_gib)
        except (GridError, ValueError) as exc:  # a bad grid file or option: say what, no trace
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        print(summary.describe())
        return 0 if summary.ok else 1
    return _demo(args)


def _demo(args) -> int:
    extra = {k: yaml.safe_load(v) for k, v in args.param}
    output = args.output or "outputs/demo"
    started = time.time()
    run_dirs = run_pipeline(output, extra=extra, force=args.force)
    numbers, shown = demo_table(run_dirs)
    # both APs: the standard mAP and MBA-Net's trapezoid mAP (docs/protocols.md#metrics)
    columns = ["stage", "backbone", "rank1", "rank5", "mAP", METRIC_LABELS["mAP_mbanet"], "mINP"]
    print(shown[columns].to_string())
    out = resolve_path(output)
    atomic_write_text(out / "comparison.csv", numbers.to_csv())
    atomic_write_text(out / "comparison.md", markdown_table(shown[columns]))
    print(f"[pipeline] done in {time.time() - started:.1f} s; results in {out}")
    return 0
