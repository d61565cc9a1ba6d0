"""Attention heatmap figures and the explorer, over a fake AttentionSource (no model, no kernel)."""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from handclip_nb.attention.figures import (  # noqa: E402
    AttentionSource,
    Match,
    aggregate_figure,
    load_image,
    query_figure,
    region_masses,
    select_head,
    topk_figure,
    total_variation,
    upsample,
)

H, W = 48, 64  # model input (4:3); 16-pixel patches -> 3x4 grid
GH, GW = 3, 4
PATCH = 16


def one_hot(r: int, c: int, heads: int = 2) -> np.ndarray:
    a = np.zeros((heads, GH, GW))
    a[:, r, c] = 1.0
    return a


class FakeSource:
    """Three queries; query i attends to patch (i % 3, i); gallery = the other queries."""

    image_size = (H, W)
    num_heads = 2
    prompt_modes = ("composed", "simplified")

    def __init__(self, tmp_path=None):
        rng = np.random.default_rng(0)
        self._images = []
        for i in range(3):
            # raw 4:3 picture twice the model size: the source letterboxes it like the model does
            arr = rng.integers(0, 255, size=(2 * H, 2 * W, 3), dtype=np.uint8)
            self._images.append(Image.fromarray(arr))
        self.gallery_dir = tmp_path
        self.calls = {"attention": 0, "topk": 0}

    def query_ids(self):
        return [0, 1, 2]

    def query_title(self, i):
        return f"q{i} · id {100 + i}"

    def image(self, i):
        return load_image(self._images[i], self.image_size)

    def attention(self, i, prompt_mode):
        self.calls["attention"] += 1
        if prompt_mode == "composed":
            return one_hot(i % 3, i)
        a = np.random.default_rng(i).random((2, GH, GW))
        return a / a.sum(axis=(1, 2), keepdims=True)

    def topk(self, i, k, prompt_mode):
        self.calls["topk"] += 1
        out = []
        for r in range(k):
            j = (i + r + 1) % 3
            img = self._images[j]  # raw size: drawn letterboxed
            if self.gallery_dir is not None and r == 0:  # one item given as a path
                path = self.gallery_dir / f"g{j}.png"
                img.save(path)
                img = path
            out.append(Match(image=img, attention=self.attention(j, prompt_mode),
                             distance=0.1 * (r + 1), correct=(r % 2 == 0), title=f"g{j}"))
        return out

    def aggregate(self, prompt_mode, limit):
        return np.stack([self.attention(i % 3, prompt_mode) for i in range(min(limit, 6))])


@pytest.fixture
def source(tmp_path):
    return FakeSource(tmp_path)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


# ------------------------------------------------------------------------------- arrays

def test_fake_source_satisfies_protocol(source):
    assert isinstance(source, AttentionSource)


def test_select_head():
    a = np.stack([np.eye(3), np.ones((3, 3))])
    np.testing.assert_allclose(select_head(a, "mean"), (np.eye(3) + 1) / 2)
    np.testing.assert_allclose(select_head(a, 1), np.ones((3, 3)))
    np.testing.assert_allclose(select_head(np.eye(3)), np.eye(3))  # 2-D = one head
    with pytest.raises(ValueError, match="out of range"):
        select_head(a, 2)
    with pytest.raises(ValueError, match="'mean'"):
        select_head(a, "max")
    with pytest.raises(TypeError):
        select_head(a, 0.5)
    with pytest.raises(ValueError, match="heads, gh, gw"):
        select_head(np.zeros((1, 2, 3, 4)))


