"""How far to trust an open-set threshold (handclip_nb.evaluate.open_set): the binomial and the
identity-bootstrap intervals against slow references, the rule of 30, and what a run records
beside its threshold (protocol_eval.calibrate_open_set): fitted or never-trained identities,
impostor pairs, the FAR interval, the test identities' pooled FAR, the warning, and that no
test identity ever chooses it."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import beta

from handclip_nb.evaluate import open_set as O
from handclip_nb.evaluate import protocol_eval as P
from handclip_nb.evaluate.verification import far_at_threshold


# --------------------------------------------------------------------------- binomial


def test_binomial_cdf_equals_the_sum_of_its_terms():
    for n, k, p in [(10, 3, 0.2), (48, 0, 0.01), (48, 5, 0.3), (200, 199, 0.9), (7, 7, 0.5)]:
        slow = sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1))
        assert O.binomial_cdf(k, n, p) == pytest.approx(slow, rel=1e-10, abs=1e-300)
    assert O.binomial_cdf(-1, 5, 0.5) == 0.0 and O.binomial_cdf(5, 5, 0.5) == 1.0


@pytest.mark.parametrize("k,n", [(1, 48), (5, 100), (174, 17400), (3, 10 ** 7), (47, 48)])
def test_clopper_pearson_equals_the_beta_quantiles(k, n):
    """The exact interval's ends are Beta quantiles (scipy, a dependency of scikit-learn)."""
    lo, hi = O.clopper_pearson(k, n)
    assert lo == pytest.approx(beta.ppf(0.025, k, n - k + 1), rel=1e-6)
    assert hi == pytest.approx(beta.ppf(0.975, k + 1, n - k), rel=1e-6)


def test_clopper_pearson_closed_forms_at_zero_and_all():
    """No false accept among n: the upper end is 1 - (alpha/2)^(1/n) (the "rule of 3" ~3.7/n);
    all n: the lower end is (alpha/2)^(1/n)."""
    for n in (48, 1000, 17400):
        assert O.clopper_pearson(0, n) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)))
        assert O.clopper_pearson(n, n) == pytest.approx((0.025 ** (1 / n), 1.0))
    with pytest.raises(ValueError, match="pairs > 0"):
        O.clopper_pearson(3, 2)


# --------------------------------------------------------------------------- identity counts


def _split(seed=0, people=6, per=4, gallery_people=None):
    rng = np.random.default_rng(seed)
    q_ids = np.repeat(np.arange(people), per)
    g_ids = np.arange(gallery_people or people)
    dist = rng.uniform(0, 1, (q_ids.size, g_ids.size))
    dist[q_ids[:, None] == g_ids[None, :]] *= 0.3  # genuine pairs closer
    return dist, q_ids, g_ids


def test_identity_pair_counts_equal_a_slow_loop():
    dist, q, g = _split(people=5, gallery_people=7)  # two gallery-only people (distractors)
    t = 0.35
    counts = O.identity_pair_counts(dist, q, g, t)
    where = {x: i for i, x in enumerate(counts.identities)}
    fa = np.zeros((7, 7), dtype=int)
    ip = np.zeros((7, 7), dtype=int)
    for a in range(dist.shape[0]):
        for b in range(dist.shape[1]):
            if q[a] != g[b]:
                ip[where[q[a]], where[g[b]]] += 1
                fa[where[q[a]], where[g[b]]] += dist[a, b] <= t
    assert (counts.false_accepts == fa).all() and (counts.impostor_pairs == ip).all()
    point = far_at_threshold(dist, q, g, t)
    assert counts.far == point.far and counts.total_impostor_pairs == point.impostor_pairs
    none = O.identity_pair_counts(dist, q, g, None)
    assert none.total_false_accepts == 0 and none.total_impostor_pairs == ip.sum()
    both = counts + O.identity_pair_counts(*_split(seed=1, people=3), t)
    assert both.total_false_accepts == counts.total_false_accepts + \
        O.identity_pair_counts(*_split(seed=1, people=3), t).total_false_accepts
    assert len(both.identities) == 7


def test_identity_bootstrap_equals_resampling_people_by_hand():
    """Each resample draws people with replacement; every pair of two draws of different people
    counts all their pairs (a slow loop over the drawn list)."""
    dist, q, g = _split(people=5)
    counts = O.identity_pair_counts(dist, q, g, 0.4)
    n = len(counts.identities)
    weights = np.random.default_rng(3).multinomial(n, np.full(n, 1 / n), size=200)
    fars = []
    for w in weights:
        drawn = [i for i in range(n) for _ in range(w[i])]
        accepted = sum(counts.false_accepts[a, b] for a in drawn for b in drawn)
        pairs = sum(counts.impostor_pairs[a, b] for a in drawn for b in drawn)
        if pairs:
            fars.append(accepted / pairs)
    want = np.percentile(fars, [2.5, 97.5])
    got = O.identity_bootstrap_interval(counts, resamples=200, seed=3)
    assert got == pytest.approx(tuple(want))


