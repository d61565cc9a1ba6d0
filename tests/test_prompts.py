"""CLIP-ReID prompt learner and PromptSG prompt composer (tiny, untrained CLIP text towers; offline).

Guards docs/mistakes.md #5 (text feature read at position 0) and docs/mistakes.md #6 (template slicing that assumed 4 context
tokens, so with 12 the EOT token was overwritten).
"""
from __future__ import annotations

import io

import pytest
import torch

from handclip_nb.models.backbones import build_backbone
from handclip_nb.models.prompts import (
    ASPECT_PHRASES,
    PromptComposer,
    PromptLearner,
    aspect_phrase,
    check_compatible,
    layout_prompt,
)

EOT_ID = 49407


@pytest.fixture(scope="module")
def vit():
    return build_backbone("tiny-vit", image_size=(96, 128), seed=0)


@pytest.fixture(scope="module")
def rn():
    return build_backbone("tiny-rn", image_size=(96, 128), seed=0)


@pytest.fixture(params=["tiny-vit", "tiny-rn"])
def backbone(request, vit, rn):
    return {"tiny-vit": vit, "tiny-rn": rn}[request.param]


# --------------------------------------------------------------------------------------------------
# Assembly for any n_ctx (docs/mistakes.md #6)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_ctx", [1, 4, 12])
def test_assembly_keeps_eot_and_suffix_for_any_n_ctx(backbone, n_ctx):
    learner = PromptLearner(backbone, num_classes=3, n_ctx=n_ctx, aspect="dorsal_r")
    tokens = learner.tokens
    assert learner.prompt_text == "A photo of a " + " ".join(["X"] * n_ctx) + " dorsal right hand."
    assert learner.n_ctx == n_ctx
    # the placeholder positions, found from the tokens, are exactly the n_ctx 'X' tokens
    x_id = int(backbone.tokenize("X")[0, 1])
    sl = learner.ctx_slice
    assert sl.stop - sl.start == n_ctx
    assert (tokens[0, sl] == x_id).all()
    assert int((tokens[0] == x_id).sum()) == n_ctx
    # EOT position from the tokens
    assert learner.eot_index == int(tokens[0].argmax()) and int(tokens[0, learner.eot_index]) == EOT_ID
    n_after = int((backbone.tokenize("dorsal right hand.")[0] != 0).sum()) - 2  # 'dors al right hand .'
    assert learner.eot_index == sl.stop + n_after

    labels = torch.tensor([0, 2, 1])
    emb = learner.assemble_labels(labels)  # [B, L, width]
    assert emb.shape == (3, backbone.context_length, learner.width)
    reference = backbone.token_embedding(tokens)[0].detach()  # [L, width]
    # EOT survives, and everything after the context (aspect words, '.', EOT, padding) is intact
    for b in range(3):
        assert torch.equal(emb[b, learner.eot_index], backbone.token_embedding.weight[EOT_ID])
        assert torch.equal(emb[b, sl.stop:], reference[sl.stop:])
        assert torch.equal(emb[b, :sl.start], reference[:sl.start])
        assert torch.equal(emb[b, sl], learner.ctx[labels[b]].detach())


@pytest.mark.parametrize("n_ctx", [1, 4, 12])
def test_placeholder_embedding_as_context_reproduces_encode_text(backbone, n_ctx):
    learner = PromptLearner(backbone, num_classes=2, n_ctx=n_ctx, aspect="palmar_l")
    x_id = int(backbone.tokenize("X")[0, 1])
    with torch.no_grad():
        learner.ctx.copy_(backbone.token_embedding.weight[x_id].expand_as(learner.ctx))
        ours = learner(torch.tensor([0, 1]))
        ref = backbone.encode_text(learner.tokens)
    assert ours.shape == (2, backbone.embed_dim)
    torch.testing.assert_close(ours, ref.expand(2, -1), atol=1e-5, rtol=1e-5)
    # and the tokens are the backbone's own tokenisation of the prompt text
    assert torch.equal(learner.tokens, backbone.tokenize(learner.prompt_text))


