"""Figures and tables that notebooks show (static matplotlib: they render under papermill too)."""
from __future__ import annotations

import textwrap
import warnings
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from .constants import METRIC_LABELS, METRIC_NAMES
from .data.protocols import Protocol

__all__ = ["protocol_table", "identity_grid", "plot_cmc", "retrieval_grid", "metrics_table",
           "plot_history", "plot_prompt_retrieval", "caption_grid", "plot_probes",
           "plot_retrieval_gain", "plot_split_boxes", "plot_tsne", "failure_figures"]

CORRECT, WRONG = "#1a9850", "#d73027"


def protocol_table(protocol: Protocol) -> pd.DataFrame:
    """Counts per split, one row per quantity (what metrics.json records under ``data``)."""
    sizes = protocol.sizes()
    return pd.DataFrame({"count": sizes}).rename_axis(
        f"{protocol.dataset} · {protocol.aspect} · gallery={protocol.gallery_mode}")


def _thumb(path: str, size=(160, 120)) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail(size)
        return np.asarray(im)


def identity_grid(protocol: Protocol, n_people: int = 6, per_person: int = 4,
                  indices: Sequence[int] | None = None, title: str = "training identities"):
    """Rows = people, columns = their images (from the fit set by default)."""
    idx = protocol.fit if indices is None else indices
    by_person: dict[str, list[int]] = {}
    for i in idx:
        by_person.setdefault(protocol.items[i].person, []).append(i)
    people = list(by_person)[:n_people]
    fig, axes = plt.subplots(len(people), per_person, squeeze=False,
                             figsize=(1.9 * per_person, 1.5 * len(people)))
    for r, person in enumerate(people):
        for c in range(per_person):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(by_person[person]):
                ax.imshow(_thumb(protocol.paths([by_person[person][c]])[0]))
            if c == 0:
                ax.set_title(f"id {person}", fontsize=8, loc="left")
    fig.suptitle(f"{title}: {len(people)} of {len(by_person)} people", fontsize=10)
    fig.tight_layout()
    return fig


