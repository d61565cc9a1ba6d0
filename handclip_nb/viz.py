"""Figures and tables that notebooks show (static matplotlib: they render under papermill too)."""
from __future__ import annotations

import textwrap
import warnings
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .constants import METRIC_LABELS, METRIC_NAMES
from .data.image_files import open_image
from .data.protocols import Protocol
from .evaluate.open_set import describe_open_set
from .evaluate.verification import VERIFICATION_METRIC_LABELS, VERIFICATION_METRIC_NAMES
from .params import exif_orientation_for

__all__ = ["protocol_table", "identity_grid", "plot_cmc", "retrieval_grid", "metrics_table",
           "plot_history", "plot_prompt_retrieval", "caption_grid", "plot_probes",
           "plot_retrieval_gain", "plot_split_boxes", "plot_tsne", "failure_figures",
           "verification_table", "plot_roc", "open_set_summary", "search_grid", "search_table",
           "search_decision", "search_match_label", "match_table", "ACCEPTED", "REJECTED",
           "plot_paper_table", "plot_seed_spread", "plot_gain_over_zero_shot"]

CORRECT, WRONG = "#1a9850", "#d73027"


def protocol_table(protocol: Protocol) -> pd.DataFrame:
    """Counts per split, one row per quantity (what metrics.json records under ``data``)."""
    sizes = protocol.sizes()
    return pd.DataFrame({"count": sizes}).rename_axis(
        f"{protocol.dataset} · {protocol.aspect} · gallery={protocol.gallery_mode}")


def _thumb(path: str, orientation: str, size=(160, 120)) -> np.ndarray:
    im = open_image(path, orientation)
    im.thumbnail(size)
    return np.asarray(im)


def _orientation(protocol: Protocol, orientation: str | None) -> str:
    """The EXIF orientation policy a protocol's figures read with: the run's
    (``params.exif_orientation``), or, when None, what ``auto`` gives the protocol's dataset
    (custom: upright; 11k, HD: as stored)."""
    return exif_orientation_for(orientation or "auto", protocol.dataset, None)


def identity_grid(protocol: Protocol, n_people: int = 6, per_person: int = 4,
                  indices: Sequence[int] | None = None, title: str = "training identities",
                  orientation: str | None = None):
    """Rows = people, columns = their images (from the fit set by default); ``orientation``:
    the run's EXIF orientation policy (None: the dataset's default)."""
    orientation = _orientation(protocol, orientation)
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
                ax.imshow(_thumb(protocol.paths([by_person[person][c]])[0], orientation))
            if c == 0:
                ax.set_title(f"id {person}", fontsize=8, loc="left")
    fig.suptitle(f"{title}: {len(people)} of {len(by_person)} people", fontsize=10)
    fig.tight_layout()
    return fig


def verification_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                       decimals: int = 2) -> pd.DataFrame:
    """``{row name: verification summary}`` (``metrics.json["verification"]["metrics"]``) →
    table of ``mean ± std`` (percent): ROC AUC, EER, TAR at each FAR."""
    keys = [k for k in VERIFICATION_METRIC_NAMES if any(k in s for s in results.values())]
    rows = {name: {VERIFICATION_METRIC_LABELS.get(k, k):
                   (f"{summary[k]['mean']:.{decimals}f} ± {summary[k]['std']:.{decimals}f}"
                    if k in summary else "not recorded") for k in keys}
            for name, summary in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index",
                                  columns=[VERIFICATION_METRIC_LABELS.get(k, k) for k in keys])


