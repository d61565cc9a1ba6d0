"""The one checkpoint format of the workbench.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code is ever executed)::

    format      "handclip_nb.checkpoint/1"
    stage       "stage1" | "stage2" | ...
    epoch       completed epochs
    model       {module name: state_dict} of everything that trains (and what it needs)
    optimizer, scheduler, scaler      state dicts (None where absent)
    rng         {"torch", "cuda", "numpy", "python"} generator states
    history     per-epoch records (losses, learning rate, validation)
    best        {"epoch", "score", "metric"}
    params      the resolved parameters of the run
    meta        what a reader must check before use (backbone, num_classes, ...)
    git_commit  provenance

Files are written atomically (temp + rename), so a run killed while saving keeps its previous
checkpoint.  :func:`load_checkpoint` turns every problem into a clear error naming the file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .runs import atomic_torch_save, git_commit

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state",
           "restore_rng_state", "check_meta"]

FORMAT = "handclip_nb.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's legacy state as plain types (weights_only cannot load ndarrays)
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }


def _to_lists(obj):
    if isinstance(obj, tuple):
        return [_to_lists(o) for o in obj]
    return obj


def _to_tuples(obj):
    if isinstance(obj, list):
        return tuple(_to_tuples(o) for o in obj)
    return obj


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))


def save_checkpoint(path: str | os.PathLike, *, stage: str, epoch: int,
                    model: Mapping[str, Mapping[str, torch.Tensor]], optimizer=None,
                    scheduler=None, scaler=None, history=None, best=None,
                    params: Mapping[str, Any] | None = None,
                    meta: Mapping[str, Any] | None = None) -> Path:
    payload = {
        "format": FORMAT,
        "stage": stage,
        "epoch": int(epoch),
        "model": {name: {k: v.detach().cpu() for k, v in sd.items()}
                  for name, sd in model.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state(),
        "history": list(history or []),
        "best": dict(best or {}),
        "params": dict(params or {}),
        "meta": dict(meta or {}),
        "git_commit": git_commit(),
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """Load one of our checkpoints with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, empty file, pickled code ...
        detail = (str(exc).strip().splitlines() or ["no details"])[0][:160]  # EOFError: ""
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read "
            f"({type(exc).__name__}: {detail}); delete it to start over "
            f"or point to another run"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a handclip_nb checkpoint (format "
                              f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt)!r}, "
                              f"expected {FORMAT!r})")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path} is a {ckpt['stage']} checkpoint; expected {stage}")
    return ckpt


def check_meta(path: str | os.PathLike, meta: Mapping[str, Any],
               expected: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose backbone, identities, ... differ from this run's."""
    wrong = [f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({'; '.join(wrong)}); "
                              f"use a run made with the same settings")
