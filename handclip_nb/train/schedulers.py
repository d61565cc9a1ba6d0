"""Learning-rate schedules, stepped once per EPOCH (docs/mistakes.md #8: the earlier code stepped per
batch with T_max in epochs).  All are ``LambdaLR`` factors of each group's base learning rate, so
their state dicts save and restore with the checkpoint.

Two epoch conventions (parameter ``lr_schedule``):

* ``"workbench"`` (default): the factor of 0-based epoch ``i`` is the schedule's value at ``i``,
  so the first epoch trains at the warmup start and a milestone ``m`` takes effect after ``m``
  epochs; the stage-1 cosine runs over the epochs after the warmup.
* ``"clipreid"``: CLIP-ReID's code.  Its schedulers are stepped at the start of each 1-based
  epoch ``e`` (``processor/processor_clipreid_stage1.py``: ``scheduler.step(epoch)``;
  ``processor_clipreid_stage2.py``: ``scheduler.step()`` after the constructor's own step), so
  epoch ``e`` trains at the value at ``e``: the warmup start itself is never used, and a
  milestone ``m`` applies from epoch ``m`` inclusive.  Stage 1 is timm's ``CosineLRScheduler``
  (``solver/scheduler_factory.py``, ``solver/cosine_lr.py``): linear warmup from the absolute
  ``warmup_lr_init``, then a cosine on the absolute epoch (not shifted by the warmup) down to
  ``lr_min``, reached at the last epoch.  Stage 2 is ``WarmupMultiStepLR``
  (``solver/lr_scheduler.py``): factor ``wf·(1 − e/W) + e/W`` for ``e < W``, times
  ``gamma ** bisect_right(milestones, e)``.

The factor functions take the epoch in their own convention; the builders translate.
"""
from __future__ import annotations

import math
import warnings
from bisect import bisect_right
from typing import Mapping, Optional, Sequence

from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LR_SCHEDULES", "warmup_cosine", "warmup_multistep", "warmup_cosine_factor",
           "warmup_multistep_factor", "clipreid_cosine_lr", "clipreid_multistep_factor",
           "stage1_scheduler", "image_stage_scheduler", "lr_trajectory"]

#: valid ``lr_schedule`` values (module docstring)
LR_SCHEDULES = ("workbench", "clipreid")


def _warmup(epoch: int, warmup_epochs: int, start_factor: float) -> float | None:
    if epoch < warmup_epochs:
        return start_factor + (1.0 - start_factor) * epoch / warmup_epochs
    return None


def warmup_cosine_factor(epoch: int, epochs: int, warmup_epochs: int, start_factor: float = 0.1,
                         min_factor: float = 0.01) -> float:
    """Linear warmup from ``start_factor``, then cosine from 1 to ``min_factor`` at ``epochs``
    (0-based ``epoch``; the workbench's stage-1 schedule)."""
    w = _warmup(epoch, warmup_epochs, start_factor)
    if w is not None:
        return w
    span = max(1, epochs - warmup_epochs)
    t = min(1.0, (epoch - warmup_epochs) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_multistep_factor(epoch: int, milestones: Sequence[int], gamma: float = 0.1,
                            warmup_epochs: int = 10, start_factor: float = 0.1) -> float:
    """Linear warmup, then ×gamma at each milestone epoch (0-based ``epoch``; the workbench's
    stage-2/3 schedule)."""
    w = _warmup(epoch, warmup_epochs, start_factor)
    if w is not None:
        return w
    return gamma ** sum(epoch >= m for m in milestones)


def clipreid_cosine_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int,
                       warmup_lr_init: float, lr_min: float) -> float:
    """Learning rate of 1-based ``epoch`` under CLIP-ReID's stage-1 scheduler: timm's
    ``CosineLRScheduler(t_initial=epochs, lr_min, warmup_lr_init, warmup_t=warmup_epochs,
    cycle_limit=1, t_in_epochs=True)`` (``solver/scheduler_factory.py``, ``solver/cosine_lr.py``).

    ``e < W``: ``warmup_lr_init + e·(base − warmup_lr_init)/W``; then
    ``lr_min + ½(base − lr_min)(1 + cos(π·e/T))`` with the absolute epoch ``e``; ``lr_min``
    from ``e = T`` on.  ViT-B/16 (base 3.5e-4, 1e-5, 1e-6, W 5, T 120): e1 7.8e-5, e2 1.46e-4,
    e4 2.82e-4, e5 ≈ 3.49e-4, e120 1e-6.
    """
    if epoch < warmup_epochs:
        return warmup_lr_init + epoch * (base_lr - warmup_lr_init) / warmup_epochs
    if epoch >= epochs:
        return lr_min
    return lr_min + 0.5 * (base_lr - lr_min) * (1.0 + math.cos(math.pi * epoch / epochs))


