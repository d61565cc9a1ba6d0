"""Input sizes of CLIP image towers: valid (height, width) for a stride, and the 2-D resize of
positional embeddings (ViT grid, RN attention-pool grid) to a new token grid."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["validate_image_size", "resize_positional_embedding"]


def _as_hw(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return (image_size, image_size)
    try:
        h, w = image_size  # type: ignore[misc]
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if (h, w) != tuple(image_size):  # reject 96.5 etc.
        raise ValueError(f"image_size must be integers, got {image_size!r}")
    return (h, w)


def validate_image_size(image_size: Union[int, Sequence[int]], stride: int, backbone: str = "backbone") -> tuple[int, int]:
    """Return ``(H, W)``; both must be positive multiples of ``stride`` (ViT patch size, 32 for RN)."""
    h, w = _as_hw(image_size)
    if h > 0 and w > 0 and h % stride == 0 and w % stride == 0:
        return (h, w)

    def down(v: int) -> int:
        return max(stride, (v // stride) * stride)

    def up(v: int) -> int:
        return max(stride, -(-v // stride) * stride)

    options = sorted({(down(h), down(w)), (up(h), up(w))})
    raise ValueError(
        f"image_size (H, W) = ({h}, {w}) does not fit {backbone}: height and width must be positive "
        f"multiples of {stride} ({'patch size' if stride != 32 else 'the ResNet output stride'}). "
        f"Nearby valid sizes: {', '.join(str(o) for o in options)}"
    )


def resize_positional_embedding(
    posemb: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize a ``[prefix + gh*gw, C]`` positional embedding to a new 2-D grid.

    The prefix (class token for ViT, mean token for the RN attention pool) is kept; the grid part
    (row-major) is resampled with bicubic interpolation in 2-D (``align_corners=False``, so each new
    token takes the embedding of the image region it covers; antialiased when shrinking). The same
    grid returns ``posemb`` itself (no-op).
    """
    old_grid = tuple(int(v) for v in old_grid)
    new_grid = tuple(int(v) for v in new_grid)
    n_grid = posemb.shape[0] - num_prefix_tokens
    if n_grid != old_grid[0] * old_grid[1]:
        raise ValueError(f"positional embedding has {n_grid} grid tokens, which is not {old_grid[0]}x{old_grid[1]}")
    if old_grid == new_grid:
        return posemb
    prefix, grid = posemb[:num_prefix_tokens], posemb[num_prefix_tokens:]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    shrink = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=shrink)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(dtype)
    return torch.cat([prefix, grid], dim=0)

