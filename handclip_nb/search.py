"""Gallery search for people at the screen and for headless runs: the search notebook's figures,
its ipywidgets explorer, and :func:`run_search`, the whole search in one call.

The computation (inputs, index, ranking, open-set decision, ``rankings.csv``, ``metrics.json``)
lives in :mod:`handclip_nb.evaluate.gallery`, the grid figure and the table in
:mod:`handclip_nb.viz`. This module adds what needs both them and the attention maps:

* :func:`attention_figure`: for a stage-3 PromptSG run, the cross-attention heatmap of a query
  and its top matches (the run's inference prompt, mean over heads, one colour scale);
* :class:`SearchExplorer`: headless, static PNGs (``figures/search_pNN.png``, pages of
  :data:`PAGE` queries, and ``figures/attention_qNN.png``); with ``interactive=True`` also an
  ipywidgets view (query dropdown, threshold switch and slider) that lists the chosen query's
  decisions as text (:func:`~handclip_nb.viz.match_table`) and re-renders its grid.
  ipywidgets is imported only on the interactive path, as in
  :mod:`handclip_nb.attention.explorer`;
* :func:`explore` (the notebook's one figure call) and :func:`run_search`.
"""
from __future__ import annotations

import html
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from . import runs
from .attention.explorer import (figure_png, import_ipywidgets, in_ipython, render_into,
                                 show_png)
from .attention.figures import load_image, overlay, select_head, with_attention_colorbar
from .attention.source import attention_maps
from .evaluate.gallery import (RANKINGS_FILE, GalleryIndex, QueryResult, SearchInputs,
                               SearchModel, Threshold, build_gallery_index, calibrate_search,
                               load_search_model, prepare_search, resolve_threshold,
                               search_queries, search_record, write_rankings_csv)
from .params import Params, resolve_params
from .viz import match_table, search_decision, search_grid, search_match_label, search_table

__all__ = ["PAGE", "MAX_PAGES", "ATTENTION_QUERIES", "attention_figure", "SearchExplorer",
           "explore", "SearchRun", "run_search"]

#: Queries per static grid figure, and at most this many pages (every query is in rankings.csv).
PAGE = 6
MAX_PAGES = 4
#: Image queries whose PromptSG heatmaps are drawn in the static figures.
ATTENTION_QUERIES = 4


def attention_figure(model: SearchModel, result: QueryResult, params: Mapping[str, Any],
                     k: int = 5, threshold: float | None = None):
    """A PromptSG run's cross-attention (its inference prompt, mean over heads) on an image
    query and its top-``k`` matches: pictures on top, heatmaps below, one colour scale."""
    if not model.is_promptsg:
        raise ValueError(f"{model.name} is a {model.stage} run: cross-attention heatmaps need a "
                         f"stage-3 PromptSG run")
    if result.kind != "image":
        raise ValueError("heatmaps are drawn for image queries only")
    promptsg = model.run.model
    mode = model.run.info.prompt_mode or "simplified"
    matches = result.matches[:max(1, int(k))]
    paths = [result.path] + [m.path for m in matches]
    maps = attention_maps(promptsg, paths, params, mode, precision=model.run.precision).numpy()
    gh, gw = promptsg.backbone.grid
    grids = [select_head(m.reshape(-1, gh, gw), "mean") for m in maps]
    size = tuple(promptsg.backbone.image_size)
    query = f"query {textwrap.shorten(result.query, 22, placeholder='…')}"
    if result.person is not None:
        query += f"\nperson {result.person}"
    labels = [(query, "black")]
    # titles and frames as in viz.search_grid: accepted / rejected by the threshold, ✓/✗ labels
    labels += [search_match_label(result, m, threshold) for m in matches]
    vmax = max(float(g.max()) for g in grids) or 1e-6
    n = len(paths)
    width = 1.9 * size[1] / size[0]
    fig, axes = plt.subplots(2, n, figsize=(width * n + 1.0, 2 * 1.9 + 1.1), squeeze=False)
    hm = None
    for c, (path, grid, (label, color)) in enumerate(zip(paths, grids, labels)):
        img = load_image(path, size, orientation=model.source.geometry.orientation)
        axes[0][c].imshow(np.asarray(img))
        axes[0][c].set_xticks([])
        axes[0][c].set_yticks([])
        for spine in axes[0][c].spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3 if color != "black" else 1)
        axes[0][c].set_title(label, fontsize=7)
        hm = overlay(axes[1][c], img, grid, vmin=0.0, vmax=vmax, colorbar=False,
                     frame=None if color == "black" else color)
    fig.suptitle(f"PromptSG cross-attention ({mode} prompt, mean of heads); "
                 f"{search_decision(result, threshold)}", fontsize=10)
    return with_attention_colorbar(fig, hm)