def test_far_interval_is_the_union_of_both_and_says_so():
    dist, q, g = _split(people=6)
    record = O.far_interval(O.identity_pair_counts(dist, q, g, 0.5))
    b, s = record["ci_binomial"], record["ci_identity_bootstrap"]
    assert record["ci"] == [min(b[0], s[0]), max(b[1], s[1])]
    assert record["ci"][0] <= record["far"] <= record["ci"][1]
    assert record["num_identities"] == 6 and record["impostor_pairs"] == 6 * 4 * 5
    zero = O.far_interval(O.identity_pair_counts(dist, q, g, -1.0))
    # no false accept: the bootstrap collapses to 0, the binomial upper end stays
    assert zero["ci_identity_bootstrap"] == [0.0, 0.0] and zero["ci"][1] > 0


def test_rule_of_30():
    assert O.pairs_needed(0.01) == 3000 and O.pairs_needed(1e-3) == 30000
    assert O.enough_pairs(3000, 0.01) and not O.enough_pairs(2999, 0.01)
    assert O.too_few_pairs_warning(3000, 0.01, "x") is None
    text = O.too_few_pairs_warning(48, 0.01, "4 people")
    assert "48 on 4 people" in text and "0.48 expected false accepts" in text
    assert "at least 3,000" in text and "calibration_dir" in text


# --------------------------------------------------------------------------- a run's record


@pytest.fixture(scope="module")
def protocol(synthetic_11k):
    from builders import run_params

    from handclip_nb.data import build_protocol

    return build_protocol(run_params("stage2", data_root=synthetic_11k, num_splits=3))


def _features(protocol, dim=16, seed=0):
    """Per identity a centre plus noise: genuine pairs are closer than impostor pairs."""
    g = torch.Generator().manual_seed(seed)
    ids = sorted(set(protocol.identities))
    centres = {i: torch.randn(dim, generator=g) for i in ids}
    rows = torch.stack([centres[i] + 0.9 * torch.randn(dim, generator=g)
                        for i in protocol.identities])
    return torch.nn.functional.normalize(rows, dim=1)


def _calibrate(protocol, far, fitted=True):
    from handclip_nb.evaluate.protocol_eval import evaluate_splits

    feats = _features(protocol)
    row_of = {i: i for i in range(len(protocol.identities))}
    test = evaluate_splits(feats, row_of, protocol, protocol.test, "test", verification=False)
    return P.calibrate_open_set(lambda idx: feats[list(idx)], protocol, far, test=test,
                                test_features=feats, test_row_of=row_of, fitted=fitted), feats


def test_open_set_record_states_identities_pairs_interval_and_test_far(protocol):
    record, feats = _calibrate(protocol, 0.5)
    cal = record["calibration"]
    assert cal["identities"] == O.FITTED  # selection 'last': every training identity fitted
    assert cal["impostor_pairs"] == record["pairs"]["impostor"]
    assert cal["far"] == pytest.approx(record["far_measured"]) and cal["far"] <= 0.5
    assert cal["ci"][0] <= cal["far"] <= cal["ci"][1]
    split, _ = P.calibration_split(protocol, True)
    assert cal["num_identities"] == len(set(protocol.ids_of([*split.query, *split.gallery])))
    assert record["enough_pairs"] and record["warning"] is None
    # the test identities' pooled FAR: every split's pairs at the calibrated threshold
    pooled = record["test"]["pooled"]
    row_of = {i: i for i in range(len(protocol.identities))}
    points = [far_at_threshold(P.split_distances(feats, row_of, s), protocol.ids_of(s.query),
                               protocol.ids_of(s.gallery), record["threshold"])
              for s in protocol.test]
    assert pooled["impostor_pairs"] == sum(p.impostor_pairs for p in points)
    assert pooled["false_accepts"] == round(sum(p.far * p.impostor_pairs for p in points))
    assert pooled["identities"] == O.NEVER_TRAINED
    assert pooled["num_identities"] == len({i for s in protocol.test
                                    for i in protocol.ids_of([*s.query, *s.gallery])})
    assert record["test"]["far_per_split"] == pytest.approx([p.far for p in points])
    never, _ = _calibrate(protocol, 0.5, fitted=False)
    assert never["calibration"]["identities"] == O.NEVER_TRAINED


