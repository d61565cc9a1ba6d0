"""Run folders: one layout for every stage, atomic writes, and the provenance of each result.

Layout of ``output_dir``::

    params.yaml        resolved parameters + environment (versions, git commit), written first
    splits.json        the protocol's index manifest (seed + content hash), no image copies
    metrics.json       written last, atomically: its presence means the run finished
    figures/*.png      figures shown in the notebook
    checkpoints/       last.pt (the resume point: see train/loop.py for when it is written) and
                       best.pt (the kept state), training stages
    prompts.pt         stage 1's learned prompts

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written ``metrics.json`` or checkpoint behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np
import yaml

from .constants import METRIC_NAMES
from .progress import set_interactive

__all__ = [
    "PARAMS_FILE",
    "METRICS_FILE",
    "SPLITS_FILE",
    "PROMPTS_FILE",
    "LAST_CHECKPOINT",
    "BEST_CHECKPOINT",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "seed_everything",
    "seed_run",
    "environment_info",
    "git_commit",
    "project_root",
    "resolve_path",
    "feature_cache_dir",
    "decode_cache_dir",
    "Run",
    "start_run",
    "finish_run",
    "read_metrics",
    "RunFolderError",
    "domain_name",
    "METRIC_NAMES",
]

#: The run-folder layout: every reader and writer names its files through these.
PARAMS_FILE = "params.yaml"
METRICS_FILE = "metrics.json"
SPLITS_FILE = "splits.json"
PROMPTS_FILE = "prompts.pt"
LAST_CHECKPOINT = "checkpoints/last.pt"
BEST_CHECKPOINT = "checkpoints/best.pt"

PACKAGES = ("torch", "torchvision", "openai-clip", "numpy", "pillow", "scikit-learn",
            "papermill", "nbval", "matplotlib", "handclip-nb")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder + ``os.replace``."""
    with _atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` when the block ends: a temp file
    in the same folder, fsynced, then ``os.replace``; removed if the block raises, so a reader
    sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions open() would have
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True,
                                              default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` streamed into a temp file in ``path``'s folder, fsynced, then renamed
    into place: a run killed while saving keeps the previous file, and no second in-memory
    copy of the serialised bytes is made (a ViT-B/16 ``last.pt`` is ~1 GB). The temp file is
    removed when the save fails."""
    import torch  # here, not at the top: the pipeline's command line imports runs without torch

    with _atomic_file(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); ``deterministic`` (the parameter of that
    name) asks cuDNN for deterministic kernels without autotuning (bit-repeatable GPU runs,
    slower convolutions), else lets it benchmark and pick the fastest kernel per shape. Both
    settings are set either way, so a notebook kernel that ran one run does not pass its choice
    on to the next."""
    import torch  # here, not at the top: the pipeline's command line imports runs without torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)


def seed_run(params: Mapping[str, Any]) -> None:
    """:func:`seed_everything` with a run's ``seed`` and ``deterministic`` parameters."""
    seed_everything(int(params["seed"]), deterministic=bool(params.get("deterministic", True)))


def project_root() -> Path:
    """The workbench checkout that holds ``notebooks/`` and ``handclip_nb/``.

    Relative paths (``outputs/...``) resolve against it, so a notebook opened in JupyterLab
    (whose kernel runs in ``notebooks/``) and the same notebook run by papermill from the
    repository root write to the same place.  Falls back to the current folder.
    """
    env = os.environ.get("HANDCLIP_HOME")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "handclip_nb").is_dir() and (folder / "notebooks").is_dir():
            return folder
    return here


