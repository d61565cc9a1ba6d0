"""Interactive attention explorer (ipywidgets) with a static fallback that always saves PNGs.

``explore(source, interactive, queries, out_dir)`` is the one call the attention notebook makes:
headless (papermill) it renders static figures, shows them and saves them; in a live session it
also shows an ipywidgets view. ipywidgets is imported only on the interactive path.
"""
from __future__ import annotations

import io
import os
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib.pyplot as plt
from IPython import get_ipython
from IPython.display import Image as IPythonImage
from IPython.display import clear_output, display

from ..runs import atomic_write_bytes
from .figures import AttentionSource, Head, aggregate_figure, query_figure, topk_figure

__all__ = ["AttentionExplorer", "explore", "figure_png", "in_ipython", "show_png",
           "import_ipywidgets", "render_into"]

DPI = 110


def in_ipython() -> bool:
    """True inside an IPython shell or kernel (a notebook, papermill, the IPython REPL)."""
    return get_ipython() is not None


def figure_png(fig, close: bool = True) -> bytes:
    """Render ``fig`` to PNG bytes (and close it, so pyplot keeps no reference)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        if close:
            plt.close(fig)
    return buf.getvalue()


@contextmanager
def _no_progress_bars():
    """Progress bars off while drawing into the explorer's Output widget.

    A bar drawn there (an ipywidgets bar in a live session, ``leave=False``) is closed before
    the front end renders the Output's captured outputs, which then show "Error displaying
    widget: model not found" above the figures (seen in JupyterLab; tests/
    test_jupyterlab_browser.py checks it). ``HANDCLIP_PROGRESS=off`` is progress.py's switch.
    """
    before = os.environ.get("HANDCLIP_PROGRESS")
    os.environ["HANDCLIP_PROGRESS"] = "off"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HANDCLIP_PROGRESS", None)
        else:
            os.environ["HANDCLIP_PROGRESS"] = before


def show_png(png: bytes) -> None:
    display(IPythonImage(data=png, format="png"))


def import_ipywidgets(view: str, static: str):
    """ipywidgets for ``view`` (e.g. "the interactive attention explorer"), or an ImportError
    that says how to install it and ``static``, the way to get static figures instead."""
    try:
        import ipywidgets  # only when a person is present: headless runs never pay for it
    except ImportError as exc:
        raise ImportError(
            f"{view} needs ipywidgets (pip install 'ipywidgets>=8', it is in environment.yml); "
            f"or {static}") from exc
    return ipywidgets


def render_into(out, label: str, draw: Callable[[], None]) -> None:
    """Clear a widget's Output area and ``draw`` into it. An error is shown there, naming
    ``label``, and the half-built figures are closed: the widget stays alive."""
    before = set(plt.get_fignums())
    with out:
        clear_output(wait=True)
        try:
            draw()
        except Exception:  # show the error in the view and keep the widget alive
            print(f"could not render {label}:")
            traceback.print_exc()
            for n in set(plt.get_fignums()) - before:  # a half-built figure
                plt.close(n)


class AttentionExplorer:
    """Query picker over an :class:`~handclip_nb.attention.figures.AttentionSource`.

    ``widget()`` builds the interactive view; ``static()`` / ``aggregate()`` render the same
    figures as PNGs into ``out_dir`` (and show them inside IPython).
    """

    def __init__(self, source: AttentionSource, k: int = 5, out_dir: str | os.PathLike | None = None):
        if int(k) < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.source = source
        self.k = int(k)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        modes = tuple(source.prompt_modes)
        if not modes:
            raise ValueError("the source has no prompt modes")
        #: prompt mode of the top-k view: the inference prompt ("simplified") when there is one
        self.default_mode = "simplified" if "simplified" in modes else modes[0]
        self.renders = 0  # how many times the interactive view was drawn (tests, debugging)
        self._controls: dict[str, Any] = {}
        self._out = None

    # ---------------------------------------------------------------- interactive
    def widget(self):
        """The ipywidgets view: query, prompt mode, head and k controls over an Output area."""
        w = import_ipywidgets("the interactive attention explorer",
                              "call explore(..., interactive=False) for static figures")
        src = self.source
        ids = list(src.query_ids())
        if not ids:
            raise ValueError("the source has no queries to explore")
        query = w.Dropdown(options=[(src.query_title(i), i) for i in ids], value=ids[0],
                           description="query", layout=w.Layout(width="420px"))
        mode = w.ToggleButtons(options=list(src.prompt_modes), value=self.default_mode,
                               description="top-k prompt")
        head = w.Dropdown(options=[("mean", "mean")] + [(f"head {h}", h)
                                                          for h in range(int(src.num_heads))],
                          value="mean", description="head")
        k = w.IntSlider(value=self.k, min=1, max=max(10, self.k), description="k")
        out = w.Output()
        self._controls = {"query": query, "prompt_mode": mode, "head": head, "k": k}
        self._out = out
        for c in self._controls.values():
            c.observe(self._on_change, names="value")
        self.render()
        return w.VBox([w.HBox([query, head, k]), mode, out])

    def _on_change(self, change=None) -> None:
        self.render()

    def render(self) -> None:
        """Redraw the query and top-k figures for the current control values into the Output."""
        if self._out is None:
            raise RuntimeError("call widget() first")
        c = self._controls
        i, head, k, mode = c["query"].value, c["head"].value, c["k"].value, c["prompt_mode"].value

        def draw():
            show_png(figure_png(query_figure(self.source, i, head=head)))
            show_png(figure_png(topk_figure(self.source, i, k=k, prompt_mode=mode, head=head)))

        with _no_progress_bars():
            render_into(self._out, f"query {i}", draw)
        self.renders += 1

    # ---------------------------------------------------------------- static
    def _emit(self, fig, name: str, show: bool) -> Path | None:
        png = figure_png(fig)
        if show and in_ipython():
            show_png(png)
        if self.out_dir is None:
            return None
        return atomic_write_bytes(self.out_dir / name, png)

    def static(self, queries: Iterable[int], head: Head = "mean", prompt_mode: str | None = None,
               show: bool = True) -> list[Path]:
        """Per query: ``attention_query{i}.png`` and ``attention_top{k}_query{i}.png``.

        Shown inside IPython when ``show``; saved (atomically) when the explorer has an
        ``out_dir``. Returns the written paths.
        """
        mode = prompt_mode or self.default_mode
        paths: list[Path] = []
        for i in queries:
            for fig, name in ((lambda: query_figure(self.source, i, head=head),
                               f"attention_query{i}.png"),
                              (lambda: topk_figure(self.source, i, k=self.k, prompt_mode=mode,
                                                   head=head),
                               f"attention_top{self.k}_query{i}.png")):
                p = self._emit(fig(), name, show)
                if p is not None:
                    paths.append(p)
        return paths

    def aggregate(self, modes: Sequence[str] | None = None, limit: int = 200,
                  head: Head = "mean", show: bool = True) -> list[Path]:
        """``attention_aggregate_{mode}.png`` per prompt mode (all of the source's by default)."""
        paths: list[Path] = []
        for m in (tuple(self.source.prompt_modes) if modes is None else modes):
            p = self._emit(aggregate_figure(self.source, m, limit=limit, head=head),
                           f"attention_aggregate_{m}.png", show)
            if p is not None:
                paths.append(p)
        return paths


def explore(source: AttentionSource, interactive: bool, queries: Sequence[int] | None = None,
            out_dir: str | os.PathLike | None = None, k: int = 5, head: Head = "mean",
            aggregate: bool = True, limit: int = 200) -> list[Path]:
    """The attention notebook's one call.

    ``interactive=True``: display the explorer widget, and still save the static PNGs (without
    showing them twice). ``interactive=False`` (papermill / headless): show and save the static
    figures only; ipywidgets is never imported. ``queries`` defaults to the first 3 of
    ``source.query_ids()``. With ``aggregate`` the per-mode aggregate figures are added.
    Returns the PNG paths written (none when ``out_dir`` is None).
    """
    explorer = AttentionExplorer(source, k=k, out_dir=out_dir)
    if queries is None:
        queries = list(source.query_ids())[:3]
    show_static = True
    if interactive:
        view = explorer.widget()  # raises a clear ImportError without ipywidgets
        if in_ipython():
            display(view)
        show_static = False
    paths = explorer.static(queries, head=head, show=show_static)
    if aggregate:
        paths += explorer.aggregate(limit=limit, head=head, show=show_static)
    return paths
