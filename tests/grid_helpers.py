"""What the grid tests share (tests/test_grid*.py): the tiny grid, the metric columns they
compare, and small readers of a grid's output folder."""
from __future__ import annotations

import os
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import yaml

METRIC_COLUMNS = ["rank1_mean", "rank5_mean", "rank10_mean", "mAP_mean", "mAP_mbanet_mean",
                  "mINP_mean", "rank1_std", "mAP_std"]

#: A grid that runs in seconds per run: untrained tiny-vit (its zero-shot ranking depends on
#: the seed that initialises it), 12 synthetic people, stages 0-2.
TINY = {
    "params": {"backbone": "tiny-vit", "num_splits": 2, "batch_size": 32,
               "synthetic_subjects": 12, "synthetic_images": 4, "image_size": [64, 96],
               "stage1": {"epochs": 2, "lr": 1.0e-2, "warmup_epochs": 1},
               "stage2": {"epochs": 2, "lr": 3.0e-3, "warmup_epochs": 1, "milestones": [1],
                          "p_ids": 4, "k_images": 2}},
    "axes": {"seed": [0, 1]},
    "stages": ["stage0", "stage1", "stage2"],
}

#: The tiny grid's seed-0 runs alone. The Slurm tests that compare with the local run of
#: ``TINY`` run this: what they check (one submission per run, a driver that finds its
#: predecessor's jobs, Slurm's metrics equal the local ones) holds run by run, and the second
#: seed only doubled their kernels (each about 12 s of CPU on the 2-core machine).
ONE_SEED = {**TINY, "axes": {"seed": [0]}}


def write_grid(tmp_path: Path, body: dict, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def grid_metrics(csv: Path) -> pd.DataFrame:
    table = pd.read_csv(csv).set_index("run").sort_index()
    return table[METRIC_COLUMNS]


def seed0_metrics(csv: Path) -> pd.DataFrame:
    """``grid_metrics`` of a grid's seed-0 runs: the reference a ``ONE_SEED`` grid must equal."""
    table = grid_metrics(csv)
    return table[table.index.str.endswith("-seed0")]


def job_of(out: Path, run: str) -> str:
    """The Slurm job id of a grid run, from submitit's pickled submissions."""
    for _ in range(100):
        for pkl in (out / "slurm").glob("*_submitted.pkl"):
            try:
                with open(pkl, "rb") as f:
                    name = cloudpickle.load(f).function.spec["name"]
            except Exception:  # a pickle still being written: try again
                continue
            if name == run:
                return pkl.name.split("_")[0]
        time.sleep(0.2)
    raise AssertionError(f"no Slurm job for {run}")


def submissions(out: Path) -> int:
    """How many jobs the grid submitted (submitit writes one pickle per submission)."""
    return len(list((out / "slurm").glob("*_submitted.pkl")))


def project_home(parent: Path) -> Path:
    """``parent/home`` shaped as a project root (HANDCLIP_HOME): outputs/ go under it."""
    home = parent / "home"
    (home / "handclip_nb").mkdir(parents=True)
    (home / "notebooks").mkdir()
    return home


def slurm_home(tmp_path: Path) -> tuple[Path, dict]:
    """A ``project_home`` and the environment of a driver (or its jobs) that uses it."""
    home = project_home(tmp_path)
    return home, {**os.environ, "HANDCLIP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
