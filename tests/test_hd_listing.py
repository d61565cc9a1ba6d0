"""HD on real file names: placeholder images for every name of ``hd_listing.csv`` (the real
dataset's layout and naming) must give MBA-Net's published HD split, count for count."""
import csv
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from builders import run_params
from handclip_nb.data import build_protocol
from handclip_nb.data.handinfo import read_hd

# MBA-Net's HD split as logged on the real data (docs/protocols.md#hd-polyu-hand-dorsal)
PUBLISHED_HD = {
    "train_ids": 251, "train_images": 2407,  # MBA-Net: 2,156 train + 251 val
    "test_ids": 251, "test_images": 2243,
    "queries_per_split": 1992,
    "gallery_per_split": 1593,  # 251 test images + the 1,342 images of 502-712
    "gallery_classes_per_split": 464,  # 251 test ids + the 213 distractor ids
}
DISTRACTOR_IDS, DISTRACTOR_IMAGES = 213, 1342


def _listing(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        return [(row["folder"], row["filename"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def placeholder_hd(real_hd_listing, tmp_path_factory) -> Path:
    """The listing's layout with one tiny 8x6 JPEG (the same bytes) behind every name."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (180, 140, 120)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    root = tmp_path_factory.mktemp("hd_placeholder")
    rows = _listing(real_hd_listing)
    for folder in {f for f, _ in rows}:
        (root / "Original Images" / folder).mkdir(parents=True)
    for folder, name in rows:
        (root / "Original Images" / folder / name).write_bytes(jpeg)
    return root


def _main_ids(rows) -> list[int]:
    return sorted({int(name.split("_")[0]) for folder, name in rows if folder == "1-501"})


def test_listing_is_the_real_shape(real_hd_listing):
    rows = _listing(real_hd_listing)
    assert len(rows) == 4650 + DISTRACTOR_IMAGES
    names = [n for _, n in rows]
    assert any(n.endswith(".JPG") for n in names) and any(n.endswith(".jpg") for n in names)
    assert "552_IMG_7278.JPG" in names and "239_31 (0).jpg" in names
    main = _main_ids(rows)
    distract = {int(n.split("_")[0]) for f, n in rows if f == "502-712"}
    assert len(main) == 502 and max(main) == 732 and len(distract) == DISTRACTOR_IDS
    assert distract & set(main)  # 502-712 reuses numbers of 1-501


def test_sorted_first_half_is_mbanet_id_447_rule(real_hd_listing):
    """The workbench's rule (sorted ids, first ⌈n/2⌉) and MBA-Net's (id <= 447) agree."""
    ids = _main_ids(_listing(real_hd_listing))
    first_half = ids[:math.ceil(len(ids) / 2)]
    assert first_half == [i for i in ids if i <= 447]
    assert len(first_half) == 251 and first_half[-1] == 447 and ids[251] > 447


def test_hd_reader_labels_real_names(placeholder_hd, real_hd_listing):
    records = read_hd(placeholder_hd)
    assert len(records) == len(_listing(real_hd_listing))
    for r in records:
        folder, name = r.path.split("/")[1:]
        number = str(int(name.split("_")[0]))
        assert r.person == ("d" + number if folder == "502-712" else number)
        assert r.distractor == (folder == "502-712")


def test_hd_protocol_reproduces_the_published_counts(placeholder_hd, real_hd_listing):
    p = build_protocol(run_params("stage0", data_root=placeholder_hd, dataset="hd",
                                  num_splits=10))
    sizes = p.sizes()
    assert {k: sizes[k] for k in PUBLISHED_HD} == PUBLISHED_HD
    # MBA-Net's split: 251 val images (one per training id) + 2,156 train images
    assert len(p.val_images) == 251
    assert sizes["train_images"] - len(p.val_images) == 2156
    assert [int(x) for x in p.train_people] == [i for i in _main_ids(_listing(real_hd_listing))
                                               if i <= 447]
    distractors = [i for i, it in enumerate(p.items) if it.distractor]
    assert len(distractors) == DISTRACTOR_IMAGES
    assert len({p.identities[i] for i in distractors}) == DISTRACTOR_IDS
    assert not {p.items[i].person for i in p.fit} & {p.items[i].person for i in distractors}
    for split in p.test:  # every split, not only the first
        assert len(split.query) == PUBLISHED_HD["queries_per_split"]
        assert len(split.gallery) == PUBLISHED_HD["gallery_per_split"]
        assert len({p.identities[i] for i in split.gallery}) == 464
        q_ids = set(p.ids_of(split.query))
        # a distractor never matches a query, though 182 of their numbers are test/train ids
        assert not q_ids & {p.identities[i] for i in distractors}
        assert all(not p.items[i].distractor for i in split.query)
        # every query has exactly one true match: its identity's gallery image
        g_ids = list(p.ids_of(split.gallery))
        assert all(g_ids.count(q) == 1 for q in q_ids)


def test_training_images_follow_mbanet_train_all_not_the_scripts_default_train(placeholder_hd):
    """MBA-Net's and CLIP-HandID's HD split scripts are the same (docs/protocols.md#hd-polyu-
    hand-dorsal), and so are their training scripts' defaults: train on ``train`` (each training
    identity's images less its one random ``val`` image: 2,156) and keep the epoch with the best
    classification accuracy on ``val`` (MBA-Net train.py:164, CLIP-HandID train_handID.py). The
    workbench's selection ``last`` trains on ``train_all`` (2,407, the scripts' ``--train_all``):
    the val image stays in the training data, and no epoch is chosen."""
    p = build_protocol(run_params("stage2", data_root=placeholder_hd, dataset="hd",
                                  num_splits=1, selection="last"))
    assert p.selection is None and p.selection_people == []
    assert len(p.fit) == PUBLISHED_HD["train_images"] == 2407  # train_all
    assert set(p.val_images) <= set(p.fit)
    assert len(set(p.fit) - set(p.val_images)) == 2156  # the scripts' default `train`
    assert len({p.items[i].person for i in p.val_images}) == 251  # one per training identity


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.usefixtures("kernel_threads")
def test_stage0_notebook_on_placeholder_hd(placeholder_hd, workbench_home):
    """A real papermill run of the stage-0 notebook records the published HD counts (about
    30 s on a loaded 2-core machine: ~3,600 test and selection images at 32x32)."""
    from handclip_nb.pipeline import run_notebook
    from handclip_nb.runs import read_metrics

    out = workbench_home / "outputs" / "s0-hd"
    run_notebook("stage0_zeroshot.ipynb", workbench_home / "s0-hd.ipynb",
                 {"dataset": "hd", "data_root": str(placeholder_hd), "backbone": "tiny-rn",
                  "image_size": [32, 32], "num_splits": 1, "feature_cache": False, "split_seed": 3,
                  "output_dir": str(out)}, progress=False)
    m = read_metrics(out)
    assert m["dataset"] == "hd" and m["split_seed"] == 3
    assert {k: m["data"][k] for k in PUBLISHED_HD} == PUBLISHED_HD
    manifest = json.loads((out / "splits.json").read_text())
    assert manifest["seed"] == 3 and manifest["content_hash"] == m["splits_hash"]
    print("stage-0 HD data:", m["data"])
