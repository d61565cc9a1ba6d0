"""Losses against slow, obvious python-loop references (handclip_nb.losses)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from handclip_nb.losses import (
    CenterLoss,
    TripletStats,
    batch_hard_triplet,
    cross_entropy_label_smooth,
    image_to_text_ce,
    pairwise_euclidean,
    supcon_loss,
    symmetric_supcon,
    text_logit_form,
)

DT = torch.float64


# tiny tensors: intra-op threads only add barrier waits on a loaded CI box
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(n: int, num_ids: int, seed: int) -> torch.Tensor:
    return torch.randint(0, num_ids, (n,), generator=_gen(seed))


# --------------------------------------------------------------------------------------------------
# slow references
# --------------------------------------------------------------------------------------------------


def ref_supcon(a, b, la, lb, scale=1.0, normalize=False):
    a, b = a.tolist(), b.tolist()
    if normalize:
        a = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in a]
        b = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in b]
    la, lb = la.tolist(), lb.tolist()
    terms = []
    for i in range(len(a)):
        logits = [scale * sum(x * y for x, y in zip(a[i], b[j])) for j in range(len(b))]
        lse = math.log(sum(math.exp(z) for z in logits))
        pos = [j for j in range(len(b)) if lb[j] == la[i]]
        if not pos:
            continue
        terms.append(sum(logits[j] - lse for j in pos) / len(pos))
    return -sum(terms) / len(terms)


def ref_ce_smooth(logits, targets, eps):
    out = 0.0
    rows = logits.tolist()
    for row, t in zip(rows, targets.tolist()):
        c = len(row)
        lse = math.log(sum(math.exp(z) for z in row))
        for k, z in enumerate(row):
            q = (1 - eps) * (1.0 if k == t else 0.0) + eps / c
            out += -q * (z - lse)
    return out / len(rows)


def ref_triplet(x, labels, margin):
    """Returns (loss or None, skipped_no_pos, list of (i, p, n))."""
    x, labels = x.tolist(), labels.tolist()
    n = len(x)

    def d(i, j):
        return math.sqrt(sum((u - v) ** 2 for u, v in zip(x[i], x[j])))

    terms, skipped, picks = [], 0, []
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(n) if labels[j] != labels[i]]
        if not pos:
            skipped += 1
            continue
        if not neg:
            continue
        p = max(pos, key=lambda j: d(i, j))
        q = min(neg, key=lambda j: d(i, j))
        diff = d(i, p) - d(i, q)
        if margin:
            terms.append(max(0.0, diff + margin))
        else:
            terms.append(math.log1p(math.exp(diff)))
        picks.append((i, p, q))
    return (sum(terms) / len(terms) if terms else None), skipped, picks


# --------------------------------------------------------------------------------------------------
# SupCon
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("na,nb,num_ids,seed", [(8, 8, 3, 0), (12, 5, 2, 1), (6, 10, 4, 2),
                                                (16, 16, 4, 3)])
@pytest.mark.parametrize("scale,normalize", [(1.0, False), (20.0, True)])
def test_supcon_matches_reference(na, nb, num_ids, seed, scale, normalize):
    g = _gen(seed)
    a = torch.randn(na, 7, generator=g, dtype=DT)
    b = torch.randn(nb, 7, generator=g, dtype=DT)
    la = _labels(na, num_ids, seed + 100)
    lb = _labels(nb, num_ids, seed + 200)
    lb[: num_ids] = torch.arange(num_ids)  # every anchor has >= 1 positive
    got = supcon_loss(a, b, la, lb, logit_scale=scale, normalize=normalize)
    assert got.item() == pytest.approx(ref_supcon(a, b, la, lb, scale, normalize), rel=1e-9)


def test_supcon_several_positives_and_asymmetric_labels():
    g = _gen(5)
    a = torch.randn(4, 5, generator=g, dtype=DT)
    b = torch.randn(7, 5, generator=g, dtype=DT)
    la = torch.tensor([0, 0, 1, 2])
    lb = torch.tensor([0, 0, 0, 1, 1, 2, 9])  # 3 / 2 / 1 positives, one label only in b
    got = supcon_loss(a, b, la, lb)
    assert got.item() == pytest.approx(ref_supcon(a, b, la, lb), rel=1e-10)
    # anchors with no positive in b are left out of the mean (not NaN)
    la2 = torch.tensor([0, 5, 1, 7])
    got2 = supcon_loss(a, b, la2, lb)
    assert torch.isfinite(got2)
    assert got2.item() == pytest.approx(ref_supcon(a, b, la2, lb), rel=1e-10)
    with pytest.raises(ValueError, match="no anchor"):
        supcon_loss(a, b, torch.tensor([3, 4, 5, 6]), lb)


def test_supcon_scale_is_inverse_temperature_and_normalize_is_explicit():
    g = _gen(6)
    a = torch.randn(6, 4, generator=g, dtype=DT) * 3
    b = torch.randn(6, 4, generator=g, dtype=DT) * 3
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    # scale s on features == scale 1 on features multiplied by s
    assert supcon_loss(a, b, lab, lab, logit_scale=4.0).item() == pytest.approx(
        supcon_loss(a * 4.0, b, lab, lab).item(), rel=1e-10)
    # normalize=True ignores feature norms, normalize=False does not
    n1 = supcon_loss(a, b, lab, lab, normalize=True)
    n2 = supcon_loss(a * 5, b * 0.1, lab, lab, normalize=True)
    assert n1.item() == pytest.approx(n2.item(), rel=1e-10)
    assert supcon_loss(a, b, lab, lab).item() != pytest.approx(
        supcon_loss(a * 5, b, lab, lab).item(), rel=1e-3)
    # tensor scale keeps the graph (CLIP's exp(logit_scale) may be learnable)
    log_scale = torch.tensor(math.log(10.0), dtype=DT, requires_grad=True)
    supcon_loss(a, b, lab, lab, logit_scale=log_scale.exp(), normalize=True).backward()
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad)


def test_supcon_refuses_raw_clip_log_scale_parameter():
    a = torch.randn(4, 3)
    lab = torch.tensor([0, 0, 1, 1])
    with pytest.raises(TypeError, match=r"logit_scale.exp\(\)"):
        supcon_loss(a, a, lab, lab, logit_scale=nn.Parameter(torch.tensor(4.6)))
    with pytest.raises(ValueError, match="positive"):
        supcon_loss(a, a, lab, lab, logit_scale=-1.0)


def test_supcon_shape_errors():
    a = torch.randn(4, 3)
    lab = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="same dim"):
        supcon_loss(a, torch.randn(4, 5), lab, lab)
    with pytest.raises(ValueError, match="labels_b has 3 entries"):
        supcon_loss(a, a, lab, lab[:3])
    with pytest.raises(ValueError, match="2-D"):
        supcon_loss(a[0], a, lab, lab)
    with pytest.raises(TypeError, match="integer"):
        supcon_loss(a, a, lab.float(), lab)


def test_symmetric_supcon_is_sum_of_both_directions():
    g = _gen(7)
    img = torch.randn(8, 6, generator=g, dtype=DT)
    txt = torch.randn(8, 6, generator=g, dtype=DT)
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    s = 50.0
    got = symmetric_supcon(img, txt, lab, s)
    want = ref_supcon(img, txt, lab, lab, s, True) + ref_supcon(txt, img, lab, lab, s, True)
    assert got.item() == pytest.approx(want, rel=1e-9)
    raw = symmetric_supcon(img, txt, lab, 1.0, normalize=False)
    want_raw = ref_supcon(img, txt, lab, lab) + ref_supcon(txt, img, lab, lab)
    assert raw.item() == pytest.approx(want_raw, rel=1e-9)
    # distinct text labels (e.g. one prompt per identity)
    txt_ids = torch.tensor([3, 2, 1, 0])
    got2 = symmetric_supcon(img, txt[:4], lab, s, text_labels=txt_ids)
    want2 = (ref_supcon(img, txt[:4], lab, txt_ids, s, True)
             + ref_supcon(txt[:4], img, txt_ids, lab, s, True))
    assert got2.item() == pytest.approx(want2, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# label smoothing, i2t CE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,c,eps,seed", [(5, 3, 0.1, 0), (9, 11, 0.3, 1), (1, 2, 0.1, 2),
                                          (16, 7, 0.0, 3)])
def test_label_smoothing_matches_formula(b, c, eps, seed):
    g = _gen(seed)
    logits = torch.randn(b, c, generator=g, dtype=DT) * 3
    targets = torch.randint(0, c, (b,), generator=g)
    got = cross_entropy_label_smooth(logits, targets, epsilon=eps)
    assert got.item() == pytest.approx(ref_ce_smooth(logits, targets, eps), rel=1e-10)
    assert got.item() == pytest.approx(
        F.cross_entropy(logits, targets, label_smoothing=eps).item(), rel=1e-10)


def test_label_smoothing_zero_is_cross_entropy_and_validates():
    g = _gen(4)
    logits = torch.randn(6, 4, generator=g, dtype=DT, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 3, 0])
    a = cross_entropy_label_smooth(logits, targets, epsilon=0.0)
    b = F.cross_entropy(logits, targets)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    ga, = torch.autograd.grad(a, logits)
    gb, = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cross_entropy_label_smooth(logits, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="epsilon"):
        cross_entropy_label_smooth(logits, targets, epsilon=1.0)
    with pytest.raises(ValueError, match="targets has 2 entries"):
        cross_entropy_label_smooth(logits, targets[:2])


@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 30.0)])
def test_image_to_text_ce_equals_explicit_logits(normalize, scale):
    g = _gen(8)
    img = torch.randn(10, 6, generator=g, dtype=DT, requires_grad=True)
    txt_all = torch.randn(5, 6, generator=g, dtype=DT)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    got = image_to_text_ce(img, txt_all, labels, scale, normalize=normalize)
    i, t = (F.normalize(img, dim=1), F.normalize(txt_all, dim=1)) if normalize else (img, txt_all)
    want = F.cross_entropy(scale * i @ t.t(), labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    smoothed = image_to_text_ce(img, txt_all, labels, scale, normalize=normalize, epsilon=0.1)
    assert smoothed.item() == pytest.approx(
        F.cross_entropy(scale * i @ t.t(), labels, label_smoothing=0.1).item(), rel=1e-10)
    got.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


def test_image_to_text_ce_shape_errors():
    img = torch.randn(4, 6)
    with pytest.raises(ValueError, match="dim 6 != text_features_all dim 8"):
        image_to_text_ce(img, torch.randn(3, 8), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        image_to_text_ce(img, torch.randn(3, 6), torch.tensor([0, 1, 2, 3]))


# --------------------------------------------------------------------------------------------------
# batch-hard triplet
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,num_ids,dim,seed", [(8, 2, 4, 0), (12, 4, 3, 1), (10, 5, 6, 2),
                                                (7, 3, 2, 3), (16, 4, 8, 4)])
@pytest.mark.parametrize("margin", [0.3, None, 5.0])
def test_triplet_matches_reference(n, num_ids, dim, seed, margin):
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g, dtype=DT)
    labels = _labels(n, num_ids, seed + 10)  # random: unequal counts, maybe singletons
    want, skipped, picks = ref_triplet(x, labels, margin)
    loss, stats = batch_hard_triplet(x, labels, margin=margin)
    assert isinstance(stats, TripletStats)
    assert stats.num_skipped_no_positive == skipped
    assert stats.num_valid == len(picks)
    if want is None:
        assert loss.item() == 0.0
    else:
        assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    for i, p, q in picks:
        assert int(stats.positive_index[i]) == p
        assert int(stats.negative_index[i]) == q


def test_triplet_soft_margin_zero_equals_none():
    g = _gen(11)
    x = torch.randn(8, 3, generator=g, dtype=DT)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    a, _ = batch_hard_triplet(x, labels, margin=None)
    b, _ = batch_hard_triplet(x, labels, margin=0.0)
    assert a.item() == b.item()
    want, _, _ = ref_triplet(x, labels, None)
    assert a.item() == pytest.approx(want, rel=1e-10)


def test_triplet_anchor_is_never_its_own_positive():
    # Anchor 0 (label 0) is the only sample of its label, with a negative close by: an
    # implementation that lets the diagonal count as a positive sees d_ap = 0 and adds
    # relu(0 - 0.1 + 0.3) = 0.2; ours skips it.  Label 1 has two far-apart samples.
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 3.0], [3.0, 3.0]], dtype=DT)
    labels = torch.tensor([0, 1, 1, 2, 2])
    loss, stats = batch_hard_triplet(x, labels, margin=0.3)
    want, skipped, _ = ref_triplet(x, labels, 0.3)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert skipped == 1 and stats.num_skipped_no_positive == 1
    assert stats.frac_with_positive == pytest.approx(4 / 5)
    assert int(stats.positive_index[0]) == -1 and int(stats.negative_index[0]) == -1
    idx = torch.arange(5)
    valid = stats.positive_index >= 0
    assert (stats.positive_index[valid] != idx[valid]).all()

    # naive (diagonal included, as in the reference hard_example_mining) differs:
    dist = pairwise_euclidean(x)
    same = labels.view(-1, 1) == labels.view(1, -1)
    naive_ap = torch.where(same, dist, torch.tensor(-1.0, dtype=DT)).max(1).values
    naive_an = torch.where(~same, dist, torch.tensor(1e9, dtype=DT)).min(1).values
    naive = F.relu(naive_ap - naive_an + 0.3).mean()
    assert naive.item() != pytest.approx(loss.item(), abs=1e-3)

    # every anchor of a P x K batch has a positive; none is skipped
    _, st = batch_hard_triplet(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert st.num_skipped_no_positive == 0 and st.frac_with_positive == 1.0
    assert (st.positive_index != torch.arange(8)).all()


def test_triplet_positive_ignores_anchor_even_when_diagonal_is_largest():
    # Each sample's only positive is an exact duplicate: numerically at the same distance as the
    # anchor itself (large norms, float32 round-off in |x|²+|y|²-2xy), so a diagonal-including
    # max may return the anchor.  Ours must return the duplicate.
    torch.manual_seed(0)
    base = torch.randn(3, 64) * 300
    x = torch.cat([base, base])  # each sample has an exact duplicate as its only positive
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, stats = batch_hard_triplet(x, labels, margin=0.3)
    assert (stats.positive_index == torch.tensor([3, 4, 5, 0, 1, 2])).all()
    assert stats.num_valid == 6


def test_triplet_stats_and_all_skipped():
    x = torch.tensor([[0.0], [1.0], [10.0], [12.0]], dtype=DT)
    labels = torch.tensor([0, 0, 1, 1])
    loss, st = batch_hard_triplet(x, labels, margin=0.3)
    # d_ap = 1, 1, 2, 2 ; d_an = 10, 9, 9, 11 -> nothing active
    assert st.mean_pos_dist == pytest.approx(1.5, rel=1e-6)
    assert st.mean_neg_dist == pytest.approx(39 / 4, rel=1e-6)
    assert st.frac_active == 0.0 and loss.item() == 0.0
    _, st = batch_hard_triplet(x, labels, margin=8.5)  # active: anchors 1 (1-9+8.5), 2 (2-9+8.5)
    assert st.frac_active == pytest.approx(0.5)

    # all labels distinct -> nothing valid, zero loss that still has a graph
    f = torch.randn(4, 3, requires_grad=True)
    loss, st = batch_hard_triplet(f, torch.arange(4))
    assert loss.item() == 0.0 and st.num_valid == 0 and st.num_skipped_no_positive == 4
    assert math.isnan(st.mean_pos_dist) and math.isnan(st.frac_active)
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    # one label only -> no negatives
    _, st = batch_hard_triplet(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert st.num_skipped_no_negative == 4 and st.num_valid == 0


def test_triplet_gradient_finite_at_duplicate_features():
    base = torch.randn(4, 5, generator=_gen(12))
    x = torch.cat([base, base, base[:2]]).requires_grad_(True)  # exact duplicates, d = 0
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    for margin in (0.3, None):
        for normalize in (False, True):
            loss, _ = batch_hard_triplet(x, labels, margin=margin, normalize=normalize)
            g, = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
    # all features identical (collapsed model)
    same = torch.ones(6, 4, requires_grad=True)
    loss, _ = batch_hard_triplet(same, torch.tensor([0, 0, 1, 1, 2, 2]))
    g, = torch.autograd.grad(loss, same)
    assert loss.item() == pytest.approx(0.3, abs=1e-5) and torch.isfinite(g).all()


def test_triplet_validates():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        batch_hard_triplet(x, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="margin"):
        batch_hard_triplet(x, torch.tensor([0, 0, 1, 1]), margin=-0.1)
    with pytest.raises(ValueError, match="2-D"):
        batch_hard_triplet(x[None], torch.tensor([0, 0, 1, 1]))


def test_triplet_training_separates_identities():
    torch.manual_seed(0)
    labels = torch.arange(6).repeat_interleave(4)  # P=6, K=4
    x = torch.randn(24, 8, requires_grad=True)
    lr = 1.0  # plain gradient descent; the loss is a mean over 24 anchors
    first = None
    for _ in range(50):
        loss, st = batch_hard_triplet(x, labels, margin=0.3)
        if first is None:
            first = (loss.item(), st.mean_neg_dist - st.mean_pos_dist)
        g, = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x -= lr * g
    loss, st = batch_hard_triplet(x, labels, margin=0.3)
    assert loss.item() < 0.2 * first[0]
    gap = st.mean_neg_dist - st.mean_pos_dist
    assert gap > first[1] + 1.0 and gap > 0  # random init: negatives start closer than positives


# --------------------------------------------------------------------------------------------------
# center loss
# --------------------------------------------------------------------------------------------------


def test_center_loss_value_and_gradient_direction():
    torch.manual_seed(0)
    crit = CenterLoss(num_classes=3, feat_dim=4).double()
    x = torch.randn(7, 4, dtype=DT, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    loss = crit(x, labels)
    c = crit.centers.detach().tolist()
    want = sum(sum((u - v) ** 2 for u, v in zip(x[i].tolist(), c[labels[i]])) for i in range(7)) / 7
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    # gradient descent moves each feature towards its centre and each centre towards its features
    to_center = crit.centers.detach()[labels] - x.detach()
    assert ((-x.grad * to_center).sum(1) > 0).all()
    torch.testing.assert_close(x.grad, -2 * to_center / 7)
    for k in range(3):
        mean_feat = x.detach()[labels == k].mean(0)
        assert (-crit.centers.grad[k] * (mean_feat - crit.centers.detach()[k])).sum() > 0
    # a step lowers the loss
    with torch.no_grad():
        x2 = x - 0.1 * x.grad
    assert crit(x2, labels).item() < loss.item()


def test_center_loss_validates():
    crit = CenterLoss(3, 4)
    with pytest.raises(ValueError, match="feat_dim=4"):
        crit(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        crit(torch.randn(2, 4), torch.tensor([0, 3]))


# --------------------------------------------------------------------------------------------------
# text_logits: CLIP-ReID's raw form and CLIP's cosine form
# --------------------------------------------------------------------------------------------------


def test_text_logit_form_names_both_forms():
    scale = torch.tensor(50.0)
    assert text_logit_form("raw", scale) == (False, 1.0)
    normalize, got = text_logit_form("cosine", scale)
    assert normalize is True and got is scale
    with pytest.raises(ValueError, match="cosine, raw"):
        text_logit_form("dot", scale)


def test_raw_text_logits_are_clipreids_supcon_and_i2t():
    """``raw``: CLIP-ReID's loss/supcontrast.py (temperature 1, no normalisation, both
    directions summed, processor_clipreid_stage1.py) and processor_clipreid_stage2.py's
    i2t logits image @ text.T through CrossEntropyLabelSmooth(eps 0.1), against slow references."""
    g = _gen(11)
    img = torch.randn(8, 5, generator=g, dtype=DT) * 3.0  # raw features: norms far from 1
    txt = torch.randn(8, 5, generator=g, dtype=DT) * 2.0
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    normalize, scale = text_logit_form("raw", torch.tensor(100.0))
    got = symmetric_supcon(img, txt, labels, scale, normalize=normalize)
    want = ref_supcon(img, txt, labels, labels) + ref_supcon(txt, img, labels, labels)
    assert got.item() == pytest.approx(want, rel=1e-10)
    txt_all = torch.randn(4, 5, generator=g, dtype=DT)
    got = image_to_text_ce(img, txt_all, labels, scale, normalize=normalize, epsilon=0.1)
    assert got.item() == pytest.approx(ref_ce_smooth(img @ txt_all.t(), labels, 0.1), rel=1e-10)
    # the cosine form is a different loss on the same features
    cos_norm, cos_scale = text_logit_form("cosine", 100.0)
    cos = symmetric_supcon(img, txt, labels, cos_scale, normalize=cos_norm)
    assert cos.item() == pytest.approx(ref_supcon(img, txt, labels, labels, 100.0, True)
                                       + ref_supcon(txt, img, labels, labels, 100.0, True),
                                       rel=1e-10)


# --------------------------------------------------------------------------- no host syncs on a GPU

#: The Tensor methods that copy a value to the host: on CUDA each one waits for the device.
_HOST_READS = ("item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu", "numpy")


def _count_host_reads(monkeypatch) -> dict:
    counts = {"reads": 0}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def _checked_losses(a, b, la, lb, targets, scale):
    """Every loss whose checks read label or scale values, as a training step calls them."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        center = CenterLoss(b.shape[0], a.shape[1]).to(a.device, a.dtype)
    return [supcon_loss(a, b, la, lb, logit_scale=scale, normalize=True),
            image_to_text_ce(a, b, la, scale, normalize=True),
            cross_entropy_label_smooth(a @ b.t(), targets, 0.1), center(a, la)]


