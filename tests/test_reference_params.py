"""The reference parameter files reproduce CLIP-ReID's recipe field by field.

``REFERENCE`` is CLIP-ReID's recipe as a table, one row per field: the parameter, its value in
CLIP-ReID's ViT-B/16 config and in its RN50 config, and where CLIP-ReID's code says so
(github.com/Syliz517/CLIP-ReID @ eb1898b; **V** = ``configs/person/vit_clipreid.yml``,
**C** = ``configs/person/cnn_clipreid.yml``, **D** = ``config/defaults.py``; other paths are
files of that repository). Every ``params/<backbone>-*.yaml`` is resolved per stage with
``resolve_params(load_params_file(f), stage=...)`` and compared with the table. A field may
differ only if ``DEVIATIONS`` lists it, with the value the files use and the reason; a listed
deviation that no longer differs fails too, so the list stays exactly the set of differences.
``python -m pytest -s tests/test_reference_params.py -k report`` prints the comparison.

The learning-rate trajectories the files produce are checked against the ones CLIP-ReID's
schedulers give (computed from their formulas; docs/methods.md lists them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from handclip_nb import params as params_mod
from handclip_nb.data.transforms import AugmentConfig
from handclip_nb.losses import TEXT_LOGITS
from handclip_nb.models.heads import TRIPLET_FEATURES, ReIDHead
from handclip_nb.params import load_params_file, resolve_params
from handclip_nb.train.schedulers import (LR_SCHEDULES, image_stage_scheduler, lr_trajectory,
                                          stage1_scheduler, warmup_cosine, warmup_multistep)

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"
BACKBONES = ("vitb16", "rn50")
TARGETS = ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l", "hd")
#: every stage that builds the backbone from the file's values
MODEL_STAGES = ("stage1", "stage2", "stage3")


@dataclass(frozen=True)
class Ref:
    stages: tuple[str, ...]
    name: str
    vit: Any
    rn50: Any
    source: str


REFERENCE: list[Ref] = [
    # --- input and backbone (every stage that builds the model) ----------------------------
    Ref(MODEL_STAGES, "image_size", [256, 128], [256, 128],
        "V:15-16, C:12-13 INPUT.SIZE_TRAIN / SIZE_TEST"),
    Ref(MODEL_STAGES, "resize_mode", "squash", "squash",
        "datasets/make_dataloader_clipreid.py:43-58 T.Resize(SIZE) to both sides"),
    Ref(MODEL_STAGES, "pixel_mean", [0.5, 0.5, 0.5], [0.485, 0.456, 0.406],
        "V:20, C:17 INPUT.PIXEL_MEAN"),
    Ref(MODEL_STAGES, "pixel_std", [0.5, 0.5, 0.5], [0.229, 0.224, 0.225],
        "V:21, C:18 INPUT.PIXEL_STD"),
    Ref(MODEL_STAGES, "rn_last_stride", 2, 1,
        "model/clip/model.py:120 layer4 stride=1 (RN50; MODEL.LAST_STRIDE, D:25, is never "
        "read); ViT: no ResNet stage, the parameter stays 2"),
    # --- stage 1: prompt learning ------------------------------------------------------------
    Ref(("stage1",), "epochs", 120, 60, "V:38, C:35 STAGE1.MAX_EPOCHS"),
    Ref(("stage1",), "lr", 3.5e-4, 3.5e-4, "V:32, C:29 STAGE1.BASE_LR"),
    Ref(("stage1",), "weight_decay", 1e-4, 1e-4,
        "V:36, C:33 STAGE1.WEIGHT_DECAY; solver/make_optimizer_prompt.py:10-11"),
    Ref(("stage1",), "batch_size", 64, 64, "V:30, C:27 STAGE1.IMS_PER_BATCH"),
    Ref(("stage1",), "warmup_epochs", 5, 5, "V:41, C:38 STAGE1.WARMUP_EPOCHS"),
    Ref(("stage1",), "warmup_lr_init", 1e-5, 1e-5, "V:33, C:30 STAGE1.WARMUP_LR_INIT"),
    Ref(("stage1",), "lr_min", 1e-6, 1e-6, "V:34, C:31 STAGE1.LR_MIN"),
    Ref(("stage1",), "lr_schedule", "clipreid", "clipreid",
        "processor/processor_clipreid_stage1.py:60-62 scheduler.step(epoch), epoch 1..MAX; "
        "solver/cosine_lr.py:62-92 (cosine on the absolute epoch)"),
    Ref(("stage1",), "text_logits", "raw", "raw",
        "loss/supcontrast.py:14,21 temperature 1.0, no L2 normalisation"),
    Ref(("stage1",), "center_features", False, False,
        "processor/processor_clipreid_stage1.py:43-53 raw image features"),
    Ref(("stage1",), "n_ctx", 4, 4, "model/make_model_clipreid.py:40-50 (4 X tokens per id)"),
    Ref(("stage1",), "selection", "last", "last",
        "V:38-39, C:35-36 CHECKPOINT_PERIOD = MAX_EPOCHS: the last epoch's prompts, "
        "every training identity"),
    # --- stage 2: image fine-tuning ----------------------------------------------------------
    Ref(("stage2",), "epochs", 60, 120, "V:53, C:50 STAGE2.MAX_EPOCHS"),
    Ref(("stage2",), "lr", 5e-6, 3.5e-4, "V:46, C:43 STAGE2.BASE_LR"),
    Ref(("stage2",), "weight_decay", 1e-4, 5e-4, "V:50, C:47 STAGE2.WEIGHT_DECAY"),
    Ref(("stage2",), "weight_decay_bias", 1e-4, 5e-4,
        "V:51, C:48 STAGE2.WEIGHT_DECAY_BIAS; solver/make_optimizer_prompt.py:37-39"),
    Ref(("stage2",), "bias_lr_factor", 2.0, 2.0,
        "V:57, C:54 STAGE2.BIAS_LR_FACTOR; solver/make_optimizer_prompt.py:37-39"),
    Ref(("stage2",), "warmup_epochs", 10, 10,
        "V:48, C:45 STAGE2.WARMUP_ITERS (the scheduler is stepped per epoch)"),
    Ref(("stage2",), "warmup_factor", 0.1, 0.01, "V:49, C:46 STAGE2.WARMUP_FACTOR"),
    Ref(("stage2",), "milestones", [30, 50], [40, 70], "V:59, C:56 STAGE2.STEPS"),
    Ref(("stage2",), "gamma", 0.1, 0.1, "V:60, C:57 STAGE2.GAMMA"),
    Ref(("stage2",), "lr_schedule", "clipreid", "clipreid",
        "processor/processor_clipreid_stage2.py:79 scheduler.step() at each epoch's start; "
        "solver/lr_scheduler.py:45-54"),
    Ref(("stage2",), "p_ids", 16, 16,
        "V:44 / C:41 STAGE2.IMS_PER_BATCH 64 over V:25 / C:22 NUM_INSTANCE 4"),
    Ref(("stage2",), "k_images", 4, 4, "V:25, C:22 DATALOADER.NUM_INSTANCE"),
    Ref(("stage2",), "id_weight", 0.25, 1.0, "V:8, C:7 MODEL.ID_LOSS_WEIGHT"),
    Ref(("stage2",), "triplet_weight", 1.0, 1.0, "V:9, C:8 MODEL.TRIPLET_LOSS_WEIGHT"),
    Ref(("stage2",), "i2t_weight", 1.0, 1.0, "V:10, C:9 MODEL.I2T_LOSS_WEIGHT"),
    Ref(("stage2",), "triplet_margin", 0.3, 0.3, "D:109 SOLVER.MARGIN; loss/make_loss.py:22"),
    Ref(("stage2",), "label_smoothing", 0.1, 0.1,
        "V:4, C:4 IF_LABELSMOOTH 'on'; loss/softmax_loss.py:17 epsilon=0.1"),
    Ref(("stage2",), "i2t_label_smoothing", 0.1, 0.1,
        "loss/make_loss.py:54-56 (the i2t logits go through the same smoothed xent)"),
    Ref(("stage2",), "text_logits", "raw", "raw",
        "processor/processor_clipreid_stage2.py:96-97 logits = image_features @ "
        "text_features.t()"),
    Ref(("stage2",), "triplet_features", "clipreid", "clipreid",
        "loss/make_loss.py:46-48 over model/make_model_clipreid.py:146 "
        "[img_feature_last, img_feature, img_feature_proj]"),
    Ref(("stage2",), "center_weight", 0.0, 0.0,
        "V:5, C:5 IF_WITH_CENTER 'no'; loss/make_loss.py:16"),
    Ref(("stage2",), "classifier", "linear", "linear",
        "model/make_model_clipreid.py:70-73 nn.Linear(bias=False)"),
    Ref(("stage2",), "random_erasing", 0.5, 0.5, "V:18, C:15 INPUT.RE_PROB"),
    Ref(("stage2",), "horizontal_flip", 0.5, 0.5, "V:17, C:14 INPUT.PROB"),
    Ref(("stage2",), "color_jitter", 0.0, 0.0,
        "datasets/make_dataloader_clipreid.py:43-52 (no colour jitter)"),
    Ref(("stage2",), "grad_clip", 0.0, 0.0,
        "processor/processor_clipreid_stage2.py (backward, scaler.step: no clipping)"),
    Ref(("stage2",), "amp", True, True, "processor/processor_clipreid_stage2.py:47,95 autocast"),
    Ref(("stage2",), "selection", "last", "last",
        "V:53-56, C:50-53 CHECKPOINT_PERIOD = EVAL_PERIOD = MAX_EPOCHS: every training "
        "identity, the last epoch"),
    # --- stage 3 (PromptSG; its own values are tests/test_params.py's): compared with stage 2
    # under the same training protocol
    Ref(("stage3",), "selection", "last", "last",
        "as stage 2: V:53-56, C:50-53 (the protocol stage 3 is compared under)"),
]


@dataclass(frozen=True)
class Deviation:
    ours: Any
    reason: str


#: The only differences from REFERENCE the files may hold (same in every stage and file).
DEVIATIONS: dict[str, Deviation] = {
    "image_size": Deviation(
        [224, 288],
        "hands are 4:3 landscape photos; CLIP-ReID's 256x128 is a standing person. 224 high "
        "(CLIP's pretraining height), 288 wide (the multiple of 32 nearest 4/3 x 224)"),
    "resize_mode": Deviation(
        "pad",
        "letterbox: stretching a hand changes its finger-length ratios, an identity cue"),
    "pixel_mean": Deviation(
        None,
        "CLIP's own statistics (the backbone's, None), with which the weights were "
        "pretrained; CLIP-ReID's (0.5 for ViT, ImageNet's for RN50) are not CLIP's. The "
        "reference values stay one override away (-p pixel_mean / -p pixel_std)"),
    "pixel_std": Deviation(None, "as pixel_mean"),
    "horizontal_flip": Deviation(
        0.0,
        "a mirrored right hand looks like a left hand, which 11k's protocol treats as "
        "another aspect (another identity)"),
}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _files(backbone: str) -> list[Path]:
    files = sorted(PARAMS_DIR.glob(f"{backbone}-*.yaml"))
    assert sorted(f.stem.split("-", 1)[1] for f in files) == sorted(TARGETS), files
    return files


def compare(path: Path) -> list[tuple[str, str, Any, Any, str]]:
    """(stage, parameter, file value, CLIP-ReID value, source) for every compared field."""
    backbone = path.stem.split("-", 1)[0]
    values = load_params_file(path)
    resolved = {s: resolve_params(values, stage=s) for s in MODEL_STAGES}
    rows = []
    for ref in REFERENCE:
        want = ref.vit if backbone == "vitb16" else ref.rn50
        for stage in ref.stages:
            assert ref.name in resolved[stage], f"{ref.name} is not a {stage} parameter"
            rows.append((stage, ref.name, resolved[stage][ref.name], want, ref.source))
    return rows


def comparison_report() -> str:
    lines = ["CLIP-ReID reference fields compared with params/<backbone>-*.yaml",
             "(V = configs/person/vit_clipreid.yml, C = configs/person/cnn_clipreid.yml, "
             "D = config/defaults.py; Syliz517/CLIP-ReID @ eb1898b)", "",
             "| stage | parameter | ViT-B/16 | RN50 | files | source |",
             "|---|---|---|---|---|---|"]
    for ref in REFERENCE:
        ours = {b: {compare_one(p, ref) for p in _files(b)} for b in BACKBONES}
        state = "deviation" if ref.name in DEVIATIONS else "equal"
        vit_ours = " / ".join(sorted(ours["vitb16"]))
        rn_ours = " / ".join(sorted(ours["rn50"]))
        lines.append(f"| {', '.join(ref.stages)} | {ref.name} | {ref.vit!r} | {ref.rn50!r} | "
                     f"{state}: vitb16 {vit_ours}, rn50 {rn_ours} | {ref.source} |")
    lines += ["", "Deviations (the only fields that differ, in every file):"]
    lines += [f"- {name} = {d.ours!r}: {d.reason}" for name, d in DEVIATIONS.items()]
    return "\n".join(lines)


def compare_one(path: Path, ref: Ref) -> str:
    values = load_params_file(path)
    return repr(resolve_params(values, stage=ref.stages[0])[ref.name])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_reference_file_matches_clipreid_field_by_field(backbone, target):
    path = PARAMS_DIR / f"{backbone}-{target}.yaml"
    differ, problems = set(), []
    for stage, name, ours, want, source in compare(path):
        if _same(ours, want):
            if name in DEVIATIONS:
                problems.append(f"{stage}.{name} = {ours!r} equals CLIP-ReID's ({source}) but "
                                f"is listed as a deviation: remove it from DEVIATIONS")
            continue
        differ.add(name)
        if name not in DEVIATIONS:
            problems.append(f"{stage}.{name} = {ours!r}, CLIP-ReID {want!r} ({source}): an "
                            f"unlisted difference")
        elif not _same(ours, DEVIATIONS[name].ours):
            problems.append(f"{stage}.{name} = {ours!r}, but the listed deviation is "
                            f"{DEVIATIONS[name].ours!r}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
    assert differ == set(DEVIATIONS), (path.name, sorted(differ), sorted(DEVIATIONS))


def test_every_reference_row_cites_a_source_and_names_a_schema_parameter():
    seen = set()
    for ref in REFERENCE:
        assert ref.source.strip(), ref
        spec = params_mod.SCHEMA[ref.name]
        for stage in ref.stages:
            assert "common" in spec.stages or stage in spec.stages, (ref.name, stage)
            assert (stage, ref.name) not in seen, f"{stage}.{ref.name} listed twice"
            seen.add((stage, ref.name))
    assert set(DEVIATIONS) <= {r.name for r in REFERENCE}
    # the ones the issue names explicitly
    assert {"pixel_mean", "pixel_std", "horizontal_flip", "random_erasing",
            "bias_lr_factor"} <= {r.name for r in REFERENCE}


def test_reference_report(capsys):
    """Prints every compared field (run with -s): the table quoted in docs and notes."""
    report = comparison_report()
    print(report)
    assert report.count("\n| ") == len(REFERENCE) + 1  # header + one line per row


def test_fixed_parts_of_the_recipe_in_code():
    """What is not a parameter but still CLIP-ReID's: pad 10 before the random crop
    (V:19, C:16 INPUT.PADDING), the test feature = pre-BN concatenation (V:67, C:64
    TEST.NECK_FEAT 'before'), L2-normalised as a whole at evaluation (V:68 FEAT_NORM)."""
    assert AugmentConfig().pad == 10
    head = ReIDHead((6, 4), 3)
    assert head.test_feature == "pre_bn"
    a, b = torch.randn(5, 6), torch.randn(5, 4)
    head.eval()
    assert torch.equal(head([a, b]).embedding_for_test, torch.cat([a, b], 1))


def test_option_values_are_the_same_in_schema_and_code():
    assert params_mod.TEXT_LOGIT_FORMS == TEXT_LOGITS
    assert params_mod.TRIPLET_FEATURE_SETS == TRIPLET_FEATURES
    assert params_mod.LR_SCHEDULES == LR_SCHEDULES


# --------------------------------------------------------------------------------------------------
# learning-rate trajectories of the reference files vs CLIP-ReID's schedulers
# --------------------------------------------------------------------------------------------------


def _trajectory(backbone: str, stage: str, group: int = 0) -> list[float]:
    p = resolve_params(load_params_file(PARAMS_DIR / f"{backbone}-dorsal_r.yaml"), stage=stage)
    if stage == "stage1":
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=p["lr"])
        return lr_trajectory(stage1_scheduler(opt, p), p["epochs"])
    weights, bias = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [weights], "lr": p["lr"]},
                            {"params": [bias], "lr": p["lr"] * p["bias_lr_factor"]}])
    return lr_trajectory(image_stage_scheduler(opt, p), p["epochs"], group=group)


def _at(traj: list[float], epoch: int) -> float:
    return traj[epoch - 1]  # 1-based epochs, as CLIP-ReID counts them


@pytest.mark.parametrize("backbone, epochs", [("vitb16", 120), ("rn50", 60)])
def test_stage1_lr_trajectory_is_clipreids(backbone, epochs):
    traj = _trajectory(backbone, "stage1")
    assert len(traj) == epochs
    for epoch, want in ((1, 7.8e-5), (2, 1.46e-4), (3, 2.14e-4), (4, 2.82e-4)):
        assert _at(traj, epoch) == pytest.approx(want, rel=1e-9), epoch
    # epoch 5: the cosine at t = 5 of T (not shifted by the warmup), just below the base lr
    t5 = 1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + math.cos(math.pi * 5 / epochs))
    assert _at(traj, 5) == pytest.approx(t5, rel=1e-9)
    # ≈ 3.49e-4 for ViT-B/16 (T = 120), as in the reference notes; 3.44e-4 for RN50 (T = 60)
    assert _at(traj, 5) == pytest.approx(3.485e-4 if epochs == 120 else 3.440e-4, abs=1e-7)
    assert _at(traj, epochs) == pytest.approx(1e-6, rel=1e-9)  # lr_min at the last epoch
    assert all(a >= b for a, b in zip(traj[4:], traj[5:]))  # decreasing after the warmup
    assert min(traj) == pytest.approx(1e-6, rel=1e-9)


def test_stage2_lr_trajectory_is_clipreids_vit():
    traj = _trajectory("vitb16", "stage2")
    assert len(traj) == 60
    assert _at(traj, 1) == pytest.approx(9.5e-7, rel=1e-9)
    assert _at(traj, 2) == pytest.approx(1.4e-6, rel=1e-9)
    for e in range(1, 10):  # linear warmup: factor 0.1·(1 − e/10) + e/10
        assert _at(traj, e) == pytest.approx(5e-6 * (0.1 + 0.9 * e / 10), rel=1e-9)
    assert all(_at(traj, e) == pytest.approx(5e-6, rel=1e-9) for e in range(10, 30))
    assert all(_at(traj, e) == pytest.approx(5e-7, rel=1e-9) for e in range(30, 50))
    assert all(_at(traj, e) == pytest.approx(5e-8, rel=1e-9) for e in range(50, 61))


def test_stage2_lr_trajectory_is_clipreids_rn50():
    traj = _trajectory("rn50", "stage2")
    assert len(traj) == 120
    assert _at(traj, 1) == pytest.approx(3.815e-5, rel=1e-9)  # 3.5e-4 · (0.01·0.9 + 0.1)
    assert _at(traj, 10) == pytest.approx(3.5e-4, rel=1e-9)
    assert all(_at(traj, e) == pytest.approx(3.5e-4, rel=1e-9) for e in range(10, 40))
    assert all(_at(traj, e) == pytest.approx(3.5e-5, rel=1e-9) for e in range(40, 70))
    assert all(_at(traj, e) == pytest.approx(3.5e-6, rel=1e-9) for e in range(70, 121))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_stage2_bias_group_runs_at_twice_the_lr(backbone):
    main, bias = _trajectory(backbone, "stage2", 0), _trajectory(backbone, "stage2", 1)
    assert all(b == pytest.approx(2 * m, rel=1e-12) for m, b in zip(main, bias))


def test_workbench_schedules_are_unchanged_by_the_new_options():
    """The defaults reproduce the schedules the notebooks and goldens ran with."""
    def fresh(lr=1e-2):
        return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)

    p1 = resolve_params(stage="stage1")
    assert lr_trajectory(stage1_scheduler(fresh(), p1), p1.epochs) == \
        lr_trajectory(warmup_cosine(fresh(), p1.epochs, p1.warmup_epochs), p1.epochs)
    p2 = resolve_params(stage="stage2")
    assert lr_trajectory(image_stage_scheduler(fresh(), p2), p2.epochs) == \
        lr_trajectory(warmup_multistep(fresh(), p2.milestones, p2.gamma, p2.warmup_epochs),
                      p2.epochs)
