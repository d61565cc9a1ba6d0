"""Cross-attention heatmaps of a PromptSG model (static matplotlib figures).

The model's language-guided cross-attention gives, per image and prompt, a weight for every
patch of the image grid: an array ``[heads, gh, gw]`` whose grid sums to 1 per head. These
figures overlay those weights on *the picture the model saw* — the letterboxed input of size
``(H, W)`` (``handclip_nb.data.transforms.LetterboxResize``) — so each patch lands on its own
pixels.

Everything a figure needs from a trained model goes through :class:`AttentionSource` (the
attention notebook implements it over the real model; the tests over a fake). Every function
returns a pyplot ``Figure`` and never calls ``plt.show()``: the caller displays, saves and closes
it (:mod:`.explorer` does all three).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle
from PIL import Image

from ..data.image_files import open_image
from ..data.transforms import LetterboxResize

__all__ = ["Match", "AttentionSource", "select_head", "upsample", "normalize", "total_variation",
           "region_masses", "REGION_ROWS", "REGION_COLS", "REGION_NAMES", "overlay",
           "query_figure", "topk_figure", "aggregate_figure", "load_image",
           "with_attention_colorbar", "CORRECT", "WRONG", "DISTRACTOR"]

CORRECT, WRONG = "#1a9850", "#d73027"
#: Frame of a gallery item of the query's person under another identity (:attr:`Match.distractor`)
DISTRACTOR = "#7b3294"
NEUTRAL = (128, 128, 128)
#: The 3x3 regions of :func:`region_masses`: rows top→bottom, columns left→right.
REGION_ROWS = ("fingers/top", "palm/middle", "wrist/bottom")
REGION_COLS = ("left", "centre", "right")
REGION_NAMES = tuple(f"{r.split('/')[0]}-{c}" for r in REGION_ROWS for c in REGION_COLS)

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
Head = Union[int, str]


@dataclass
class Match:
    """One gallery item of a query's ranking.

    ``image``: the gallery picture as the model saw it (PIL image or path; a picture of another
    size is letterboxed to the model's input size when drawn). ``attention``: ``[heads, gh, gw]``
    for that gallery image under the prompt mode of the ranking. ``distance``: smaller = closer.
    ``correct``: same identity as the query. ``distractor``: for an item of another identity
    that still shows the query's person, why the protocol counts it against the query (e.g.
    ``"same person, dorsal_l"``: identities are per aspect); drawn as a distractor, not ✗.
    """

    image: ImageLike
    attention: np.ndarray
    distance: float
    correct: bool
    title: str = ""
    distractor: str = ""

    def __post_init__(self):
        if self.correct and self.distractor:
            raise ValueError(f"a match of the query's identity is not a distractor "
                             f"({self.distractor!r}): give correct=False or no distractor")


@runtime_checkable
class AttentionSource(Protocol):
    """What the figures and the explorer need from a trained model.

    ``image_size``: model input ``(H, W)``; ``num_heads``: cross-attention heads;
    ``prompt_modes``: e.g. ``("composed", "simplified")`` — "composed" uses each image's own
    pseudo-word prompt, "simplified" the fixed "A photo of a {aspect} hand.".
    """

    image_size: tuple[int, int]
    num_heads: int
    prompt_modes: tuple[str, ...]

    def query_ids(self) -> list[int]:
        """Indices of the queries that can be shown."""

    def query_title(self, i: int) -> str:
        """A short label for query ``i`` (e.g. ``"q12 · id 0000034 · Hand_0000123.jpg"``)."""

    def image(self, i: int) -> Image.Image:
        """Query ``i`` letterboxed to ``image_size`` (exactly the model's input picture)."""

    def attention(self, i: int, prompt_mode: str) -> np.ndarray:
        """Cross-attention of query ``i`` under ``prompt_mode``: ``[heads, gh, gw]``."""

    def topk(self, i: int, k: int, prompt_mode: str) -> list[Match]:
        """The ``k`` closest gallery items of query ``i``, closest first."""

    def aggregate(self, prompt_mode: str, limit: int) -> np.ndarray:
        """Attention of up to ``limit`` images: ``[M, heads, gh, gw]``."""


# --------------------------------------------------------------------------------------------
# arrays
# --------------------------------------------------------------------------------------------

def select_head(attn: np.ndarray, head: Head = "mean") -> np.ndarray:
    """``[heads, gh, gw]`` → ``[gh, gw]``: the mean over heads (``"mean"``) or head ``head``.

    A 2-D ``[gh, gw]`` array is taken as a single head.
    """
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"attention must be [heads, gh, gw] (or [gh, gw]); got shape {a.shape}")
    if isinstance(head, str):
        if head != "mean":
            raise ValueError(f"head must be 'mean' or an int in 0..{a.shape[0] - 1}; got {head!r}")
        return a.mean(axis=0)
    if isinstance(head, (bool, np.bool_)) or not isinstance(head, (int, np.integer)):
        raise TypeError(f"head must be 'mean' or an int; got {type(head).__name__} {head!r}")
    if not 0 <= int(head) < a.shape[0]:
        raise ValueError(f"head {head} out of range: this attention has {a.shape[0]} heads "
                         f"(valid: 'mean', 0..{a.shape[0] - 1})")
    return a[int(head)]