def resolve_path(path: str | os.PathLike) -> Path:
    """Absolute paths stay; relative ones are taken from :func:`project_root`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def feature_cache_dir() -> Path:
    """The shared on-disk feature cache (keys cover model, images and transform)."""
    return project_root() / "outputs" / ".feature_cache"


def decode_cache_dir() -> Path:
    """The shared decoded-image cache (``data/images.py``; keys cover file and geometry)."""
    return project_root() / "outputs" / ".decode_cache"


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The current commit hash (with ``-dirty`` if the tree has changes), or ``"unknown"``."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": git_commit(),
    }
    try:
        import torch  # here, not at the top: the pipeline's command line imports runs without torch

        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        # the CPU's intra-op threads change the order of float sums, and so a result's last
        # digits (two golden notebook cells differ between one thread and two)
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover - torch is a hard dependency
        pass
    return info


@dataclass
class Run:
    """An open run folder: created by :func:`start_run`, closed by :func:`finish_run`."""

    params: Mapping[str, Any]
    output_dir: Path
    started: float = field(default_factory=time.time)
    #: versions and git commit, read once at the start and recorded again with the metrics
    environment: dict = field(default_factory=dict)

    @property
    def figures_dir(self) -> Path:
        d = self.output_dir / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def elapsed(self) -> float:
        return time.time() - self.started

    def save_figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` (atomically)."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return atomic_write_bytes(self.figures_dir / f"{name}.png", buf.getvalue())

    def save_figures(self, figures: Mapping[str, Any]) -> list[Path]:
        """Save each ``{name: figure}`` as ``figures/<name>.png``."""
        return [self.save_figure(fig, name) for name, fig in figures.items()]


def start_run(params: Mapping[str, Any]) -> Run:
    """Seed everything, create ``output_dir`` and write ``params.yaml`` with provenance.

    A stale ``metrics.json`` from an earlier run in the same folder is removed first, so the
    folder never looks finished while this run is in progress.
    """
    set_interactive(bool(params.get("interactive", False)))
    seed_run(params)
    out = resolve_path(params["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    stale = out / METRICS_FILE
    if stale.exists():
        stale.unlink()
    env = environment_info()
    record = {"params": dict(params), "environment": env,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(out / PARAMS_FILE, yaml.safe_dump(record, sort_keys=True))
    return Run(params=params, output_dir=out, environment=env)


def _check_metric_block(block: Mapping[str, Any], where: str) -> None:
    for name in METRIC_NAMES:
        if name not in block:
            hint = ("; it is MBA-Net's trapezoid mAP, which rank_metrics returns since both APs "
                    "are recorded: a block copied from a metrics.json written before then lacks "
                    "it, so re-run (or re-evaluate) that run" if name == "mAP_mbanet" else "")
            raise ValueError(f"metrics {where!r} lacks {name!r}{hint}")
        entry = block[name]
        if not {"mean", "std", "per_split"} <= set(entry):
            raise ValueError(f"metrics {where}.{name} must hold mean, std and per_split")
        for v in [entry["mean"], *entry["per_split"]]:
            if not 0.0 <= float(v) <= 100.0:
                raise ValueError(f"metrics {where}.{name} = {v} is not a percentage (0-100)")


REQUIRED_DATA_KEYS = ("train_ids", "train_images", "test_ids", "test_images",
                      "queries_per_split", "gallery_per_split")


def finish_run(run: Run, metrics: Mapping[str, Any]) -> Path:
    """Validate the docs/contracts.md schema, add provenance and write ``metrics.json`` atomically."""
    if metrics.get("stage") == "pretrain":  # no re-ID protocol: retrieval and probes instead
        required = ("stage", "backbone", "retrieval", "probes", "data")
    elif metrics.get("stage") == "search":  # the user's own gallery: no protocol either
        required = ("stage", "backbone", "gallery", "queries", "summary")
    else:
        required = ("stage", "dataset", "aspect", "backbone", "num_splits", "test", "data")
    missing = [k for k in required if k not in metrics]
    if missing:
        raise ValueError(f"metrics.json would lack {missing}")
    if metrics["stage"] not in ("pretrain", "search"):
        _check_metric_block(metrics["test"], "test")
        lacking = [k for k in REQUIRED_DATA_KEYS if k not in metrics["data"]]
        if lacking:
            raise ValueError(f"metrics['data'] lacks protocol sizes {lacking}")
    record = dict(metrics)
    record.setdefault("seconds", round(run.elapsed(), 2))
    env = run.environment or environment_info()
    record["provenance"] = {"git_commit": env["git_commit"], "packages": env["packages"],
                            "seed": run.params.get("seed"),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return atomic_write_json(run.metrics_path, record)


class RunFolderError(FileNotFoundError):
    """A run folder that cannot be used; the message names it and the fix."""


def domain_name(dataset: str, aspect: str | None) -> str:
    """``11k/<aspect>``, ``custom/<aspect>`` or ``hd``: where a run was trained or tested."""
    return "hd" if dataset == "hd" else f"{dataset}/{aspect}"


def read_metrics(output_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the run in {output_dir} has not finished (or never ran)"
        )
    return json.loads(path.read_text())
