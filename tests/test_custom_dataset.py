"""The custom dataset (``dataset: custom``, data/custom.py): folder and labels.csv layouts, the
11k protocol on them, split columns, and every layout error reported at once with its place.

The datasets are the session's synthetic 11k hands (conftest ``synthetic_11k``: 12 people x 4
aspects x 5 images) linked into the custom layouts, so no image is rendered here.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest

from handclip_nb.data.custom import (LABELS_FILE, NO_ASPECT, build_custom_protocol,
                                     custom_aspect, custom_source_hash, read_custom)
from handclip_nb.data.datasets import build_protocol
from handclip_nb.data.handinfo import DataError, HandImage, read_handinfo
from handclip_nb.data.protocols import build_11k_protocol
from handclip_nb.params import ParamError, resolve_params

#: the folder names the aspect-folder layout uses: every accepted spelling appears once
ASPECT_FOLDERS = {"dorsal_r": "dorsal_r", "dorsal_l": "Dorsal Left",
                  "palmar_r": "palmar-right", "palmar_l": "PALMAR_L"}


@pytest.fixture(scope="module")
def source(synthetic_11k) -> tuple[Path, list[HandImage]]:
    """The synthetic 11k root and its records without accessories (custom data has none)."""
    records = [r for r in read_handinfo(synthetic_11k / "HandInfo.csv") if not r.accessories]
    return synthetic_11k, records


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def flat_dataset(root: Path, source, aspect: str = "dorsal_r") -> Path:
    """``root/<person>/<image>`` with one aspect's images of every person."""
    src, records = source
    for r in records:
        if r.aspect == aspect:
            _link(src / r.path, root / r.person / Path(r.path).name)
    return root


def aspect_dataset(root: Path, source) -> Path:
    """``root/<person>/<aspect folder>/<image>`` with all four aspects."""
    src, records = source
    for r in records:
        _link(src / r.path, root / r.person / ASPECT_FOLDERS[r.aspect] / Path(r.path).name)
    return root