class SearchExplorer:
    """The figures of one search: static pages and heatmaps, or the interactive view."""

    def __init__(self, model: SearchModel, results: Sequence[QueryResult], threshold: Threshold,
                 params: Mapping[str, Any], k: int | None = None,
                 out_dir: str | os.PathLike | None = None):
        self.model, self.results, self.threshold = model, list(results), threshold
        self.params = params
        self.k = int(k if k is not None else params["top_k"])
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.renders = 0  # how many times the interactive view was drawn (tests, debugging)
        self._controls: dict[str, Any] = {}
        self._decisions = None
        self._out = None

    @property
    def orientation(self) -> str:
        """The EXIF orientation policy the model read the photos with (the figures show them
        the same way)."""
        return self.model.source.geometry.orientation

    # ---------------------------------------------------------------- static
    def _emit(self, fig, name: str, show: bool) -> Path | None:
        png = figure_png(fig)
        if show and in_ipython():
            show_png(png)
        if self.out_dir is None:
            return None
        return runs.atomic_write_bytes(self.out_dir / name, png)

    def static(self, show: bool = True) -> list[Path]:
        """``search_pNN.png``: the grid, :data:`PAGE` queries a page (at most
        :data:`MAX_PAGES`); for a PromptSG run ``attention_qNN.png`` for the first
        :data:`ATTENTION_QUERIES` image queries. Returns the PNGs written."""
        paths: list[Path] = []
        pages = [self.results[i:i + PAGE] for i in range(0, len(self.results), PAGE)]
        for n, page in enumerate(pages[:MAX_PAGES], 1):
            title = None
            if len(pages) > 1:
                title = f"gallery search, queries {(n - 1) * PAGE + 1}-{(n - 1) * PAGE + len(page)}"
                title += f" of {len(self.results)}"
            p = self._emit(search_grid(page, self.threshold, k=self.k, title=title,
                                       orientation=self.orientation),
                           f"search_p{n:02d}.png", show)
            if p is not None:
                paths.append(p)
        if len(pages) > MAX_PAGES and show and in_ipython():
            print(f"figures show the first {MAX_PAGES * PAGE} of {len(self.results)} queries; "
                  f"every query is in {RANKINGS_FILE}")
        if self.model.is_promptsg:
            images = [r for r in self.results if r.kind == "image" and r.matches]
            for n, r in enumerate(images[:ATTENTION_QUERIES], 1):
                p = self._emit(attention_figure(self.model, r, self.params, self.k,
                                                self.threshold.value), f"attention_q{n:02d}.png",
                               show)
                if p is not None:
                    paths.append(p)
        return paths

    # ---------------------------------------------------------------- interactive
    def widget(self):
        """The ipywidgets view: a query dropdown, the open-set threshold (a switch and a
        slider, disabled while the switch is off), the chosen query's decisions as text
        (:meth:`decisions_html`) and its grid (and, for PromptSG, the heatmaps)."""
        w = import_ipywidgets("the interactive search view",
                              "run with interactive=False for static figures")
        if not self.results:
            raise ValueError("no queries to explore")
        options = [(f"{i + 1}. {r.kind}: {textwrap.shorten(r.query, 48, placeholder='…')}", i)
                   for i, r in enumerate(self.results)]
        query = w.Dropdown(options=options, value=0, description="query",
                           layout=w.Layout(width="460px"))
        best = [r.best_distance for r in self.results if r.kind == "image" and r.matches]
        value = self.threshold.value
        known = value is not None
        start = max(0.0, float(value)) if known and np.isfinite(value) else (
            0.0 if known else float(np.median(best)) if best else 0.5)
        top = max([m.distance for r in self.results for m in r.matches] + [1.0, start])
        use = w.Checkbox(value=known, description="open-set threshold", indent=False)
        slider = w.FloatSlider(value=start, min=0.0, max=round(float(top) + 0.05, 2),
                               step=0.001, readout_format=".3f", description="threshold",
                               continuous_update=False, disabled=not known)
        decisions = w.HTML(layout=w.Layout(width="auto"))
        decisions.add_class("handclip-search-decisions")  # what the browser test reads
        out = w.Output()
        self._controls = {"query": query, "use_threshold": use, "threshold": slider}
        self._decisions, self._out = decisions, out
        for c in self._controls.values():
            c.observe(self._on_change, names="value")
        self.render()
        return w.VBox([query, w.HBox([use, slider]), decisions, out])

    def current_threshold(self) -> float | None:
        c = self._controls
        return float(c["threshold"].value) if c["use_threshold"].value else None

    def _on_change(self, change=None) -> None:
        self._controls["threshold"].disabled = not self._controls["use_threshold"].value
        self.render()

    def decisions_html(self, result: QueryResult, value: float | None) -> str:
        """What is decided for ``result`` under the threshold ``value``, as text: the top-1
        decision, then each ranked image accepted or rejected and what the labels say."""
        rule = ("no threshold" if value is None else
                f"accepted when d &lt;= {value:.4g}, else rejected")
        person = ("" if result.person is None else
                  f"; query person {html.escape(result.person)}")
        return (f"<b>top-1 decision: {html.escape(search_decision(result, value))}</b> "
                f"({rule}{person})"
                + match_table(result, value).to_html(index=False, border=0))

    def render(self) -> None:
        """Show the chosen query's decisions and redraw its grid (and heatmaps) into the
        Output area."""
        if self._out is None:
            raise RuntimeError("call widget() first")
        result = self.results[self._controls["query"].value]
        value = self.current_threshold()
        self._decisions.value = self.decisions_html(result, value)

        def draw():
            show_png(figure_png(search_grid([result], value, k=self.k,
                                            orientation=self.orientation)))
            if self.model.is_promptsg and result.kind == "image" and result.matches:
                show_png(figure_png(attention_figure(self.model, result, self.params, self.k,
                                                     value)))

        render_into(self._out, f"query {result.query!r}", draw)
        self.renders += 1


