"""PromptSG model (tiny, untrained CLIP backbones; offline, CPU).

Guards docs/mistakes.md #4 -- the earlier implementation's cross-attention over a *single* image vector
(softmax over one key is 1, so the text had no effect) and the inversion MLP that received no
gradient with the SupCon weight at 0 -- plus the simplified-prompt cache, the frozen text tower,
the attention statistics and a short optimisation.
"""
from __future__ import annotations

import math

import pytest
import torch

from handclip_nb.models.backbones import build_backbone
from handclip_nb.models.promptsg import (
    PROMPT_MODES,
    InversionNetwork,
    LanguageGuidedFusion,
    PromptSG,
    attention_entropy,
    default_num_heads,
    prompt_sensitivity,
)
from handclip_nb.train.stage3 import promptsg_loss

SIZE = (96, 128)


# tiny tensors: intra-op threads only add barrier waits on a loaded CI box
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str = "tiny-vit", num_classes: int = 4, seed: int = 0, **kw) -> PromptSG:
    """A fresh PromptSG whose text tower is frozen the way stage 3 freezes it."""
    bb = build_backbone(name, image_size=SIZE, seed=0)
    bb.requires_grad_(False)
    bb.visual.requires_grad_(True)
    torch.manual_seed(seed)
    return PromptSG(bb, num_classes, aspect="dorsal_r", **kw)


