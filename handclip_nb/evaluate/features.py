"""Feature extraction with optional flip TTA, and an on-disk feature cache.

Features are the backbone's global embedding, L2-normalised, so ranking by cosine distance
(``1 - q·g``) equals ranking by Euclidean distance on the unit sphere.  The cache key covers
everything that changes the numbers: the backbone fingerprint (name + weights hash), the image
list with each file's size and mtime, the transform's description, the flip flag, and the
device type and precision the features were computed in (fp32, fp16 or bf16 autocast) — so a
re-evaluation never re-encodes, a changed image or transform never reuses stale features, and a
CPU run never reads a GPU run's fp16 features (nor the other way round).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.datasets import ImageListDataset, make_loader
from ..data.images import ImageSource
from ..device import Precision, resolve_device
from ..models.backbones import backbone_fingerprint
from ..progress import tqdm
from ..runs import atomic_torch_save

__all__ = ["extract_features", "feature_cache_key", "cosine_distance"]


def feature_cache_key(fingerprint: str, paths: Sequence[str], transform_desc: str,
                      flip: bool, precision: Precision) -> str:
    """The cache file name of features of ``paths``: ``precision`` is the autocast they are
    computed under (its device type and fp32 / fp16 / bf16)."""
    h = hashlib.sha256()
    h.update(f"{fingerprint}\n{transform_desc}\nflip={flip}\n"
             f"device={precision.device_type}\nprecision={precision.name}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def cosine_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between L2-normalised rows: smaller = closer, in [0, 2]."""
    return 1.0 - query @ gallery.T


@torch.no_grad()
def extract_features(backbone, paths: Sequence[str], transform: Callable, batch_size: int = 64,
                     device: str | torch.device = "cpu", flip: bool = False,
                     cache_dir: str | os.PathLike | None = None, num_workers: int | None = 0,
                     desc: str = "features", encode: Callable | None = None,
                     cache_tag: str | None = None, normalize: bool = True,
                     precision: Precision | None = None) -> torch.Tensor:
    """Encode ``paths`` → float32 CPU tensor [N, D], each row L2-normalised (``normalize``).

    ``transform`` is an :class:`~handclip_nb.data.images.ImageSource` (the stages' path:
    decoded once through its cache, which is filled in parallel first) or a transform of PIL
    images. ``precision`` is the autocast of the forward passes, the run's own (its ``amp`` /
    ``amp_dtype``: :func:`~handclip_nb.device.run_precision`); default fp32.
    ``num_workers=None`` derives the loader's workers from the machine.

    ``encode`` maps an image batch to features (default: the backbone's global embedding), so
    later stages rank with their own heads through the same loop.  A custom ``encode`` is only
    cached when ``cache_tag`` identifies it (e.g. a hash of the head's weights); the backbone
    fingerprint alone cannot tell two heads apart.
    """
    device = resolve_device(device)
    precision = precision or Precision(device.type)
    if precision.device_type != device.type:
        raise ValueError(f"extract_features on {device} with a precision for "
                         f"{precision.device_type!r} ({precision.describe()}); pass the precision "
                         f"of this device: run_precision(params, {str(device)!r})")
    cache_path = None
    if encode is not None and cache_tag is None:
        cache_dir = None
    if cache_dir is not None:
        key = feature_cache_key(f"{backbone_fingerprint(backbone)}|{cache_tag or 'global'}"
                                f"|norm={normalize}",
                                paths, repr(transform), flip, precision)
        cache_path = Path(cache_dir) / f"{key}.pt"
        if cache_path.is_file():
            try:
                cached = torch.load(cache_path, map_location="cpu", weights_only=True)
                feats = cached["features"]
                if feats.shape[0] == len(paths):
                    return feats
            except Exception:  # a corrupt cache entry is re-computed, never trusted
                pass
    encode = encode or (lambda x: backbone.encode_image(x).global_embedding)
    if isinstance(transform, ImageSource):
        transform.prepare(paths)  # decode the missing images once, on every core
    loader = make_loader(ImageListDataset(paths, [0] * len(paths), transform), device,
                         num_workers, batch_size=batch_size, shuffle=False)
    was_training = backbone.training
    backbone.eval()
    chunks = []
    for images, _, _ in tqdm(loader, desc=desc, leave=False):
        images = images.to(device, non_blocking=True)
        with precision.autocast():
            f = encode(images).float()
            if flip:
                f = f + encode(torch.flip(images, dims=[3])).float()
        chunks.append((torch.nn.functional.normalize(f, dim=1) if normalize else f).cpu())
    backbone.train(was_training)
    feats = torch.cat(chunks) if chunks else torch.empty(0, 0)
    if cache_path is not None:
        atomic_torch_save({"features": feats, "count": len(paths)}, cache_path)
    return feats