def plot_roc(curves: Mapping[str, Mapping[str, Sequence[float]]],
             far_marks: Sequence[float] = (1e-2, 1e-3), title: str = "ROC (verification)"):
    """ROC curves (TAR against FAR, FAR on a log axis so the low-FAR operating points that
    biometrics reports are visible) of the first test split of several runs; each curve is a
    ``metrics.json["verification"]["roc_first_split"]`` (``{"far": [...], "tar": [...]}``)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    lowest = 1.0
    for name, roc in curves.items():
        far, tar = np.asarray(roc["far"], float), 100 * np.asarray(roc["tar"], float)
        keep = far > 0  # a log axis cannot show FAR 0; the curve starts at one false accept
        if keep.any():
            lowest = min(lowest, far[keep].min())
            ax.step(far[keep], tar[keep], where="post", label=name)
    for mark in far_marks:
        ax.axvline(mark, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(max(lowest, 1e-6), 1.0)
    ax.set_ylim(0, 100.5)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR, %)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def open_set_summary(open_set: Mapping[str, Any] | None) -> str:
    """One paragraph on a run's open-set threshold (``metrics.json["open_set"]``): where it was
    calibrated, its FAR there and on the test identities."""
    if not open_set:
        return "no open-set threshold recorded"
    threshold = open_set.get("threshold")
    text = (f"open-set threshold: cosine distance <= "
            f"{'none (accept nothing)' if threshold is None else f'{threshold:.4f}'} is "
            f"accepted as the same person, calibrated for FAR {open_set['far_target']:g} on "
            f"{open_set['calibrated_on']} ({open_set['pairs']['impostor']} impostor pairs: "
            f"FAR {open_set['far_measured']:.4f}, TAR {open_set['tar_measured']:.4f})")
    test = open_set.get("test")
    if test:
        text += (f"; on the test identities: FAR {test['far_mean']:.4f}, "
                 f"TAR {test['tar_mean']:.4f} (mean over splits)")
    # how far to trust it: identities, pairs, intervals, the too-few-pairs warning
    return text + "\n" + describe_open_set(open_set)


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
                   n_queries: int = 6, failures_only: bool = False, seed: int = 0,
                   orientation: str | None = None):
    """Query, then its top-k gallery images; green frame = same identity, red = another;
    ``orientation``: the run's EXIF orientation policy (None: the dataset's default)."""
    orientation = _orientation(protocol, orientation)
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
        ax.imshow(_thumb(protocol.paths([split.query[qi]])[0], orientation))
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
            ax.imshow(_thumb(protocol.paths([split.gallery[gi]])[0], orientation))
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
                    seed: int = 0, orientation: str | None = None) -> dict[str, Any]:
    """``{"failures_<run>": figure}``: queries of the first split whose rank-1 is wrong, with
    their top-k gallery (green = same person), ranked by the distances used for the metrics
    (re-ranked when re-ranking is on).  ``n_queries=0``: no figures. ``orientation``: the
    EXIF orientation policy (None: the dataset's default)."""
    figures = {}
    if n_queries <= 0:
        return figures
    for e in evaluations:
        first = e.test.splits[0]
        fig = retrieval_grid(e.protocol, first.split, first.distmat, k=k,
                                 n_queries=n_queries, failures_only=True, seed=seed,
                                 orientation=orientation)
        fig.suptitle(f"{e.name}: rank-1 failures (green = same person)", fontsize=10)
        figures[f"failures_{_slug(e.name)}"] = fig
    return figures


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------- gallery search

#: Frames of a gallery image the open-set threshold accepts as the query's person (distance <=
#: threshold) and of one it rejects. Acceptance is the rule's claim: whether the image shows
#: the query's person is what the labels say (✓/✗), and a frame never says it.
ACCEPTED, REJECTED = "#2166ac", "#9e9e9e"
NOT_DECIDED = "not decided"


def _threshold_value(threshold) -> float | None:
    """A :class:`~handclip_nb.evaluate.gallery.Threshold`, a number or None -> a number or None."""
    return getattr(threshold, "value", threshold)


def _distance_label(d: float) -> str:
    """Three decimals, or two significant digits below 0.01 (untrained models' distances)."""
    return f"{d:.3f}" if abs(d) >= 0.01 or d == 0 else f"{d:.2g}"


def search_decision(result, threshold=None) -> str:
    """A query's top-1 open-set decision in words: ``identified as <person>`` (the top-1 image
    accepted; an unlabelled one by its name), ``not in gallery`` (rejected), or ``not decided
    (<why>)``: a text query, no threshold, nothing ranked."""
    value = _threshold_value(threshold)
    if result.kind != "image":
        return f"{NOT_DECIDED} (text query)"
    if value is None:
        return f"{NOT_DECIDED} (no threshold)"
    if result.best is None:
        return f"{NOT_DECIDED} (nothing ranked)"
    if not result.decision(value):
        return "not in gallery"
    best = result.best
    return (f"identified as {best.person}" if best.person is not None
            else f"identified as {best.name} (unlabelled)")


def _verdict_mark(ok: bool | None) -> str:
    return "" if ok is None else " ✓" if ok else " ✗"


def search_match_label(result, match, threshold=None) -> tuple[str, str]:
    """(title, frame colour) of one ranked gallery image: rank, distance and the threshold's
    verdict (accepted: blue, rejected: grey; black without a threshold or for a text query),
    then its person with ✓/✗ where both it and the query are labelled."""
    accepted = result.accepts(match, _threshold_value(threshold))
    text = f"#{match.rank} d={_distance_label(match.distance)}"
    if accepted is not None:
        text += " accepted" if accepted else " rejected"
    if match.person is not None:
        text += f"\n{match.person}{_verdict_mark(result.same_person(match))}"
    colour = "black" if accepted is None else ACCEPTED if accepted else REJECTED
    return text, colour


def search_table(results: Sequence, threshold=None) -> pd.DataFrame:
    """One row per query of a gallery search (:class:`~handclip_nb.evaluate.gallery.QueryResult`):
    its top-1 gallery image, person and distance, and the open-set decision
    (:func:`search_decision`)."""
    rows = []
    for r in results:
        best = r.matches[0] if r.matches else None
        rows.append({"query": r.query, "type": r.kind, "query person": r.person or "",
                     "top-1 image": best.name if best else "",
                     "top-1 person": (best.person or "") if best else "",
                     "distance": round(best.distance, 4) if best else float("nan"),
                     "decision": search_decision(r, threshold)})
    return pd.DataFrame(rows, columns=["query", "type", "query person", "top-1 image",
                                       "top-1 person", "distance", "decision"])


def match_table(result, threshold=None) -> pd.DataFrame:
    """One row per ranked gallery image of one query: rank, image, person, distance, the
    threshold's verdict (``accepted``/``rejected``, empty when not decided) and what the labels
    say (``same person``/``other person``, empty when either is unlabelled)."""
    value = _threshold_value(threshold)
    rows = []
    for m in result.matches:
        accepted, same = result.accepts(m, value), result.same_person(m)
        rows.append({"rank": m.rank, "gallery image": m.name, "person": m.person or "",
                     "distance": round(m.distance, 4),
                     "threshold": "" if accepted is None else
                     "accepted" if accepted else "rejected",
                     "labels": "" if same is None else
                     "✓ same person" if same else "✗ other person"})
    return pd.DataFrame(rows, columns=["rank", "gallery image", "person", "distance",
                                       "threshold", "labels"])


def _text_panel(ax, text: str, width: int = 22) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#f4f4f4")
    ax.text(0.5, 0.5, textwrap.fill(text, width), ha="center", va="center", fontsize=7,
            transform=ax.transAxes, wrap=True)


def search_grid(results: Sequence, threshold=None, k: int = 5, title: str | None = None,
                orientation: str = "exif"):
    """Queries (rows) and their top-``k`` gallery images with distances: what was decided.

    ``results``: :class:`~handclip_nb.evaluate.gallery.QueryResult` s; ``threshold``: a
    ``Threshold``, a cosine distance or None. Each gallery image says whether the threshold
    accepts it (distance <= threshold: blue frame, "accepted") or rejects it (grey frame,
    "rejected"); without a threshold, and for text queries (whose distances are not image-image
    ones), frames are black and nothing is said. ✓/✗ after an image's person compares the
    labels, where both the query and the image are labelled: acceptance is never "the same
    person". Under each query its top-1 decision (:func:`search_decision`), with ✓/✗ when the
    labels can check it; over it its person when its folder names one. ``orientation``: the
    search's EXIF orientation policy (``model.source.geometry.orientation``; the search's
    default turns phone photos upright).
    """
    value = _threshold_value(threshold)
    results = list(results)
    if not results:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no queries", ha="center")
        return fig
    k = max(1, int(k))
    fig, axes = plt.subplots(len(results), k + 1, squeeze=False,
                             figsize=(1.8 * (k + 1), 2.0 * len(results) + 0.6))
    for row, r in enumerate(results):
        ax = axes[row][0]
        if r.kind == "image":
            ax.imshow(_thumb(r.path, orientation))
            ax.set_xticks([])
            ax.set_yticks([])
            label = f"query {textwrap.shorten(r.query, 24, placeholder='…')}"
        else:
            _text_panel(ax, r.query)
            label = "text query"
        label += f"\nperson {r.person}" if r.person is not None else (
            "\nperson unknown" if r.kind == "image" else "")
        ax.set_title(label, fontsize=7)
        decision = search_decision(r, value)
        decided = r.decision(value)
        ax.set_xlabel(decision + _verdict_mark(r.decision_correct(value)), fontsize=7,
                      color=ACCEPTED if decided else "black",
                      fontweight="normal" if decided is None else "bold")
        for c in range(k):
            ax = axes[row][c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(r.matches):
                ax.axis("off")
                continue
            m = r.matches[c]
            ax.imshow(_thumb(m.path, orientation))
            text, color = search_match_label(r, m, value)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3 if color != "black" else 1)
            ax.set_title(text, fontsize=7)
    if value is None:
        rule = "no open-set threshold: nothing accepted or rejected"
    elif np.isinf(value):
        rule = "threshold: accept nothing (every image rejected)"
    else:
        rule = (f"accepted: d <= {_distance_label(value)} (blue frame), "
                f"rejected: above (grey frame)")
    rule += ("\n✓/✗: the person labels agree/differ (acceptance is the threshold's claim, the "
             "labels are the truth); under each query: its top-1 decision")
    fig.suptitle(f"{title or f'gallery search, top-{k}'}\n{rule}", fontsize=9)
    fig.tight_layout()
    return fig


def _cell_labels(index: pd.Index) -> list[str]:
    """``method · backbone`` (a paper table's two-level rows) or the index as text."""
    return [" · ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in index]


def plot_paper_table(numbers: pd.DataFrame, std: pd.DataFrame | None = None,
                     best: pd.DataFrame | None = None, title: str = "rank-1 (%)"):
    """A paper table (``evaluate.grid_results.paper_table``: rows method × backbone, columns
    protocols) as an annotated heatmap: each cell ``mean`` and ``± std``, the best of each
    column in bold, empty cells grey."""
    values = numbers.to_numpy(dtype=float)
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(1.6 + 1.45 * max(cols, 1), 0.9 + 0.55 * max(rows, 1)))
    shown = np.ma.masked_invalid(values)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    finite = values[np.isfinite(values)]
    image = ax.imshow(shown, cmap=cmap, aspect="auto",
                      vmin=finite.min() if finite.size else 0,
                      vmax=finite.max() if finite.size else 100)
    for r in range(rows):
        for c in range(cols):
            if not np.isfinite(values[r, c]):
                ax.text(c, r, "–", ha="center", va="center", fontsize=8, color="#666666")
                continue
            text = f"{values[r, c]:.1f}"
            if std is not None and np.isfinite(std.iat[r, c]):
                text += f"\n± {std.iat[r, c]:.1f}"
            bold = best is not None and bool(best.iat[r, c])
            level = (values[r, c] - image.norm.vmin) / max(image.norm.vmax - image.norm.vmin,
                                                           1e-9)
            ax.text(c, r, text, ha="center", va="center", fontsize=8,
                    fontweight="bold" if bold else "normal",
                    color="black" if level > 0.55 else "white")
    ax.set_xticks(range(cols), [str(c) for c in numbers.columns], fontsize=8)
    ax.set_yticks(range(rows), _cell_labels(numbers.index), fontsize=8)
    ax.set_title(title + ("; bold: best of the column" if best is not None else ""),
                 fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    return fig


def plot_seed_spread(spread: pd.DataFrame, title: str = "rank-1 (%) per seed"):
    """One panel per protocol: each method × backbone's per-seed means
    (``grid_results.seed_spread``) as dots, their mean as a bar, so a gap between methods
    can be read against how much the seeds disagree."""
    protocols = list(dict.fromkeys(spread["protocol"])) or ["(no runs)"]
    cells = list(dict.fromkeys(zip(spread["method"], spread["backbone"])))
    fig, axes = plt.subplots(1, len(protocols), squeeze=False, sharey=True,
                             figsize=(0.9 + max(2.4, 0.55 * len(cells)) * len(protocols), 3.4))
    colors = plt.get_cmap("tab10")
    for ax, protocol in zip(axes[0], protocols):
        part = spread[spread["protocol"] == protocol]
        for x, cell in enumerate(cells):
            dots = part[(part["method"] == cell[0]) & (part["backbone"] == cell[1])]
            if dots.empty:
                continue
            jitter = np.linspace(-0.12, 0.12, len(dots)) if len(dots) > 1 else [0.0]
            ax.scatter(x + np.asarray(jitter), dots["mean"], s=18, color=colors(x % 10),
                       zorder=3)
            ax.hlines(dots["mean"].mean(), x - 0.3, x + 0.3, color=colors(x % 10), lw=2)
        ax.set_xticks(range(len(cells)), [f"{m}\n{b}" for m, b in cells], fontsize=7,
                      rotation=45, ha="right")
        ax.set_title(protocol, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean over the seed's splits")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_gain_over_zero_shot(gain: pd.DataFrame, title: str = "rank-1 gain over zero-shot CLIP"):
    """Grouped bars (``grid_results.gain_over_zero_shot``): per protocol, each trained method
    × backbone's pooled mean minus the zero-shot mean of its backbone, in points."""
    protocols = list(dict.fromkeys(gain["protocol"]))
    cells = list(dict.fromkeys(zip(gain["method"], gain["backbone"])))
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * max(len(protocols), 1), 3.2))
    width = 0.8 / max(len(cells), 1)
    for k, (method, backbone) in enumerate(cells):
        part = gain[(gain["method"] == method) & (gain["backbone"] == backbone)]
        heights = [part.loc[part["protocol"] == p, "gain"].iloc[0]
                   if (part["protocol"] == p).any() else np.nan for p in protocols]
        ax.bar(np.arange(len(protocols)) - 0.4 + width * (k + 0.5), heights, width,
               label=f"{method} · {backbone}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(protocols)), protocols, fontsize=8)
    ax.set_ylabel("points over zero-shot")
    ax.set_title(title, fontsize=10)
    if cells:
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
