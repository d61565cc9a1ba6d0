"""The one checkpoint format of the workbench.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code is ever executed)::

    format      "handclip_nb.checkpoint/2"
    kind        "last" (what resuming needs) | "best" (the kept state every reader loads)
    stage       "stage1" | "stage2" | ...
    epoch       completed epochs
    step        steps done in epoch ``epoch + 1`` (0: the checkpoint is at an epoch boundary)
    partial     the running epoch of a mid-epoch checkpoint (None at a boundary): its loss
                sums, batches and images so far, seconds spent, and the RNG state at its start
                (the resumed run replays the epoch's first ``step`` batches without training
                on them, so the rest of the epoch sees the same batches and random numbers)
    model       {module name: state_dict} of the modules that train (parameters and buffers);
                frozen weights are never copied: ``meta["frozen"]`` names them
    optimizer, scheduler, scaler      state dicts (None where absent, and always None in best.pt)
    rng         {"torch", "cuda", "numpy", "python"} generator states (None in best.pt)
    history     per-epoch records (losses, learning rate, validation)
    best        {"epoch", "score", "metric"}
    params      the resolved parameters of the run
    meta        what a reader must check before use (backbone, num_classes, ..., and
                ``frozen``: the SHA-256 of the frozen tensors the run trained beside)
    git_commit  provenance

Format 1 (the same layout without ``kind``, ``step`` and ``partial``, with optimizer state in
best.pt as well) is read as an epoch-boundary checkpoint whose frozen weights were not recorded.

Files are streamed to a temp file and renamed (:func:`~handclip_nb.runs.atomic_torch_save`), so
a run killed while saving keeps its previous checkpoint. :func:`load_checkpoint` turns every
problem into a clear error naming the file.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .runs import atomic_torch_save, git_commit

__all__ = ["FORMAT", "OLD_FORMATS", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "rng_state", "restore_rng_state", "check_meta", "frozen_tensors", "frozen_sha256",
           "check_frozen"]

FORMAT = "handclip_nb.checkpoint/2"
#: Earlier formats that still load (see the module docstring).
OLD_FORMATS = ("handclip_nb.checkpoint/1",)


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
                    meta: Mapping[str, Any] | None = None, kind: str = "last", step: int = 0,
                    partial: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint. ``kind="best"`` is the kept state for readers: its optimizer,
    scheduler, scaler and RNG are left out whatever is passed (resuming reads ``last.pt``)."""
    if kind not in ("last", "best"):
        raise ValueError(f"kind must be 'last' or 'best', got {kind!r}")
    resumable = kind == "last"
    payload = {
        "format": FORMAT,
        "kind": kind,
        "stage": stage,
        "epoch": int(epoch),
        "step": int(step),
        "partial": dict(partial) if partial is not None else None,
        "model": {name: {k: v.detach().cpu() for k, v in sd.items()}
                  for name, sd in model.items()},
        "optimizer": optimizer.state_dict() if resumable and optimizer is not None else None,
        "scheduler": scheduler.state_dict() if resumable and scheduler is not None else None,
        "scaler": (scaler.state_dict() if resumable and scaler is not None and scaler.is_enabled()
                   else None),
        "rng": rng_state() if resumable else None,
        "history": list(history or []),
        "best": dict(best or {}),
        "params": dict(params or {}),
        "meta": dict(meta or {}),
        "git_commit": git_commit(),
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """Load one of our checkpoints with ``weights_only=True``; clear errors for bad files. A
    format-1 file comes back in format 2's layout (``format`` keeps what the file says)."""
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
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt)
    if found in OLD_FORMATS:
        ckpt = {"kind": "last" if path.name != "best.pt" else "best", "step": 0,
                "partial": None, **ckpt}
    elif found != FORMAT:
        raise CheckpointError(f"{path} is not a handclip_nb checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path} is a {ckpt['stage']} checkpoint; expected {stage}")
    return ckpt


def frozen_tensors(frozen: Mapping[str, torch.nn.Module],
                   trainable: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``{name.key: tensor}`` of every parameter and buffer of the ``frozen`` modules that is not
    inside one of the ``trainable`` ones (a stage-2 run's CLIP minus its image encoder)."""
    trained = {id(m) for module in trainable.values() for m in module.modules()}
    out: dict[str, torch.Tensor] = {}
    for name, module in frozen.items():
        if id(module) in trained:
            continue
        skipped = [prefix + "." for prefix, m in module.named_modules()
                   if prefix and id(m) in trained]
        for key, tensor in module.state_dict().items():
            if not any(key.startswith(prefix) for prefix in skipped):
                out[f"{name}.{key}"] = tensor
    return out


def frozen_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name): the
    same weights give the same digest on every device and process."""
    digest = hashlib.sha256(b"handclip_nb.frozen/1\0")
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def check_frozen(path: str | os.PathLike, meta: Mapping[str, Any],
                 expected: Mapping[str, Any] | None) -> None:
    """Refuse a checkpoint trained beside other frozen weights than this run's (its
    ``meta["frozen"]``; checkpoints that did not record them are not checked)."""
    saved = meta.get("frozen")
    if not saved or not expected or saved.get("sha256") == expected.get("sha256"):
        return
    raise CheckpointError(
        f"checkpoint {path} was trained beside other frozen weights than this run's "
        f"({saved.get('tensors')} frozen tensors of backbone {meta.get('backbone')!r}, sha256 "
        f"{str(saved.get('sha256'))[:16]}..., here {str(expected.get('sha256'))[:16]}...): use "
        f"the backbone weights (backbone, weights, image_size) the run was made with, or start "
        f"afresh in a new output_dir")


def check_meta(path: str | os.PathLike, meta: Mapping[str, Any],
               expected: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose backbone, identities, ... differ from this run's (the frozen
    weights have their own check, :func:`check_frozen`)."""
    wrong = [f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if k != "frozen" and meta.get(k) != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({'; '.join(wrong)}); "
                              f"use a run made with the same settings")
