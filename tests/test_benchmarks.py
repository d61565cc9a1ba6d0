"""Smoke tests of the benchmark scripts: their functions run on tiny inputs and return the
figures' keys.  Nothing here is timed; the figures themselves are in benchmarks/README.md."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


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
@pytest.mark.usefixtures("kernel_threads")
def test_papermill_overhead_is_measured(training, tmp_path, monkeypatch):
    monkeypatch.setenv("HANDCLIP_HOME", str(tmp_path))
    data = training.make_dataset(tmp_path / "hands", 16, 4)
    row = training.measure_papermill("tiny-vit", data, tmp_path, epochs=1, p_ids=4, k_images=2,
                                     log=lambda *_: None)
    for key in ("papermill_s", "direct_train_s", "direct_cells_s"):
        assert row[key] > 0
    assert row["ratio_vs_train"] == pytest.approx(row["papermill_s"] / row["direct_train_s"])
    assert "| stage2_image.ipynb |" in training.papermill_table(row)


# --------------------------------------------------------------------------- data (decode cache)


@pytest.fixture(scope="module")
def data_bench():
    return _load("bench_data")


@pytest.fixture(scope="module")
def small_photos(data_bench, tmp_path_factory):
    """8 people x 4 aspects x 3 photos at 640x480: reduced-scale decoding applies (>= 2x 288)."""
    root = tmp_path_factory.mktemp("bench-data-photos")
    return data_bench.make_dataset(root, 8, 3, photo_size=(640, 480), progress=False)


def test_data_loading_measures_each_path_on_one_core(data_bench, small_photos, tmp_path):
    paths = data_bench.photo_paths(small_photos)[:6]
    res = data_bench.measure_loading(paths, tmp_path / "cache", chunk=3, warm_repeats=2,
                                     progress=False)
    assert res["threads"] == 1 and res["prepared_now"] == 6
    assert res["images"] == {"a_precache": 6, "b_cache_off": 6, "c_cache_on": 12,
                             "c_dataset": 12}
    for rate in [*res["images_per_s"].values(), *res["images_per_cpu_s"].values()]:
        assert rate > 0 and math.isfinite(rate)
    assert res["ratio_c_over_b"] == pytest.approx(
        res["images_per_s"]["c_cache_on"] / res["images_per_s"]["b_cache_off"])
    assert "(c)/(b) =" in data_bench.loading_table(res)


def test_data_prepare_reports_bytes_per_entry(data_bench, small_photos, tmp_path):
    paths = data_bench.photo_paths(small_photos)[:4]
    row = data_bench.measure_prepare(paths, tmp_path / "cache", workers=2, progress=False)
    assert row["built"] == row["images"] == 4 and row["images_per_s"] > 0
    # uint8 HxWx3 + the .npy header, then the source record (data/images.py): its JSON as a
    # second .npy array (128-byte header + the text), whose length depends on the path
    records = [128 + len(json.dumps({"source": os.path.abspath(p), "size": os.stat(p).st_size,
                                     "mtime_ns": os.stat(p).st_mtime_ns}).encode())
               for p in paths]
    assert row["entry_bytes"] == 224 * 288 * 3 + 128 + sum(records) / len(records)
    assert row["entry_allocated_bytes"] >= row["entry_bytes"]
    again = data_bench.measure_prepare(paths, tmp_path / "cache", workers=1, progress=False)
    assert again["built"] == 0  # every entry reused


def test_data_cache_size_of_11k(data_bench, real_handinfo, tmp_path):
    from handclip_nb.data.handinfo import read_handinfo

    size = data_bench.cache_size_11k(real_handinfo, 193664)
    assert size["images"] == len(read_handinfo(real_handinfo))
    assert size["bytes"] == size["images"] * 193664
    assert size["entry_bytes_in_blocks"] == 48 * 4096
    assert size["GiB_in_blocks"] == pytest.approx(size["images"] * 48 * 4096 / 2**30)
    assert data_bench.cache_size_11k(tmp_path / "missing.csv", 193664) is None


def test_data_quick_run_epochs_and_equal_metrics(data_bench, small_photos, tmp_path,
                                                 monkeypatch):
    monkeypatch.setattr(data_bench, "make_dataset", lambda *a, **k: small_photos)
    monkeypatch.setenv("HANDCLIP_HOME", str(tmp_path / "elsewhere"))
    res = data_bench.run(tmp_path, quick=True, people=8, images=3, photo_size=(640, 480),
                         handinfo=tmp_path / "missing.csv", loading=6, progress=False,
                         log=lambda *_: None)
    assert os.environ["HANDCLIP_HOME"] == str(tmp_path / "elsewhere")  # restored
    assert res["loading"]["paths"] == 6 and res["photos"] == 8 * 4 * 3
    home_cache = tmp_path / "home" / "outputs" / ".decode_cache"
    assert home_cache.is_dir()  # the package's default cache went to the private home
    epoch = res["epoch"]
    for run in (epoch["cache_off"], epoch["cache_on"]):
        assert run["seconds_per_epoch"] > 0 and run["cpu_seconds_per_epoch"] > 0
    assert epoch["cache_build"]["built"] == epoch["cache_build"]["images"] > 0
    assert epoch["loss_max_abs_diff"] == 0.0  # the same pixels, the same batches
    assert "untrained" in epoch["cache_on"]["backbone"]
    eq = res["equality"]
    assert eq["cache_identical"] is True
    assert set(eq["cache_on_vs_off"].values()) == {0.0}
    assert 0 <= eq["pixels"]["mean_abs"] <= eq["pixels"]["max_abs"] <= 255
    assert 0.9 < eq["cosine_min"] <= 1.0 + 1e-6
    assert res["size_11k"] is None and "missing" in res["size_11k_note"]
    for table in (data_bench.prepare_table(res["prepare"]), data_bench.epoch_table(epoch),
                  data_bench.equality_table(eq)):
        assert table.count("|") > 10


# --------------------------------------------------------------------------- GPU check


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


GPU_CHECK_KEYS = {"schema", "environment", "budget_s", "weights", "sections", "checks", "ok",
                  "elapsed_s", "table"}


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section_on_the_cpu(gpu_check, tmp_path, capsys):
    """``gpu_check.py --smoke``: the same sections as on a GPU, on this CPU with the tiny
    backbones; one table printed, the JSON with every key, every check passed."""
    import torch

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert GPU_CHECK_KEYS <= set(result) and result["ok"]
    env = result["environment"]
    assert env["mode"] == "smoke" and env["device"] == "cpu"
    assert {"torch", "torch_cuda", "torchvision", "git_commit", "date", "python"} <= set(env)
    sections = result["sections"]
    assert set(sections) == set(gpu_check.SECTIONS)
    assert all(s["status"] == "ran" and "error" not in s for s in sections.values())

    tests = sections["tests"]
    assert {"tests/test_gpu.py", "tests/test_promptsg.py"} <= set(tests["files"])
    assert tests["ok"] and tests["failed"] == tests["errors"] == 0 and tests["tests"] >= 6
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]  # the conftest hook skips them without CUDA

    assert {r["arch"] for r in sections["parity"]["rows"]} == {"tiny-vit", "tiny-rn"}
    assert all(r["ok"] for r in sections["parity"]["rows"])

    rows = sections["throughput"]["rows"]
    assert len(rows) == 2 * len(gpu_check.MODES) * len(gpu_check.PRECISIONS)
    for row in rows:
        assert gpu_check.UNTRAINED in row["model"]
        if row["precision"] == "fp16":
            assert "CUDA only" in row["skipped"]
        else:
            assert row["images_per_s"] > 0 and math.isfinite(row["images_per_s"])
    assert all(r["loss_finite"] for r in rows if r["mode"] == "train" and "loss" in r)

    stages = sections["stages"]
    assert stages["dataset"]["photos"] > 0
    assert [r["stage"] for r in stages["runs"]] == ["stage1", "stage2", "stage3"]
    assert all(r["finite"] and r["falling"] for r in stages["runs"])
    assert set(stages["evaluation"]) == {"stage2", "stage3"}
    assert all({"rank1", "mAP"} <= set(m) for m in stages["evaluation"].values())

    checkpoint = sections["checkpoint"]["result"]
    assert checkpoint["bytes"] > 0 and checkpoint["seconds"] > 0
    concurrency = sections["concurrency"]["rows"]
    assert [r["k"] for r in concurrency] == [1, 2]
    for row in concurrency:  # every run of a K trained, and their steps overlapped
        assert row["completed"] == row["k"] and row["aggregate_images_per_s"] > 0
        assert len({r["index"] for r in row["runs"]}) == row["k"]
        assert max(r["start_wall"] for r in row["runs"]) < min(r["end_wall"] for r in row["runs"])
    projection = sections["projection"]
    assert [r["runs_per_gpu"] for r in projection["rows"]] == [1, 2]
    assert all(r["runs"] == 130 and r["wall_s"] > 0 for r in projection["rows"])
    assert projection["assumed"] and projection["measurements"]["checkpoint_s"] > 0

    assert all(len(row) == 4 for row in result["table"])
    assert all(gpu_check.UNTRAINED in row[1] for row in result["table"]
               if row[0] in ("parity", "throughput") and row[1] != "elapsed")
    printed = capsys.readouterr().out
    assert "| section | item | value | notes |" in printed and f"wrote {out}" in printed


def test_gpu_check_skips_sections_past_its_budget(gpu_check, tmp_path):
    """A budget spent before a section starts skips it (and says why); the JSON is still
    written, and a check that verified nothing is not OK."""
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--budget-s", "0", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["ok"] is False and result["checks"] == []
    assert all(s["status"].startswith("skipped (budget") for s in result["sections"].values())
    assert [row[0] for row in result["table"]] == list(gpu_check.SECTIONS)


def test_gpu_check_full_plan_measures_the_real_architectures_untrained(gpu_check):
    plan = gpu_check.full_plan()
    assert plan.device == "cuda" and not plan.smoke
    assert [m.name for m in plan.models] == ["vitb16", "rn50"]
    assert plan.image_size == (224, 288) and plan.batch == 64 and plan.photo_size == (1600, 1200)
    assert plan.stage_model.name == "vitb16"
    assert plan.concurrency == (1, 2, 4, 8)
    assert set(plan.estimates) == set(gpu_check.SECTIONS)
    assert sum(plan.estimates.values()) < gpu_check.DEFAULT_BUDGET_S < 8 * 60
    backbone = gpu_check.random_backbone(plan.stage_model, plan.image_size)
    assert backbone.pretrained is False and "untrained" in backbone.display_name
    assert backbone.preprocess_config().image_size == (224, 288)
    assert sum(p.numel() for p in backbone.visual.parameters()) == 86_192_640 + 56 * 768  # 253 tokens


def test_gpu_check_collects_the_cuda_marked_test_files(gpu_check):
    names = {p.name for p in gpu_check.cuda_test_files()}
    assert {"test_gpu.py", "test_promptsg.py"} <= names
    assert "test_benchmarks.py" not in names


# --------------------------------------------------------------------------- custom search demo


@pytest.mark.slow  # every stage trained in this process: 17 s, outside make test-fast
def test_custom_search_demo_quick_runs_every_stage_and_the_search(tmp_path, monkeypatch):
    """benchmarks/custom_search_demo.py --quick: a custom folder dataset, stages 0-3 and the
    search notebook (its cells in this process), one table of figures."""
    demo = _load("custom_search_demo")
    monkeypatch.setenv("HANDCLIP_HOME", str(tmp_path))
    res = demo.run(tmp_path, quick=True, papermill=False, log=lambda *_: None)
    assert set(res["stages"]) == set(demo.STAGES)
    for stage in ("stage0", "stage2", "stage3"):
        figures = res["stages"][stage]
        assert 0 <= figures["rank1"] <= 100 and 0 <= figures["roc_auc"] <= 100
        assert figures["far_target"] == 1.0 and figures["far_test"] is not None
    search = res["search"]["stage2"]
    assert 0 <= search["top1_accuracy"] <= 100
    assert search["summary"]["image_queries"] == 4 * 2  # 4 test people x 2 other photos
    assert set(res["text"]["stage2"]) == set(demo.TEXTS)
    assert all(v is None or 0 <= v <= 100 for v in res["text"]["stage2"].values())
    assert "| search top-1 accuracy % (4 gallery photos, 8 queries) |" in res["table"]


# --------------------------------------------------------------------------- verification memory


def test_verification_benchmark_measures_and_compares_on_a_small_split():
    bench = _load("bench_verification")
    row = bench.measure(60)
    assert row["identical"] is True
    assert {"all_pairs_mb", "streamed_mb", "ranking_mb", "rerank_need_gb"} <= set(row)
    assert row["pairs"] == 3600 and row["streamed_mb"] > 0 and row["all_pairs_mb"] > 0


# --------------------------------------------------------------------------- campaign projection


@pytest.fixture(scope="module")
def campaign():
    return _load("campaign")


def test_the_campaigns_protocol_sizes_are_the_real_protocols(campaign, real_handinfo,
                                                             real_hd_listing, tmp_path):
    """PROTOCOL_IMAGES and DATASET_PHOTOS as the protocols of the real metadata give them
    (HD: the listing's names behind empty files, which is all read_hd looks at)."""
    import csv

    from handclip_nb.data.handinfo import read_handinfo, read_hd

    records = read_handinfo(real_handinfo)
    for aspect in ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l"):
        assert campaign.protocol_images("11k", aspect, records) == \
            campaign.PROTOCOL_IMAGES[("11k", aspect)], aspect
    with open(real_hd_listing) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        folder = tmp_path / "Original Images" / row["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / row["filename"]).touch()
    assert campaign.protocol_images("hd", "dorsal", read_hd(tmp_path)) == \
        campaign.PROTOCOL_IMAGES[("hd", "dorsal")]
    assert campaign.DATASET_PHOTOS == {"11k": len(records), "hd": len(rows)}


def test_the_campaign_runs_are_the_grids_runs_with_their_reference_epochs(campaign):
    runs = campaign.campaign_runs()
    assert len(runs) == 130 and sum(r.grid == "clipfh-11k" for r in runs) == 104
    for run in runs:
        target = run.aspect if run.dataset == "11k" else "hd"
        recipe = "clip-handid-" if run.stage == "handid" else ""
        reference = yaml.safe_load((REPO / "params" / f"{recipe}{run.backbone}-{target}.yaml")
                                   .read_text())
        if run.stage == "stage0":
            assert run.epochs == 0
            continue
        assert run.epochs == reference[run.stage]["epochs"], run.name
        if run.stage == "handid":
            assert run.batch_size == reference["batch_size"] == {"vitb16": 20, "rn50": 4}[
                run.backbone]
        elif run.stage != "stage1":
            assert (run.p_ids, run.k_images) == (16, 4)
    # 3 seeds x (4 aspects x 2 backbones + 2 backbones) of each trained stage
    assert sum(r.stage == "stage2" for r in runs) == 30
    assert sum(r.stage == "handid" for r in runs) == 30


def test_the_projection_formula_on_a_hand_computed_case(campaign):
    """Three runs on one protocol: zero-shot, stage 1 (2 epochs), stage 2 (3 epochs).

    GPU s: stage0 300/100 = 3; stage1 100/100 + 2 x 100/50 + 300/100 = 8; stage2 3 x 64/32 +
    200/100 = 8; sum 19. Host s: 10 each, stage 2 plus its checkpoints x 2 s. The loop's
    defaults (checkpoint_every 0, every 10 minutes): last.pt at the end + best.pt = 2
    checkpoints, 4 s: host 34. Every epoch: ceil(3/1) + 1 = 4, host 38; every 2 epochs:
    ceil(3/2) + 1 = 3, host 36; every 0.05 minutes (3 s) of the 8 GPU s: 1 + floor(8/3) + 1 =
    4, host 38. Decode 5 s.
    K = 1: 19 + 34 + 5 = 58; K = 2 at speed-up 1.6: 19/1.6 + 34/2 + 5 = 33.875."""
    images = {("11k", "dorsal_r"): {"train": 100, "pk_epoch": 64, "eval_fitted": 200,
                                    "eval_zero_shot": 300}}
    runs = [campaign.CampaignRun("g", "s0", "stage0", "vitb16", "11k", "dorsal_r", 0),
            campaign.CampaignRun("g", "s1", "stage1", "vitb16", "11k", "dorsal_r", 2),
            campaign.CampaignRun("g", "s2", "stage2", "vitb16", "11k", "dorsal_r", 3, 16, 4)]
    m = campaign.Measurements(train_images_s={("stage1", "vitb16"): 50.0,
                                              ("stage2", "vitb16"): 32.0},
                              extract_images_s={"vitb16": 100.0}, speedup={1: 1.0, 2: 1.6},
                              start_up_s=10.0, checkpoint_s=2.0, decode_once_s=5.0)
    one = campaign.project(runs, m, 1, images=images)
    assert (one["gpu_s"], one["host_s"], one["wall_s"]) == (19.0, 34.0, 58.0)
    assert one["grids"]["g"]["runs"] == 3
    assert campaign.project(runs, m, 2, images=images)["wall_s"] == pytest.approx(33.875)
    m.checkpoint_every = 1
    assert campaign.project(runs, m, 1, images=images)["host_s"] == 38.0
    m.checkpoint_every = 2
    assert campaign.project(runs, m, 1, images=images)["host_s"] == 36.0
    m.checkpoint_every, m.checkpoint_minutes = 0, 0.05
    assert campaign.project(runs, m, 1, images=images)["host_s"] == 38.0
    with pytest.raises(ValueError, match="no measured speed-up for 4 runs per GPU"):
        campaign.project(runs, m, 4, images=images)


def test_a_clip_handid_run_trains_whole_batches_of_its_fitted_images(campaign):
    """100 training images of 8 identities: 8 held out, 92 fitted, batches of 20 -> 80 images
    per epoch (the last 12 dropped). 2 epochs at 40 images/s: 4 s; the 8 held-out images
    encoded after each epoch at 100/s: 0.16 s; the evaluation's 200: 2 s. GPU 6.16 s."""
    images = {("11k", "dorsal_r"): {"train": 100, "train_ids": 8, "pk_epoch": 64,
                                    "eval_fitted": 200, "eval_zero_shot": 300}}
    run = campaign.CampaignRun("g", "h", "handid", "vitb16", "11k", "dorsal_r", 2, batch_size=20)
    m = campaign.Measurements(train_images_s={("handid", "vitb16"): 40.0},
                              extract_images_s={"vitb16": 100.0})
    gpu, _ = campaign.run_seconds(run, m, images)
    assert gpu == pytest.approx(6.16)