def _loss_inputs(dtype=DT, device="cpu"):
    g = _gen(11)
    a = torch.randn(6, 4, generator=g, dtype=dtype).to(device)
    b = torch.randn(5, 4, generator=g, dtype=dtype).to(device)
    la = torch.tensor([0, 0, 1, 1, 2, 4], device=device)
    lb = torch.arange(5, device=device)
    return a, b, la, lb, la.clone(), torch.tensor(10.0, dtype=dtype, device=device)


def test_the_loss_checks_read_no_device_value_off_the_cpu(monkeypatch):
    """On a GPU the label-range, scale and positive checks must not wait for the device at
    every step. Two proofs without a GPU: on the ``meta`` device (no values at all: any read
    raises) every checked loss runs; and with the CPU treated as a device, computing them
    makes no host read from Python while the values equal the CPU path's (the old checks:
    ``int(labels.min())``, ``float(scale)``, ``bool(has_pos.any())`` fail both)."""
    a, b, la, lb, targets, scale = _loss_inputs(device="meta")
    for loss in _checked_losses(a, b, la, lb, targets, scale):
        assert loss.device.type == "meta" and loss.shape == ()
    reference = [x.item() for x in _checked_losses(*_loss_inputs())]
    from handclip_nb import losses

    monkeypatch.setattr(losses, "_reads_on_host", lambda x: False)
    with monkeypatch.context() as patch:
        counts = _count_host_reads(patch)
        values = _checked_losses(*_loss_inputs())
        assert counts["reads"] == 0, f"{counts['reads']} host reads in the device path"
    assert [v.item() for v in values] == pytest.approx(reference, rel=1e-12)


