"""Progress bars that respect headless runs.

``tqdm.auto`` draws ipywidgets bars inside any Jupyter kernel, papermill's included, which would
leave widget state in every executed notebook.  Widgets are for a person at the screen: runs
started with ``interactive=False`` (the default, and what papermill uses) get plain text bars.
``HANDCLIP_PROGRESS=off`` in the environment turns every bar off: the nbval golden notebooks
use it, because a bar's timings differ on every run.
"""
from __future__ import annotations

import os

_interactive = False

__all__ = ["tqdm", "set_interactive"]


def set_interactive(flag: bool) -> None:
    global _interactive
    _interactive = bool(flag)


def tqdm(*args, **kwargs):
    # chosen per call (the run may switch to interactive); tqdm.auto pulls in ipywidgets
    if _interactive:
        from tqdm.auto import tqdm as bar  # widget bars: only when a person is present
    else:
        from tqdm.std import tqdm as bar  # text bars (already imported with tqdm itself)
    kwargs.setdefault("mininterval", 0.5)
    if os.environ.get("HANDCLIP_PROGRESS", "").strip().lower() in ("off", "0", "false", "no"):
        kwargs["disable"] = True
    return bar(*args, **kwargs)