def test_too_few_calibration_pairs_warn_in_the_run_and_its_summary(protocol):
    from handclip_nb import viz

    with pytest.warns(UserWarning, match="too few impostor pairs for FAR 1 %"):
        record, _ = _calibrate(protocol, 0.01)
    assert record["enough_pairs"] is False and "rule of 30" in record["warning"]
    text = viz.open_set_summary(record)
    assert "fitted identities" in text and "WARNING: too few impostor pairs" in text
    assert "on the test identities (never trained on, never used to choose it)" in text
    assert "95 % CI" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _calibrate(protocol, 0.5)  # enough pairs: no warning


def test_no_test_identity_ever_chooses_the_threshold(protocol, monkeypatch):
    """The threshold is the same whatever the test identities' features are, and a calibration
    split holding a test identity is refused."""
    feats = _features(protocol)
    changed = feats.clone()
    test_rows = sorted({i for s in protocol.test for i in (*s.query, *s.gallery)})
    changed[test_rows] = torch.nn.functional.normalize(torch.randn(len(test_rows), 16), dim=1)
    a = P.calibrate_open_set(lambda idx: feats[list(idx)], protocol, 0.5)
    b = P.calibrate_open_set(lambda idx: changed[list(idx)], protocol, 0.5)
    assert a == b
    monkeypatch.setattr(P, "calibration_split",
                        lambda protocol, fitted=True: (protocol.test[0], "test identities"))
    with pytest.raises(ValueError, match="holds .* test identities"):
        P.calibrate_open_set(lambda idx: feats[list(idx)], protocol, 0.5)


def test_records_without_reliability_say_what_they_lack():
    old = {"threshold": 0.3, "far_target": 0.01, "calibrated_on": "fitted training identities",
           "far_measured": 0.01, "tar_measured": 0.5, "pairs": {"genuine": 3, "impostor": 9}}
    assert "re-run the stage" in O.describe_open_set(old)


# --------------------------------------------------------------------------- the search


@pytest.fixture(scope="module")
def search_folders(synthetic_11k, tmp_path_factory):
    """``gallery``: one dorsal_r photo of 3 people, ``queries``: two more of each; ``calib``:
    every dorsal_r photo of 6 other people (``<person>/<image>``), the never-trained ones."""
    import shutil
    from pathlib import Path

    from handclip_nb.data.handinfo import read_handinfo

    records = [r for r in read_handinfo(synthetic_11k / "HandInfo.csv") if r.aspect == "dorsal_r"]
    people = sorted({r.person for r in records})
    root = tmp_path_factory.mktemp("calibrated_search")
    for n, person in enumerate(people[:9]):
        mine = [r for r in records if r.person == person]
        targets = ([root / "gallery"] + [root / "queries"] * 2) if n < 3 \
            else [root / "calib"] * len(mine)
        for r, dest in zip(mine, targets):
            (dest / person).mkdir(parents=True, exist_ok=True)
            shutil.copy2(synthetic_11k / r.path, dest / person / Path(r.path).name)
    return root


def _search_params(root, **values):
    from handclip_nb.params import resolve_params

    given = dict(backbone="tiny-vit", gallery_dir=str(root / "gallery"),
                 query=str(root / "queries"), batch_size=16, num_workers=0,
                 decode_cache=False, output_dir=str(root / "out"))
    return resolve_params({**given, **values}, stage="search")


def test_search_calibrates_on_never_trained_people_and_says_so(search_folders, workbench_home):
    from handclip_nb.evaluate import gallery as G
    from handclip_nb.evaluate.verification import calibrate_threshold
    from handclip_nb.runs import read_metrics
    from handclip_nb.search import run_search

    params = _search_params(search_folders, calibration_dir=str(search_folders / "calib"),
                            open_set_far=0.05)
    res = run_search(params)
    inputs = G.prepare_search(params)
    calibration = G.calibrate_search(res.model, inputs, params)
    assert len(calibration.gallery_ids) == 6 == len(set(calibration.gallery_ids))
    assert len(calibration.query_ids) == 6 * 5 - 6
    point = calibrate_threshold(calibration.distances, calibration.query_ids,
                                calibration.gallery_ids, 0.05)
    assert res.threshold.value == point.threshold
    r = res.threshold.reliability
    assert r["calibration"]["identities"] == O.NEVER_TRAINED
    assert r["calibration"]["impostor_pairs"] == point.impostor_pairs == 24 * 5
    assert r["calibration"]["far"] == pytest.approx(point.far)
    assert r["warning"] is not None and "120 on calibration_dir" in r["warning"]
    text = res.threshold.describe_reliability()
    assert "calibrated in this search for FAR 0.05 on 6 never-trained people" in text
    assert "calibrated on never-trained identities: FAR" in text and "WARNING" in text
    m = read_metrics(params.output_dir)
    assert m["threshold"]["reliability"]["calibration"]["num_identities"] == 6
    # a given threshold is measured on the same never-trained people, not re-chosen there
    given = G.resolve_threshold(res.model, 0.5, None, calibration)
    assert given.value == 0.5 and given.reliability["calibration"] is None
    measured = given.reliability["never_trained"][0]
    assert measured["far"] == pytest.approx(
        far_at_threshold(calibration.distances, calibration.query_ids,
                         calibration.gallery_ids, 0.5).far)
    assert "chosen by you, not calibrated" in given.describe_reliability()


