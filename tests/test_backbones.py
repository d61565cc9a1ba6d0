"""Backbone registry, weight loading, 2-D positional-embedding adaptation and the image interface.

Fast (tiny CLIP architectures only) and offline: the network is never touched.
"""
from __future__ import annotations

import copy
import time
import urllib.request
import warnings

import pytest
import torch

from handclip_nb import backbone_specs as bb
from handclip_nb.backbone_specs import (TINY_RN_ARCH, TINY_VIT_ARCH, available_backbones,
                                        get_backbone_spec)
from handclip_nb.constants import CLIP_MEAN, CLIP_STD
from handclip_nb.device import resolve_device
from handclip_nb.models import backbones as backbones_mod
from handclip_nb.models.backbones import (ClipBackbone, ImageFeatures, backbone_fingerprint,
                                          build_backbone)
from handclip_nb.models.positional import resize_positional_embedding
from handclip_nb.models.weight_files import IncompatibleWeightsError, WeightsNotFoundError

clip = backbones_mod.clip
from clip.model import CLIP, convert_weights  # noqa: E402

SIZES = [(224, 224), (96, 128), (224, 288)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may download: the downloader and urlopen fail loudly; HOME is a temp folder."""

    def _no_network(*args, **kwargs):
        raise AssertionError("the network must not be touched")

    monkeypatch.setattr(clip.clip, "_download", _no_network)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    return home


def _images(size, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def _seeded_clip(arch, seed):
    torch.manual_seed(seed)
    return CLIP(**arch).eval()


def _fp16_rounded(model):
    """What clip.load / build_model make of a model's weights (fp16-rounded, back in fp32)."""
    ref = copy.deepcopy(model)
    convert_weights(ref)
    return ref.float().eval()


def _trace_to(model, path):
    """Save ``model`` as a TorchScript archive, the format of OpenAI's released files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (_images((224, 224), 1), clip.tokenize(["a hand"])), check_trace=False)
        torch.jit.save(traced, str(path))
    return path


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


def test_registry_names_and_aliases():
    names = available_backbones()
    for n in ["vitb16", "vitb32", "rn50", "rn101", "tiny-vit", "tiny-rn"]:
        assert n in names
    assert get_backbone_spec("ViT-B/16").name == "vitb16"
    assert get_backbone_spec("RN50").name == "rn50"
    assert get_backbone_spec("vitb16").weights_basename == "ViT-B-16.pt"
    assert get_backbone_spec("rn101").weights_basename == "RN101.pt"
    assert get_backbone_spec("vitb32").stride == 32 and get_backbone_spec("tiny-rn").stride == 32
    assert get_backbone_spec("tiny-vit").stride == 16


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        build_backbone("vitb14")
    msg = str(exc.value)
    assert "vitb14" in msg
    for n in ["vitb16", "vitb32", "rn50", "rn101", "tiny-vit", "tiny-rn"]:
        assert n in msg


def test_register_local_weights_entry_is_one_line(tmp_path):
    """A 'handclip-mini'-style entry (arch + shipped weights file) needs only a BackboneSpec."""
    src = build_backbone("tiny-vit", seed=5, image_size=(224, 224))
    path = tmp_path / "mini.pt"
    torch.save(src.clip.state_dict(), path)
    spec = bb.BackboneSpec("test-mini", "test entry", arch=TINY_VIT_ARCH, weights_file=str(path),
                           weights_label="test-mini pretrained weights")
    bb.register_backbone(spec)
    try:
        b = build_backbone("test-mini", image_size=(224, 224))
        assert b.pretrained and b.display_name == "test-mini (test-mini pretrained weights)"
        x = _images((224, 224))
        assert torch.equal(b.encode_image(x).global_embedding, src.encode_image(x).global_embedding)
        path.unlink()
        with pytest.raises(WeightsNotFoundError, match="mini.pt"):
            build_backbone("test-mini", image_size=(224, 224))
    finally:
        bb.BACKBONES.pop("test-mini")


# ------------------------------------------------------------------------------------------------
# tiny models: shapes, dtype, naming, determinism
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("size", SIZES)
def test_tiny_shapes_fp32_and_clip_agreement(name, size):
    b = build_backbone(name, image_size=size)
    assert isinstance(b, ClipBackbone)
    assert all(p.dtype == torch.float32 for p in b.parameters())
    assert b.dtype == torch.float32 and not b.training
    assert b.image_size == size
    stride = 16 if name == "tiny-vit" else 32
    grid = (size[0] // stride, size[1] // stride)
    assert b.grid == grid and b.patch_size == stride
    assert b.is_vit == (name == "tiny-vit")
    assert b.clip.visual.input_resolution == (size[0] if size[0] == size[1] else size)

    x = _images(size)
    f = b.encode_image(x)
    assert isinstance(f, ImageFeatures)
    assert f.grid == grid
    assert f.global_embedding.shape == (2, b.embed_dim) == (2, 64)
    assert f.patch_tokens.shape == (2, grid[0] * grid[1], 64)
    assert f.pre_projection.shape == (2, b.visual_width)
    assert f.patch_map().shape == (2, 64, *grid)
    assert all(t.dtype == torch.float32 for t in (f.global_embedding, f.patch_tokens, f.pre_projection))
    # adaptation is in place: CLIP's own encode_image works at the new size and agrees
    assert torch.equal(b.clip.encode_image(x), f.global_embedding)


def test_display_names_say_untrained():
    for name in ["tiny-vit", "tiny-rn"]:
        b = build_backbone(name, seed=3, image_size=(224, 224))
        assert b.pretrained is False and b.name == name
        assert b.display_name == f"{name} (untrained, random init seed 3)"
        assert "untrained" in repr(b)


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_backbone("tiny-vit", seed=0, image_size=(224, 224))
    assert torch.equal(torch.rand(3), expected)  # global RNG stream untouched
    b = build_backbone("tiny-vit", seed=0, image_size=(224, 224))
    c = build_backbone("tiny-vit", seed=1, image_size=(224, 224))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not torch.equal(sa["clip.visual.conv1.weight"], sc["clip.visual.conv1.weight"])
    ra, rb = build_backbone("tiny-rn", seed=0, image_size=(224, 224)), build_backbone("tiny-rn", seed=0, image_size=(224, 224))
    assert all(torch.equal(v, rb.state_dict()[k]) for k, v in ra.state_dict().items())


def test_tiny_arch_matches_independently_built_clip():
    ref = _seeded_clip(TINY_VIT_ARCH, 7)
    b = build_backbone("tiny-vit", seed=7, image_size=(224, 224))
    own = b.clip.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in ref.state_dict().items())


# ------------------------------------------------------------------------------------------------
# exactness at the native size
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_native_size_is_bit_identical_to_clip(name):
    b = build_backbone(name, image_size=(224, 224))
    fresh = copy.deepcopy(b.clip)  # unmodified clip.model.CLIP with the same weights
    x = _images((224, 224), batch=3)
    with torch.no_grad():
        ref = fresh.encode_image(x)
        f = b.encode_image(x)
    assert torch.equal(f.global_embedding, ref)


def test_vit_patch_tokens_follow_clip_forward():
    b = build_backbone("tiny-vit", image_size=(224, 224))
    fresh = copy.deepcopy(b.clip)
    seen = {}
    fresh.visual.transformer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    x = _images((224, 224))
    with torch.no_grad():
        fresh.encode_image(x)
        f = b.encode_image(x)
    tokens = seen["out"].permute(1, 0, 2)  # LND -> NLD
    v = fresh.visual
    assert torch.equal(f.patch_tokens, v.ln_post(tokens[:, 1:, :]) @ v.proj)
    assert torch.equal(f.pre_projection, v.ln_post(tokens[:, 0, :]))


def test_rn_patch_tokens_are_attnpool_values():
    b = build_backbone("tiny-rn", image_size=(96, 128))
    seen = {}
    b.clip.visual.attnpool.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = _images((96, 128))
    with torch.no_grad():
        f = b.encode_image(x)
    pool = b.clip.visual.attnpool
    fmap = seen["x"]  # [B, C, 3, 4]
    tokens = fmap.flatten(2).permute(0, 2, 1) + pool.positional_embedding[1:]
    assert torch.allclose(f.patch_tokens, pool.c_proj(pool.v_proj(tokens)), atol=1e-6)
    assert torch.allclose(f.pre_projection, fmap.mean(dim=(2, 3)))


def test_rn_patch_tokens_consistent_with_attnpool_under_uniform_attention():
    """With q/k projections zeroed the attention is uniform, so the attention-pool output is the
    mean of the projected values over [mean token, spatial tokens]: the dense tokens are exactly
    those values, in the same joint space."""
    b = build_backbone("tiny-rn", image_size=(96, 128), seed=2)
    pool = b.clip.visual.attnpool
    with torch.no_grad():
        for lin in (pool.q_proj, pool.k_proj):
            lin.weight.zero_()
            lin.bias.zero_()
    seen = {}
    pool.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = _images((96, 128))
    with torch.no_grad():
        f = b.encode_image(x)
        fmap = seen["x"].flatten(2).permute(0, 2, 1)  # [B, N, C]
        mean_tok = pool.c_proj(pool.v_proj(fmap.mean(dim=1) + pool.positional_embedding[0]))
        n = f.patch_tokens.shape[1]
        expected = (mean_tok + f.patch_tokens.sum(dim=1)) / (n + 1)
    assert torch.allclose(f.global_embedding, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_patch_tokens_change_with_the_image(name):
    b = build_backbone(name, image_size=(96, 128))
    x = _images((96, 128))
    y = x.clone()
    y[:, :, :32, :32] += 1.0  # change the top-left corner only
    with torch.no_grad():
        fx, fy = b.encode_image(x), b.encode_image(y)
    diff = (fx.patch_tokens - fy.patch_tokens).abs().amax(dim=(0, 2))
    assert diff.max() > 1e-4
    assert not torch.equal(fx.global_embedding, fy.global_embedding)
    if name == "tiny-rn":  # convolutional receptive field: the far corner token moves less
        assert diff[0] > diff[-1]


# ------------------------------------------------------------------------------------------------
# 2-D positional-embedding resize
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_same_grid_is_noop(name):
    b = build_backbone(name, image_size=(224, 224))
    pos = b._pos_param()
    before = pos.detach().clone()
    b.set_image_size((224, 224))
    assert b._pos_param() is pos and torch.equal(pos, before)
    assert b.clip.visual.input_resolution == 224
    assert resize_positional_embedding(before, b.grid, b.grid) is before


def _linear_grid(gh, gw, step_h=1.0, step_w=1.0):
    """Embedding that is linear in (row, col), evaluated at the centres of a gh x gw grid that spans
    the same image as a 14 x 14 grid (coordinates in source-grid cells)."""
    r = (torch.arange(gh) + 0.5) * step_h - 0.5
    c = (torch.arange(gw) + 0.5) * step_w - 0.5
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr, cc, 2 * rr - 3 * cc + 1], dim=-1).reshape(gh * gw, 3)


@pytest.mark.parametrize("new_grid", [(6, 8), (14, 18), (7, 9), (20, 20)])
def test_resize_keeps_a_linear_embedding_nearly_linear(new_grid):
    src = torch.cat([torch.full((1, 3), 7.0), _linear_grid(14, 14)])
    out = resize_positional_embedding(src, (14, 14), new_grid)
    assert out.shape == (1 + new_grid[0] * new_grid[1], 3)
    assert torch.equal(out[0], src[0])  # class token kept
    expected = _linear_grid(*new_grid, 14 / new_grid[0], 14 / new_grid[1])
    span = expected.amax(0) - expected.amin(0)
    err = (out[1:] - expected).abs().amax(0)
    assert (err / span).max() < 0.03, (err, span)
    # and the 2-D layout survives: rows follow channel 0, columns follow channel 1
    grid = out[1:].reshape(*new_grid, 3)
    assert (grid[1:, :, 0] > grid[:-1, :, 0]).all() and (grid[:, 1:, 1] > grid[:, :-1, 1]).all()


def test_backbone_resize_uses_the_2d_grid():
    b = build_backbone("tiny-vit", image_size=(224, 224))
    with torch.no_grad():
        lin = _linear_grid(14, 14)
        b.clip.visual.positional_embedding[1:, :3] = lin
    b.set_image_size((96, 128))
    pos = b.clip.visual.positional_embedding[1:, :3].detach()
    expected = _linear_grid(6, 8, 14 / 6, 14 / 8)
    span = expected.amax(0) - expected.amin(0)
    assert ((pos - expected).abs().amax(0) / span).max() < 0.03


def test_rn_attnpool_positional_embedding_resized():
    b = build_backbone("tiny-rn", image_size=(224, 288))
    assert b.clip.visual.attnpool.positional_embedding.shape == (1 + 7 * 9, 256)
    b2 = build_backbone("tiny-rn", image_size=(224, 224))
    assert torch.equal(b.clip.visual.attnpool.positional_embedding[0], b2.clip.visual.attnpool.positional_embedding[0])


@pytest.mark.parametrize("name,size,nearby", [
    ("tiny-vit", (100, 130), ["(96, 128)", "(112, 144)"]),
    ("tiny-rn", (100, 130), ["(96, 128)", "(128, 160)"]),
    ("tiny-rn", 200, ["(192, 192)", "(224, 224)"]),
])
def test_indivisible_size_names_valid_nearby_sizes(name, size, nearby):
    with pytest.raises(ValueError) as exc:
        build_backbone(name, image_size=size)
    for s in nearby:
        assert s in str(exc.value)


def test_wrong_input_size_is_a_clear_error():
    b = build_backbone("tiny-vit", image_size=(96, 128))
    with pytest.raises(ValueError, match=r"\(96, 128\)"):
        b.encode_image(_images((224, 224)))


# ------------------------------------------------------------------------------------------------
# real (OpenAI) entries: offline errors and the real loading path on tiny architectures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fname", [("vitb16", "ViT-B-16.pt"), ("rn50", "RN50.pt")])
def test_offline_missing_weights_fail_fast_and_explain(name, fname, tmp_path, _offline):
    dl = tmp_path / "dl"
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as exc:
        build_backbone(name, download_root=dl, image_size=(224, 224))
    assert time.perf_counter() - t0 < 2.0
    err = exc.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert str(dl / fname) in msg
    assert str(_offline / ".cache" / "clip" / fname) in msg
    assert "weights=" in msg and "download_root" in msg and "~/.cache/clip" in msg
    assert clip.clip._MODELS[get_backbone_spec(name).openai_name] in msg
    assert err.searched == [str(dl / fname), str(_offline / ".cache" / "clip" / fname)]
    assert not dl.exists()  # nothing created, nothing downloaded


def test_missing_weights_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "ViT-B-16.pt"
    for name in ["vitb16", "tiny-vit"]:
        t0 = time.perf_counter()
        with pytest.raises(WeightsNotFoundError) as exc:
            build_backbone(name, weights=missing, image_size=(224, 224))
        assert time.perf_counter() - t0 < 2.0
        assert str(missing) in str(exc.value) and "weights=" in str(exc.value)


def test_torchscript_release_file_loads_through_clip_load(tmp_path, _offline):
    """A TorchScript archive (the format of OpenAI's files) in the cache goes through clip.load."""
    ref = _seeded_clip(TINY_VIT_ARCH, 11)
    cache = _offline / ".cache" / "clip"
    cache.mkdir(parents=True)
    _trace_to(ref, cache / "ViT-B-16.pt")
    with pytest.warns(UserWarning, match="not the standard"):
        b = build_backbone("vitb16", image_size=(224, 224))
    assert b.pretrained and b.name == "vitb16"
    assert b.display_name == "vitb16 (OpenAI CLIP weights)"
    assert b.weights_path == str(cache / "ViT-B-16.pt")
    assert all(p.dtype == torch.float32 for p in b.parameters())
    x = _images((224, 224))
    with torch.no_grad():
        assert torch.equal(b.encode_image(x).global_embedding, _fp16_rounded(ref).encode_image(x))
    # download_root is consulted first, and non-square sizes work on loaded models too
    dl = tmp_path / "dl"
    dl.mkdir()
    _trace_to(_seeded_clip(TINY_VIT_ARCH, 12), dl / "ViT-B-16.pt")
    with pytest.warns(UserWarning):
        b2 = build_backbone("vitb16", download_root=dl, image_size=(96, 128))
    assert b2.weights_path == str(dl / "ViT-B-16.pt")
    assert b2.encode_image(_images((96, 128))).patch_tokens.shape == (2, 48, 64)


@pytest.mark.parametrize("name,arch", [("vitb16", TINY_VIT_ARCH), ("rn50", TINY_RN_ARCH)])
def test_state_dict_file_loads_through_build_model(name, arch, tmp_path):
    ref = _seeded_clip(arch, 4)
    path = tmp_path / "my_clip.pt"
    torch.save(ref.state_dict(), path)
    with pytest.warns(UserWarning, match="not the standard"):
        b = build_backbone(name, weights=path, image_size=(96, 128))
    assert b.pretrained and b.display_name == f"{name} (weights from my_clip.pt)"
    assert all(p.dtype == torch.float32 for p in b.parameters())
    expected = _fp16_rounded(ref).state_dict()
    own = b.clip.state_dict()
    pos_key = "visual.positional_embedding" if name == "vitb16" else "visual.attnpool.positional_embedding"
    assert all(torch.equal(expected[k], own[k]) for k in expected if k != pos_key)
    assert own[pos_key].shape[0] == 1 + b.grid[0] * b.grid[1]
    f = b.encode_image(_images((96, 128)))
    assert f.patch_tokens.shape == (2, b.grid[0] * b.grid[1], 64)


def test_wrong_family_weights_for_real_name(tmp_path):
    path = tmp_path / "rn.pt"
    torch.save(_seeded_clip(TINY_RN_ARCH, 0).state_dict(), path)
    with pytest.raises(IncompatibleWeightsError, match="ResNet"):
        build_backbone("vitb16", weights=path, image_size=(224, 224))


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(IncompatibleWeightsError, match="garbage.pt"):
        build_backbone("rn50", weights=path, image_size=(224, 224))


# ------------------------------------------------------------------------------------------------
# weights for tiny architectures
# ------------------------------------------------------------------------------------------------


def test_tiny_weights_roundtrip_exact(tmp_path):
    src = build_backbone("tiny-rn", seed=9, image_size=(224, 224))
    path = tmp_path / "tiny_rn.pt"
    torch.save(src.clip.state_dict(), path)
    b = build_backbone("tiny-rn", weights=path, seed=0, image_size=(224, 224))
    assert b.pretrained and b.display_name == "tiny-rn (weights from tiny_rn.pt)"
    own = b.clip.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in src.clip.state_dict().items())
    # a wrapper state dict ("clip." prefix) works too
    torch.save(src.state_dict(), path)
    b2 = build_backbone("tiny-rn", weights=path, image_size=(224, 224))
    assert torch.equal(b2.clip.visual.conv1.weight, src.clip.visual.conv1.weight)


def test_tiny_weights_shape_mismatch_names_checkpoint_and_backbone(tmp_path):
    path = tmp_path / "from_rn.pt"
    torch.save(build_backbone("tiny-rn", image_size=(224, 224)).clip.state_dict(), path)
    with pytest.raises(IncompatibleWeightsError) as exc:
        build_backbone("tiny-vit", weights=path, image_size=(224, 224))
    msg = str(exc.value)
    assert str(path) in msg and "'tiny-vit'" in msg and "ResNet" in msg


def test_save_weights_roundtrip_at_non_native_size(tmp_path):
    src = build_backbone("tiny-vit", image_size=(96, 128), seed=3)
    with torch.no_grad():
        src.clip.visual.positional_embedding.add_(0.1)  # pretend it was fine-tuned at this size
    path = src.save_weights(tmp_path / "ft.pt")
    b = build_backbone("tiny-vit", weights=path, image_size=(96, 128))
    x = _images((96, 128))
    with torch.no_grad():
        assert torch.equal(b.encode_image(x).global_embedding, src.encode_image(x).global_embedding)
    assert backbone_fingerprint(b) == backbone_fingerprint(src)
    b224 = build_backbone("tiny-vit", weights=path, image_size=(224, 224))  # re-adapted from the file's grid
    assert b224.grid == (14, 14)
    # our format also restores an OpenAI entry exactly, without the release file
    real = build_backbone("tiny-rn", image_size=(96, 128), seed=1)
    p2 = real.save_weights(tmp_path / "rn.pt")
    with pytest.warns(UserWarning, match="not the standard"):
        r = build_backbone("rn50", weights=p2, image_size=(96, 128))
    assert torch.equal(r.encode_image(x).global_embedding, real.encode_image(x).global_embedding)


# ------------------------------------------------------------------------------------------------
# text side, preprocessing, device, fingerprint
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_text_side_with_real_tokenizer(name):
    b = build_backbone(name, image_size=(224, 224))
    assert b.context_length == 77 and b.vocab_size == 49408
    tokens = b.tokenize(["A photo of a X X X X dorsal right hand.", "a hand"])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        t = b.encode_text(tokens)
        assert t.shape == (2, b.embed_dim)
        assert torch.equal(t, b.clip.encode_text(tokens))
        via_embeddings = b.encode_text_embeddings(b.token_embedding(tokens), tokens)
    assert torch.allclose(via_embeddings, t, atol=1e-6)
    for attr in ["token_embedding", "text_projection", "transformer", "ln_final", "positional_embedding"]:
        assert getattr(b, attr) is getattr(b.clip, attr)


def test_preprocess_constants_match_clip():
    norm = clip.clip._transform(224).transforms[-1]
    assert tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD
    cfg = build_backbone("tiny-vit", image_size=(96, 128)).preprocess_config()
    assert cfg.mean == CLIP_MEAN and cfg.std == CLIP_STD and cfg.image_size == (96, 128)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_backbone("tiny-vit", device="cuda", image_size=(224, 224))
    assert build_backbone("tiny-vit", device="auto", image_size=(224, 224)).device.type == resolve_device("auto").type


def test_fingerprint():
    a = build_backbone("tiny-vit", seed=0, image_size=(224, 224))
    fa = backbone_fingerprint(a)
    assert len(fa) == 16 and all(ch in "0123456789abcdef" for ch in fa)
    assert backbone_fingerprint(build_backbone("tiny-vit", seed=0, image_size=(224, 224))) == fa
    assert backbone_fingerprint(build_backbone("tiny-vit", seed=1, image_size=(224, 224))) != fa
    assert backbone_fingerprint(build_backbone("tiny-vit", seed=0, image_size=(96, 128))) != fa
    assert backbone_fingerprint(build_backbone("tiny-rn", seed=0, image_size=(224, 224))) != fa
    with torch.no_grad():
        a.clip.ln_final.weight[0] += 1e-3
    assert backbone_fingerprint(a) != fa


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn", "handclip-mini"])
def test_default_input_size_and_preprocessing_come_from_the_registry(name):
    """build_backbone(name) without a size uses the registry entry's default, and the built
    model's preprocessing config is the entry's (one source for both)."""
    spec = get_backbone_spec(name)
    b = build_backbone(name)
    assert b.image_size == tuple(spec.default_image_size)
    cfg = b.preprocess_config()
    assert cfg == spec.preprocess(b.image_size, "pad")
    assert (cfg.mean, cfg.std) == (CLIP_MEAN, CLIP_STD)
    assert build_backbone(name, resize_mode="squash").preprocess_config().resize_mode == "squash"


def test_openai_entries_name_real_clip_releases():
    """Each OpenAI entry names a model of the installed openai-clip (its file name and SHA-256
    come from there), and a wrong name fails with the list of real ones."""
    for spec in bb.BACKBONES.values():
        if spec.openai_name is not None:
            assert spec.openai_name in clip.clip._MODELS, spec.name
            assert spec.weights_basename.endswith(".pt") and len(spec.sha256) == 64
    bad = bb.BackboneSpec("test-bad", "bad", openai_name="ViT-Z/99")
    with pytest.raises(ValueError, match="not an OpenAI CLIP model"):
        bad.url


# ------------------------------------------------------------------------------------------------
# CLIP-ReID's options: the intermediate feature, the RN last stride, the input normalisation
# ------------------------------------------------------------------------------------------------


def test_vit_intermediate_is_the_cls_token_entering_the_last_block():
    """CLIP-ReID's img_feature_last (model/clip/model.py: resblocks[:11], then resblocks[11]):
    computed independently here, and the global embedding is still bit-identical to CLIP's."""
    b = build_backbone("tiny-vit", image_size=(96, 128))
    v = b.clip.visual
    x = _images((96, 128), batch=3)
    with torch.no_grad():
        f = b.encode_image(x)
        t = v.conv1(x).flatten(2).permute(0, 2, 1)
        cls = v.class_embedding + torch.zeros(3, 1, t.shape[-1])
        t = v.ln_pre(torch.cat([cls, t], dim=1) + v.positional_embedding)
        t = t.permute(1, 0, 2)
        for block in list(v.transformer.resblocks)[:-1]:
            t = block(t)
        assert torch.equal(b.clip.encode_image(x), f.global_embedding)
    assert f.intermediate.shape == (3, b.intermediate_width) == (3, 64)
    torch.testing.assert_close(f.intermediate, t[0], rtol=0, atol=0)
    assert not torch.allclose(f.intermediate, f.pre_projection)  # no ln_post, one block earlier


@pytest.mark.parametrize("name", ["tiny-rn", "handclip-mini"])
def test_rn_intermediate_is_the_pooled_third_stage(name):
    b = build_backbone(name, image_size=(96, 128))
    v = b.clip.visual
    x = _images((96, 128))
    with torch.no_grad():
        f = b.encode_image(x)
        h = v.avgpool(v.relu3(v.bn3(v.conv3(v.relu2(v.bn2(v.conv2(v.relu1(v.bn1(v.conv1(x))))))))))
        layer3 = v.layer3(v.layer2(v.layer1(h)))
        assert torch.equal(b.clip.encode_image(x), f.global_embedding)
    assert f.intermediate.shape == (2, b.intermediate_width) == (2, layer3.shape[1])
    assert torch.equal(f.intermediate, layer3.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["tiny-rn", "handclip-mini"])
def test_rn_last_stride_1_doubles_the_grid_and_keeps_the_weights(name):
    """CLIP-ReID's RN50 (model/clip/model.py:120, layer4 stride 1): same weights, output stride
    16, twice the grid in each direction, attention-pool positional embedding resized in 2-D."""
    size = (96, 128)
    b2 = build_backbone(name, image_size=size)
    b1 = build_backbone(name, image_size=size, rn_last_stride=1)
    assert (b2.last_stride, b1.last_stride) == (2, 1)
    assert (b2.patch_size, b1.patch_size) == (32, 16)
    assert b1.grid == (2 * b2.grid[0], 2 * b2.grid[1]) == (6, 8)
    pos_key = "clip.visual.attnpool.positional_embedding"
    s1, s2 = b1.state_dict(), b2.state_dict()
    assert set(s1) == set(s2)  # no module with state added or removed
    assert s1[pos_key].shape == (1 + 6 * 8, s2[pos_key].shape[1])
    assert torch.equal(s1[pos_key][0], s2[pos_key][0])  # the mean token's embedding is kept
    for key in s1:
        if key != pos_key:
            assert torch.equal(s1[key], s2[key]), f"{key} changed"
    x = _images(size)
    with torch.no_grad():
        f1, f2 = b1.encode_image(x), b2.encode_image(x)
        assert torch.equal(b1.clip.encode_image(x), f1.global_embedding)
    assert f1.patch_tokens.shape[1] == 48 and f1.grid == (6, 8)
    assert torch.isfinite(f1.global_embedding).all() and torch.isfinite(f1.intermediate).all()
    assert f1.global_embedding.shape == f2.global_embedding.shape
    assert not torch.allclose(f1.global_embedding, f2.global_embedding)
    assert torch.equal(f1.intermediate, f2.intermediate)  # layers 1-3 are untouched
    assert "rn_last_stride=1" in repr(b1)
    assert backbone_fingerprint(b1) != backbone_fingerprint(b2)


def test_rn_last_stride_1_sizes_roundtrip_and_refusals(tmp_path):
    b = build_backbone("tiny-rn", image_size=(80, 112), rn_last_stride=1)  # multiples of 16
    assert b.grid == (5, 7)
    with pytest.raises(ValueError, match="multiples of 16"):
        build_backbone("tiny-rn", image_size=(88, 112), rn_last_stride=1)
    with pytest.raises(ValueError, match="ResNet"):
        build_backbone("tiny-vit", rn_last_stride=1)
    with pytest.raises(ValueError, match="1 or 2"):
        build_backbone("tiny-rn", rn_last_stride=3)
    with torch.no_grad():
        b.clip.visual.attnpool.positional_embedding.add_(0.1)
    path = b.save_weights(tmp_path / "s1.pt")
    back = build_backbone("tiny-rn", weights=path, image_size=(80, 112), rn_last_stride=1)
    x = _images((80, 112))
    with torch.no_grad():
        assert torch.equal(back.encode_image(x).global_embedding, b.encode_image(x).global_embedding)
    # back to stride 2 from a stride-1 file: one resize from the file's grid
    assert build_backbone("tiny-rn", weights=path, image_size=(96, 128)).grid == (3, 4)
    # set_last_stride back and forth restores CLIP's modules
    b.set_last_stride(2, image_size=(96, 128))
    assert b.grid == (3, 4) and isinstance(b.clip.visual.layer4[0].avgpool, torch.nn.AvgPool2d)


def test_backbone_from_params_passes_stride_and_normalisation():
    from handclip_nb.models.backbones import backbone_from_params
    from handclip_nb.params import resolve_params

    p = resolve_params({"backbone": "tiny-rn", "rn_last_stride": 1,
                        "pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5]},
                       stage="stage2")
    b = backbone_from_params(p, device="cpu")
    assert b.last_stride == 1 and b.grid == (6, 8)
    cfg = b.preprocess_config()
    assert (cfg.mean, cfg.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    default = backbone_from_params(resolve_params({"backbone": "tiny-rn"}, stage="stage2"),
                                   device="cpu")
    assert default.last_stride == 2
    assert (default.preprocess_config().mean, default.preprocess_config().std) == (CLIP_MEAN, CLIP_STD)