def clipreid_multistep_factor(epoch: int, milestones: Sequence[int], gamma: float = 0.1,
                              warmup_epochs: int = 10, warmup_factor: float = 0.1) -> float:
    """Factor of 1-based ``epoch`` under CLIP-ReID's stage-2 ``WarmupMultiStepLR`` (linear
    method, ``solver/lr_scheduler.py``): ``(wf·(1 − e/W) + e/W if e < W else 1) ·
    gamma ** bisect_right(milestones, e)``.  ViT (base 5e-6, wf 0.1, W 10, [30, 50]): e1 9.5e-7,
    e2 1.4e-6 … e10 5e-6; e30–49 5e-7; e50–60 5e-8."""
    factor = 1.0
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        factor = warmup_factor * (1.0 - alpha) + alpha
    return factor * gamma ** bisect_right(sorted(milestones), epoch)


def warmup_cosine(optimizer, epochs: int, warmup_epochs: int = 5, start_factor: float = 0.1,
                  min_factor: float = 0.01) -> LambdaLR:
    return LambdaLR(optimizer, lambda e: warmup_cosine_factor(e, epochs, warmup_epochs,
                                                              start_factor, min_factor))


def warmup_multistep(optimizer, milestones: Sequence[int], gamma: float = 0.1,
                     warmup_epochs: int = 10, start_factor: float = 0.1) -> LambdaLR:
    milestones = sorted(int(m) for m in milestones)
    return LambdaLR(optimizer, lambda e: warmup_multistep_factor(e, milestones, gamma,
                                                                 warmup_epochs, start_factor))


def _check_schedule(name: str) -> str:
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; valid: {', '.join(LR_SCHEDULES)}")
    return name


def _ratio(value: Optional[float], base: float, default: float) -> float:
    """``value`` (an absolute learning rate) as a factor of ``base``; ``default`` when None."""
    if value is None:
        return default
    return float(value) / base if base > 0 else 0.0


def stage1_scheduler(optimizer, params: Mapping) -> LambdaLR:
    """Stage 1's warmup + cosine, per ``params``: ``epochs``, ``warmup_epochs``,
    ``lr_schedule``, ``warmup_lr_init`` (None = 0.1 × lr) and ``lr_min`` (None = 0.01 × lr);
    ``warmup_lr_init`` and ``lr_min`` are absolute learning rates, as in CLIP-ReID."""
    schedule = _check_schedule(params.get("lr_schedule", "workbench"))
    epochs, warmup = int(params["epochs"]), int(params["warmup_epochs"])
    init, floor = params.get("warmup_lr_init"), params.get("lr_min")
    lambdas = []
    for group in optimizer.param_groups:
        base = float(group["lr"])
        start, end = _ratio(init, base, 0.1), _ratio(floor, base, 0.01)
        if schedule == "workbench":
            lambdas.append(lambda e, s=start, m=end: warmup_cosine_factor(e, epochs, warmup, s, m))
        else:
            lambdas.append(lambda e, b=base, s=start, m=end: (
                clipreid_cosine_lr(e + 1, b, epochs, warmup, s * b, m * b) / b if b > 0 else 0.0))
    return LambdaLR(optimizer, lambdas)


def image_stage_scheduler(optimizer, params: Mapping) -> LambdaLR:
    """Stages 2 and 3: warmup over ``warmup_epochs`` from ``warmup_factor`` × lr, then
    ×``gamma`` at each of ``milestones``, with the epoch convention of ``lr_schedule``."""
    schedule = _check_schedule(params.get("lr_schedule", "workbench"))
    milestones = sorted(int(m) for m in params["milestones"])
    gamma, warmup = float(params["gamma"]), int(params["warmup_epochs"])
    factor = float(params.get("warmup_factor", 0.1))
    if schedule == "workbench":
        return LambdaLR(optimizer, lambda e: warmup_multistep_factor(e, milestones, gamma,
                                                                     warmup, factor))
    return LambdaLR(optimizer, lambda e: clipreid_multistep_factor(e + 1, milestones, gamma,
                                                                   warmup, factor))


def lr_trajectory(scheduler: LambdaLR, epochs: int, group: int = 0) -> list[float]:
    """The learning rate each epoch trains at (index 0 = epoch 1), as the training loop steps
    ``scheduler`` (once after every epoch).  Advances ``scheduler``: pass a fresh one."""
    out = []
    with warnings.catch_warnings():  # no optimizer.step() here: only the schedule is read
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
        for _ in range(int(epochs)):
            out.append(float(scheduler.optimizer.param_groups[group]["lr"]))
            scheduler.step()
    return out
