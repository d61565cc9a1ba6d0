"""Synthetic provenance: the generator marks every dataset root it writes
(``handclip_synthetic.json``), :func:`handclip_nb.data.is_synthetic_dataset` reads the mark, and
every stage's ``metrics.json`` records it as ``synthetic``.
"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from builders import run_params
from handclip_nb.data import (SYNTHETIC_PROVENANCE_FILE, build_protocol, is_synthetic_dataset,
                              synthetic_provenance)
from handclip_nb.data import synthetic as syn
from handclip_nb.data.synthetic import generate_dataset
from handclip_nb.evaluate import compare
from handclip_nb.evaluate.protocol_eval import EvalResult, metrics_record, summarise

SMALL = dict(subjects=2, images_per_subject=2, image_size=(16, 12))


def _provenance(root) -> dict:
    return json.loads((root / SYNTHETIC_PROVENANCE_FILE).read_text(encoding="utf-8"))


def _unmarked_copy(root, dest):
    """The same dataset without the generator's mark: what real data looks like."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(SYNTHETIC_PROVENANCE_FILE))
    assert not (dest / SYNTHETIC_PROVENANCE_FILE).exists()
    return dest


# ----------------------------------------------------------------------------- the generator


def test_generator_marks_an_11k_root(tmp_path):
    root = generate_dataset(tmp_path / "a", seed=3, difficulty=0.25, **SMALL)
    record = _provenance(root)
    assert record["generator"] == "handclip_nb.data.synthetic" and record["synthetic"] is True
    assert {k: record[k] for k in ("layout", "subjects", "images_per_subject", "seed",
                                   "difficulty", "image_size")} == {
        "layout": "11k", "subjects": 2, "images_per_subject": 2, "seed": 3, "difficulty": 0.25,
        "image_size": [16, 12]}
    assert "package_version" in record
    # nothing in it depends on time or on the folder: equal arguments, equal bytes
    again = generate_dataset(tmp_path / "b", seed=3, difficulty=0.25, **SMALL)
    assert ((root / SYNTHETIC_PROVENANCE_FILE).read_bytes()
            == (again / SYNTHETIC_PROVENANCE_FILE).read_bytes())
    # regenerating into the same root (stale images removed) keeps the mark
    generate_dataset(root, seed=4, **SMALL)
    assert _provenance(root)["seed"] == 4
    assert not list(root.glob("*.tmp*"))  # written atomically, no temp file left


def test_generator_marks_an_hd_root(tmp_path):
    root = generate_dataset(tmp_path / "hd", layout="hd", distractors=2, seed=1, **SMALL)
    record = _provenance(root)
    assert record["synthetic"] is True and record["layout"] == "hd"
    assert (record["subjects"], record["distractors"]) == (2, 2)
    assert (root / "Original Images" / "1-501").is_dir()


def test_cli_marks_its_root(tmp_path):
    assert syn.main(["--root", str(tmp_path / "cli"), "--subjects", "2",
                     "--images-per-subject", "2", "--width", "16", "--height", "12"]) == 0
    api = generate_dataset(tmp_path / "api", **SMALL)
    assert ((tmp_path / "cli" / SYNTHETIC_PROVENANCE_FILE).read_bytes()
            == (api / SYNTHETIC_PROVENANCE_FILE).read_bytes())


# ----------------------------------------------------------------------------- the reader


def test_is_synthetic_dataset(tmp_path):
    root = generate_dataset(tmp_path / "gen", **SMALL)
    real = _unmarked_copy(root, tmp_path / "real")
    assert is_synthetic_dataset(None) is True  # data_root: None, the embedded synthetic hands
    assert is_synthetic_dataset({"data_root": None}) is True
    assert is_synthetic_dataset(root) is True and is_synthetic_dataset(str(root)) is True
    assert is_synthetic_dataset({"data_root": str(root)}) is True
    assert synthetic_provenance(root)["layout"] == "11k"
    assert is_synthetic_dataset(real) is False
    assert is_synthetic_dataset({"data_root": str(real)}) is False
    assert synthetic_provenance(real) is None


def test_a_corrupt_mark_still_means_synthetic(tmp_path):
    root = generate_dataset(tmp_path / "gen", **SMALL)
    (root / SYNTHETIC_PROVENANCE_FILE).write_text("{not json", encoding="utf-8")
    with pytest.warns(UserWarning, match="unreadable"):
        assert synthetic_provenance(root)["synthetic"] is True
    with pytest.warns(UserWarning, match="unreadable"):
        assert is_synthetic_dataset(root) is True


# ----------------------------------------------------------------------------- metrics.json


def _fake_results():
    per_split = [{"rank1": 50.0, "rank5": 60.0, "rank10": 70.0, "mAP": 40.0, "mAP_mbanet": 41.0,
                  "mINP": 30.0}]

    class _Split:
        metrics = {"cmc": np.linspace(0.5, 1.0, 20)}

    return {"test": EvalResult("test", [_Split()], summarise(per_split))}


def test_metrics_record_says_whether_the_data_is_synthetic(synthetic_11k, tmp_path):
    real = _unmarked_copy(synthetic_11k, tmp_path / "real")
    for root, expected in ((synthetic_11k, True), (real, False)):
        params = run_params("stage0", data_root=root, num_splits=1)
        protocol = build_protocol(params)
        record = metrics_record("stage0", params, protocol, _fake_results())
        assert record["synthetic"] is expected, root
        # the evaluation notebook's record says the same of its test data
        first = SimpleNamespace(info=SimpleNamespace(params=params, backbone_display="x"),
                                name="run", summary=record["test"],
                                test=SimpleNamespace(cmc=np.linspace(50, 100, 20)),
                                record=lambda: {"run": "run"})
        evaluation = compare.evaluation_record(params, protocol, [first])
        assert evaluation["synthetic"] is expected, root


def test_a_stage0_run_on_a_generated_root_writes_synthetic_true(synthetic_11k, tmp_path,
                                                                one_thread):
    from handclip_nb.evaluate import evaluate_backbone
    from handclip_nb.models import build_backbone
    from handclip_nb.runs import finish_run, read_metrics, start_run

    params = run_params("stage0", tmp_path / "stage0", synthetic_11k, num_splits=1)
    run = start_run(params)
    protocol = build_protocol(params)
    backbone = build_backbone("tiny-vit", image_size=params.image_size, seed=params.seed)
    results = evaluate_backbone(backbone, protocol, params)
    finish_run(run, metrics_record("stage0", params, protocol, results, backbone))
    assert read_metrics(tmp_path / "stage0")["synthetic"] is True