def test_the_device_path_still_stops_on_bad_labels_and_scales(monkeypatch):
    """The device-side assertions carry the CPU errors' message (on a CPU tensor
    ``torch._assert_async`` raises at once; on a GPU at the next synchronisation)."""
    from handclip_nb import losses

    monkeypatch.setattr(losses, "_reads_on_host", lambda x: False)
    a, b, la, lb, targets, scale = _loss_inputs()
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 5\)"):
        cross_entropy_label_smooth(a @ b.t(), torch.tensor([0, 1, 2, 3, 4, 5]), 0.1)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 5\)"):
        image_to_text_ce(a, b, torch.tensor([0, 1, 2, 3, 4, -1]), scale)
    with pytest.raises(RuntimeError, match="logit_scale must be a finite positive number"):
        supcon_loss(a, b, la, lb, logit_scale=torch.tensor(-1.0, dtype=DT))
    with pytest.raises(RuntimeError, match="no anchor in features_a has a positive"):
        supcon_loss(a, b, torch.full((6,), 9), lb)
    # anchors without a positive weigh nothing in the device path's masked mean either
    la2 = torch.tensor([0, 7, 1, 7, 2, 4])
    device_value = supcon_loss(a, b, la2, lb).item()
    monkeypatch.setattr(losses, "_reads_on_host", lambda x: True)
    assert device_value == pytest.approx(supcon_loss(a, b, la2, lb).item(), rel=1e-12)