def _batch(ids: int = 4, per_id: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(ids * per_id, 3, *SIZE, generator=g)
    labels = torch.arange(ids).repeat_interleave(per_id)
    return images, labels


@pytest.fixture(scope="module")
def vit_model():
    """Read-only model (eval mode) shared by the tests that do not train."""
    return _model("tiny-vit").eval()


def _loss(model, images, labels, **kw):
    out = model(images, labels, prompt_mode="composed")
    kw.setdefault("logit_scale", model.backbone.logit_scale.exp().detach())
    return out, promptsg_loss(out, labels, **kw)


# --------------------------------------------------------------------------------------------------
# Construction and API
# --------------------------------------------------------------------------------------------------


def test_construction_and_prompts(vit_model):
    m = vit_model
    assert m.prompt_text == "A photo of a X dorsal right hand."
    assert m.simplified_text == "A photo of a dorsal right hand."
    assert m.num_heads == 2 == default_num_heads(64)
    assert default_num_heads(512) == 16 and default_num_heads(100) == 2 and default_num_heads(8) == 1
    assert isinstance(m.inversion, InversionNetwork)
    layers = [type(l).__name__ for l in m.inversion]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.inversion[0].in_features == 64 and m.inversion[0].out_features == 512
    assert m.inversion[-1].out_features == m.backbone.token_embedding.embedding_dim
    assert isinstance(m.fusion.cross_attn, torch.nn.MultiheadAttention) and len(m.fusion.blocks) == 2
    assert m.head.in_dims == (64, 64) and m.embedding_dim == 128
    assert set(m.trainable_modules()) == {"visual", "inversion", "fusion", "head"}
    assert m.trainable_modules()["visual"] is m.backbone.visual
    assert set(m.new_modules()) == {"inversion", "fusion", "head"}
    with pytest.raises(ValueError, match="divide the embedding dim 64"):
        LanguageGuidedFusion(64, num_heads=3)


def test_forward_outputs_and_prompt_mode_validation(vit_model):
    m = vit_model
    x, _ = _batch(2, 2)
    with torch.no_grad():
        out = m(x, prompt_mode="composed")
        simple = m(x, prompt_mode="simplified")
        emb = m.embed(x)
    b, n = 4, 6 * 8
    assert out.features.patch_tokens.shape == (b, n, 64) and out.grid == (6, 8)
    assert out.pseudo_words.shape == (b, 64) and out.text.shape == (b, 64)
    assert out.attention.shape == (b, 2, n) and out.fused.shape == (b, 64)
    assert out.head.embedding_for_test.shape == (b, 128)
    assert simple.pseudo_words is None and simple.text.shape == (b, 64)
    assert torch.equal(simple.text, simple.text[:1].expand(b, -1))  # one prompt for every image
    torch.testing.assert_close(emb, simple.head.embedding_for_test)
    with pytest.raises(ValueError, match=r"unknown prompt_mode 'fancy'; valid modes: 'composed', 'simplified'"):
        m(x, prompt_mode="fancy")
    with pytest.raises(ValueError, match="valid modes"):
        m.embed(x, prompt_mode="")
    assert PROMPT_MODES == ("composed", "simplified")


# --------------------------------------------------------------------------------------------------
# docs/mistakes.md #4 guards
# --------------------------------------------------------------------------------------------------


def test_attention_differs_between_text_queries(vit_model):
    """(1) The text decides where the model looks: two different queries, same image, different maps."""
    m = vit_model
    x, _ = _batch(2, 2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        feats = m.backbone.encode_image(x)
        t_a = m.composer(torch.randn(4, m.composer.width, generator=g))
        t_b = m.composer(torch.randn(4, m.composer.width, generator=g))
        fused_a, attn_a = m.fusion(t_a, feats.patch_tokens)
        fused_b, attn_b = m.fusion(t_b, feats.patch_tokens)
        composed = m(x, prompt_mode="composed").attention
        simplified = m(x, prompt_mode="simplified").attention
    assert not torch.allclose(attn_a, attn_b, atol=1e-4)
    assert prompt_sensitivity(attn_a, attn_b) > 1e-3
    assert not torch.allclose(fused_a, fused_b, atol=1e-4)
    # per image, too: no image's map is independent of the text
    per_image = 0.5 * (attn_a - attn_b).abs().sum(-1).mean(-1)
    assert (per_image > 1e-4).all()
    assert prompt_sensitivity(composed, simplified) > 1e-3


@pytest.mark.parametrize("name,grid", [("tiny-vit", (6, 8)), ("tiny-rn", (3, 4))])
def test_attention_is_over_patch_tokens(name, grid):
    """(2) Attention is a softmax over N = h*w > 1 patch tokens, never over a single vector."""
    m = _model(name).eval()
    x, _ = _batch(1, 3)
    n = grid[0] * grid[1]
    with torch.no_grad():
        out = m(x, prompt_mode="composed")
        maps = m.attention_maps(x, prompt_mode="composed")
    assert n > 1 and out.grid == grid
    assert out.features.patch_tokens.shape == (3, n, 64)
    assert out.attention.shape == (3, m.num_heads, n)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, m.num_heads))
    assert (out.attention >= 0).all()
    assert (out.attention.amax(-1) < 1 - 1e-3).all()  # not a degenerate single key
    assert maps.shape == (3, m.num_heads, *grid)
    torch.testing.assert_close(maps.flatten(2), out.attention)
    # a single key is refused outright
    with pytest.raises(ValueError, match="N > 1 patch tokens"):
        m.fusion(out.text, out.features.global_embedding[:, None, :])


@pytest.mark.parametrize("supcon_weight", [0.5, 0.0])
def test_inversion_network_receives_gradients(supcon_weight):
    """(3) With the full loss, and with supcon_weight = 0 (through the composed cross-attention query)."""
    m = _model().train()
    x, y = _batch()
    out, parts = _loss(m, x, y, supcon_weight=supcon_weight)
    assert set(parts) == {"loss", "id", "triplet", "supcon"}
    assert parts["supcon"].requires_grad == (supcon_weight > 0)
    parts["loss"].backward()
    for name, p in m.inversion.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    for name, p in m.fusion.cross_attn.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_simplified_training_step_leaves_inversion_alone():
    m = _model().train()
    x, y = _batch()
    out = m(x, y, prompt_mode="simplified")
    parts = promptsg_loss(out, y, supcon_weight=0.0, logit_scale=10.0)
    assert set(parts) == {"loss", "id", "triplet"}
    parts["loss"].backward()
    assert all(p.grad is None for p in m.inversion.parameters())
    with pytest.raises(ValueError, match="needs composed prompts"):
        promptsg_loss(out, y, supcon_weight=0.5, logit_scale=10.0)