def plot_cmc(curves: Mapping[str, np.ndarray], max_rank: int = 20, title: str = "CMC"):
    """CMC curves (percent) of several runs on one axis."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, cmc in curves.items():
        cmc = np.asarray(cmc)[:max_rank]
        ax.plot(np.arange(1, len(cmc) + 1), cmc, marker="o", markersize=3, label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100.5)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def retrieval_grid(protocol: Protocol, split, distmat: np.ndarray, k: int = 5,
                   n_queries: int = 6, failures_only: bool = False, seed: int = 0):
    """Query, then its top-k gallery images; green frame = same identity, red = another."""
    q_ids = protocol.ids_of(split.query)
    g_ids = protocol.ids_of(split.gallery)
    order = np.argsort(distmat, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(split.query))
    if failures_only:
        rows = rows[g_ids[order[:, 0]] != q_ids]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(rows, size=min(n_queries, len(rows)), replace=False)) \
        if len(rows) else rows
    if len(rows) == 0:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no queries to show (no rank-1 failures)", ha="center")
        return fig
    fig, axes = plt.subplots(len(rows), k + 1, squeeze=False,
                             figsize=(1.8 * (k + 1), 1.45 * len(rows)))
    for r, qi in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(_thumb(protocol.paths([split.query[qi]])[0]))
        ax.set_title("query", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        for c in range(k):
            ax = axes[r][c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= order.shape[1]:
                ax.axis("off")
                continue
            gi = order[qi, c]
            ax.imshow(_thumb(protocol.paths([split.gallery[gi]])[0]))
            ok = g_ids[gi] == q_ids[qi]
            for spine in ax.spines.values():
                spine.set_edgecolor(CORRECT if ok else WRONG)
                spine.set_linewidth(3)
            ax.set_title(f"#{c + 1} d={distmat[qi, gi]:.3g}", fontsize=7)
    fig.suptitle("retrieval (green = same person)" + (" — rank-1 failures" if failures_only
                                                      else ""), fontsize=10)
    fig.tight_layout()
    return fig


def metrics_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                  decimals: int = 2) -> pd.DataFrame:
    """``{row name: summary}`` → table of ``mean ± std`` (percent).

    Columns are the summaries' metrics (``METRIC_NAMES`` order first, any others after),
    headed by ``constants.METRIC_LABELS`` (both APs: ``mAP`` and ``mAP (MBA-Net)``); a metric a
    row lacks (a summary written before ``mAP_mbanet`` was recorded) shows ``not recorded``."""
    keys = list(dict.fromkeys(k for summary in results.values() for k in summary))
    keys.sort(key=lambda k: METRIC_NAMES.index(k) if k in METRIC_NAMES else len(METRIC_NAMES))
    rows = {name: {METRIC_LABELS.get(k, k): (f"{summary[k]['mean']:.{decimals}f} ± "
                                             f"{summary[k]['std']:.{decimals}f}"
                                             if k in summary else "not recorded")
                   for k in keys} for name, summary in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index",
                                  columns=[METRIC_LABELS.get(k, k) for k in keys])


def plot_history(history: Sequence[Mapping], title: str = "training"):
    """Loss components per epoch (left) and validation rank-1 / mAP per epoch (right)."""
    epochs = [h["epoch"] for h in history]
    has_val = any("val" in h for h in history)
    fig, axes = plt.subplots(1, 2 if has_val else 1, squeeze=False,
                             figsize=(10 if has_val else 5, 3.4))
    ax = axes[0][0]
    keys = [k for k in history[0]["loss"]] if history else []
    for k in keys:
        ax.plot(epochs, [h["loss"][k] for h in history], marker="o", markersize=3,
                label=k, linewidth=2.2 if k == "loss" else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_val:
        ax = axes[0][1]
        val = [(h["epoch"], h["val"]) for h in history if "val" in h]
        for k in ("rank1", "mAP"):
            if k in val[0][1]:
                ax.plot([e for e, _ in val], [v[k] for _, v in val], marker="o", markersize=3,
                        label=f"val {k}")
        best = max(val, key=lambda ev: ev[1].get("mAP", 0))
        ax.axvline(best[0], color="grey", linestyle=":", label=f"best (epoch {best[0]})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.set_title("model selection (held-out training identities)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_prompt_retrieval(before: Mapping[str, float], after: Mapping[str, float]):
    """Text→image retrieval of each identity's prompt over the training images."""
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    names = ["rank1", "mAP"]
    x = np.arange(len(names))
    ax.bar(x - 0.18, [before[n] for n in names], width=0.36, label="untrained prompts")
    ax.bar(x + 0.18, [after[n] for n in names], width=0.36, label="learned prompts")
    ax.axhline(after.get("chance_mAP", 0), color="grey", linestyle=":", label="chance mAP")
    ax.set_xticks(x, names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("prompt → image retrieval (training ids)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def caption_grid(data, n: int = 6, seed: int = 0, width: int = 44):
    """``n`` random captioned images (a :class:`~handclip_nb.data.captioned.CaptionedImages`)
    with their captions wrapped underneath: what the pretraining pairs look like."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(data), size=min(n, len(data)), replace=False)
    cols = min(3, len(pick))
    rows = int(np.ceil(len(pick) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, pick):
        ax.imshow(data.pixels[int(i)].permute(1, 2, 0).numpy())
        ax.set_title("\n".join(textwrap.wrap(data.captions[int(i)], width)), fontsize=7.5,
                     loc="left")
    fig.tight_layout()
    return fig


def plot_probes(probes: pd.DataFrame, title: str = "attribute probes"):
    """Precision@k of each text probe next to its base rate (what a random ranking scores)."""
    col = next(c for c in probes.columns if c.startswith("precision@"))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(probes)), 3.4))
    x = np.arange(len(probes))
    ax.bar(x - 0.18, probes["base_rate"], width=0.36, color="lightgrey", label="base rate")
    ax.bar(x + 0.18, probes[col], width=0.36, label=col)
    ax.set_xticks(x, probes.index, rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_retrieval_gain(before: Mapping[str, float], after: Mapping[str, float],
                        keys: Sequence[str] = ("i2t_R1", "i2t_mAP", "t2i_R1", "t2i_mAP")):
    """Held-out image↔caption retrieval before (random init) and after pretraining."""
    fig, ax = plt.subplots(figsize=(5.4, 3.2))
    x = np.arange(len(keys))
    ax.bar(x - 0.18, [before[k] for k in keys], width=0.36, color="lightgrey",
           label="random init")
    ax.bar(x + 0.18, [after[k] for k in keys], width=0.36, label="pretrained")
    ax.set_xticks(x, keys)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("image ↔ caption retrieval, held-out people")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- evaluation across runs (handclip_nb.evaluate.compare) ---------------------------------


def plot_split_boxes(values: pd.DataFrame, metrics: Sequence[str] = ("rank1", "mAP", "mINP"),
                     title: str = "per-split metrics"):
    """Box plot per run of each metric over the Monte-Carlo splits, every split drawn as a dot
    (``values``: the long table of ``tables.split_values``: run, metric, split, value)."""
    import seaborn as sns  # here: seaborn adds ~2 s to start-up and only this figure uses it

    fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                             figsize=(max(4.5, 1.1 * values["run"].nunique() + 2) * len(metrics)
                                      / 1.6, 3.6))
    order = list(dict.fromkeys(values["run"]))
    for ax, metric in zip(axes[0], metrics):
        data = values[values["metric"] == metric]
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated vert=
            warnings.simplefilter("ignore", category=DeprecationWarning)
            sns.boxplot(data=data, x="run", y="value", hue="run", order=order, hue_order=order,
                        ax=ax, width=0.55, fliersize=0, legend=False)
        sns.stripplot(data=data, x="run", y="value", order=order, ax=ax, color="black",
                      size=3.5, alpha=0.7, jitter=0.12)
        ax.set_title(metric)
        ax.set_xlabel("")
        ax.set_ylabel("%")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title} ({values['split'].nunique()} splits)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_tsne(embeddings: Mapping[str, Mapping[str, np.ndarray]],
              title: str = "t-SNE of test embeddings"):
    """One panel per run: ``compare.tsne_points`` output, coloured by person; the gallery image
    of each person is the large outlined marker, queries the small dots."""
    names = list(embeddings)
    fig, axes = plt.subplots(1, len(names), squeeze=False, figsize=(4.2 * len(names), 4.0))
    for ax, name in zip(axes[0], names):
        e = embeddings[name]
        people = sorted(set(e["person"].tolist()))
        colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(people), 1), endpoint=False))
        for person, colour in zip(people, colours):
            mine = e["person"] == person
            q, g = mine & ~e["gallery"], mine & e["gallery"]
            ax.scatter(*e["points"][q].T, s=14, color=colour, alpha=0.8)
            ax.scatter(*e["points"][g].T, s=70, color=colour, edgecolor="black", linewidth=1.0)
        ax.set_title(f"{name}\n{len(people)} people, {len(e['person'])} images", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} (colour = person, outlined = gallery image)", fontsize=10)
    fig.tight_layout()
    return fig


def failure_figures(evaluations: Sequence, k: int = 5, n_queries: int = 6,
                    seed: int = 0) -> dict[str, Any]:
    """``{"failures_<run>": figure}``: queries of the first split whose rank-1 is wrong, with
    their top-k gallery (green = same person), ranked by the distances used for the metrics
    (re-ranked when re-ranking is on).  ``n_queries=0``: no figures."""
    figures = {}
    if n_queries <= 0:
        return figures
    for e in evaluations:
        first = e.test.splits[0]
        fig = retrieval_grid(e.protocol, first.split, first.distmat, k=k,
                                 n_queries=n_queries, failures_only=True, seed=seed)
        fig.suptitle(f"{e.name}: rank-1 failures (green = same person)", fontsize=10)
        figures[f"failures_{_slug(e.name)}"] = fig
    return figures


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