def test_the_cpu_keeps_its_clear_errors_with_the_values():
    a, b, la, lb, targets, scale = _loss_inputs()
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\), got values in \[0, 7\]"):
        cross_entropy_label_smooth(a @ b.t(), torch.tensor([0, 1, 2, 3, 4, 7]), 0.1)
    with pytest.raises(ValueError, match="logit_scale must be a finite positive number, got -1"):
        supcon_loss(a, b, la, lb, logit_scale=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="no anchor"):
        supcon_loss(a, b, torch.full((6,), 9), lb)


@pytest.mark.parametrize("margin", [0.3, None])
def test_the_triplet_loss_of_a_training_step_reads_no_device_value(monkeypatch, margin):
    """``stats=False`` (what stages 2 and 3 ask for): off the CPU no host read, not even the
    valid-anchor count (a masked mean replaces boolean indexing), with the CPU path's loss and
    gradient, skipped anchors included; on ``meta`` it runs without values."""
    from handclip_nb import losses

    g = _gen(12)
    x = torch.randn(8, 5, generator=g, dtype=DT)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])  # anchor 5 has no positive: skipped
    meta_loss, meta_stats = batch_hard_triplet(x.to("meta"), labels.to("meta"), margin=margin,
                                               stats=False)
    assert meta_loss.device.type == "meta" and meta_stats is None
    cpu_x = x.clone().requires_grad_(True)
    cpu_loss, cpu_stats = batch_hard_triplet(cpu_x, labels, margin=margin)
    assert cpu_stats.num_skipped_no_positive == 1
    cpu_loss.backward()
    monkeypatch.setattr(losses, "_reads_on_host", lambda t: False)
    device_x = x.clone().requires_grad_(True)
    with monkeypatch.context() as patch:
        counts = _count_host_reads(patch)
        device_loss, device_stats = batch_hard_triplet(device_x, labels, margin=margin,
                                                       stats=False)
        device_loss.backward()
        assert counts["reads"] == 0, f"{counts['reads']} host reads in the device path"
    assert device_stats is None
    assert device_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-12)
    assert torch.allclose(device_x.grad, cpu_x.grad, rtol=1e-12, atol=0)
    # no valid anchor at all: a zero that still belongs to the graph, as on the CPU
    lonely = x.clone().requires_grad_(True)
    zero, _ = batch_hard_triplet(lonely, torch.arange(8), margin=margin, stats=False)
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.equal(lonely.grad, torch.zeros_like(x))