def test_clip_reid_layout_for_four_context_words(vit):
    # cross-check with CLIP-ReID's "A photo of a X X X X person." layout: SOT + 4 words, then the ctx
    learner = PromptLearner(vit, num_classes=2, n_ctx=4, aspect="dorsal")
    assert learner.prompt_text == "A photo of a X X X X dorsal hand."
    assert learner.ctx_slice == slice(5, 9)
    assert learner.eot_index == 13  # 'dors' 'al' 'hand' '.' then EOT


def test_placeholder_found_from_tokens_not_assumed(vit):
    # a template with the placeholder word elsewhere and the context not at position 5
    learner = PromptLearner(vit, num_classes=2, n_ctx=3, template="X marks a {ctx} {aspect} hand X X X.",
                            aspect="dorsal left")
    ids = learner.tokens[0].tolist()
    assert learner.prompt_text == "X marks a X X X dorsal left hand X X X."
    assert learner.ctx_slice == slice(4, 7)
    assert learner.eot_index == ids.index(EOT_ID)
    layout = layout_prompt(vit, "{ctx} hand", slot="ctx", n_slot=2)
    assert layout.slot == slice(1, 3) and layout.text == "X X hand"


# --------------------------------------------------------------------------------------------------
# Reading at EOT, not position 0 (docs/mistakes.md #5)
# --------------------------------------------------------------------------------------------------


def test_identities_get_different_features_and_position_zero_would_not(backbone):
    learner = PromptLearner(backbone, num_classes=4, n_ctx=4, aspect="dorsal_r", init_std=0.5)
    with torch.no_grad():
        feats = learner(torch.arange(4))
        assert feats.shape == (4, backbone.embed_dim)
        # read at EOT: every identity differs from every other
        dist = torch.cdist(feats, feats)
        off = dist[~torch.eye(4, dtype=torch.bool)]
        assert (off > 1e-3 * feats.norm(dim=1).mean()).all()
        # the test has teeth: reading at position 0 (SOT; all-zero tokens -> argmax 0) under the causal
        # mask gives the same vector for every identity
        emb = learner.assemble_labels(torch.arange(4))
        at_zero = backbone.encode_text_embeddings(emb, torch.zeros_like(learner.tokens).expand(4, -1))
        torch.testing.assert_close(at_zero, at_zero[:1].expand(4, -1), atol=1e-6, rtol=1e-6)
        all_feats = learner.all_text_features(batch_size=3)
    torch.testing.assert_close(all_feats, feats, atol=1e-6, rtol=1e-6)
    assert not all_feats.requires_grad


# --------------------------------------------------------------------------------------------------
# Frozen encoders: only ctx learns
# --------------------------------------------------------------------------------------------------


def test_only_ctx_receives_gradients(backbone):
    learner = PromptLearner(backbone, num_classes=5, n_ctx=4, aspect="dorsal_r")
    # even without freezing, the prompt's fixed parts are buffers, not parameters
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    buffers = dict(learner.named_buffers())
    assert {"tokens", "token_prefix", "token_suffix"} <= set(buffers)
    assert not any(b.requires_grad for b in buffers.values())
    assert set(learner.state_dict()) == {"ctx", "tokens", "token_prefix", "token_suffix"}

    backbone.requires_grad_(False)  # as the caller (stage 1) does
    try:
        feats = learner(torch.tensor([0, 3, 3, 1]))
        feats.pow(2).sum().backward()
        assert learner.ctx.grad is not None
        used = learner.ctx.grad.abs().sum(dim=(1, 2))
        assert (used[[0, 1, 3]] > 0).all() and (used[[2, 4]] == 0).all()
        assert all(p.grad is None for p in backbone.parameters())
    finally:
        backbone.requires_grad_(True)