@pytest.mark.parametrize("r,c", [(0, 0), (1, 1), (1, 2), (2, 3)])
def test_upsample_peak_lands_in_its_patch(r, c):
    g = np.zeros((GH, GW))
    g[r, c] = 1.0
    for mode in ("bilinear", "nearest"):
        up = upsample(g, (H, W), mode=mode)
        assert up.shape == (H, W)
        py, px = np.unravel_index(np.argmax(up), up.shape)
        assert r * PATCH <= py < (r + 1) * PATCH and c * PATCH <= px < (c + 1) * PATCH
        # the patch's own block carries most of the heat
        block = up[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
        assert block.sum() > 0.5 * up.sum()
    near = upsample(g, (H, W), mode="nearest")
    assert near[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].min() == 1.0
    assert near.sum() == PATCH * PATCH
    # bilinear (align_corners=False) is centred on the block: symmetric about its centre
    # (away from the image border, where values are clamped)
    if 0 < r < GH - 1 and 0 < c < GW - 1:
        up = upsample(g, (H, W))
        block = up[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
        np.testing.assert_allclose(block, block[::-1, ::-1], atol=1e-6)


def test_upsample_rejects_bad_input():
    with pytest.raises(ValueError):
        upsample(np.zeros((2, 3, 4)), (H, W))
    with pytest.raises(ValueError):
        upsample(np.zeros((3, 4)), (H, W), mode="area51")


def test_total_variation():
    p, q = np.zeros((3, 4)), np.zeros((3, 4))
    p[0, 0], q[2, 3] = 1, 1
    assert total_variation(p, q) == pytest.approx(1.0)
    assert total_variation(p, p * 5) == pytest.approx(0.0)


@pytest.mark.parametrize("shape", [(3, 4), (7, 9), (14, 18), (2, 2)])
def test_region_masses_sum_to_one(shape):
    g = np.random.default_rng(0).random(shape)
    m = region_masses(g)
    assert m.shape == (3, 3)
    assert m.sum() == pytest.approx(1.0)
    assert (m >= 0).all()
    stack = region_masses(np.stack([g, g * 3]))
    assert stack.shape == (2, 3, 3)
    np.testing.assert_allclose(stack[0], stack[1])
    # a uniform map puts each region's area (1/9) in it
    np.testing.assert_allclose(region_masses(np.ones(shape)), np.full((3, 3), 1 / 9))


@pytest.mark.parametrize("r,c,region", [(0, 0, (0, 0)), (13, 17, (2, 2)), (7, 9, (1, 1)),
                                        (0, 17, (0, 2)), (10, 2, (2, 0))])
def test_region_masses_one_hot(r, c, region):
    g = np.zeros((14, 18))  # ViT-B/16 grid of a 224x288 input
    g[r, c] = 1.0
    m = region_masses(g)
    assert m[region] == pytest.approx(1.0)


def test_region_masses_split_cut_patch_by_area():
    g = np.zeros((4, 3))
    g[1, 1] = 1.0  # row 1 covers [1, 2): 1/3 in the top third, 2/3 in the middle third
    m = region_masses(g)
    assert m[0, 1] == pytest.approx(1 / 3)
    assert m[1, 1] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------- figures

def test_query_figure(source):
    fig = query_figure(source, 1)
    img_axes = _image_axes(fig)
    assert len(img_axes) == 3  # plain input + composed + simplified
    assert len(_colorbars(fig)) == 2
    assert "TV(composed, simplified)" in fig._suptitle.get_text()
    # plain panel: the letterboxed picture at the model size
    plain = img_axes[0].get_images()[0].get_array()
    assert plain.shape[:2] == (H, W)
    # composed panel: the heatmap is upsampled to the picture and peaks in patch (1, 1)
    composed = img_axes[1].get_images()
    assert len(composed) == 2
    heat = np.asarray(composed[1].get_array())
    assert heat.shape == (H, W)
    py, px = np.unravel_index(np.argmax(heat), heat.shape)
    assert (py // PATCH, px // PATCH) == (1, 1)
    # the two heatmaps share a colour scale
    assert composed[1].get_clim() == img_axes[2].get_images()[1].get_clim()


def test_query_figure_single_head(source):
    fig = query_figure(source, 0, head=1)
    assert "head 1" in fig._suptitle.get_text()
    with pytest.raises(ValueError):
        query_figure(source, 0, head=5)


def test_topk_figure(source):
    k = 3
    fig = topk_figure(source, 2, k=k, prompt_mode="composed")
    img_axes = _image_axes(fig)
    assert len(img_axes) == 2 * (k + 1)  # pictures on top, heatmaps below
    assert len(_colorbars(fig)) == 1
    assert source.calls["topk"] == 1
    titles = [ax.get_title() for ax in img_axes[:k + 1]]
    assert titles[0].startswith("query")
    assert "d=0.1" in titles[1] and "d=0.3" in titles[3]
    # frames: green for correct (ranks 1, 3), red for wrong (rank 2)
    colours = [matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor()) for ax in img_axes[1:k + 1]]
    assert colours == ["#1a9850", "#d73027", "#1a9850"]
    # every gallery picture is drawn at the model size, even the one given as a path
    for ax in img_axes:
        assert ax.get_images()[0].get_array().shape[:2] == (H, W)
    with pytest.raises(ValueError, match="prompt_mode"):
        topk_figure(source, 0, prompt_mode="fancy")


def test_aggregate_figure(source):
    fig = aggregate_figure(source, "composed", limit=6)
    axes = fig.axes
    img_axes = _image_axes(fig)
    assert len(img_axes) == 1 and len(_colorbars(fig)) == 1
    bars = [ax for ax in axes if ax.patches and not ax.get_images()]
    assert len(bars) == 1
    heights = [p.get_height() for p in bars[0].patches]
    assert len(heights) == 9
    assert sum(heights) == pytest.approx(1.0)
    # composed attention of query i sits on patch (i % 3, i) of a 3x4 grid, each image 1/3 of
    # the mean: patch (0, 0) is all in region (0, 0); column 1 ([1, 2) of 4) is 1/3 left,
    # 2/3 centre; column 2 ([2, 3)) is 2/3 centre, 1/3 right
    expected = np.array([[3, 0, 0], [1, 2, 0], [0, 2, 1]]) / 9
    np.testing.assert_allclose(np.array(heights).reshape(3, 3), expected, atol=1e-9)
    assert "6 images" in fig._suptitle.get_text()


# ------------------------------------------------------------------------------- explorer

def _pngs(d):
    return sorted(p.name for p in d.iterdir())


def test_static_writes_pngs_atomically(source, tmp_path):
    from handclip_nb.attention.explorer import AttentionExplorer

    out = tmp_path / "figs"
    ex = AttentionExplorer(source, k=2, out_dir=out)
    paths = ex.static([0, 2])
    paths += ex.aggregate()
    names = ["attention_query0.png", "attention_top2_query0.png", "attention_query2.png",
             "attention_top2_query2.png", "attention_aggregate_composed.png",
             "attention_aggregate_simplified.png"]
    assert [p.name for p in paths] == names
    assert _pngs(out) == sorted(names)  # no temp files left behind
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == []  # every figure closed


def test_widget_rerenders_on_change(source):
    from handclip_nb.attention.explorer import AttentionExplorer

    ex = AttentionExplorer(source, k=2)
    view = ex.widget()
    import ipywidgets as w

    assert isinstance(view, w.VBox)
    c = ex._controls
    assert isinstance(c["query"], w.Dropdown) and isinstance(c["prompt_mode"], w.ToggleButtons)
    assert c["query"].options[1] == ("q1 · id 101", 1)
    assert list(c["head"].options) == [("mean", "mean"), ("head 0", 0), ("head 1", 1)]
    assert c["prompt_mode"].value == "simplified"
    assert ex.renders == 1
    calls = source.calls["topk"]
    c["query"].value = 2
    assert ex.renders == 2
    c["prompt_mode"].value = "composed"
    assert ex.renders == 3
    c["head"].value = 1
    c["k"].value = 3
    assert ex.renders == 5
    assert source.calls["topk"] == calls + 4
    assert plt.get_fignums() == []


def test_explore_headless_never_touches_ipywidgets(source, tmp_path, monkeypatch):
    from handclip_nb.attention import explorer as widgets

    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # any import of it now fails
    paths = widgets.explore(source, interactive=False, queries=[1], out_dir=tmp_path / "o", k=2)
    assert sorted(p.name for p in paths) == sorted(
        ["attention_query1.png", "attention_top2_query1.png",
         "attention_aggregate_composed.png", "attention_aggregate_simplified.png"])
    with pytest.raises(ImportError, match="interactive=False"):
        widgets.explore(source, interactive=True, queries=[1], out_dir=tmp_path / "o2")


def test_explore_interactive_still_saves(source, tmp_path):
    from handclip_nb.attention import explorer as widgets

    paths = widgets.explore(source, interactive=True, queries=None, out_dir=tmp_path, k=1,
                            aggregate=False)
    assert len(paths) == 6  # 3 default queries x (query, top-k)
    assert all(p.stat().st_size > 0 for p in paths)
    assert plt.get_fignums() == []


def test_module_import_does_not_import_ipywidgets():
    import subprocess

    code = ("import sys, handclip_nb.attention.explorer, handclip_nb.attention.figures, handclip_nb.attention; "
            "assert 'ipywidgets' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------- distractors


class DistractorSource(FakeSource):
    """Query 0's top-3: the same identity, the query's person under another aspect (a
    distractor by the protocol), another person."""

    def topk(self, i, k, prompt_mode):
        kinds = [dict(correct=True), dict(correct=False, distractor="same person, dorsal_l"),
                 dict(correct=False)]
        return [Match(image=self._images[r], attention=self.attention(r, prompt_mode),
                      distance=0.1 * (r + 1), title=f"person {100 + r}", **kinds[r])
                for r in range(k)]


def test_topk_figure_labels_a_distractor_of_the_query_person_not_wrong():
    from handclip_nb.attention.figures import CORRECT, DISTRACTOR, WRONG

    fig = topk_figure(DistractorSource(), 0, k=3, prompt_mode="simplified")
    axes = _image_axes(fig)[1:4]
    titles = [ax.get_title() for ax in axes]
    assert "✓" in titles[0] and "✗" in titles[2]
    assert "distractor (same person, dorsal_l)" in titles[1] and "✗" not in titles[1]
    assert [matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor()) for ax in axes] == \
        [CORRECT, DISTRACTOR, WRONG]
    assert "1 correct, 1 distractor(s) of the query's person" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="not a distractor"):
        Match(image=None, attention=one_hot(0, 0), distance=0.1, correct=True, distractor="x")


def test_gallery_relation_names_the_aspect_of_a_same_person_distractor(synthetic_11k,
                                                                       synthetic_hd):
    """11k with every aspect's gallery: a gallery image of the query's person under another
    aspect is another identity, labelled a distractor naming its aspect (never "✗ person");
    on HD the 502-712 people are gallery-only distractors of their own."""
    from handclip_nb.attention import gallery_relation
    from handclip_nb.data.handinfo import read_handinfo, read_hd
    from handclip_nb.data.protocols import build_11k_protocol, build_hd_protocol

    protocol = build_11k_protocol(read_handinfo(synthetic_11k / "HandInfo.csv"), "dorsal_r",
                                  root=synthetic_11k, num_splits=1, gallery_mode="all")
    split = protocol.test[0]
    seen = 0
    for q in split.query:
        for g in split.gallery:
            qi, gi = protocol.items[q], protocol.items[g]
            correct, distractor, title = gallery_relation(protocol, q, g)
            same_identity = (qi.person, qi.aspect) == (gi.person, gi.aspect)  # 11k: per aspect
            assert correct == same_identity
            want = f"same person, {gi.aspect}" if qi.person == gi.person and not correct else ""
            assert distractor == want
            assert title == f"person {gi.person} · {gi.aspect}"
            seen += bool(distractor)
    assert seen == 3 * len(split.query)  # each query's person has 3 other aspects' images

    hd = build_hd_protocol(read_hd(synthetic_hd), root=synthetic_hd, num_splits=1)
    q = hd.test[0].query[0]
    extra = [g for g in hd.test[0].gallery if hd.items[g].distractor]
    assert extra
    for g in extra:
        correct, distractor, title = gallery_relation(hd, q, g)
        assert not correct and distractor == "" and title.endswith("gallery-only distractor")


def test_model_source_topk_marks_distractors(synthetic_11k):
    """ModelAttentionSource.topk labels its matches by gallery_relation (the ranking and maps
    are stubbed: what is tested is the labelling of a real protocol's gallery)."""
    from types import SimpleNamespace

    from handclip_nb.attention import ModelAttentionSource
    from handclip_nb.data.handinfo import read_handinfo
    from handclip_nb.data.protocols import build_11k_protocol

    protocol = build_11k_protocol(read_handinfo(synthetic_11k / "HandInfo.csv"), "dorsal_r",
                                  root=synthetic_11k, num_splits=1, gallery_mode="all")
    split = protocol.test[0]
    model = SimpleNamespace(backbone=SimpleNamespace(image_size=(H, W), grid=(GH, GW)),
                            num_heads=2)

    class Stubbed(ModelAttentionSource):
        def _ranking(self, prompt_mode):
            return np.tile(np.arange(len(split.gallery), dtype=float), (len(split.query), 1))

        def _maps(self, mode, indices):
            return np.stack([one_hot(0, 0) for _ in indices])

        def _image(self, index):
            return Image.new("RGB", (W, H))

    source = Stubbed(model, protocol, {"batch_size": 4})
    matches = source.topk(0, len(split.gallery), "simplified")
    q = protocol.items[split.query[0]]
    for m, g in zip(matches, split.gallery):
        item = protocol.items[g]
        assert m.correct == ((item.person, item.aspect) == (q.person, q.aspect))
        assert m.distractor == (f"same person, {item.aspect}"
                                if item.person == q.person and item.aspect != q.aspect else "")
        assert m.title == f"person {item.person} · {item.aspect}"
    assert sum(bool(m.distractor) for m in matches) == 3
