"""Parameter builders shared by the test files (``from builders import run_params``).

Tests train small runs on CPU: the untrained ``tiny-vit`` (no weight file), two Monte-Carlo
splits, no on-disk feature cache (every test sees fresh features), one warmup epoch. Each test
adds what it is about; everything else is the schema's default for the stage.
"""
from __future__ import annotations

from pathlib import Path

from handclip_nb.params import Params, resolve_params

#: What every test run has unless it says otherwise.
FAST = dict(backbone="tiny-vit", num_splits=2, feature_cache=False, warmup_epochs=1)


def run_params(stage: str, out: str | Path | None = None, data_root: str | Path | None = None,
               **values) -> Params:
    """Resolved parameters of a test run of ``stage`` writing to ``out``, on ``data_root``
    (None = the embedded synthetic hands), with :data:`FAST` under ``values``."""
    given = {**FAST, "data_root": None if data_root is None else str(data_root), **values}
    if out is not None:
        given["output_dir"] = str(out)
    return resolve_params(given, stage=stage)
