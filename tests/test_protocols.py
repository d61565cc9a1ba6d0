"""11k / HD readers and protocols: the published split sizes, seeds, manifests, bad data."""
import json
import shutil

import pytest

from handclip_nb.data.handinfo import DataError, read_handinfo, read_hd
from handclip_nb.data.protocols import (build_11k_protocol, build_hd_protocol, load_manifest,
                                        verify_images)

# docs/protocols.md: the MBA-Net protocol sizes on the real HandInfo.csv.
PUBLISHED = {
    "dorsal_r": (72, 962, 71, 1042, 971),
    "dorsal_l": (73, 808, 73, 1061, 988),
    "palmar_r": (72, 977, 71, 988, 917),
    "palmar_l": (76, 1004, 75, 1023, 948),
}


@pytest.fixture(scope="module")
def real_records(real_handinfo):
    return read_handinfo(real_handinfo)


def test_real_handinfo_parses_all_rows_and_strips_ids(real_records):
    assert len(real_records) == 11076
    people = {r.person for r in real_records}
    # 190 raw id strings, but "1200000 " (one image) is person 1200000 with a trailing space
    assert len(people) == 189
    assert "1200000" in people and "1200000 " not in people


@pytest.mark.parametrize("aspect", list(PUBLISHED))
@pytest.mark.parametrize("gallery_mode", ["aspect", "all"])
def test_real_11k_split_sizes_match_the_published_table(real_records, aspect, gallery_mode):
    p = build_11k_protocol(real_records, aspect, num_splits=10, gallery_mode=gallery_mode)
    s = p.sizes()
    assert (s["train_ids"], s["train_images"], s["test_ids"], s["test_images"],
            s["queries_per_split"]) == PUBLISHED[aspect]
    for split in p.test:
        assert len(split.query) == PUBLISHED[aspect][4]
        if gallery_mode == "aspect":
            assert len(split.gallery) == PUBLISHED[aspect][2]
        else:  # the four aspects' test galleries merged
            assert len(split.gallery) == sum(v[2] for v in PUBLISHED.values())


def test_real_11k_train_and_test_identities_follow_sorted_order(real_records):
    p = build_11k_protocol(real_records, "dorsal_r")
    assert p.train_people == sorted(p.train_people)
    assert max(p.train_people) < min(p.test_people)
    assert not set(p.train_people) & set(p.test_people)
    # no image with accessories anywhere in the protocol
    assert all(not it.accessories for it in p.items)


def test_model_selection_never_touches_test_identities(real_records):
    for aspect in PUBLISHED:
        p = build_11k_protocol(real_records, aspect, gallery_mode="all", val_fraction=0.2)
        test_ids = set(p.test_people)
        sel = {p.items[i].person for i in (*p.selection.query, *p.selection.gallery)}
        assert sel and not sel & test_ids
        assert sel <= set(p.train_people)
        assert len(p.selection_people) == round(0.2 * len(p.train_people))
        fit_people = {p.items[i].person for i in p.fit}
        assert not fit_people & sel and not fit_people & test_ids
        # the val/selection identities are ranked among themselves only
        assert set(p.ids_of(p.selection.gallery)) >= set(p.ids_of(p.selection.query))


def test_val_image_is_one_per_training_identity(real_records):
    p = build_11k_protocol(real_records, "palmar_l")
    people = [p.items[i].person for i in p.val_images]
    assert sorted(people) == sorted(p.train_people)


def test_all_gallery_keeps_identities_distinct_per_aspect(real_records):
    p = build_11k_protocol(real_records, "dorsal_r", gallery_mode="all")
    split = p.test[0]
    gallery_aspects = {p.items[i].aspect for i in split.gallery}
    assert gallery_aspects == {"dorsal_r", "dorsal_l", "palmar_r", "palmar_l"}
    # the same person's dorsal_l image must not count as a match for a dorsal_r query
    q_ids = set(p.ids_of(split.query))
    for i in split.gallery:
        if p.items[i].aspect != "dorsal_r":
            assert p.identities[i] not in q_ids


def test_splits_are_seeded_and_prefix_stable(real_records):
    a = build_11k_protocol(real_records, "dorsal_l", seed=3, num_splits=4)
    b = build_11k_protocol(real_records, "dorsal_l", seed=3, num_splits=6)
    c = build_11k_protocol(real_records, "dorsal_l", seed=4, num_splits=4)
    assert a.test == b.test[:4]  # adding splits leaves the earlier ones unchanged
    assert a.test != c.test
    assert a.manifest()["content_hash"] == build_11k_protocol(
        real_records, "dorsal_l", seed=3, num_splits=4).manifest()["content_hash"]
    assert len({s.gallery for s in a.test}) == 4  # the Monte-Carlo splits differ


