"""Re-ID heads: BNNeck, classifiers, CLIP-ReID's two-branch head (handclip_nb.models.heads)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from handclip_nb.losses import batch_hard_triplet, cross_entropy_label_smooth
from handclip_nb.models.heads import (
    ArcFaceClassifier,
    BNNeck,
    LinearClassifier,
    ReIDHead,
    ReIDHeadOutput,
    build_classifier,
)


# tiny tensors: intra-op threads only add barrier waits on a loaded CI box
pytestmark = pytest.mark.usefixtures("one_thread")


class _Feats:
    """Duck-typed stand-in for backbones.ImageFeatures (only the two fields the head reads)."""

    def __init__(self, pre_projection, global_embedding):
        self.pre_projection = pre_projection
        self.global_embedding = global_embedding


# --------------------------------------------------------------------------------------------------
# BNNeck, classifiers
# --------------------------------------------------------------------------------------------------


def test_bnneck_bias_frozen_and_init():
    neck = BNNeck(16)
    assert isinstance(neck, torch.nn.BatchNorm1d)
    assert neck.bias.requires_grad is False and neck.weight.requires_grad is True
    assert torch.equal(neck.weight, torch.ones(16)) and torch.equal(neck.bias, torch.zeros(16))
    x = torch.randn(8, 16) * 3 + 1
    out = neck(x)
    out.pow(2).sum().backward()
    assert neck.bias.grad is None and neck.weight.grad is not None
    # training mode: batch statistics -> zero mean per channel (bias 0)
    torch.testing.assert_close(out.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    # an optimiser over all parameters leaves the bias at 0
    opt = torch.optim.SGD(neck.parameters(), lr=1.0)
    opt.step()
    assert torch.equal(neck.bias, torch.zeros(16))


def test_linear_classifier_init_and_shape():
    torch.manual_seed(0)
    clf = LinearClassifier(256, 100)
    assert clf.weight.shape == (100, 256)
    assert [n for n, _ in clf.named_parameters()] == ["weight"]  # no bias
    assert clf.weight.std().item() == pytest.approx(0.001, rel=0.05)
    x = torch.randn(4, 256)
    torch.testing.assert_close(clf(x), x @ clf.weight.t())
    torch.testing.assert_close(clf(x, torch.tensor([0, 1, 2, 3])), clf(x))
    with pytest.raises(ValueError, match=r"\[batch, 256\]"):
        clf(torch.randn(4, 255))


def test_build_classifier_kinds():
    assert isinstance(build_classifier("linear", 8, 3), LinearClassifier)
    arc = build_classifier("arcface", 8, 3, s=16.0, m=0.3)
    assert isinstance(arc, ArcFaceClassifier) and arc.s == 16.0 and arc.m == 0.3
    with pytest.raises(ValueError, match="linear, arcface"):
        build_classifier("cosface", 8, 3)


def test_arcface_eval_logits_are_scaled_cosine():
    torch.manual_seed(0)
    arc = ArcFaceClassifier(6, 5, s=30.0, m=0.5)
    x = torch.randn(7, 6)
    cos = F.normalize(x, dim=1) @ F.normalize(arc.weight, dim=1).t()
    torch.testing.assert_close(arc(x), 30.0 * cos)  # training mode, no targets: no margin
    arc.eval()
    t = torch.randint(0, 5, (7,))
    torch.testing.assert_close(arc(x, t), 30.0 * cos)  # eval with targets: no margin either


def test_arcface_margin_matches_formula_and_raises_loss():
    torch.manual_seed(1)
    s, m = 30.0, 0.5
    arc = ArcFaceClassifier(6, 5, s=s, m=m).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    t = torch.randint(0, 5, (40,))
    logits = arc(x, t)
    cos = (F.normalize(x, dim=1) @ F.normalize(arc.weight, dim=1).t())
    for i in range(40):
        for j in range(5):
            c = cos[i, j].item()
            if j != t[i].item():
                want = s * c
            else:
                theta = math.acos(max(-1.0, min(1.0, c)))
                want = s * (math.cos(theta + m) if theta + m < math.pi
                            else c - math.sin(math.pi - m) * m)
            assert logits[i, j].item() == pytest.approx(want, abs=1e-6)
    # the margin only lowers the target logit, so it raises the loss
    plain = s * cos
    assert (logits.gather(1, t[:, None]) < plain.gather(1, t[:, None])).all()
    off_target = torch.ones_like(logits, dtype=torch.bool).scatter_(1, t[:, None], False)
    assert torch.equal(logits[off_target], plain[off_target])
    assert F.cross_entropy(logits, t).item() > F.cross_entropy(plain, t).item()
    # no margin -> identical to s*cos
    arc0 = ArcFaceClassifier(6, 5, s=s, m=0.0).double()
    arc0.weight.data.copy_(arc.weight.data)
    torch.testing.assert_close(arc0(x, t), plain)


def test_arcface_easy_margin_and_gradients():
    arc = ArcFaceClassifier(2, 2, s=10.0, m=0.5, easy_margin=True).double()
    arc.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[-1.0, 0.2], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 0])
    out = arc(x, t)
    cos0 = F.normalize(x.detach(), dim=1)[:, 0]
    # sample 0 has cos < 0: easy margin leaves it; sample 1 has cos = 1 exactly: cos(m)
    assert out[0, 0].item() == pytest.approx(10 * cos0[0].item())
    assert out[1, 0].item() == pytest.approx(10 * math.cos(0.5))
    F.cross_entropy(out, t).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(arc.weight.grad).all()


def test_arcface_validates():
    with pytest.raises(ValueError, match="margin"):
        ArcFaceClassifier(4, 3, m=2.0)
    arc = ArcFaceClassifier(4, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        arc(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        arc(torch.randn(2, 4), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------------
# ReIDHead
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classifier", ["linear", "arcface"])
def test_reid_head_shapes(classifier):
    torch.manual_seed(0)
    head = ReIDHead((48, 32), num_classes=7, classifier=classifier)
    assert head.embedding_dim == 80
    pre, proj = torch.randn(6, 48), torch.randn(6, 32)
    out = head(_Feats(pre, proj), torch.arange(6) % 7)
    assert isinstance(out, ReIDHeadOutput)
    assert [tuple(l.shape) for l in out.logits] == [(6, 7), (6, 7)]
    assert out.features_for_triplet[0] is pre and out.features_for_triplet[1] is proj
    assert [tuple(f.shape) for f in out.bn_features] == [(6, 48), (6, 32)]
    assert out.embedding_for_test.shape == (6, 80)
    # list input == ImageFeatures input
    out2 = head([pre, proj], torch.arange(6) % 7)
    torch.testing.assert_close(out2.embedding_for_test, out.embedding_for_test)


def test_reid_head_test_feature_choice():
    torch.manual_seed(0)
    pre, proj = torch.randn(5, 12) * 2 + 3, torch.randn(5, 8) * 4 - 1
    head = ReIDHead((12, 8), 4)
    assert head.test_feature == "pre_bn"
    torch.testing.assert_close(head([pre, proj]).embedding_for_test, torch.cat([pre, proj], 1))
    post = ReIDHead((12, 8), 4, test_feature="post_bn")
    post([pre, proj])  # one training step updates the running statistics
    post.eval()
    out = post([pre, proj])
    torch.testing.assert_close(out.embedding_for_test, torch.cat(out.bn_features, 1))
    want = torch.cat([post.necks[0](pre), post.necks[1](proj)], 1)
    torch.testing.assert_close(out.embedding_for_test, want)
    assert not torch.allclose(out.embedding_for_test, torch.cat([pre, proj], 1))
    with pytest.raises(ValueError, match="pre_bn, post_bn"):
        ReIDHead((12, 8), 4, test_feature="after")
    with pytest.raises(ValueError, match="linear, arcface"):
        ReIDHead((12, 8), 4, classifier="softmax")


def test_reid_head_validates_inputs():
    head = ReIDHead((12, 8), 4)
    with pytest.raises(ValueError, match="expects 2"):
        head([torch.randn(3, 12)])
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \[batch, 8\]"):
        head([torch.randn(3, 12), torch.randn(3, 9)])
    with pytest.raises(ValueError, match="different batch sizes"):
        head([torch.randn(3, 12), torch.randn(4, 8)])
    with pytest.raises(ValueError, match="2 branches"):
        ReIDHead((12,), 4)(_Feats(torch.randn(3, 12), torch.randn(3, 8)))
    with pytest.raises(TypeError, match="ImageFeatures or a list"):
        head(torch.randn(3, 20))


@pytest.mark.parametrize("classifier", ["linear", "arcface"])
def test_reid_head_training_step_reaches_both_classifiers(classifier):
    torch.manual_seed(0)
    # stand-in backbone: a linear map giving a "pre-projection" and a "projected" feature
    backbone = torch.nn.Linear(10, 24)
    proj = torch.nn.Linear(24, 16, bias=False)
    head = ReIDHead((24, 16), num_classes=4, classifier=classifier)
    params = [*backbone.parameters(), *proj.parameters(), *head.parameters()]
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-3)
    images = torch.randn(8, 10)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pre = backbone(images)
    out = head(_Feats(pre, proj(pre)), labels)
    loss = sum(cross_entropy_label_smooth(l, labels) for l in out.logits)
    loss = loss + sum(batch_hard_triplet(f, labels)[0] for f in out.features_for_triplet)
    opt.zero_grad()
    loss.backward()
    for k in range(2):
        g = head.classifiers[k].weight.grad
        assert g is not None and g.abs().sum() > 0, f"classifier {k} got no gradient"
        assert head.necks[k].weight.grad is not None and head.necks[k].bias.grad is None
    assert backbone.weight.grad.abs().sum() > 0 and proj.weight.grad.abs().sum() > 0
    before = [c.weight.detach().clone() for c in head.classifiers]
    opt.step()
    assert all(not torch.equal(b, c.weight) for b, c in zip(before, head.classifiers))
    assert torch.equal(head.necks[0].bias, torch.zeros(24))


# --------------------------------------------------------------------------------------------------
# triplet_features: CLIP-ReID's third triplet feature
# --------------------------------------------------------------------------------------------------


class _FeatsWithIntermediate(_Feats):
    def __init__(self, pre_projection, global_embedding, intermediate):
        super().__init__(pre_projection, global_embedding)
        self.intermediate = intermediate


def test_reid_head_clipreid_triplet_features_add_the_intermediate_first():
    """CLIP-ReID (model/make_model_clipreid.py:146, loss/make_loss.py:46-48): the triplet loss
    sees [img_feature_last, img_feature, img_feature_proj]; the ID loss and the test feature
    still use the two branches only."""
    torch.manual_seed(0)
    pre, proj, inter = torch.randn(6, 20), torch.randn(6, 12), torch.randn(6, 9)
    two = ReIDHead((20, 12), num_classes=3)
    three = ReIDHead((20, 12), num_classes=3, triplet_features="clipreid")
    three.load_state_dict(two.state_dict())  # no new parameters
    feats = _FeatsWithIntermediate(pre, proj, inter)
    a, b = two(feats), three(feats)
    assert len(a.features_for_triplet) == 2 and len(b.features_for_triplet) == 3
    assert b.features_for_triplet[0] is inter
    assert b.features_for_triplet[1] is pre and b.features_for_triplet[2] is proj
    assert torch.equal(a.embedding_for_test, b.embedding_for_test)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    # list input: the intermediate comes as an argument
    c = three([pre, proj], intermediate=inter)
    assert c.features_for_triplet[0] is inter
    assert "triplet_features='clipreid'" in repr(three)


def test_reid_head_clipreid_triplet_features_need_the_intermediate():
    head = ReIDHead((20, 12), num_classes=3, triplet_features="clipreid")
    with pytest.raises(ValueError, match="intermediate"):
        head(_Feats(torch.randn(4, 20), torch.randn(4, 12)))
    with pytest.raises(ValueError, match="intermediate must be"):
        head([torch.randn(4, 20), torch.randn(4, 12)], intermediate=torch.randn(3, 5))
    with pytest.raises(ValueError, match="triplet_features"):
        ReIDHead((20, 12), num_classes=3, triplet_features="three")


def test_reid_model_with_a_real_backbone_feeds_three_triplet_features():
    from handclip_nb.models.backbones import build_backbone
    from handclip_nb.models.reid import ReIDModel

    bb = build_backbone("tiny-vit", image_size=(96, 128))
    model = ReIDModel(bb, 4, triplet_features="clipreid").eval()
    x = torch.randn(3, 3, 96, 128)
    with torch.no_grad():
        feats, out = model(x)
        emb = model.embed(x)
    assert [f.shape[1] for f in out.features_for_triplet] == [bb.intermediate_width,
                                                            bb.visual_width, bb.embed_dim]
    # the ranking feature: CLIP-ReID's TEST.NECK_FEAT 'before' = cat[img_feature, img_feature_proj]
    assert torch.equal(emb, torch.cat([feats.pre_projection, feats.global_embedding], 1))