def test_the_cpu_triplet_loss_is_the_same_without_its_stats():
    g = _gen(13)
    x = torch.randn(8, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with_stats, stats = batch_hard_triplet(x, labels)
    without, none = batch_hard_triplet(x, labels, stats=False)
    assert none is None and stats is not None and torch.equal(with_stats, without)


# --------------------------------------------------------------------------------------------------
# CLIP-HandID's losses (github.com/nathanlem1/CLIP-HandID): losses/supcontrast.py @ 02f3bb5c and
# losses/softmax_loss.py @ a37bb1e5, written out slowly in their own form
# --------------------------------------------------------------------------------------------------


def ref_clip_handid_supcon(anchors, contrast, anchor_labels, contrast_labels):
    """supcontrast.py:15-30: mask[i][j] = labels equal; logits = anchors · contrastᵀ / 1.0
    (no normalisation); minus the row max; log_prob = logits - log Σ_j exp; the mean over
    positives, then minus the mean over anchors."""
    a, b = anchors.tolist(), contrast.tolist()
    total = 0.0
    for i, row in enumerate(a):
        logits = [sum(x * y for x, y in zip(row, col)) / 1.0 for col in b]
        top = max(logits)
        logits = [z - top for z in logits]
        log_norm = math.log(sum(math.exp(z) for z in logits))
        mask = [1.0 if int(anchor_labels[i]) == int(contrast_labels[j]) else 0.0
                for j in range(len(b))]
        total += sum(m * (z - log_norm) for m, z in zip(mask, logits)) / sum(mask)
    return -total / len(a)


def ref_clip_handid_label_smoothing(logits, targets, epsilon=0.1):
    """softmax_loss.py:36-44 (LabelSmoothingCrossEntropyLoss): (mean_i Σ_c -log p_ic) / C · ε
    + (1 - ε) · mean_i -log p_iy."""
    rows, c = logits.tolist(), logits.shape[1]
    summed = nll = 0.0
    for row, t in zip(rows, targets.tolist()):
        lse = math.log(sum(math.exp(z) for z in row))
        summed += sum(-(z - lse) for z in row)
        nll += -(row[t] - lse)
    return summed / len(rows) / c * epsilon + (1 - epsilon) * nll / len(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_is_clip_handids_supcontrast(seed):
    """CLIP-HandID's image->text + text->image term (train_handID.py:131-133): our
    symmetric_supcon on raw features with scale 1 (text_logits: raw) is its SupConLoss."""
    g = _gen(seed)
    image = torch.randn(12, 6, generator=g, dtype=DT) * 3
    text = torch.randn(12, 6, generator=g, dtype=DT) * 3
    labels = torch.randint(0, 4, (12,), generator=g)
    want = (ref_clip_handid_supcon(image, text, labels, labels)
            + ref_clip_handid_supcon(text, image, labels, labels))
    normalize, scale = text_logit_form("raw", 100.0)
    got = symmetric_supcon(image, text, labels, scale, normalize=normalize)
    assert float(got) == pytest.approx(want, rel=1e-10)
    assert float(supcon_loss(image, text, labels, labels)) == pytest.approx(
        ref_clip_handid_supcon(image, text, labels, labels), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_smoothing_is_clip_handids(seed):
    g = _gen(seed)
    logits = torch.randn(7, 5, generator=g, dtype=DT) * 4
    targets = torch.randint(0, 5, (7,), generator=g)
    assert float(cross_entropy_label_smooth(logits, targets, 0.1)) == pytest.approx(
        ref_clip_handid_label_smoothing(logits, targets, 0.1), rel=1e-10)