def test_changing_pseudo_word_changes_text(vit_model):
    """(4) S* is in the prompt: another pseudo-word gives another text feature."""
    m = vit_model
    g = torch.Generator().manual_seed(2)
    words = torch.randn(3, m.composer.width, generator=g)
    with torch.no_grad():
        base = m.composer(words)
        moved = m.composer(words + 0.5 * torch.randn(3, m.composer.width, generator=g))
        again = m.composer(words.clone())
    assert ((base - moved).norm(dim=1) > 1e-3).all()
    torch.testing.assert_close(base, again)
    # and through the model: the text follows the inversion network's output
    x, _ = _batch(2, 2)
    with torch.no_grad():
        out = m(x, prompt_mode="composed")
        torch.testing.assert_close(out.text, m.composer(out.pseudo_words))
        assert (torch.cdist(out.text, out.text)[~torch.eye(4, dtype=torch.bool)] > 1e-5).all()


def test_simplified_inference_skips_inversion_and_encodes_once():
    """(5) Simplified inference never runs the inversion network and encodes its prompt once."""
    m = _model().eval()
    x, _ = _batch(2, 2)
    calls = {"inversion": 0, "encode_text": 0}
    m.inversion.register_forward_hook(lambda *a: calls.__setitem__("inversion", calls["inversion"] + 1))
    original = m.backbone.encode_text

    def counting(tokens):
        calls["encode_text"] += 1
        return original(tokens)

    m.backbone.encode_text = counting  # instance attribute shadows the method
    with torch.no_grad():
        first = m.embed(x)
        second = m.embed(x, "simplified")
        m.attention_maps(x)
        out = m(x, prompt_mode="simplified")
    assert calls == {"inversion": 0, "encode_text": 1}
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        ref = original(m.backbone.tokenize("A photo of a dorsal right hand."))
    torch.testing.assert_close(out.text[:1], ref)
    assert not out.text.requires_grad

    with torch.no_grad():  # the composed mode does run it
        m(x, prompt_mode="composed")
    assert calls["inversion"] == 1

    # the cache is invalidated when the text encoder's weights change in place (e.g. loading)
    # and by clear_text_cache(); not otherwise
    with torch.no_grad():
        m.backbone.text_projection.copy_(m.backbone.text_projection)
        m.embed(x)
        m.embed(x)
    assert calls["encode_text"] == 2
    m.clear_text_cache()
    with torch.no_grad():
        m.embed(x)
    assert calls["encode_text"] == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_simplified_cache_follows_the_device():
    m = _model().eval()
    x, _ = _batch(1, 2)
    with torch.no_grad():
        cpu = m.embed(x)
        m.to("cuda")
        gpu = m.embed(x.cuda())
        assert m.simplified_text_feature().device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_text_encoder_stays_frozen_and_param_groups():
    """(6) With the text tower frozen by the caller, a training step leaves it untouched."""
    m = _model().train()
    text_params = m.text_encoder_parameters()
    assert text_params and all(not p.requires_grad for p in text_params)
    before = [p.detach().clone() for p in text_params]
    visual_before = [p.detach().clone() for p in m.backbone.visual.parameters()]

    groups = m.param_groups(1e-4, 1e-3, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["backbone", "new"]
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1]
    assert ids[0] == {id(p) for p in m.backbone.visual.parameters()}
    new = {id(p) for mod in m.new_modules().values() for p in mod.parameters() if p.requires_grad}
    assert ids[1] == new
    assert not {id(p) for p in text_params} & (ids[0] | ids[1])

    opt = torch.optim.Adam(groups)
    x, y = _batch()
    _, parts = _loss(m, x, y)
    parts["loss"].backward()
    assert all(p.grad is None for p in text_params)
    opt.step()
    for p, b in zip(text_params, before):
        assert torch.equal(p, b)
    assert any(not torch.equal(p, b) for p, b in zip(m.backbone.visual.parameters(), visual_before))

    # freeze_text_encoder() does the same for a caller who did not freeze anything
    m2 = PromptSG(build_backbone("tiny-rn", image_size=SIZE, seed=0), 3)
    assert all(p.requires_grad for p in m2.text_encoder_parameters())
    m2.freeze_text_encoder()
    assert not any(p.requires_grad for p in m2.text_encoder_parameters())
    assert all(p.requires_grad for p in m2.backbone.visual.parameters())