def test_same_aspect_gallery_is_shared_across_query_aspects(real_records):
    a = build_11k_protocol(real_records, "dorsal_r", gallery_mode="all")
    b = build_11k_protocol(real_records, "palmar_r", gallery_mode="all")
    pick = lambda p, asp: sorted(p.items[i].path for i in p.test[2].gallery  # noqa: E731
                                 if p.items[i].aspect == asp)
    assert pick(a, "palmar_r") == pick(b, "palmar_r")


def test_manifest_round_trip_and_tamper_check(real_records, tmp_path):
    p = build_11k_protocol(real_records, "dorsal_r", seed=1, num_splits=2)
    path = p.write_manifest(tmp_path / "splits.json")
    data = load_manifest(path)
    assert data["seed"] == 1 and data["sizes"]["queries_per_split"] == 971
    assert len(data["items"]) == len(p.items)
    data["test"][0]["query"] = data["test"][0]["query"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="content hash mismatch"):
        load_manifest(path)


# ---------------------------------------------------------------- malformed HandInfo.csv
HEADER = "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities\n"
GOOD = '"0000001",27,"male","fair",0,0,"dorsal right","Hand_0000001.jpg",0\n'


@pytest.mark.parametrize("bad_row, fragment", [
    ('"0000001",27,"male","fair",0,0,"dorsal right","Hand_1.jpg"\n', "expected 9 columns"),
    ('"0000001",27,"male","fair",0,0,"sideways","Hand_1.jpg",0\n', "unknown aspectOfHand"),
    ('"0000001",27,"male","fair",yes,0,"dorsal right","Hand_1.jpg",0\n', "'accessories'"),
    ('"0000001",27,"male","fair",0,2,"dorsal right","Hand_1.jpg",0\n', "'nailPolish'"),
    ('"   ",27,"male","fair",0,0,"dorsal right","Hand_1.jpg",0\n', "empty id"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, fragment):
    csv_path = tmp_path / "HandInfo.csv"
    csv_path.write_text(HEADER + GOOD + GOOD + bad_row + GOOD)
    with pytest.raises(DataError) as err:
        read_handinfo(csv_path)
    assert f"{csv_path}:4" in str(err.value) and fragment in str(err.value)


def test_bad_header_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="HandInfo.csv"):
        read_handinfo(tmp_path / "HandInfo.csv")
    (tmp_path / "HandInfo.csv").write_text("id,age\n" + GOOD)
    with pytest.raises(DataError, match=":1: header"):
        read_handinfo(tmp_path / "HandInfo.csv")


def test_empty_aspect_is_an_error_naming_the_aspect(tmp_path):
    csv_path = tmp_path / "HandInfo.csv"
    csv_path.write_text(HEADER + GOOD.replace(",0,0,", ",1,0,") * 3)
    records = read_handinfo(csv_path)
    with pytest.raises(DataError, match="aspect dorsal_r: no images left"):
        build_11k_protocol(records, "dorsal_r")
    with pytest.raises(DataError, match="aspect palmar_l"):
        build_11k_protocol(records, "palmar_l")


# ---------------------------------------------------------------- synthetic files on disk
def test_synthetic_11k_protocol_on_files(synthetic_11k):
    records = read_handinfo(synthetic_11k / "HandInfo.csv")
    p = build_11k_protocol(records, "dorsal_r", root=synthetic_11k, num_splits=3,
                           gallery_mode="all")
    verify_images(synthetic_11k, p.items)
    s = p.sizes()
    assert s["train_ids"] == 6 and s["test_ids"] == 6
    assert s["queries_per_split"] == s["test_images"] - s["test_ids"]


def test_missing_and_unreadable_images_reported_together(synthetic_11k, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_11k, root)
    records = read_handinfo(root / "HandInfo.csv")
    p = build_11k_protocol(records, "dorsal_r", root=root)
    victims = [root / p.items[i].path for i in (0, 1, 2)]
    victims[0].unlink()
    victims[1].unlink()
    victims[2].write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as err:
        verify_images(root, p.items)
    msg = str(err.value)
    assert "2 missing image(s)" in msg and "1 unreadable image(s)" in msg
    assert str(victims[0]) in msg and str(victims[2]) in msg


def test_hd_labels_come_from_file_names(synthetic_hd):
    records = read_hd(synthetic_hd)
    for r in records:
        stem = r.path.rsplit("/", 1)[1].split("_")[0]
        assert r.person == ("d" if r.distractor else "") + str(int(stem))
    assert any(r.distractor for r in records)


def _hd_layout(root, main_names, distractor_names):
    for folder, names in (("1-501", main_names), ("502-712", distractor_names)):
        (root / "Original Images" / folder).mkdir(parents=True)
        for name in names:
            (root / "Original Images" / folder / name).write_bytes(b"x")
    return root


def test_hd_reader_takes_camera_names_and_reused_numbers(tmp_path):
    """Real HD names: ``<id>_<camera file name>``, mixed-case extensions; 502-712 reuses ids."""
    root = _hd_layout(tmp_path,
                      ["552_IMG_7278.JPG", "552_IMG_7279.jpg", "239_31 (0).jpg", "239_31 (1).jpg",
                       "0193_IMG_4661.JPG", "193_IITD_12.JPG", "7_3.jpg", "Thumbs.db"],
                      ["552_we (3).jpg", "552_RIMG0001.JPG", "9_1.jpg"])
    records = read_hd(root)
    got = sorted((r.path.rsplit("/", 1)[1], r.person, r.distractor) for r in records)
    assert got == sorted([
        ("552_IMG_7278.JPG", "552", False), ("552_IMG_7279.jpg", "552", False),
        ("239_31 (0).jpg", "239", False), ("239_31 (1).jpg", "239", False),
        ("0193_IMG_4661.JPG", "193", False), ("193_IITD_12.JPG", "193", False),
        ("7_3.jpg", "7", False),
        ("552_we (3).jpg", "d552", True), ("552_RIMG0001.JPG", "d552", True),
        ("9_1.jpg", "d9", True)])
    p = build_hd_protocol(records, num_splits=2, val_fraction=0)
    for split in p.test:
        q_ids = set(p.ids_of(split.query))
        d_ids = {p.identities[i] for i in split.gallery if p.items[i].distractor}
        assert len(d_ids) == 2 and not q_ids & d_ids  # distractor 552 is not person 552


def test_hd_protocol(synthetic_hd):
    records = read_hd(synthetic_hd)
    p = build_hd_protocol(records, root=synthetic_hd, num_splits=3, val_fraction=0.2)
    main_ids = sorted({int(r.person) for r in records if not r.distractor})
    n_train = (len(main_ids) + 1) // 2
    assert [int(x) for x in p.train_people] == main_ids[:n_train]
    assert [int(x) for x in p.test_people] == main_ids[n_train:]
    n_distract = sum(r.distractor for r in records)
    for split in p.test:
        assert len(split.gallery) == len(p.test_people) + n_distract
        q_ids = set(p.ids_of(split.query))
        for i in split.gallery:
            if p.items[i].distractor:
                assert p.identities[i] not in q_ids  # distractors never match a query
    sel = {p.items[i].person for i in p.selection.query}
    assert sel <= set(p.train_people)


def test_hd_bad_file_name_is_reported(synthetic_hd, tmp_path):
    root = tmp_path / "hd"
    shutil.copytree(synthetic_hd, root)
    (root / "Original Images" / "1-501" / "photo.jpg").write_bytes(b"x")
    (root / "Original Images" / "1-501" / "552_.JPG").write_bytes(b"x")
    (root / "Original Images" / "502-712" / "IMG_7278.JPG").write_bytes(b"x")
    with pytest.raises(DataError) as err:
        read_hd(root)
    msg = str(err.value)  # every bad name of both folders, in one error
    for name in ("photo.jpg", "552_.JPG", "IMG_7278.JPG", "1-501: 2 image name(s)",
                 "502-712: 1 image name(s)", "<id>_<name>"):
        assert name in msg, (name, msg)
    with pytest.raises(FileNotFoundError, match="Original Images/1-501"):
        read_hd(tmp_path)


def test_hd_protocol_on_real_shaped_ids():
    """Contiguous ids 1-502 → ids <= 251 train, the other 251 test (the real numbering, with
    gaps up to 732, is tests/test_hd_listing.py)."""
    from handclip_nb.data.handinfo import HandImage

    records = [HandImage(path=f"Original Images/1-501/{i}_{n}.jpg", person=str(i),
                         aspect="dorsal") for i in range(1, 503) for n in (1, 2)]
    # folder enumeration order would put "10" before "2"; labels must not depend on it
    records.sort(key=lambda r: r.path)
    p = build_hd_protocol(records, num_splits=1)
    assert max(int(x) for x in p.train_people) == 251
    assert len(p.test_people) == 251


# ---------------------------------------------------------------- split_seed
def _manifest_bytes(params, path):
    from handclip_nb.data import build_protocol

    return build_protocol(params).write_manifest(path).read_bytes()


@pytest.mark.parametrize("stage, dataset", [("stage0", "11k"), ("stage2", "11k"),
                                            ("stage2", "hd")])
def test_split_seed_not_seed_decides_splits_json(stage, dataset, synthetic_11k, synthetic_hd,
                                                 tmp_path):
    from builders import run_params

    root = synthetic_11k if dataset == "11k" else synthetic_hd
    base = dict(dataset=dataset, data_root=root, num_splits=3)
    a = _manifest_bytes(run_params(stage, **base, seed=0), tmp_path / "a.json")
    b = _manifest_bytes(run_params(stage, **base, seed=7), tmp_path / "b.json")
    assert a == b  # two training seeds of one method: the same splits.json, byte for byte
    c = _manifest_bytes(run_params(stage, **base, seed=0, split_seed=1), tmp_path / "c.json")
    ma, mc = json.loads(a), json.loads(c)
    assert ma["seed"] == 0 and mc["seed"] == 1  # the manifest records the split seed
    assert ma["test"] != mc["test"]
    assert ma["test"][0]["gallery"] != mc["test"][0]["gallery"]
    assert (ma["selection_people"], ma["val_images"]) != (mc["selection_people"],
                                                          mc["val_images"])
    # the train/test halves are not random: only the draws inside them change
    assert (ma["train_people"], ma["test_people"]) == (mc["train_people"], mc["test_people"])


def test_metrics_record_records_split_seed(synthetic_11k):
    import numpy as np

    from builders import run_params
    from handclip_nb.data import build_protocol
    from handclip_nb.evaluate.protocol_eval import EvalResult, metrics_record, summarise

    params = run_params("stage0", data_root=synthetic_11k, seed=4, split_seed=2, num_splits=1)
    protocol = build_protocol(params)
    per_split = [{"rank1": 50.0, "rank5": 60.0, "rank10": 70.0, "mAP": 40.0, "mINP": 30.0}]

    class _Split:
        metrics = {"cmc": np.linspace(0.5, 1.0, 20)}

    result = EvalResult("test", [_Split()], summarise(per_split))
    record = metrics_record("stage0", params, protocol, {"test": result})
    assert record["split_seed"] == 2 and protocol.seed == 2
    assert record["data"]["gallery_classes_per_split"] == len(
        set(protocol.ids_of(protocol.test[0].gallery)))


def test_best_accuracy_holds_every_training_identitys_val_image_out_of_training(synthetic_11k):
    """CLIP-HandID's split (prepare_train_val_test_11k_r_l.py: one random image per training
    identity into val/): the val images leave the fit set, every identity keeps its label, the
    test splits are untouched; the other policies keep them in training."""
    from handclip_nb.data import build_protocol
    from handclip_nb.data.protocols import hold_out_val_images
    from handclip_nb.params import resolve_params

    base = {"data_root": str(synthetic_11k), "num_splits": 2}
    kept = build_protocol(resolve_params({**base, "selection": "last"}, stage="handid"))
    held = build_protocol(resolve_params({**base, "selection": "best_accuracy"}, stage="handid"))
    assert not kept.val_held_out and set(kept.val_images) <= set(kept.fit)
    assert held.val_held_out and held.selection is None
    assert not set(held.val_images) & set(held.fit)
    assert set(held.fit) | set(held.val_images) == set(kept.fit)
    assert len(held.val_images) == len(held.train_people) == held.num_classes
    assert {held.items[i].person for i in held.val_images} == set(held.train_people)
    label = dict(zip(kept.fit, kept.fit_labels))
    assert all(label[i] == k for i, k in zip(held.fit, held.fit_labels))
    assert held.test == kept.test and held.test_hash() == kept.test_hash()
    assert held.manifest()["content_hash"] != kept.manifest()["content_hash"]
    assert hold_out_val_images(held) is held


def test_best_accuracy_refuses_an_identity_with_a_single_image(synthetic_11k):
    from dataclasses import replace

    from handclip_nb.data.protocols import hold_out_val_images

    records = read_handinfo(synthetic_11k / "HandInfo.csv")
    protocol = build_11k_protocol(records, "dorsal_r", num_splits=1, val_fraction=0.0)
    person = protocol.fit_people[0]
    lonely = [i for i in protocol.fit if protocol.items[i].person != person
              or i in protocol.val_images]
    keep = set(lonely)
    thinned = replace(protocol, fit=lonely,
                      fit_labels=[k for i, k in zip(protocol.fit, protocol.fit_labels)
                                  if i in keep])
    with pytest.raises(DataError, match="single image"):
        hold_out_val_images(thinned)