def test_label_validation(vit):
    learner = PromptLearner(vit, num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        learner(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="1-D integer"):
        learner(torch.tensor([[0.0]]))


# --------------------------------------------------------------------------------------------------
# Template errors
# --------------------------------------------------------------------------------------------------


def test_template_errors(vit):
    with pytest.raises(ValueError, match=r"lacks the placeholder \{ctx\}"):
        PromptLearner(vit, 3, template="A photo of a {aspect} hand.")
    with pytest.raises(ValueError, match=r"2 of the placeholder \{ctx\}"):
        PromptLearner(vit, 3, template="A {ctx} photo of a {ctx} hand.")
    with pytest.raises(ValueError, match=r"needs 81 tokens.*context length of 77"):
        PromptLearner(vit, 3, n_ctx=70)
    PromptLearner(vit, 3, n_ctx=66)  # the longest that fits: 77 tokens
    with pytest.raises(ValueError, match=">= 1"):
        PromptLearner(vit, 3, n_ctx=0)
    with pytest.raises(ValueError, match="unknown field"):
        PromptLearner(vit, 3, template="A photo of a {ctx} {side} hand.")
    with pytest.raises(ValueError, match="unknown hand aspect 'dorsal-r'"):
        PromptLearner(vit, 3, aspect="dorsal-r")
    with pytest.raises(ValueError, match="cannot locate"):
        PromptLearner(vit, 3, template="A photo of a X {ctx} hand.")
    with pytest.raises(ValueError, match="one token"):
        PromptLearner(vit, 3, placeholder="S*")


def test_aspect_phrases():
    assert aspect_phrase("dorsal_r") == "dorsal right"
    assert aspect_phrase("palmar_l") == "palmar left"
    assert aspect_phrase("Dorsal  Left") == "dorsal left"
    assert aspect_phrase("dorsal") == "dorsal"
    assert set(ASPECT_PHRASES) == {"dorsal_r", "dorsal_l", "palmar_r", "palmar_l", "dorsal"}


# --------------------------------------------------------------------------------------------------
# Seeds and checkpoints
# --------------------------------------------------------------------------------------------------


def test_seeded_init(vit):
    a = PromptLearner(vit, 6, n_ctx=4, seed=3)
    b = PromptLearner(vit, 6, n_ctx=4, seed=3)
    c = PromptLearner(vit, 6, n_ctx=4, seed=4)
    assert torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    assert abs(float(a.ctx.detach().std()) - 0.02) < 0.005
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    PromptLearner(vit, 6)
    assert torch.equal(torch.rand(1), before)  # the global RNG stream is untouched


def test_checkpoint_round_trip(vit):
    learner = PromptLearner(vit, 4, n_ctx=12, aspect="palmar_r", seed=1)
    with torch.no_grad():
        learner.ctx.add_(1.0)  # "trained"
    ids = ["0000012", "0000034", "0000056", "0000078"]
    buf = io.BytesIO()
    torch.save(learner.state_for_checkpoint(identities=ids), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["meta"]["n_ctx"] == 12 and state["meta"]["backbone"] == "tiny-vit"
    assert state["meta"]["embed_width"] == learner.width and state["meta"]["num_classes"] == 4

    restored = PromptLearner.from_checkpoint(state, vit, num_classes=4, identities=ids)
    assert restored.prompt_text == learner.prompt_text and restored.ctx_slice == learner.ctx_slice
    assert torch.equal(restored.ctx, learner.ctx)
    with torch.no_grad():
        torch.testing.assert_close(restored.all_text_features(), learner.all_text_features(), atol=0, rtol=0)
    fresh = PromptLearner(vit, 4, n_ctx=12, aspect="palmar_r", seed=9)
    fresh.load_checkpoint(state)
    assert torch.equal(fresh.ctx, learner.ctx)


def test_checkpoint_compatibility_errors(vit, rn):
    state = PromptLearner(vit, 4, n_ctx=4, aspect="dorsal_r").state_for_checkpoint(identities=list("abcd"))
    meta = state["meta"]
    check_compatible(meta, "tiny-vit", 4)  # fits
    with pytest.raises(ValueError, match=r"backbone: checkpoint has 'tiny-vit', expected 'tiny-rn'"):
        check_compatible(meta, "tiny-rn", 4)
    with pytest.raises(ValueError, match=r"num_classes.*checkpoint has 4, expected 5"):
        check_compatible(meta, "tiny-vit", 5)
    with pytest.raises(ValueError, match=r"backbone.*num_classes"):  # every mismatch named at once
        check_compatible(meta, "tiny-rn", 5)
    with pytest.raises(ValueError, match=r"text embedding width: checkpoint has 64, expected 512"):
        check_compatible(meta, "tiny-vit", 4, embed_width=512)
    with pytest.raises(ValueError, match=r"label 2 is 'c' in the checkpoint but 'x' here"):
        check_compatible(meta, "tiny-vit", 4, identities=list("abxd"))
    with pytest.raises(ValueError, match="backbone"):
        PromptLearner.from_checkpoint(state, rn, num_classes=4)
    with pytest.raises(ValueError, match="num_classes"):
        PromptLearner.from_checkpoint(state, vit, num_classes=3)
    with pytest.raises(ValueError, match="n_ctx: checkpoint has 4, expected 8"):
        PromptLearner(vit, 4, n_ctx=8).load_checkpoint(state)
    with pytest.raises(ValueError, match="aspect"):
        PromptLearner(vit, 4, aspect="palmar_l").load_checkpoint(state)
    other = build_backbone("tiny-vit", image_size=(96, 128), seed=1)  # same name, other text weights
    with pytest.raises(ValueError, match="different text encoder"):
        PromptLearner.from_checkpoint(state, other, num_classes=4)
    with pytest.raises(ValueError, match="not a prompt-learner checkpoint"):
        PromptLearner.from_checkpoint(state["state_dict"], vit)


# --------------------------------------------------------------------------------------------------
# PromptSG composer
# --------------------------------------------------------------------------------------------------


def test_composer(backbone):
    composer = PromptComposer(backbone, aspect="dorsal_l")
    assert composer.prompt_text == "A photo of a X dorsal left hand."
    x_id = int(backbone.tokenize("X")[0, 1])
    assert composer.token_index == 5 and int(composer.tokens[0, composer.token_index]) == x_id
    assert composer.eot_index == int(composer.tokens[0].argmax())
    # the placeholder's own embedding reproduces encode_text of the prompt
    with torch.no_grad():
        own = composer(backbone.token_embedding.weight[x_id][None])
        torch.testing.assert_close(own, backbone.encode_text(composer.tokens), atol=1e-5, rtol=1e-5)

    backbone.requires_grad_(False)
    try:
        g = torch.Generator().manual_seed(0)
        words = (torch.randn(3, composer.width, generator=g) * 0.5).requires_grad_(True)
        feats = composer(words)
        assert feats.shape == (3, backbone.embed_dim)
        assert (torch.cdist(feats, feats)[~torch.eye(3, dtype=torch.bool)] > 1e-4).all()  # S* matters
        feats.sum().backward()
        assert words.grad is not None and (words.grad.abs().sum(dim=1) > 0).all()
        assert all(p.grad is None for p in backbone.parameters())
    finally:
        backbone.requires_grad_(True)
    assert list(composer.named_parameters()) == []

    with torch.no_grad():
        simple = composer.simplified_text_feature()
        ref = backbone.encode_text(backbone.tokenize("A photo of a dorsal left hand."))
    assert composer.simplified_text == "A photo of a dorsal left hand."
    torch.testing.assert_close(simple, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"pseudo_words must be \[B, 64\]"):
        composer(torch.zeros(2, 1, composer.width))


def test_composer_placeholder_from_tokens(vit):
    composer = PromptComposer(vit, template="A close photo of the {token} {aspect} hand of someone.",
                              aspect="palmar_r", placeholder="*")
    star = int(vit.tokenize("*")[0, 1])
    ids = composer.tokens[0].tolist()
    assert composer.prompt_text == "A close photo of the * palmar right hand of someone."
    assert composer.token_index == ids.index(star) == 6
    with pytest.raises(ValueError, match=r"lacks the placeholder \{token\}"):
        PromptComposer(vit, template="A photo of a {aspect} hand.")


def test_learner_and_composer_share_machinery():
    # one implementation of the template splitting (no duplicated slicing code)
    assert PromptLearner.encode is PromptComposer.encode
    assert PromptLearner.assemble is PromptComposer.assemble