def upsample(grid: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``[gh, gw]`` patch weights → ``[H, W]`` pixel map.

    Patch ``(r, c)`` covers pixels ``[r*H/gh, (r+1)*H/gh) x [c*W/gw, (c+1)*W/gw)``: with
    ``align_corners=False`` each patch value sits at the centre of its own pixel block
    (``mode="nearest"`` fills the block exactly). The values keep the grid's scale (attention
    weight per patch), so colour bars read as attention.
    """
    g = np.asarray(grid, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"grid must be [gh, gw]; got shape {g.shape}")
    H, W = int(size[0]), int(size[1])
    t = torch.from_numpy(np.ascontiguousarray(g))[None, None]
    if mode == "nearest":
        out = F.interpolate(t, size=(H, W), mode="nearest")
    elif mode in ("bilinear", "bicubic"):
        out = F.interpolate(t, size=(H, W), mode=mode, align_corners=False)
    else:
        raise ValueError(f"mode must be 'bilinear', 'bicubic' or 'nearest'; got {mode!r}")
    return out[0, 0].numpy()


def normalize(grid: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to sum 1 (a uniform map if it sums to 0)."""
    g = np.clip(np.asarray(grid, dtype=np.float64), 0, None)
    s = g.sum()
    return g / s if s > 0 else np.full_like(g, 1.0 / g.size)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance ``0.5 * sum|p - q|`` between two maps (each normalised to 1).

    0 = identical attention, 1 = disjoint attention.
    """
    p, q = np.asarray(p), np.asarray(q)
    if p.shape != q.shape:
        raise ValueError(f"maps differ in shape: {p.shape} vs {q.shape}")
    return float(0.5 * np.abs(normalize(p) - normalize(q)).sum())


def _split_weights(n: int, parts: int = 3) -> np.ndarray:
    """``[parts, n]``: how much of cell ``j`` (covering ``[j, j+1)``) falls in each part."""
    edges = np.linspace(0.0, n, parts + 1)
    lo, hi = np.arange(n), np.arange(n) + 1.0
    w = np.clip(np.minimum(hi[None], edges[1:, None]) - np.maximum(lo[None], edges[:-1, None]),
                0.0, None)
    return w  # each column sums to 1


def region_masses(grid: np.ndarray) -> np.ndarray:
    """Attention mass of the 3x3 regions of the grid: ``[3, 3]`` summing to 1.

    Rows are :data:`REGION_ROWS` (top/fingers, middle/palm, bottom/wrist), columns
    :data:`REGION_COLS`. Region borders sit at thirds of the grid; a patch cut by a border is
    shared by area. Accepts ``[gh, gw]`` or a stack ``[M, gh, gw]`` (→ ``[M, 3, 3]``).
    """
    g = np.asarray(grid, dtype=np.float64)
    single = g.ndim == 2
    if single:
        g = g[None]
    if g.ndim != 3:
        raise ValueError(f"grid must be [gh, gw] or [M, gh, gw]; got shape {g.shape}")
    g = np.clip(g, 0, None)
    tot = g.sum(axis=(1, 2), keepdims=True)
    g = np.where(tot > 0, g / np.where(tot > 0, tot, 1), 1.0 / (g.shape[1] * g.shape[2]))
    wr, wc = _split_weights(g.shape[1]), _split_weights(g.shape[2])
    out = np.einsum("rh,mhw,cw->mrc", wr, g, wc)
    return out[0] if single else out


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------

def load_image(image: ImageLike, size: tuple[int, int] | None = None,
               orientation: str = "ignore") -> Image.Image:
    """A PIL RGB image; letterboxed to ``size`` = (H, W) when given and the size differs. A
    path is read with the EXIF ``orientation`` policy (give the run's: ``"exif"`` turns a phone
    photo upright; ``"ignore"``, the default, keeps the pixels as stored)."""
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr).convert("RGB")
    else:
        im = open_image(image, orientation)
    if size is not None and im.size != (int(size[1]), int(size[0])):
        im = LetterboxResize((int(size[0]), int(size[1])))(im)
    return im


def _frame(ax, color: str | None, width: float = 4.0) -> None:
    """No ticks; a coloured frame when ``color`` is given, no frame otherwise."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_edgecolor(color)
            spine.set_linewidth(width)