def test_trainable_modules_restore_the_model():
    """What stage 3 checkpoints (trainable_modules) rebuilds the same ranking feature."""
    m = _model().train()
    opt = torch.optim.Adam(m.param_groups(1e-3, 1e-3))
    x, y = _batch()
    _, parts = _loss(m, x, y)
    parts["loss"].backward()
    opt.step()
    m.eval()
    state = {k: {n: t.clone() for n, t in mod.state_dict().items()} for k, mod in m.trainable_modules().items()}
    m2 = _model(seed=5).eval()
    for k, mod in m2.trainable_modules().items():
        mod.load_state_dict(state[k])
    with torch.no_grad():
        for mode in PROMPT_MODES:
            torch.testing.assert_close(m.embed(x, mode), m2.embed(x, mode))


# --------------------------------------------------------------------------------------------------
# Attention statistics against slow references
# --------------------------------------------------------------------------------------------------


def _entropy_ref(attn):
    out = []
    for img in attn.tolist():
        hs = []
        for row in img:
            hs.append(-sum(a * math.log(a) for a in row if a > 0))
        out.append(sum(hs) / len(hs))
    return torch.tensor(out, dtype=torch.float64)


def _tv_ref(a, b):
    vals = []
    for ia, ib in zip(a.tolist(), b.tolist()):
        for ra, rb in zip(ia, ib):
            vals.append(0.5 * sum(abs(p - q) for p, q in zip(ra, rb)))
    return sum(vals) / len(vals)


def test_attention_entropy():
    n = 48
    uniform = torch.full((3, 2, n), 1.0 / n)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((3,), math.log(n)))
    one_hot = torch.zeros(2, 2, n)
    one_hot[:, :, 5] = 1.0
    torch.testing.assert_close(attention_entropy(one_hot), torch.zeros(2))
    g = torch.Generator().manual_seed(0)
    rand = torch.softmax(torch.randn(4, 3, n, generator=g) * 2, dim=-1)
    rand[0, 0, :10] = 0  # exact zeros: 0 log 0 = 0
    rand[0, 0] /= rand[0, 0].sum()
    got = attention_entropy(rand)
    assert got.shape == (4,) and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _entropy_ref(rand), atol=1e-5, rtol=1e-5)
    assert ((got > 0) & (got < math.log(n))).all()
    torch.testing.assert_close(attention_entropy(rand[:, 0]), attention_entropy(rand[:, :1]))  # [B, N]
    with pytest.raises(ValueError, match=r"\[B, heads, N\]"):
        attention_entropy(torch.ones(n))


def test_prompt_sensitivity():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(5, 2, 12, generator=g), dim=-1)
    b = torch.softmax(torch.randn(5, 2, 12, generator=g), dim=-1)
    assert prompt_sensitivity(a, a) == 0.0
    assert prompt_sensitivity(a, b) == pytest.approx(_tv_ref(a, b), abs=1e-6)
    assert prompt_sensitivity(a, b) == pytest.approx(prompt_sensitivity(b, a))
    x = torch.zeros(3, 2, 12)
    y = torch.zeros(3, 2, 12)
    x[..., 0] = 1.0
    y[..., 7] = 1.0
    assert prompt_sensitivity(x, y) == pytest.approx(1.0)
    assert isinstance(prompt_sensitivity(x, y), float)
    with pytest.raises(ValueError, match="same shape"):
        prompt_sensitivity(a, b[:, :1])


# --------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------


def test_optimisation_lowers_the_loss():
    """~30 Adam steps on 4 ids x 4 random images lower the full loss (all three terms train)."""
    m = _model().train()
    x, y = _batch(seed=3)
    opt = torch.optim.Adam(m.param_groups(1e-4, 1e-3, weight_decay=0.0))
    history = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        _, parts = _loss(m, x, y)
        parts["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    first, last = history[0], history[-1]
    print("loss", first, "->", last)
    assert last["loss"] < 0.7 * first["loss"]
    assert last["id"] < first["id"] and last["supcon"] < first["supcon"]
