"""2-D t-SNE maps of runs' test embeddings (the evaluation notebook's figure data)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["tsne_points", "tsne_by_run"]


def tsne_points(evaluation, max_ids: int = 12, seed: int = 0,
                split: int = 0) -> dict[str, np.ndarray]:
    """2-D t-SNE of the test embeddings of ``max_ids`` randomly chosen test identities (their
    queries and gallery image in ``split``; cross-aspect and HD distractors left out).

    Returns ``{"points": [n, 2], "person": [n] str, "gallery": [n] bool}``.
    """
    from sklearn.manifold import TSNE  # here: scikit-learn takes ~1 s to import, t-SNE is optional

    protocol = evaluation.protocol
    chosen = protocol.test[split]
    items = [i for i in (*chosen.query, *chosen.gallery)
             if protocol.items[i].aspect == protocol.aspect and not protocol.items[i].distractor]
    people = sorted({protocol.items[i].person for i in items})
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(people, size=min(max_ids, len(people)), replace=False).tolist())
    items = [i for i in items if protocol.items[i].person in keep]
    if len(items) < 3:
        raise ValueError(f"t-SNE needs at least 3 test images, got {len(items)}")
    feats = evaluation.features[[evaluation.row_of[i] for i in items]].numpy()
    # perplexity must stay below the number of points; 30 (the default) for large sets
    perplexity = float(min(30.0, max(1.0, (len(items) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                  ).fit_transform(feats)
    gallery = set(chosen.gallery)
    return {"points": points, "person": np.array([protocol.items[i].person for i in items]),
            "gallery": np.array([i in gallery for i in items])}


def tsne_by_run(evaluations: Sequence, max_ids: int = 12,
                seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """:func:`tsne_points` of every run, the same people in each (for ``viz.plot_tsne``)."""
    return {e.name: tsne_points(e, max_ids=max_ids, seed=seed) for e in evaluations}