def overlay(ax, image: ImageLike, grid: np.ndarray, alpha: float = 0.5, cmap: str = "jet",
            colorbar: bool = True, title: str | None = None, vmin: float | None = 0.0,
            vmax: float | None = None, frame: str | None = None, mode: str = "bilinear"):
    """Draw ``image`` on ``ax`` with the ``[gh, gw]`` attention ``grid`` upsampled on top.

    The heatmap is upsampled to the image's own pixel size, so the grid must be the one of that
    picture (the letterboxed model input). ``vmin``/``vmax`` fix the colour scale (share them
    to compare panels); the colour bar is in attention weight per patch. Returns the heatmap's
    ``AxesImage``.
    """
    im = load_image(image)
    w, h = im.size
    heat = upsample(grid, (h, w), mode=mode)
    ax.imshow(np.asarray(im))
    if vmax is None:
        vmax = float(np.max(grid)) if np.max(grid) > (vmin or 0) else (vmin or 0) + 1e-6
    hm = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest")
    _frame(ax, frame)
    if title:
        ax.set_title(title, fontsize=9, color=frame or "black")
    if colorbar:
        cb = ax.figure.colorbar(hm, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label("attention / patch", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    return hm


def _panel_width(size: tuple[int, int], height: float = 2.4) -> float:
    H, W = size
    return height * W / H


def _check_mode(source: AttentionSource, prompt_mode: str) -> str:
    modes = tuple(source.prompt_modes)
    if prompt_mode not in modes:
        raise ValueError(f"prompt_mode {prompt_mode!r} is not one of this source's modes {modes}")
    return prompt_mode


def _head_label(head: Head) -> str:
    return "mean of heads" if head == "mean" else f"head {head}"


def query_figure(source: AttentionSource, i: int, head: Head = "mean"):
    """Query ``i``: the plain input, then one heatmap per prompt mode (composed, simplified).

    The heatmaps share one colour scale (each has its colour bar); the title gives the
    total-variation distance between the composed and simplified maps.
    """
    size = tuple(source.image_size)
    modes = tuple(source.prompt_modes)
    img = load_image(source.image(i), size)
    grids = {m: select_head(source.attention(i, m), head) for m in modes}
    vmax = max(float(g.max()) for g in grids.values()) or 1e-6
    pw = _panel_width(size)
    fig, axes = plt.subplots(1, 1 + len(modes), figsize=((pw + 0.7) * (1 + len(modes)), 3.2),
                             squeeze=False)
    axes = axes[0]
    axes[0].imshow(np.asarray(img))
    _frame(axes[0], None)
    axes[0].set_title("model input (letterboxed)", fontsize=9)
    for ax, m in zip(axes[1:], modes):
        g = grids[m]
        peak = np.unravel_index(int(np.argmax(g)), g.shape)
        overlay(ax, img, g, vmin=0.0, vmax=vmax,
                title=f"{m} prompt\nmax {g.max():.3f} at patch {tuple(int(v) for v in peak)}")
    title = f"{source.query_title(i)} · {_head_label(head)}"
    if len(modes) >= 2:
        a, b = ("composed", "simplified") if {"composed", "simplified"} <= set(modes) else modes[:2]
        title += f"\nTV({a}, {b}) = {total_variation(grids[a], grids[b]):.3f}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def topk_figure(source: AttentionSource, i: int, k: int = 5, prompt_mode: str = "simplified",
                head: Head = "mean"):
    """Query ``i`` and its top-``k`` gallery items: pictures on top, heatmaps below.

    Green frame and ✓ = same identity as the query, red and ✗ = another person, purple =
    a distractor: the query's person under another identity (:attr:`Match.distractor` says
    why, e.g. another aspect); the distance is in each title. All heatmaps share one colour
    scale (one colour bar on the right).
    """
    _check_mode(source, prompt_mode)
    size = tuple(source.image_size)
    matches = list(source.topk(i, k, prompt_mode))[:k]
    q_img = load_image(source.image(i), size)
    items = [(q_img, select_head(source.attention(i, prompt_mode), head), None,
              f"query\n{source.query_title(i)}")]
    for r, m in enumerate(matches, 1):
        mark = "✓ " if m.correct else "" if m.distractor else "✗ "
        label = f"#{r} {mark}d={float(m.distance):.3g}"
        if m.title:
            label += f"\n{m.title}"
        if m.distractor:
            label += f"\ndistractor ({m.distractor})"
        color = CORRECT if m.correct else DISTRACTOR if m.distractor else WRONG
        items.append((load_image(m.image, size), select_head(m.attention, head), color, label))
    vmax = max(float(g.max()) for _, g, _, _ in items) or 1e-6
    n = len(items)
    pw = _panel_width(size, 1.9)
    fig, axes = plt.subplots(2, n, figsize=(pw * n + 1.0, 2 * 1.9 + 1.1), squeeze=False)
    hm = None
    for c, (img, g, color, label) in enumerate(items):
        axes[0][c].imshow(np.asarray(img))
        _frame(axes[0][c], color if color else "black", 4.0 if color else 1.5)
        axes[0][c].set_title(label, fontsize=7, color=color or "black")
        hm = overlay(axes[1][c], img, g, vmin=0.0, vmax=vmax, colorbar=False,
                     frame=color if color else "black")
    n_ok = sum(m.correct for m in matches)
    n_distractors = sum(bool(m.distractor) for m in matches)
    counts = f"{n_ok} correct" + (f", {n_distractors} distractor(s) of the query's person"
                                  if n_distractors else "")
    fig.suptitle(f"top-{len(matches)} ({counts}) · {prompt_mode} prompt · "
                 f"{_head_label(head)}", fontsize=10)
    return with_attention_colorbar(fig, hm)


def with_attention_colorbar(fig, mappable):
    """Lay out a row-of-heatmaps figure and give its shared attention scale one colour bar on
    the right (the overlays are drawn with ``colorbar=False`` and one ``vmax``)."""
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    cax = fig.add_axes((0.945, 0.08, 0.012, 0.38), label="<colorbar>")
    cb = fig.colorbar(mappable, cax=cax)
    cb.set_label("attention / patch", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    return fig


def aggregate_figure(source: AttentionSource, prompt_mode: str = "simplified", limit: int = 200,
                     head: Head = "mean", background: ImageLike | None = None):
    """Mean attention over up to ``limit`` images, and its mass per 3x3 region.

    Left: the mean map on a neutral grey picture (or on ``background``, e.g. the mean input
    image), with the region borders and each region's share. Right: the mean share per region
    (sums to 1) with the spread over images (± std) and per-head means; the dashed line is the
    share a uniform map would give (its area, 1/9).
    """
    _check_mode(source, prompt_mode)
    size = tuple(int(v) for v in source.image_size)
    attn = np.asarray(source.aggregate(prompt_mode, limit), dtype=np.float64)
    if attn.ndim == 3:
        attn = attn[:, None]
    if attn.ndim != 4 or attn.shape[0] == 0:
        raise ValueError(f"aggregate() must return [M>0, heads, gh, gw]; got shape {attn.shape}")
    M, n_heads, gh, gw = attn.shape
    per_image = np.stack([select_head(a, head) for a in attn])  # [M, gh, gw]
    mean_map = per_image.mean(axis=0)
    masses = region_masses(per_image).reshape(M, 9)  # [M, 9]
    mean_mass = region_masses(mean_map)  # [3, 3]
    per_head = region_masses(attn.mean(axis=0)).reshape(n_heads, 9)

    pw = _panel_width(size, 3.2)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(pw + 0.9 + 5.2, 3.9),
                                 gridspec_kw={"width_ratios": [pw + 0.9, 5.2]})
    bg = (load_image(background, size) if background is not None
          else Image.new("RGB", (size[1], size[0]), NEUTRAL))
    overlay(ax, bg, mean_map, alpha=0.6 if background is not None else 0.85, vmin=0.0,
            title=f"mean attention over {M} images")
    H, W = size
    for t in (1, 2):
        ax.axhline(t * H / 3 - 0.5, color="white", linestyle="--", linewidth=1)
        ax.axvline(t * W / 3 - 0.5, color="white", linestyle="--", linewidth=1)
    for r in range(3):
        for c in range(3):
            ax.text((c + 0.5) * W / 3 - 0.5, (r + 0.5) * H / 3 - 0.5, f"{mean_mass[r, c]:.0%}",
                    ha="center", va="center", fontsize=9, color="white", fontweight="bold",
                    bbox=dict(boxstyle="round,pad=0.15", fc="black", alpha=0.45, lw=0))
    ax.add_patch(Rectangle((-0.5, -0.5), W, H, fill=False, ec="white", lw=1))

    x = np.arange(9)
    bx.bar(x, mean_mass.reshape(9), yerr=masses.std(axis=0), capsize=3, color="#4575b4",
           alpha=0.85, label=f"{_head_label(head)} (± std over images)")
    if n_heads > 1:
        for h in range(n_heads):
            bx.scatter(x + (h - (n_heads - 1) / 2) * 0.12, per_head[h], s=10, color="black",
                       zorder=3, label="per-head means" if h == 0 else None)
    bx.axhline(1 / 9, color="grey", linestyle="--", linewidth=1, label="uniform (1/9)")
    bx.set_xticks(x)
    bx.set_xticklabels([f"{REGION_ROWS[r].split('/')[0]}\n{REGION_COLS[c]}"
                        for r in range(3) for c in range(3)], fontsize=7)
    for sep in (2.5, 5.5):
        bx.axvline(sep, color="lightgrey", linewidth=0.8)
    bx.set_ylabel("share of attention")
    bx.set_ylim(0, max(0.3, float((mean_mass.reshape(9) + masses.std(axis=0)).max()) * 1.15))
    rows = " · ".join(f"{REGION_ROWS[r]} {mean_mass[r].sum():.0%}" for r in range(3))
    bx.set_title(f"attention per region (sums to {mean_mass.sum():.2f})\n{rows}", fontsize=9)
    bx.legend(fontsize=7, loc="best")
    bx.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{prompt_mode} prompt · {M} images · grid {gh}x{gw} · {n_heads} heads",
                 fontsize=10)
    fig.tight_layout()
    return fig