def csv_dataset(root: Path, source, rows_for, header=("image", "person", "aspect", "split")
                ) -> Path:
    """Images under ``root/img/`` and a labels.csv whose rows ``rows_for(record)`` gives
    (None drops the record)."""
    src, records = source
    rows = []
    for r in records:
        row = rows_for(r)
        if row is not None:
            _link(src / r.path, root / "img" / Path(r.path).name)
            rows.append(row)
    with open(root / LABELS_FILE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return root


def _image(r: HandImage) -> str:
    return f"img/{Path(r.path).name}"


def check_protocol_invariants(p) -> None:
    """What every protocol of the workbench guarantees (docs/protocols.md)."""
    train, test = set(p.train_people), set(p.test_people)
    assert train and test and not train & test
    assert {p.items[i].person for i in p.fit} <= train - set(p.selection_people)
    assert set(p.selection_people) <= train
    assert p.selection is not None
    assert {p.items[i].person for i in (*p.selection.query, *p.selection.gallery)} \
        == set(p.selection_people)
    for split in p.test:
        mine = [i for i in split.gallery if p.items[i].aspect == p.aspect]
        gallery_people = [p.items[i].person for i in mine]
        assert sorted(gallery_people) == sorted(test)  # one gallery image per test identity
        assert {p.items[i].person for i in split.query} <= test
        assert all(p.items[i].aspect == p.aspect for i in split.query)
        assert not set(split.query) & set(split.gallery)


# ---------------------------------------------------------------- folder layout
def test_flat_folders_are_one_aspect_named_by_the_parameter(tmp_path, source):
    root = flat_dataset(tmp_path / "flat", source)
    records = read_custom(root)
    assert {r.aspect for r in records} == {NO_ASPECT}
    assert len({r.person for r in records}) == 12
    p = build_custom_protocol(records, "palmar_l", root=root, seed=0, num_splits=3,
                              val_fraction=0.4)
    assert p.dataset == "custom" and p.aspect == "palmar_l"  # the word the prompts will use
    assert {it.aspect for it in p.items} == {"palmar_l"}
    # the 11k rule: sorted people, the first ceil(12/2) train
    people = sorted({r.person for r in records})
    assert p.train_people == people[:6] and p.test_people == people[6:]
    assert len(p.test) == 3 and p.num_splits == 3
    assert len(p.selection_people) == round(0.4 * 6)
    check_protocol_invariants(p)


def test_split_seed_decides_the_draws_and_nothing_else(tmp_path, source):
    root = flat_dataset(tmp_path / "flat", source)
    records = read_custom(root)
    a, b = (build_custom_protocol(records, "dorsal_r", root=root, seed=7, num_splits=4)
            for _ in range(2))
    assert a.manifest() == b.manifest()
    c = build_custom_protocol(records, "dorsal_r", root=root, seed=8, num_splits=4)
    assert c.train_people == a.train_people and c.test_people == a.test_people
    assert [s.gallery for s in c.test] != [s.gallery for s in a.test]


def test_aspect_folders_follow_the_11k_protocol(tmp_path, source):
    root = aspect_dataset(tmp_path / "aspects", source)
    records = read_custom(root)
    assert {r.aspect for r in records} == set(ASPECT_FOLDERS)  # every spelling understood
    for gallery_mode in ("aspect", "all"):
        p = build_custom_protocol(records, "palmar_r", root=root, num_splits=2,
                                  gallery_mode=gallery_mode)
        ref = build_11k_protocol(source[1], "palmar_r", num_splits=2, gallery_mode=gallery_mode)
        assert (p.train_people, p.test_people) == (ref.train_people, ref.test_people)
        assert p.sizes() == ref.sizes()
        check_protocol_invariants(p)
    # "all" merges every aspect's gallery; identities stay distinct per aspect
    gallery = [p.items[i] for i in p.test[0].gallery]
    assert {it.aspect for it in gallery} == set(ASPECT_FOLDERS)
    assert len({p.identities[i] for i in p.test[0].gallery}) == len(gallery)


def test_asking_for_an_aspect_the_dataset_lacks_names_those_it_has(tmp_path, source):
    src, records = source
    root = tmp_path / "two"
    for r in records:
        if r.aspect in ("dorsal_l", "palmar_r"):
            _link(src / r.path, root / r.person / r.aspect / Path(r.path).name)
    with pytest.raises(DataError, match="no image of aspect dorsal_r; the dataset's aspects "
                                        "are dorsal_l, palmar_r: set aspect"):
        build_custom_protocol(read_custom(root), "dorsal_r", root=root)


def test_aspect_spellings():
    assert custom_aspect(" Dorsal Right ") == "dorsal_r"
    assert custom_aspect("palmar_left") == "palmar_l"
    assert custom_aspect("dorsal") is None and custom_aspect("front") is None


def test_source_hash_follows_the_listing_and_the_csv(tmp_path, source):
    root = flat_dataset(tmp_path / "flat", source)
    before = custom_source_hash(root, read_custom(root))
    assert before == custom_source_hash(root, read_custom(root))
    first = sorted(root.iterdir())[0]
    os.rename(next(first.iterdir()), first / "renamed.jpg")
    assert custom_source_hash(root, read_custom(root)) != before

    croot = csv_dataset(tmp_path / "csv", source, lambda r: (_image(r), r.person, r.aspect),
                        header=("image", "person", "aspect"))
    h1 = custom_source_hash(croot, read_custom(croot))
    with open(croot / LABELS_FILE, "a") as fh:
        fh.write("\n")  # the file changed: the hash follows its bytes
    assert custom_source_hash(croot, read_custom(croot)) != h1


# ---------------------------------------------------------------- labels.csv
def test_csv_without_split_is_the_folder_protocol(tmp_path, source):
    root = csv_dataset(tmp_path / "csv", source, lambda r: (_image(r).replace("/", "\\"),
                                                            r.person, r.aspect),
                       header=("Image", " PERSON", "aspect"))  # any case, Windows paths
    records = read_custom(root)
    assert all(r.path.startswith("img/") and r.split is None for r in records)
    p = build_custom_protocol(records, "dorsal_l", root=root, num_splits=2)
    ref = build_11k_protocol(source[1], "dorsal_l", num_splits=2)
    assert (p.train_people, p.test_people) == (ref.train_people, ref.test_people)
    check_protocol_invariants(p)


def test_csv_train_test_names_the_halves_and_keeps_the_draws(tmp_path, source):
    test_people = {"0000000", "0000003", "0000004", "0000009"}  # not the sorted halves
    root = csv_dataset(tmp_path / "csv", source, lambda r: (
        _image(r), r.person, r.aspect, "test" if r.person in test_people else "train"))
    records = read_custom(root)
    p = build_custom_protocol(records, "dorsal_r", root=root, num_splits=5, gallery_mode="all")
    assert set(p.test_people) == test_people and len(p.train_people) == 8
    assert len(p.test) == 5 and p.num_splits == 5
    check_protocol_invariants(p)
    # "all": the other aspects' galleries hold the same named test people
    assert {p.items[i].person for i in p.test[0].gallery} == test_people


def test_csv_query_gallery_is_one_fixed_split(tmp_path, source):
    # people 0-5 train; the others: the first image of each aspect is the gallery, the rest
    # queries; person 11 keeps only its gallery image (a distractor with one image)
    roles: dict[str, str] = {}
    for r in source[1]:
        first = not any(roles.get(x.path) for x in source[1]
                        if (x.person, x.aspect) == (r.person, r.aspect) and x.path != r.path)
        roles[r.path] = ("train" if int(r.person) < 6 else "gallery" if first
                         else "" if r.person == "0000011" else "query")
    root = csv_dataset(tmp_path / "csv", source, lambda r: (
        _image(r), r.person, r.aspect, roles[r.path]) if roles[r.path] else None)
    records = read_custom(root)
    p = build_custom_protocol(records, "dorsal_r", root=root, num_splits=10, seed=3,
                              val_fraction=0.4)
    assert p.num_splits == 1 and len(p.test) == 1  # num_splits has nothing to draw
    assert p.manifest()["num_splits"] == 1
    split = p.test[0]
    assert {p.items[i].split for i in split.query} == {"query"}
    assert {p.items[i].split for i in split.gallery} == {"gallery"}
    assert "0000011" in p.test_people
    assert "0000011" not in {p.items[i].person for i in split.query}
    named_queries = {r.path for r in records if r.split == "query" and r.aspect == "dorsal_r"}
    assert {p.items[i].path for i in split.query} == named_queries
    assert p.train_people == [f"{k:07d}" for k in range(6)]
    assert set(p.selection_people) <= set(p.train_people) and len(p.selection_people) == 2
    all_mode = build_custom_protocol(records, "dorsal_r", root=root, gallery_mode="all")
    assert {all_mode.items[i].aspect for i in all_mode.test[0].gallery} == set(ASPECT_FOLDERS)


# ---------------------------------------------------------------- errors
def test_folder_problems_are_reported_together(tmp_path, source):
    src, records = source
    root = flat_dataset(tmp_path / "bad", source)
    people = sorted(p.name for p in root.iterdir())
    (root / "empty_person").mkdir()
    lonely = root / "lonely"
    lonely.mkdir()
    shutil.copy(src / records[0].path, lonely / "only.JPG")
    broken = root / people[0] / "broken.png"
    broken.write_bytes(b"not a png")
    (root / "stray.jpg").write_bytes(b"x")
    nested = root / people[1] / "deeper"
    nested.mkdir()
    (root / "README.txt").write_text("not part of the layout")  # other files are skipped
    with pytest.raises(DataError) as err:
        read_custom(root)
    msg = str(err.value)
    assert msg.startswith(f"custom dataset at {root}: 5 problem(s)")
    assert f"{root / 'stray.jpg'}: an image directly under data_root" in msg
    assert f"{root / 'empty_person'}: empty person folder" in msg
    assert f"{lonely}: person 'lonely' has only 1 usable image" in msg
    assert f"{broken}: does not open as an image (UnidentifiedImageError)" in msg
    assert f"{root / people[1]}: holds " in msg and "aspect folders" in msg
    assert "docs/protocols.md#custom-datasets" in msg


def test_aspect_folder_problems(tmp_path, source):
    root = aspect_dataset(tmp_path / "bad", source)
    people = sorted(p.name for p in root.iterdir())
    os.rename(root / people[0] / "PALMAR_L", root / people[0] / "front")
    os.rename(root / people[1] / "PALMAR_L", root / people[1] / "front")
    (root / people[2] / "dorsal_r" / "sub").mkdir()
    (root / people[3] / "palmar_right").mkdir()  # a second spelling of "palmar-right"
    flat_person = root / "flatty"
    flat_person.mkdir()
    for k in range(2):
        shutil.copy(source[0] / source[1][k].path, flat_person / f"{k}.jpg")
    with pytest.raises(DataError) as err:
        read_custom(root)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert (f"{root / people[0] / 'front'}: unknown aspect folder 'front' (and in 1 more person "
            f"folder(s))") in msg
    assert f"{root / people[2] / 'dorsal_r'}: holds the folder(s) ['sub']: nested too deep" in msg
    assert re.search(re.escape(str(root / people[3])) + r"/palmar_right: aspect palmar_r again",
                     msg)
    assert "1 person folder(s) hold images directly (e.g. ['flatty'])" in msg


def test_csv_problems_are_reported_together_with_their_lines(tmp_path, source):
    src, records = source
    root = tmp_path / "bad"
    rows = []
    for r in records[:8]:
        _link(src / r.path, root / "img" / Path(r.path).name)
        rows.append([_image(r), r.person, r.aspect, "", "x"])
    (root / "img" / "broken.jpg").write_bytes(b"no")
    rows[0][1] = " "                                   # line 2: empty person
    rows[1][0] = "img/missing.jpg"                     # line 3: missing file
    rows[2][2] = "sideways"                            # line 4: unknown aspect
    rows[3][2] = ""                                    # line 5: partial aspect column
    rows[4][0] = rows[5][0]                            # line 7 repeats line 6's image
    rows.append(["img/broken.jpg", "0000099", "dorsal_r", "", "x"])  # line 10: unreadable
    rows.append(["img/a.jpg", "0000099"])                # line 11: wrong cell count
    with open(root / LABELS_FILE, "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "person", "aspect", "Notes", "extra"], *rows])
    with pytest.raises(DataError) as err:
        read_custom(root)
    msg = str(err.value)
    labels = root / LABELS_FILE
    expected = [
        f"{labels}:1: unknown column 'Notes'",
        f"{labels}:1: unknown column 'extra'",
        f"{labels}:2: empty person",
        f"{labels}:3: image 'img/missing.jpg' not found ({root / 'img' / 'missing.jpg'})",
        f"{labels}:4: aspect 'sideways' is not one of dorsal_r",
        f"{labels}:5: empty aspect",
        f"{labels}:7: image '{rows[5][0]}' listed again (first at line 6)",
        f"{labels}:10: image {root / 'img' / 'broken.jpg'} does not open as an image",
        f"{labels}:11: 2 cell(s), the header has 5",
    ]
    for fragment in expected:
        assert fragment in msg, fragment
    # and the consequences: people left with one usable image are named by their row
    assert "person '0000099' has only 1 usable image" not in msg  # its only row is unusable
    assert msg.count("\n  - ") >= len(expected)
    lines = [int(n) for n in re.findall(re.escape(f"{labels}:") + r"(\d+):", msg)]
    assert lines == sorted(lines)  # listed in the file's order


def test_csv_split_column_problems(tmp_path, source):
    def split_of(r: HandImage):
        if r.person == "0000000":
            return "train" if r.aspect == "dorsal_r" else "query"   # both sides
        if r.person == "0000001":
            return "test"                                            # test with query/gallery
        if r.person == "0000002":
            return "query"                                           # no gallery image
        if r.person == "0000003" and r.aspect == "dorsal_l":
            return ""                                                # partial column
        return "train" if int(r.person) < 6 else ("gallery" if r.path.endswith(("1.jpg", "6.jpg"))
                                                   else "query")

    root = csv_dataset(tmp_path / "bad", source, lambda r: (_image(r), r.person, r.aspect,
                                                            split_of(r)))
    with pytest.raises(DataError) as err:
        read_custom(root)
    msg = str(err.value)
    labels = root / LABELS_FILE
    assert re.search(re.escape(str(labels)) + r":\d+: empty split; with a split column every "
                                              r"row names its split", msg)
    assert f"{labels}: the split column mixes 'test'" in msg
    assert "person '0000000' is on the test side here and on the training side at" in msg
    assert "person '0000002' has query images of aspect dorsal_r but no gallery image" in msg


def test_csv_header_problems(tmp_path, source):
    root = csv_dataset(tmp_path / "bad", source, lambda r: (_image(r), r.aspect, r.aspect),
                       header=("image", "aspect", "aspect"))
    with pytest.raises(DataError) as err:
        read_custom(root)
    msg = str(err.value)
    assert f"{root / LABELS_FILE}:1: column 'aspect' appears 2 times" in msg
    assert f"{root / LABELS_FILE}:1: no 'person' column" in msg


def test_empty_root(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no person folders and no "
                                                  f"labels.csv")):
        read_custom(tmp_path)


# ---------------------------------------------------------------- through the parameters
def test_build_protocol_from_params(tmp_path, source):
    root = aspect_dataset(tmp_path / "aspects", source)
    params = resolve_params({"dataset": "custom", "data_root": str(root), "aspect": "dorsal_l",
                             "num_splits": 2}, stage="stage0")
    p = build_protocol(params)
    assert p.dataset == "custom" and p.aspect == "dorsal_l" and len(p.test) == 2
    assert p.source_hash == custom_source_hash(root, read_custom(root))
    check_protocol_invariants(p)
    assert build_protocol(params).manifest() == p.manifest()

    (root / sorted(os.listdir(root))[0] / ASPECT_FOLDERS["dorsal_l"] / "junk.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="junk.jpg: does not open as an image"):
        build_protocol(params)
    build_protocol(params, verify=False)  # no decoding asked for: the header is not read


def test_custom_without_data_root_is_a_parameter_error():
    """Refused when the parameters are resolved, before a run folder exists; build_protocol
    refuses it too when handed unresolved parameters."""
    with pytest.raises(ParamError, match="dataset 'custom' reads your own folder"):
        resolve_params({"dataset": "custom"}, stage="stage0")
    params = {**resolve_params({}, stage="stage0"), "dataset": "custom"}
    with pytest.raises(ParamError, match="dataset 'custom' needs data_root"):
        build_protocol(params)
