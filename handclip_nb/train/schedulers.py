"""Learning-rate schedules, stepped once per EPOCH (docs/mistakes.md #8: the earlier code stepped per
batch with T_max in epochs).  Both are ``LambdaLR`` factors of the base learning rate, so their
state dicts save and restore with the checkpoint.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "warmup_multistep", "warmup_cosine_factor", "warmup_multistep_factor"]


def _warmup(epoch: int, warmup_epochs: int, start_factor: float) -> float | None:
    if epoch < warmup_epochs:
        return start_factor + (1.0 - start_factor) * epoch / warmup_epochs
    return None


def warmup_cosine_factor(epoch: int, epochs: int, warmup_epochs: int, start_factor: float = 0.1,
                         min_factor: float = 0.01) -> float:
    """Linear warmup from ``start_factor``, then cosine from 1 to ``min_factor`` at ``epochs``."""
    w = _warmup(epoch, warmup_epochs, start_factor)
    if w is not None:
        return w
    span = max(1, epochs - warmup_epochs)
    t = min(1.0, (epoch - warmup_epochs) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_multistep_factor(epoch: int, milestones: Sequence[int], gamma: float = 0.1,
                            warmup_epochs: int = 10, start_factor: float = 0.1) -> float:
    """Linear warmup, then ×gamma at each milestone epoch (CLIP-ReID stage 2)."""
    w = _warmup(epoch, warmup_epochs, start_factor)
    if w is not None:
        return w
    return gamma ** sum(epoch >= m for m in milestones)


def warmup_cosine(optimizer, epochs: int, warmup_epochs: int = 5, start_factor: float = 0.1,
                  min_factor: float = 0.01) -> LambdaLR:
    return LambdaLR(optimizer, lambda e: warmup_cosine_factor(e, epochs, warmup_epochs,
                                                              start_factor, min_factor))


def warmup_multistep(optimizer, milestones: Sequence[int], gamma: float = 0.1,
                     warmup_epochs: int = 10, start_factor: float = 0.1) -> LambdaLR:
    milestones = sorted(int(m) for m in milestones)
    return LambdaLR(optimizer, lambda e: warmup_multistep_factor(e, milestones, gamma,
                                                                 warmup_epochs, start_factor))