def explore(model: SearchModel, results: Sequence[QueryResult], threshold: Threshold,
            params: Mapping[str, Any], interactive: bool, out_dir: str | os.PathLike | None = None,
            k: int | None = None) -> list[Path]:
    """The search notebook's one figure call. ``interactive=True``: display the explorer widget
    and still save the static PNGs (without showing them twice); ``interactive=False``
    (papermill, headless): show and save the static figures, ipywidgets never imported.
    Returns the PNG paths written (none without ``out_dir``)."""
    explorer = SearchExplorer(model, results, threshold, params, k=k, out_dir=out_dir)
    show_static = True
    if interactive:
        view = explorer.widget()  # raises a clear ImportError without ipywidgets
        if in_ipython():
            display(view)
        show_static = False
    return explorer.static(show=show_static)


@dataclass
class SearchRun:
    """What :func:`run_search` did: its run folder and everything it computed."""

    output_dir: Path
    inputs: SearchInputs
    model: SearchModel
    threshold: Threshold
    index: GalleryIndex
    results: list[QueryResult]
    record: dict
    rankings_csv: Path
    figures: list[Path]

    def table(self):
        return search_table(self.results, self.threshold)


def run_search(params: Mapping[str, Any], show: bool = False) -> SearchRun:
    """The search notebook in one call: check the inputs (nothing written on a bad one), open
    the run folder, rebuild the model, build or reuse the gallery index, rank, save the figures
    (shown inline when ``show`` inside IPython), write ``rankings.csv`` and ``metrics.json``.
    ``params``: resolved ``search`` parameters, or values to resolve."""
    if not (isinstance(params, Params) and params.get("stage") == "search"):
        params = resolve_params(params, stage="search")
    inputs = prepare_search(params)
    run = runs.start_run(params)
    model = load_search_model(params, inputs)
    threshold = resolve_threshold(model, params["threshold"], params["flip_tta"],
                                  calibrate_search(model, inputs, params))
    index = build_gallery_index(model, inputs, run.output_dir, params)
    results = search_queries(model, index, inputs, params)
    explorer = SearchExplorer(model, results, threshold, params, out_dir=run.figures_dir)
    figures = explorer.static(show=show)
    csv_path = write_rankings_csv(run.output_dir / RANKINGS_FILE, results, threshold)
    record = search_record(params, inputs, model, index, results, threshold, figures)
    runs.finish_run(run, record)
    return SearchRun(output_dir=run.output_dir, inputs=inputs, model=model, threshold=threshold,
                     index=index, results=results, record=record, rankings_csv=csv_path,
                     figures=figures)