def test_a_run_threshold_is_measured_on_calibration_people_and_test_identities():
    from types import SimpleNamespace

    from handclip_nb.evaluate import gallery as G
    from handclip_nb.run_loader import RunInfo

    interval = {"far": 0.0099, "false_accepts": 172, "impostor_pairs": 17400, "num_identities": 30,
                "ci": [0.008, 0.012], "confidence": 0.95, "tar": 0.8}
    open_set = {"threshold": 0.25, "far_target": 0.01, "calibrated_on": "fitted training "
                "identities", "calibration": {"identities": "fitted", **interval},
                "warning": None,
                "test": {"pooled": {**interval, "identities": "never-trained", "far": 0.0045,
                                    "num_identities": 30}}}
    info = RunInfo(name="run", folder="/r", stage="stage2", params={"flip_tta": False},
                   recorded={"open_set": open_set}, backbone_display="x")
    model = SimpleNamespace(run=SimpleNamespace(info=info))
    t = G.resolve_threshold(model)
    text = t.describe_reliability()
    assert t.value == 0.25
    assert "calibrated on fitted identities: FAR 0.99 % (172 false accepts of 17,400" in text
    assert "a stranger's impostor pairs lie closer" in text
    assert ("on never-trained identities (the run's 30 test identities, never used to choose "
            "it): FAR 0.45 %") in text
    assert "no calibration_dir" in text
    calibration = G.SearchCalibration(root="/c", distances=np.array([[0.1, 0.2], [0.3, 0.05]]),
                                      query_ids=["a", "b"], gallery_ids=["a", "b"],
                                      far_target=0.5)
    with_dir = G.resolve_threshold(model, calibration=calibration)
    run_on_dir = with_dir.reliability["never_trained"][0]
    assert "the run's threshold cosine distance <= 0.2500" in run_on_dir["where"]
    assert run_on_dir["far"] == 0.5  # 0.2 accepted, 0.3 not
    old = G.resolve_threshold(SimpleNamespace(run=SimpleNamespace(info=RunInfo(
        name="run", folder="/r", stage="stage2", params={}, backbone_display="x",
        recorded={"open_set": {"threshold": 0.2, "far_target": 0.01,
                               "calibrated_on": "x"}}))))
    assert "predates reliability records" in old.describe_reliability()


def test_bad_calibration_dir_fails_early_naming_the_fix(search_folders, tmp_path):
    import shutil

    from handclip_nb.evaluate import gallery as G

    with pytest.raises(G.SearchError, match="calibration_dir .* does not exist"):
        G.prepare_search(_search_params(search_folders, calibration_dir=str(tmp_path / "no")))
    with pytest.raises(G.SearchError, match="also gallery or query images"):
        G.prepare_search(_search_params(search_folders,
                                        calibration_dir=str(search_folders / "queries")))
    one = tmp_path / "one"
    shutil.copytree(next((search_folders / "calib").iterdir()), one / "p1")
    with pytest.raises(G.SearchError, match="holds one person"):
        G.prepare_search(_search_params(search_folders, calibration_dir=str(one)))
    labelled = tmp_path / "labelled"
    shutil.copytree(search_folders / "calib", labelled)
    people = sorted(p.name for p in labelled.iterdir())
    rows = ["image,person,split"] + [
        f"{p.relative_to(labelled).as_posix()},{p.parent.name},"
        f"{'train' if people.index(p.parent.name) < 3 else 'test'}"
        for p in sorted(labelled.rglob("*.jpg"))]
    (labelled / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(G.SearchError, match="every calibration person is a stranger"):
        G.prepare_search(_search_params(search_folders, calibration_dir=str(labelled)))
    from handclip_nb.params import ParamError

    with pytest.raises(ParamError, match="open_set_far"):
        _search_params(search_folders, open_set_far=1.5)
