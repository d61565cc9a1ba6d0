"""Batch samplers: P×K (every batch holds P identities with K images each), and the plain
shuffled batches of CLIP-HandID (:class:`ShuffledBatchSampler`).

Without P×K most anchors of a batch-hard triplet loss have no positive in the batch
(docs/mistakes.md #7).  Identities with fewer than K images are sampled with replacement.  An epoch
visits every identity's images in chunks of K (torchreid's RandomIdentitySampler design), and
the order depends only on (seed, epoch), so a resumed run draws the same batches.

The batches hold :class:`Draw` items, each image index numbered by how often the epoch drew it
before (:func:`number_draws`): an image drawn twice into one batch is two draws, and
:class:`~handclip_nb.data.datasets.ImageListDataset` augments each draw from its own seed.
Otherwise the two copies would be the same tensor, a positive pair at distance 0 that teaches
nothing (CLIP-ReID augments every draw independently).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["PKSampler", "ShuffledBatchSampler", "Draw", "number_draws"]


class Draw(NamedTuple):
    """One draw of an epoch's sample sequence: the dataset item ``index``, and ``occurrence``,
    how many times the epoch drew that item before (0 for its first draw)."""

    index: int
    occurrence: int


def number_draws(batches: Iterable[Sequence[int]]) -> list[list[Draw]]:
    """An epoch's batches of item indices as batches of :class:`Draw`: the k-th draw of an
    index in the epoch (counted across batches, in order) gets ``occurrence`` k - 1.  The
    numbers depend on the epoch's sequence alone, never on how the loader's workers share it."""
    drawn: dict[int, int] = defaultdict(int)
    numbered = []
    for batch in batches:
        draws = []
        for index in batch:
            index = int(index)
            draws.append(Draw(index, drawn[index]))
            drawn[index] += 1
        numbered.append(draws)
    return numbered


class PKSampler(Sampler[list[Draw]]):
    """A batch sampler (use as ``DataLoader(batch_sampler=...)``) yielding P×K lists of
    :class:`Draw` (index, occurrence), for a dataset that seeds each draw's augmentation
    (:class:`~handclip_nb.data.datasets.ImageListDataset`)."""

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0):
        if p < 2:
            raise ValueError(f"PKSampler needs p >= 2 identities per batch, got p={p}")
        if k < 2:
            raise ValueError(f"PKSampler needs k >= 2 images per identity, got k={k}")
        by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            by_label[int(label)].append(index)
        if len(by_label) < p:
            raise ValueError(f"PKSampler: p={p} identities per batch but the data has only "
                             f"{len(by_label)}; lower p")
        self.by_label = dict(sorted(by_label.items()))
        self.p, self.k, self.seed = p, k, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _chunks(self, rng: np.random.Generator) -> list[tuple[int, list[int]]]:
        chunks = []
        for label, idx in self.by_label.items():
            idx = np.asarray(idx)
            if len(idx) < self.k:
                idx = rng.choice(idx, size=self.k, replace=True)
            else:
                idx = rng.permutation(idx)
            usable = len(idx) - len(idx) % self.k
            for start in range(0, usable, self.k):
                chunks.append((label, idx[start:start + self.k].tolist()))
        return chunks

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pending: dict[int, list[list[int]]] = defaultdict(list)
        for label, chunk in self._chunks(rng):
            pending[label].append(chunk)
        batches = []
        while len(pending) >= self.p:
            labels = sorted(pending)
            chosen = rng.choice(len(labels), size=self.p, replace=False)
            batch: list[int] = []
            for c in sorted(chosen):
                label = labels[c]
                batch.extend(pending[label].pop())
                if not pending[label]:
                    del pending[label]
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[Draw]]:
        return iter(number_draws(self._batches()))

    def __len__(self) -> int:
        return len(self._batches())


class ShuffledBatchSampler(Sampler):
    """Plain shuffled batches of ``batch_size`` items, the last incomplete one dropped: what
    CLIP-HandID trains on (``train_handID.py``: ``DataLoader(shuffle=True)`` and ``if
    now_batch_size < args.batch_size: continue``), no identity structure. The order is a
    permutation drawn from (``seed``, epoch) alone, so a resumed run draws the same batches."""

    def __init__(self, size: int, batch_size: int, seed: int = 0):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(size) < int(batch_size):
            raise ValueError(f"{size} training images make no complete batch of {batch_size} "
                             f"(the last incomplete batch is dropped, as CLIP-HandID does); "
                             f"lower batch_size")
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        return self.size // self.batch_size
