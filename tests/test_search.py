"""Gallery search (notebooks/search.ipynb): inputs and their errors, the cached gallery index,
ranking against a slow reference, text queries, the open-set decision, rankings.csv and
metrics.json, the figures and the widget, and the notebook itself through papermill.

Tiny-vit (untrained) on a few synthetic hands: what is tested is the mechanics, not accuracy.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from handclip_nb.data.handinfo import read_handinfo
from handclip_nb.evaluate import gallery as G
from handclip_nb.params import ParamError, resolve_params
from handclip_nb.run_loader import RunInfo
from handclip_nb.runs import RunFolderError, atomic_write_json, read_metrics

#: people in the gallery, and one more person who is only among the queries
GALLERY_PEOPLE = 5


@pytest.fixture(scope="module")
def folders(synthetic_11k, tmp_path_factory) -> dict[str, Path]:
    """``gallery/<person>/<image>``: the first dorsal_r photo of 5 people; ``queries/<person>/``:
    two more photos of each of them and two of a sixth person who is not in the gallery.
    Copies (not links), so a test may rewrite a gallery file."""
    records = [r for r in read_handinfo(synthetic_11k / "HandInfo.csv") if r.aspect == "dorsal_r"]
    people = sorted({r.person for r in records})[:GALLERY_PEOPLE + 1]
    root = tmp_path_factory.mktemp("search")
    for person in people:
        mine = [r for r in records if r.person == person]
        targets = [root / "queries"] * 2
        if person != people[-1]:
            targets.insert(0, root / "gallery")
        for r, dest in zip(mine, targets):
            (dest / person).mkdir(parents=True, exist_ok=True)
            shutil.copy2(synthetic_11k / r.path, dest / person / Path(r.path).name)
    return {"gallery": root / "gallery", "queries": root / "queries", "root": root,
            "people": people}


def search_params(out, folders, **values):
    given = dict(backbone="tiny-vit", gallery_dir=str(folders["gallery"]),
                 query=str(folders["queries"]), output_dir=str(out), batch_size=16,
                 num_workers=0, decode_cache=False)
    given.update(values)
    return resolve_params(given, stage="search")


def prepared(out, folders, **values):
    p = search_params(out, folders, **values)
    inputs = G.prepare_search(p)
    return p, inputs, G.load_search_model(p, inputs)


@pytest.fixture()
def encodes(monkeypatch):
    """Counts the images that pass through ``extract_features`` in the gallery module."""
    seen = []
    real = G.extract_features

    def counting(backbone, paths, *args, **kwargs):
        seen.append((kwargs.get("desc"), len(paths)))
        return real(backbone, paths, *args, **kwargs)

    monkeypatch.setattr(G, "extract_features", counting)
    return seen


# ----------------------------------------------------------------------------- parameters


def test_search_parameters_coerce_and_name_the_output_folder():
    p = resolve_params({"gallery_dir": "/data/my gallery/", "query_text": "  a  left hand "},
                       stage="search")
    assert p.query_text == ["a left hand"] and p.top_k == 5 and p.threshold is None
    assert p.output_dir == os.path.join("outputs", "search-my gallery-handclip-mini")
    p = resolve_params({"query_text": '["a palm", "dark skin"]', "gallery_dir": "g",
                        "run_dir": "outputs/stage2-x/"}, stage="search")
    assert p.query_text == ["a palm", "dark skin"]
    assert p.output_dir == os.path.join("outputs", "search-g-stage2-x")
    assert resolve_params({"query_text": []}, stage="search").query_text is None
    for bad in (3, ["ok", ""], "[1, 2]", {"a": 1}):
        with pytest.raises(ParamError, match="parameter 'query_text'"):
            resolve_params({"query_text": bad}, stage="search")
    with pytest.raises(ParamError, match="parameter 'threshold'.*>= 0"):
        resolve_params({"threshold": -0.1}, stage="search")
    with pytest.raises(ParamError, match="parameter 'top_k'"):
        resolve_params({"top_k": 0}, stage="search")


# ----------------------------------------------------------------------------- ranking


def test_rank_features_equals_a_slow_reference():
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(7, 16, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(11, 16, generator=gen), dim=1)
    g[4] = g[2]  # a tie: broken by gallery index
    exclude = [[], [3], [], [0, 1], [], [], list(range(10))]
    order, dist = G.rank_features(q, g, top_k=4, exclude=exclude)
    for i in range(7):
        ref = [(1.0 - float(np.dot(q[i].double().numpy(), g[j].double().numpy())), j)
               for j in range(11) if j not in exclude[i]]
        ref = sorted(ref, key=lambda t: (round(t[0], 6), t[1]))[:4]
        got = [(d, j) for j, d in zip(order[i], dist[i]) if j >= 0]
        assert [j for _, j in got] == [j for _, j in ref]
        assert np.allclose([d for d, _ in got], [d for d, _ in ref], atol=1e-6)
    assert list(order[6]) == [10, -1, -1, -1]  # one image left to rank


def test_image_and_text_search_match_a_slow_reference(folders, tmp_path):
    """Each image encoded alone, cosine distances in a loop, argsort: the same top-k; the text
    ranking is the global image embedding against encode_text(tokenize(text))."""
    texts = ["a photo of the dorsal side of a man's right hand, dark skin", "red nail polish"]
    p, inputs, model = prepared(tmp_path / "o", folders, query_text=texts, top_k=3)
    index = G.build_gallery_index(model, inputs, tmp_path / "o", p)
    results = G.search_queries(model, index, inputs, p)
    assert [r.kind for r in results] == ["image"] * len(inputs.queries) + ["text"] * 2
    bb = model.run.backbone

    def one(path):
        with torch.no_grad():
            f = bb.encode_image(model.source(path)[None]).global_embedding[0].double()
        return f / f.norm()

    gal = [one(g.path) for g in inputs.gallery]
    with torch.no_grad():
        tfeats = bb.encode_text(bb.tokenize(texts, truncate=True)).double()
    tfeats = tfeats / tfeats.norm(dim=1, keepdim=True)
    queries = [one(q.path) for q in inputs.queries] + list(tfeats)
    for r, qf in zip(results, queries):
        d = np.array([1.0 - float(qf @ gf) for gf in gal])
        ref = np.argsort(d, kind="stable")[:3]
        assert [m.index for m in r.matches] == list(ref), r.query
        assert np.allclose([m.distance for m in r.matches], d[ref], rtol=1e-3, atol=1e-6)
        assert [m.rank for m in r.matches] == [1, 2, 3]
        assert all(m.name == inputs.gallery[m.index].name for m in r.matches)
    assert results[0].person == folders["people"][0] and results[-1].path is None


def test_text_queries_use_the_global_embedding_of_a_run_with_its_own_head(folders, tmp_path):
    """A stage-2/3 run ranks images with its head's feature, texts against the image tower's
    global embedding (the joint space): two feature sets in the index."""
    p, inputs, model = prepared(tmp_path / "o", folders, query_text="a palm")
    bb = model.run.backbone
    head = torch.nn.Linear(bb.embed_dim, 8)
    model.run.encode = lambda x: head(bb.encode_image(x).global_embedding)
    model.run.cache_tag = "test-head"
    model.key = G.model_key(model.run, model.source, model.flip)
    index = G.build_gallery_index(model, inputs, tmp_path / "o", p)
    assert index.features.shape[1] == 8 and index.text_features.shape[1] == bb.embed_dim
    results = G.search_queries(model, index, inputs, p)
    text = [r for r in results if r.kind == "text"][0]
    with torch.no_grad():
        t = torch.nn.functional.normalize(bb.encode_text(bb.tokenize(["a palm"])).float(), dim=1)
    d = (1 - index.text_features @ t[0]).numpy()
    assert [m.index for m in text.matches] == list(np.argsort(d, kind="stable")[:5])


# ----------------------------------------------------------------------------- the index


def test_index_is_reused_and_rebuilt_when_gallery_or_model_change(folders, tmp_path, encodes):
    gallery = tmp_path / "gallery"
    shutil.copytree(folders["gallery"], gallery)
    folders = {**folders, "gallery": gallery}
    out = tmp_path / "o"
    n = sum(1 for _ in gallery.rglob("*.jpg"))

    def build(**values):
        encodes.clear()
        p, inputs, model = prepared(out, folders, **values)
        index = G.build_gallery_index(model, inputs, out, p)
        return index, sum(c for desc, c in encodes if desc.startswith("encode gallery"))

    index, count = build()
    assert index.status == "built (no index yet)" and count == n == index.encoded
    data = torch.load(out / G.INDEX_FILE, weights_only=True)  # a plain, safe file
    assert data["format"] == G.INDEX_FORMAT and data["count"] == n
    assert torch.equal(data["features"], index.features)

    index2, count = build()
    assert index2.status == "reused" and count == 0
    assert torch.equal(index2.features, index.features)

    first = sorted(gallery.rglob("*.jpg"))[0]
    shutil.copyfile(sorted(gallery.rglob("*.jpg"))[1], first)  # another picture, same name
    index3, count = build()
    assert index3.status == "built (the gallery files changed)" and count == n
    assert not torch.equal(index3.features, index.features)
    assert build()[1] == 0

    extra = gallery / "new_person" / "x.jpg"
    extra.parent.mkdir()
    shutil.copy2(first, extra)  # an added image
    index4, count = build()
    assert index4.status == "built (the gallery files changed)" and count == n + 1

    index5, count = build(seed=1)  # another random init of tiny-vit: another model
    assert index5.status == "built (the model differs from the index's)" and count == n + 1
    _, count = build(seed=1, image_size=[64, 80])  # another image pipeline
    assert count == n + 1
    _, count = build(seed=1, image_size=[64, 80], feature_cache=False)
    assert count == n + 1

    # text queries on a stage-0 model reuse the ranking features: nothing more to encode
    index6, count = build(seed=1, image_size=[64, 80], query_text="a hand")
    assert index6.status == "reused" and count == 0
    assert index6.text_features is index6.features

    (out / G.INDEX_FILE).write_bytes(b"damaged")
    assert build(seed=1, image_size=[64, 80])[0].status == \
        "built (the index file was unreadable)"


# ----------------------------------------------------------------------------- open set


def _fake_model(folder, recorded, flip=False):
    info = RunInfo(name="run", folder=folder, stage="stage2", params={"flip_tta": flip},
                   recorded=recorded, backbone_display="x")
    return SimpleNamespace(run=SimpleNamespace(info=info))


def test_threshold_from_the_run_the_parameter_or_none():
    open_set = {"threshold": 0.25, "far_target": 0.01, "calibrated_on": "held-out identities"}
    t = G.resolve_threshold(_fake_model("/r", {"open_set": open_set}))
    assert t.value == 0.25 and "FAR 0.01" in t.source and t.accepts(0.25) and not t.accepts(0.3)
    assert G.resolve_threshold(_fake_model("/r", {"open_set": open_set}), 0.5).value == 0.5
    nothing = G.resolve_threshold(_fake_model("/r", {"open_set": {**open_set,
                                                                  "threshold": None}}))
    assert nothing.value == -math.inf and nothing.accepts(0.0) is False
    assert nothing.record()["accept_nothing"] and nothing.record()["value"] is None
    old = G.resolve_threshold(_fake_model("/r", {"test": {}}))
    assert old.value is None and "re-run it, or set threshold" in old.source
    assert old.accepts(0.1) is None
    zero = G.resolve_threshold(_fake_model(None, None))
    assert zero.value is None and "zero-shot" in zero.source
    flipped = G.resolve_threshold(_fake_model("/r", {"open_set": open_set}), flip_tta=True)
    assert "calibrated with flip_tta=False" in flipped.source


def test_open_set_no_match_rankings_csv_and_metrics(folders, workbench_home):
    """A query whose best distance is above the threshold has no match in the gallery; the
    CSV marks every ranked image against the threshold; metrics.json summarises."""
    from handclip_nb import viz
    from handclip_nb.search import run_search

    out = workbench_home / "outputs" / "s"
    probe = run_search(search_params(out, folders, top_k=3))  # no threshold: nothing decided
    best = sorted(r.best_distance for r in probe.results)
    threshold = float(np.mean(best[len(best) // 2 - 1:len(best) // 2 + 1]))  # half match
    res = run_search(search_params(out, folders, top_k=3, threshold=threshold,
                                   query_text="dark skin"))
    assert res.index.status == "reused" and res.index.encoded == 0
    images = [r for r in res.results if r.kind == "image"]
    decided = [r.decision(res.threshold) for r in images]
    assert decided == [r.best_distance <= threshold for r in images]
    assert True in decided and False in decided
    table = viz.search_table(res.results, res.threshold)
    assert list(table["decision"]) == [f"identified as {r.best.person}" if d else "not in gallery"
                                       for r, d in zip(images, decided)] + \
        ["not decided (text query)"]

    with open(res.rankings_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == G.RANKINGS_COLUMNS
    assert len(rows) == 3 * len(res.results)
    for r, chunk in zip(res.results, (rows[i:i + 3] for i in range(0, len(rows), 3))):
        assert [int(c["rank"]) for c in chunk] == [1, 2, 3]
        assert {c["query"] for c in chunk} == {r.query}
        dists = [float(c["distance"]) for c in chunk]
        assert dists == sorted(dists)
        for c, m in zip(chunk, r.matches):
            assert c["gallery_image"] == m.name and c["person"] == (m.person or "")
            want = "" if r.kind == "text" else str(m.distance > threshold)
            assert c["above_threshold"] == want
    assert rows[0]["query_person"] == folders["people"][0]

    m = read_metrics(out)
    assert m["stage"] == "search" and m["backbone"] == "tiny-vit" and m["run_dir"] is None
    assert m["threshold"]["value"] == pytest.approx(threshold)
    assert m["threshold"]["source"] == "the threshold parameter"
    s = m["summary"]
    assert s["image_queries"] == len(images) and s["text_queries"] == 1
    assert s["matches"] == sum(decided) and s["no_matches"] == len(decided) - sum(decided)
    assert s["queries_in_gallery"] == 2 * GALLERY_PEOPLE and s["queries_not_in_gallery"] == 2
    in_gallery = [r for r in images if r.person in folders["people"][:GALLERY_PEOPLE]]
    top1 = sum(r.best.person == r.person for r in in_gallery)
    assert s["top1_correct"] == top1
    assert s["top1_accuracy"] == pytest.approx(100 * top1 / len(in_gallery))
    right = sum(bool(r.decision(threshold) and r.best.person == r.person) for r in in_gallery)
    right += sum(r.decision(threshold) is False for r in images if r not in in_gallery)
    assert s["open_set_accuracy"] == pytest.approx(100 * right / len(images))
    q0 = m["queries"][0]
    assert q0["top1_image"] == res.results[0].best.name and q0["match"] == decided[0]
    assert m["gallery"]["images"] == GALLERY_PEOPLE and m["gallery"]["people"] == GALLERY_PEOPLE
    assert m["provenance"]["git_commit"] and (out / "params.yaml").is_file()
    pages = -(-len(res.results) // 6)
    assert sorted(f.name for f in (out / "figures").iterdir()) == \
        [f"search_p{i:02d}.png" for i in range(1, pages + 1)] == m["figures"]
    assert plt.get_fignums() == []


def test_a_query_whose_only_gallery_image_is_itself_is_not_in_the_gallery(
        folders, synthetic_11k, tmp_path):
    """Guards against counting a query as "in the gallery" because of its own file: with the
    query folder equal to the gallery folder, each query is left out of its own ranking, so a
    person with one image there has no other image to find. Such queries are not in the
    gallery (top-1 accuracy leaves them out; the open-set accuracy wants "no match")."""
    records = [r for r in read_handinfo(synthetic_11k / "HandInfo.csv") if r.aspect == "dorsal_r"]
    people = sorted({r.person for r in records})[:4]
    counts = dict(zip(people, (2, 2, 1, 1)))  # the last two people: one image each
    same = tmp_path / "same"
    for person, n in counts.items():
        (same / person).mkdir(parents=True)
        for r in [r for r in records if r.person == person][:n]:
            shutil.copy2(synthetic_11k / r.path, same / person / Path(r.path).name)
    p, inputs, model = prepared(tmp_path / "o", {**folders, "gallery": same}, query=str(same),
                                top_k=3)
    index = G.build_gallery_index(model, inputs, tmp_path / "o", p)
    results = G.search_queries(model, index, inputs, p)
    assert len(results) == len(inputs.gallery) == 6
    assert all(r.query not in [m.name for m in r.matches] for r in results)  # never itself
    threshold = G.Threshold(float(np.median([r.best_distance for r in results])), "test")
    s = G.search_summary(results, threshold, inputs.gallery_people)
    assert (s["queries_in_gallery"], s["queries_not_in_gallery"]) == (4, 2)
    known = [r for r in results if counts[r.person] > 1]
    alone = [r for r in results if counts[r.person] == 1]
    assert [r.in_gallery for r in results] == [counts[r.person] > 1 for r in results]
    top1 = sum(r.best.person == r.person for r in known)
    assert s["top1_correct"] == top1
    assert s["top1_accuracy"] == pytest.approx(100 * top1 / 4)
    right = sum(bool(r.decision(threshold) and r.best.person == r.person) for r in known)
    right += sum(r.decision(threshold) is False for r in alone)
    assert s["open_set_accuracy"] == pytest.approx(100 * right / 6)
    record = G.search_record(p, inputs, model, index, results, threshold)
    assert [q["in_gallery"] for q in record["queries"]] == [r.in_gallery for r in results]
    assert record["summary"] == s


def test_a_query_in_a_person_folder_of_the_gallery_is_that_persons(folders, tmp_path):
    """The gallery's layout names the person of a query image that lies in it: one image in
    ``<gallery>/<person>/``, a query folder that is a person folder, a deeper (aspect) folder
    under it; a labelled query folder elsewhere keeps its own labels, and an image directly in
    the gallery folder or outside it stays unlabelled."""
    gallery = tmp_path / "gallery"
    shutil.copytree(folders["gallery"], gallery)
    alice = sorted(p.name for p in gallery.iterdir())[0]
    image = next((gallery / alice).iterdir())
    (gallery / alice / "dorsal").mkdir()
    shutil.copy2(image, gallery / alice / "dorsal" / "deeper.jpg")
    shutil.copy2(image, gallery / "loose.jpg")
    outside = tmp_path / "outside.jpg"
    shutil.copy2(image, outside)

    def persons(query):
        p = search_params(tmp_path / "o", {**folders, "gallery": gallery}, query=str(query))
        return {q.name: q.person for q in G.prepare_search(p).queries}

    assert persons(image) == {image.name: alice}
    assert persons(gallery / alice) == {image.name: alice, "dorsal/deeper.jpg": alice}
    assert persons(gallery / alice / "dorsal" / "deeper.jpg") == {"deeper.jpg": alice}
    assert persons(gallery / "loose.jpg") == {"loose.jpg": None}
    assert persons(outside) == {"outside.jpg": None}
    labelled = persons(folders["queries"])
    assert labelled == {q.relative_to(folders["queries"]).as_posix(): q.parent.name
                        for q in folders["queries"].rglob("*.jpg")}
    assert G.gallery_person(gallery / alice / "dorsal" / "deeper.jpg", gallery) == alice
    assert G.gallery_person(gallery, gallery) is None


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_fail_early_naming_the_problem(folders, tmp_path):
    from handclip_nb.search import run_search

    out = tmp_path / "never"

    def fails(match, exc=G.SearchError, **values):
        with pytest.raises(exc, match=match):
            run_search(search_params(out, folders, **values))
        assert not out.exists()  # nothing written

    fails("gallery_dir is not set", gallery_dir=None)
    fails(f"gallery_dir {re.escape(str(tmp_path / 'nope'))} .*does not exist",
          gallery_dir=str(tmp_path / "nope"))
    a_file = next(folders["gallery"].rglob("*.jpg"))
    fails("is a file, not a folder", gallery_dir=str(a_file))
    empty = tmp_path / "empty"
    (empty / "alice").mkdir(parents=True)
    (empty / "alice" / "notes.txt").write_text("x")
    (empty / ".hidden.jpg").write_bytes(b"x")
    fails("holds no images", gallery_dir=str(empty))
    fails(f"query {re.escape(str(tmp_path / 'q.jpg'))} .*does not exist",
          query=str(tmp_path / "q.jpg"))
    fails("nothing to search for", query=None)
    fails("query folder .* holds no images", query=str(empty))
    fails("is not an image file", query=str(empty / "alice" / "notes.txt"))
    broken = tmp_path / "broken"
    shutil.copytree(folders["gallery"], broken)
    (broken / "bob").mkdir()
    (broken / "bob" / "bad.jpg").write_bytes(b"not a jpeg")
    fails(re.escape(f"1 image(s) of gallery_dir cannot be read: {broken / 'bob' / 'bad.jpg'} "
                    f"(UnidentifiedImageError)"),
          gallery_dir=str(broken))
    fails("no params.yaml", RunFolderError, run_dir=str(tmp_path))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "params.yaml").write_text("params: {stage: stage2, backbone: tiny-vit}\n")
    fails("has not finished", RunFolderError, run_dir=str(unfinished))
    (unfinished / "params.yaml").write_text("params: {stage: stage1, backbone: tiny-vit}\n")
    atomic_write_json(unfinished / "metrics.json", {"stage": "stage1"})
    fails("is a stage-1 run", ValueError, run_dir=str(unfinished))


# ----------------------------------------------------------------------------- figures


def test_widget_rerenders_and_headless_never_imports_ipywidgets(folders, tmp_path, monkeypatch):
    import ipywidgets as w

    from handclip_nb import search

    p, inputs, model = prepared(tmp_path / "o", folders, query_text="a palm", top_k=2,
                                threshold=0.001)
    index = G.build_gallery_index(model, inputs, tmp_path / "o", p)
    results = G.search_queries(model, index, inputs, p)
    threshold = G.resolve_threshold(model, p.threshold)
    ex = search.SearchExplorer(model, results, threshold, p)
    view = ex.widget()
    assert isinstance(view, w.VBox) and ex.renders == 1
    c = ex._controls
    assert len(c["query"].options) == len(results) and c["use_threshold"].value is True
    assert c["threshold"].value == pytest.approx(0.001)
    c["query"].value = len(results) - 1  # the text query
    c["threshold"].value = 0.5
    c["use_threshold"].value = False
    assert ex.renders == 4 and ex.current_threshold() is None
    assert c["threshold"].disabled  # the slider does nothing while the switch is off
    assert plt.get_fignums() == []

    # the slider decides: the shown decisions follow it
    c["use_threshold"].value = True
    assert not c["threshold"].disabled
    c["query"].value = 0
    first = results[0]
    assert first.person is not None and f"query person {first.person}" in ex._decisions.value
    c["threshold"].value = 0.0
    assert "top-1 decision: not in gallery" in ex._decisions.value
    assert ex._decisions.value.count("<td>rejected</td>") == len(first.matches)
    c["threshold"].value = c["threshold"].max
    assert f"top-1 decision: identified as {first.best.person}" in ex._decisions.value
    assert ex._decisions.value.count("<td>accepted</td>") == len(first.matches)
    assert plt.get_fignums() == []

    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # any import of it now fails
    paths = search.explore(model, results, threshold, p, interactive=False,
                           out_dir=tmp_path / "figs")
    assert [x.name for x in paths] == [f"search_p{i:02d}.png"
                                       for i in range(1, -(-len(results) // 6) + 1)]
    assert all(x.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for x in paths)
    with pytest.raises(ImportError, match="interactive=False"):
        search.explore(model, results, threshold, p, interactive=True)


def _hand_result(folders, persons, distances, query_person="alice", in_gallery=True):
    """A QueryResult over real gallery images, with the labels and distances given."""
    images = sorted(folders["gallery"].rglob("*.jpg"))
    matches = [G.RankedImage(rank=n + 1, index=n, name=f"{person or 'loose'}/{n}.jpg",
                             path=str(images[n % len(images)]), person=person, distance=d)
               for n, (person, d) in enumerate(zip(persons, distances))]
    query = sorted(folders["queries"].rglob("*.jpg"))[0]
    return G.QueryResult(query=query.name, kind="image", path=str(query), person=query_person,
                         matches=matches, in_gallery=in_gallery)


def _grid_panels(fig, k):
    axes = [ax for ax in fig.axes if ax.get_images() or ax.get_title()]
    return axes[0], axes[1:k + 1]


@pytest.fixture()
def figures_closed():
    """Every figure closed after the test, also when an assertion stopped it half-way."""
    yield
    plt.close("all")


def test_search_figure_says_accepted_or_rejected_never_same_person(folders, figures_closed):
    """Under a threshold every ranked image is accepted or rejected, and only the labels say
    ✓ same person / ✗ other person: five people accepted are not "the same person". The top-1
    decision stands under the query, once, checked against the labels where they can."""
    from handclip_nb import viz

    persons = ["bob", "alice", "carol", None, "dave"]
    distances = [0.1, 0.2, 0.3, 0.4, 0.5]
    result = _hand_result(folders, persons, distances)
    for threshold in (0.35, 0.6, 0.05):
        fig = viz.search_grid([result], G.Threshold(threshold, "test"), k=5)
        query_ax, panels = _grid_panels(fig, 5)
        assert "person alice" in query_ax.get_title()
        for ax, person, d in zip(panels, persons, distances):
            title = ax.get_title()
            accepted = d <= threshold  # the slow, obvious reference
            assert (" accepted" in title, " rejected" in title) == (accepted, not accepted)
            frame = matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor())
            assert frame == (viz.ACCEPTED if accepted else viz.REJECTED)
            mark = "" if person is None else " ✓" if person == "alice" else " ✗"
            assert title.endswith(f"{person}{mark}" if person else "rejected" if not accepted
                                  else "accepted")
        text = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        assert "same person" not in text  # acceptance never claims it
        decision = query_ax.get_xlabel()
        # the top-1 is bob: accepted means identified as bob, a wrong decision (✗)
        assert decision == ("identified as bob ✗" if threshold >= 0.1 else "not in gallery ✗")
        plt.close(fig)
    # a query whose person is not in the gallery: "not in gallery" is the right decision
    away = _hand_result(folders, persons, distances, query_person="erin", in_gallery=False)
    fig = viz.search_grid([away], 0.05, k=5)
    assert _grid_panels(fig, 5)[0].get_xlabel() == "not in gallery ✓"
    plt.close(fig)
    unlabelled = _hand_result(folders, [None] * 5, distances, query_person=None,
                              in_gallery=None)
    fig = viz.search_grid([unlabelled], 0.15, k=5)
    query_ax, panels = _grid_panels(fig, 5)
    assert query_ax.get_xlabel() == "identified as loose/0.jpg (unlabelled)"
    assert "person unknown" in query_ax.get_title()
    plt.close(fig)
    fig = viz.search_grid([result], None, k=5)  # no threshold: nothing accepted or rejected
    query_ax, panels = _grid_panels(fig, 5)
    assert query_ax.get_xlabel() == "not decided (no threshold)"
    assert not any("accepted" in ax.get_title() or "rejected" in ax.get_title() for ax in panels)
    plt.close(fig)


def test_match_table_and_decisions_equal_a_slow_reference(folders):
    from handclip_nb import viz

    persons = ["bob", "alice", None, "alice", "carol"]
    distances = [0.11, 0.2, 0.25, 0.31, 0.4]
    result = _hand_result(folders, persons, distances)
    for threshold in (None, 0.0, 0.2, 0.3, 1.0, -math.inf):
        table = viz.match_table(result, threshold)
        for row, person, d in zip(table.itertuples(index=False), persons, distances):
            want = "" if threshold is None else "accepted" if d <= threshold else "rejected"
            assert row.threshold == want
            assert row.labels == ("" if person is None else
                                  "✓ same person" if person == "alice" else "✗ other person")
        decision = viz.search_decision(result, threshold)
        assert decision == ("not decided (no threshold)" if threshold is None else
                            "identified as bob" if 0.11 <= threshold else "not in gallery")
    text = G.QueryResult(query="a palm", kind="text", path=None, person=None,
                         matches=result.matches)
    assert viz.search_decision(text, 0.3) == "not decided (text query)"
    assert set(viz.match_table(text, 0.3)["threshold"]) == {""}


def test_promptsg_run_adds_attention_heatmaps(folders, synthetic_11k, workbench_home):
    """A stage-3 run (one epoch) ranks with PromptSG and draws its cross-attention."""
    from builders import run_params

    from handclip_nb.data import build_protocol
    from handclip_nb.models import build_backbone
    from handclip_nb.runs import start_run
    from handclip_nb.search import run_search
    from handclip_nb.train.stage3 import train_stage3

    p3 = run_params("stage3", workbench_home / "outputs" / "s3", synthetic_11k, epochs=1,
                    milestones=[1], p_ids=2, k_images=2, num_splits=1, batch_size=16,
                    num_workers=0)
    start_run(p3)
    train_stage3(p3, p3.output_dir, build_protocol(p3),
                 build_backbone("tiny-vit", image_size=p3.image_size, seed=0), progress=False)
    open_set = {"threshold": 0.02, "far_target": 0.01, "calibrated_on": "held-out identities"}
    atomic_write_json(Path(p3.output_dir) / "metrics.json", {"stage": "stage3",
                                                             "open_set": open_set})
    out = workbench_home / "outputs" / "s"
    res = run_search(search_params(out, folders, run_dir=p3.output_dir, top_k=2,
                                   query=str(folders["queries"] / folders["people"][0])))
    assert res.model.is_promptsg and res.threshold.value == 0.02
    assert [f.name for f in res.figures] == ["search_p01.png", "attention_q01.png",
                                             "attention_q02.png"]
    m = read_metrics(out)
    assert m["run_stage"] == "stage3" and m["prompt_mode"] == "simplified"
    assert m["threshold"]["open_set"]["calibrated_on"] == "held-out identities"


# ----------------------------------------------------------------------------- the notebook


@pytest.mark.notebook
@pytest.mark.usefixtures("kernel_threads")
def test_search_notebook_with_a_stage0_run(folders, workbench_home):
    """Stage 0 through its notebook (tiny-vit, small synthetic data) gives a run folder with an
    open-set threshold; the search notebook ranks the gallery with it, headless."""
    from handclip_nb.pipeline import run_notebook

    s0 = workbench_home / "outputs" / "s0"
    run_notebook("stage0_zeroshot.ipynb", workbench_home / "s0.ipynb",
                 {"backbone": "tiny-vit", "num_splits": 1, "synthetic_subjects": 8,
                  "synthetic_images": 3, "batch_size": 32, "output_dir": str(s0)},
                 progress=False)
    calibrated = read_metrics(s0)["open_set"]
    out = workbench_home / "outputs" / "search"
    executed = run_notebook("search.ipynb", workbench_home / "search.ipynb",
                            {"run_dir": str(s0), "gallery_dir": str(folders["gallery"]),
                             "query": str(folders["queries"]), "top_k": 3,
                             "query_text": "a photo of the palm side of a woman's right hand",
                             "batch_size": 32, "output_dir": str(out)}, progress=False)
    m = read_metrics(out)
    assert m["stage"] == "search" and m["run_stage"] == "stage0"
    assert m["threshold"]["value"] == calibrated["threshold"]
    assert m["summary"]["image_queries"] == 2 * (GALLERY_PEOPLE + 1)
    assert m["summary"]["text_queries"] == 1
    with open(out / "rankings.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3 * (2 * (GALLERY_PEOPLE + 1) + 1)
    assert (out / G.INDEX_FILE).is_file()
    nb = json.loads(executed.read_text())
    images = [o for c in nb["cells"] for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == len(m["figures"]) >= 3
    text = json.dumps(nb)
    assert "open-set threshold" in text and "not decided" in text  # the text query
    # how far to trust it: a zero-shot stage 0 calibrated on its never-trained training
    # identities (4 people here: too few impostor pairs), and its FAR on the test identities
    assert "calibrated on never-trained identities: FAR" in text
    assert "WARNING: too few impostor pairs for FAR 1 %" in text
    assert re.search(r"on never-trained identities \(the run's \d+ test identities", text)
    assert m["threshold"]["reliability"]["calibration"]["identities"] == "never-trained"


def test_the_index_key_holds_the_device_type_and_the_precision(folders, tmp_path, monkeypatch):
    """A gallery index encoded in one precision (a GPU run's fp16 or bf16, the run's amp /
    amp_dtype) is never reused by a search in another (a CPU's fp32)."""
    from handclip_nb.device import Precision
    from handclip_nb.run_loader import LoadedRun

    _, _, model = prepared(tmp_path / "o", folders)
    keys = [G.model_key(model.run, model.source, model.flip)]
    for dtype in (torch.float16, torch.bfloat16):
        monkeypatch.setattr(LoadedRun, "precision",
                            property(lambda self, d=dtype: Precision("cuda", True, d)))
        keys.append(G.model_key(model.run, model.source, model.flip))
    assert len(set(keys)) == 3
