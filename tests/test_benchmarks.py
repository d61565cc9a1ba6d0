"""Smoke tests of the benchmark scripts: their functions run on tiny inputs and return the
figures' keys.  Nothing here is timed; the figures themselves are in benchmarks/README.md."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def arch():
    return _load("bench_architectures")


@pytest.fixture(scope="module")
def training():
    return _load("bench_training")


# --------------------------------------------------------------------------- architectures

ROW_KEYS = {"arch", "model", "weights", "pretrained", "image_size", "mode", "device", "precision",
            "batch", "images_per_s", "s_per_iter", "peak_mb", "delta_mb", "mem_method"}


def test_architecture_rows_have_figures_and_say_random_weights(arch, monkeypatch, one_thread):
    from handclip_nb.backbone_specs import TINY_VIT_ARCH

    # a tiny architecture through the same code path (the real ones take seconds per step)
    monkeypatch.setitem(arch.ARCHS, "tiny-test", dict(TINY_VIT_ARCH))
    configs = arch.plan(True, ["tiny-test"], [(32, 32)], cuda=False)
    assert [c["mode"] for c in configs] == ["extract", "train"]
    rows = arch.run(configs, subprocess_per_row=False, log=lambda *_: None)
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["pretrained"] is False
        assert row["weights"] == "random init (architecture benchmark only)"
        assert "random init (architecture benchmark only)" in row["model"]
        assert row["images_per_s"] > 0 and math.isfinite(row["images_per_s"])
        assert row["peak_mb"] > 0 and row["delta_mb"] >= 0
    assert "random init (architecture benchmark only)" in arch.table(rows)


def test_real_architectures_are_built_with_random_weights(arch):
    expected_visual_params = {"vitb16": 86_192_640, "rn50": 38_316_896}  # at 224 x 224
    for name, count in expected_visual_params.items():
        bb = arch.build_random(name, (224, 224))
        assert bb.pretrained is False and bb.weights_label == arch.WEIGHTS_LABEL
        assert sum(p.numel() for p in bb.visual.parameters()) == count
        assert bb.set_image_size((224, 288)).image_size == (224, 288)


def test_gpu_plan_measures_fp32_fp16_bf16(arch):
    rows = arch.plan(False, ["vitb16"], [(224, 288)], cuda=True)
    gpu = [r for r in rows if r["device"] == "cuda"]
    assert {r["amp"] for r in gpu} == {None, "fp16", "bf16"}
    assert {r["mode"] for r in gpu} == {"extract", "train"}
    with pytest.raises(ValueError, match="CUDA only"):
        arch.measure("vitb16", (224, 224), "extract", 1, 1, device="cpu", amp="fp16")


@pytest.mark.slow
def test_architecture_worker_subprocess_real_rn50(arch):
    row = arch.measure_in_subprocess(dict(arch="rn50", image_size=[64, 64], mode="extract",
                                          batch=1, iters=1, warmup=0, device="cpu", amp=None))
    assert ROW_KEYS <= set(row) and row["arch"] == "rn50" and row["pretrained"] is False
    assert row["images_per_s"] > 0 and row["peak_mb"] > 0


# --------------------------------------------------------------------------- training


def test_throughput_skips_warmup_and_validated_epochs(training):
    history = [{"epoch": 1, "images": 32, "seconds": 10.0},
               {"epoch": 2, "images": 32, "seconds": 1.0},
               {"epoch": 3, "images": 32, "seconds": 1.0},
               {"epoch": 4, "images": 32, "seconds": 5.0, "val": {"mAP": 1.0}}]
    assert training.throughput(history) == (32.0, 64, 2.0, 2)
    assert training.throughput(history[:1])[0] == pytest.approx(3.2)  # nothing steady: fall back


def test_training_quick_run_gives_images_per_second_per_stage(training, tmp_path, one_thread):
    res = training.run(["tiny-vit", "no-such-backbone"], quick=True, workdir=tmp_path,
                       papermill=False, log=lambda *_: None)
    assert res["backbones"] == ["tiny-vit"]
    assert any(n.startswith("no-such-backbone: skipped") for n in res["notes"])
    assert [r["stage"] for r in res["throughput"]] == ["stage1", "stage2", "stage3"]
    for row in res["throughput"]:
        assert row["images_per_s"] > 0 and math.isfinite(row["images_per_s"])
        assert row["steady_images"] > 0 and row["seconds_per_epoch"] > 0
        assert "untrained" in row["backbone"]
    assert "| stage2 |" in training.throughput_table(res["throughput"])


def test_direct_run_resolves_the_notebooks_own_defaults(training, tmp_path):
    p = training.notebook_params("stage2_image.ipynb", {"output_dir": str(tmp_path),
                                                        "epochs": 2}, "stage2")
    assert p.epochs == 2 and p.random_erasing == 0.0  # the notebook's default, not the schema's


@pytest.mark.slow
@pytest.mark.notebook
def test_papermill_overhead_is_measured(training, tmp_path, monkeypatch):
    monkeypatch.setenv("HANDCLIP_HOME", str(tmp_path))
    data = training.make_dataset(tmp_path / "hands", 16, 4)
    row = training.measure_papermill("tiny-vit", data, tmp_path, epochs=1, p_ids=4, k_images=2,
                                     log=lambda *_: None)
    for key in ("papermill_s", "direct_train_s", "direct_cells_s"):
        assert row[key] > 0
    assert row["ratio_vs_train"] == pytest.approx(row["papermill_s"] / row["direct_train_s"])
    assert "| stage2_image.ipynb |" in training.papermill_table(row)
