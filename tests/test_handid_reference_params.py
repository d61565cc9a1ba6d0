"""The CLIP-HandID parameter files reproduce its released recipe field by field.

``REFERENCE`` is CLIP-HandID's recipe as a table, one row per field: the parameter, its value for
ViT-B/16 and for RN50, and the line of CLIP-HandID's code that sets it (github.com/nathanlem1/
CLIP-HandID; **T** = ``train_handID.py`` @ 6c0aa079, **M** = ``model/make_model_handID.py`` @
134daf47, **E** = ``eval_query_gallery_handID.py`` @ 313b0fac, **S** = ``losses/supcontrast.py``
@ 02f3bb5c, **L** = ``losses/softmax_loss.py`` @ a37bb1e5, **R** = ``utils/lr_scheduler.py`` @
533d801a, **C** = ``model/clip/model.py`` @ a37bb1e5). Every ``params/clip-handid-*.yaml`` is
resolved for the ``handid`` stage and compared with the table; a field may differ only if
``DEVIATIONS`` lists it (none today). ``python -m pytest -s tests/test_handid_reference_params.py
-k report`` prints the comparison and the field count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from handclip_nb import params as params_mod
from handclip_nb.models import handid as handid_mod
from handclip_nb.params import load_params_file, resolve_params
from handclip_nb.train.schedulers import image_stage_scheduler, lr_trajectory

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"
BACKBONES = ("vitb16", "rn50")
TARGETS = ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l", "hd")


@dataclass(frozen=True)
class Ref:
    name: str
    vit: Any
    rn50: Any
    source: str


REFERENCE: list[Ref] = [
    # --- input --------------------------------------------------------------------------------
    Ref("image_size", [224, 224], [224, 224], "T:281 --input_size (224, 224), train and test"),
    Ref("resize_mode", "squash", "squash",
        "T:321 Resize((256, 256)), T:328 / E:167 Resize((224, 224)): stretched, no letterbox"),
    Ref("train_resize", [256, 256], [256, 256],
        "T:321-322 Resize((256, 256)) then RandomCrop((224, 224))"),
    Ref("reduced_jpeg_decode", False, False,
        "T:351-354 torchvision ImageFolder: PIL decodes every pixel"),
    Ref("pixel_mean", [0.485, 0.456, 0.406], [0.485, 0.456, 0.406], "T:325, T:330 Normalize"),
    Ref("pixel_std", [0.229, 0.224, 0.225], [0.229, 0.224, 0.225], "T:325, T:330 Normalize"),
    Ref("rn_last_stride", 2, 1,
        "C:126 layer4 stride=1 (RN50); ViT: no ResNet stage, the parameter stays 2"),
    Ref("horizontal_flip", 0.5, 0.5, "T:323 RandomHorizontalFlip() (p 0.5)"),
    Ref("random_erasing", 0.0, 0.0, "T:254 --erasing_p 0, T:333-334"),
    Ref("color_jitter", 0.0, 0.0, "T:253 --color_jitter False, T:336-338"),
    # --- batches, seed, precision -------------------------------------------------------------
    Ref("batch_size", 20, 4, "T:250 --batch_size 20; T:287-288 RN50: args.batch_size = 4"),
    Ref("seed", 42, 42, "T:290-293 is_repr: set_seed(42)"),
    Ref("deterministic", True, True, "T:51-52, T:57 cudnn.deterministic, no benchmark, "
        "use_deterministic_algorithms(True)"),
    Ref("amp", False, False, "T:264, T:267 --fp16 / --bf16 False: fp32 (T:113-119)"),
    Ref("tf32", False, False,
        "fp32 matrix products: PyTorch's default, nothing in T changes it (see DEVIATIONS' "
        "note in docs/methods.md on cuDNN convolutions)"),
    # --- optimisation -------------------------------------------------------------------------
    Ref("epochs", 70, 70, "T:457-458 train_model(..., num_epochs=70)"),
    Ref("lr", 5e-6, 5e-6, "T:256 --lr 0.000005; T:379 the image encoder's group at lr"),
    Ref("lr_new", 5e-5, 5e-5, "T:380 new layers at 10*lr; T:80 10*lr every epoch"),
    Ref("weight_decay", 5e-4, 5e-4, "T:261 --optimizer adam; T:389-392 Adam(weight_decay=5e-4)"),
    Ref("warmup_epochs", 10, 10, "T:259 --warmup True; T:404-406 LRScheduler(warmup_epoch=10)"),
    Ref("warmup_factor", 0.01, 0.01,
        "T:406 warmup_begin_lr=0.01*args.lr; R:55-59 linear from it"),
    Ref("milestones", [40, 60], [40, 60], "T:404 LRScheduler(step=[40, 60])"),
    Ref("gamma", 0.5, 0.5, "T:405 factor=0.5; R:64-65"),
    Ref("lr_schedule", "workbench", "workbench",
        "T:77-80 lr_scheduler.update(epoch) with the 0-based epoch before it trains; R:54-66"),
    Ref("grad_clip", 0.0, 0.0, "T:143-151 backward, step: no clipping"),
    # --- loss ---------------------------------------------------------------------------------
    Ref("id_weight", 1.0, 1.0, "T:121-123 loss = sum(id_loss) over both classifiers"),
    Ref("label_smoothing", 0.1, 0.1,
        "T:255 --ls True; T:432-433 LabelSmoothingCrossEntropyLoss(); L:31 epsilon 0.1"),
    Ref("handid_supcon_weight", 1.0, 1.0, "T:131-135 loss = loss_i2t + loss_t2i + loss"),
    Ref("text_logits", "raw", "raw", "S:13 temperature 1.0, S:21 raw dot products"),
    Ref("handid_heads", "two", "two",
        "M:100-125 bottleneck + classifier on the CLS feature, bottleneck_proj + "
        "classifier_proj on the projected one; ID loss on both (T:121-123)"),
    Ref("classifier", "linear", "linear", "M:108-111 nn.Linear(bias=False), std 0.001 (M:34)"),
    Ref("handid_inversion_grad", False, False,
        "M:376 @torch.no_grad() on encode_text_with_placeholders (and M:426)"),
    Ref("handid_token", "mean", "mean",
        "M:422-423 pseudo_token_embeddings[b].mean(dim=0, keepdim=True) into the slot"),
    # --- selection and evaluation -------------------------------------------------------------
    Ref("selection", "best_accuracy", "best_accuracy",
        "T:166 val accuracy (T:139 the projected classifier's), T:180-182 epoch_acc >= best_acc, "
        "T:190 the best state kept; E:121 which_epoch 'best'"),
    Ref("eval_every", 1, 1, "T:84 a val phase every epoch"),
    Ref("patience", 0, 0, "T:72 every one of the 70 epochs runs"),
    Ref("flip_tta", True, True, "E:67-80 the features of the image and its mirror, summed"),
    Ref("num_splits", 10, 10, "E: N = 10 Monte-Carlo runs, gallery0..9 / query0..9"),
    Ref("ap_mode", "mbanet_trapezoid", "mbanet_trapezoid",
        "E:12 utils/evaluation_metrics.compute_CMC_mAP, MBA-Net's (trapezoid) AP"),
]

#: 11k files only: the gallery of every aspect's test identities (MBA-Net's)
REFERENCE_11K = [Ref("gallery_mode", "all", "all", "E: galleries 'gallery<i>_all' for data_type "
                     "11k")]


@dataclass(frozen=True)
class Deviation:
    ours: Any
    reason: str


#: The only differences from REFERENCE the files may hold (none: every field is CLIP-HandID's).
DEVIATIONS: dict[str, Deviation] = {}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _path(backbone: str, target: str) -> Path:
    return PARAMS_DIR / f"clip-handid-{backbone}-{target}.yaml"


def compare(path: Path, backbone: str, target: str) -> list[tuple[str, Any, Any, str]]:
    """(parameter, file value, CLIP-HandID value, source) of every compared field."""
    resolved = resolve_params(load_params_file(path), stage="handid")
    refs = REFERENCE + ([] if target == "hd" else REFERENCE_11K)
    return [(r.name, resolved[r.name], r.vit if backbone == "vitb16" else r.rn50, r.source)
            for r in refs]


def test_the_files_are_exactly_the_ten_targets():
    files = sorted(PARAMS_DIR.glob("clip-handid-*.yaml"))
    assert files == sorted(_path(b, t) for b in BACKBONES for t in TARGETS)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_reference_file_matches_clip_handid_field_by_field(backbone, target):
    path = _path(backbone, target)
    problems = []
    resolved = resolve_params(load_params_file(path), stage="handid")
    assert resolved["backbone"] == backbone
    assert resolved["dataset"] == ("hd" if target == "hd" else "11k")
    if target != "hd":
        assert resolved["aspect"] == target
    for name, ours, want, source in compare(path, backbone, target):
        if not _same(ours, want) and not (name in DEVIATIONS
                                          and _same(ours, DEVIATIONS[name].ours)):
            problems.append(f"{name} = {ours!r}, CLIP-HandID {want!r} ({source})")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_every_reference_row_cites_a_source_and_names_a_handid_parameter():
    names = [r.name for r in REFERENCE + REFERENCE_11K]
    assert len(names) == len(set(names))
    for ref in REFERENCE + REFERENCE_11K:
        assert ref.source.strip(), ref
        spec = params_mod.SCHEMA[ref.name]
        assert "common" in spec.stages or "handid" in spec.stages, ref.name


def test_reference_report(capsys):
    """Prints the compared fields and their count (run with -s)."""
    rows = compare(_path("vitb16", "dorsal_r"), "vitb16", "dorsal_r")
    print(f"CLIP-HandID reference: {len(rows)} fields compared per 11k file "
          f"({len(REFERENCE)} per HD file), {len(DEVIATIONS)} deviations")
    for name, ours, want, source in rows:
        print(f"| {name} | {ours!r} | {want!r} | {source} |")
    assert len(rows) == len(REFERENCE) + len(REFERENCE_11K)


def test_fixed_parts_of_the_recipe_in_code():
    """What is not a parameter but still CLIP-HandID's: the prompt and its placeholder
    (M:398, M:404), the inversion MLP (M:142 hidden 4 x the projected width; M:255, M:270-283
    Linear-LayerNorm-GELU-Dropout(0.5) twice, Linear-LayerNorm), the ranking feature (E:77
    features2[1] = cat of the two BN outputs, M:203), one pseudo-token (M:255 num_tokens=1)."""
    assert handid_mod.HANDID_TEMPLATE.format(token=handid_mod.HANDID_PLACEHOLDER) == \
        "A photo of a sks hand"
    mlp = handid_mod.InversionMLP(8, 6)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Dropout"] * 2 + ["Linear", "LayerNorm"]
    assert mlp.hidden == 32 and mlp[3].p == 0.5 and mlp[7].p == 0.5
    assert params_mod.HANDID_TOKEN_MODES == handid_mod.TOKEN_MODES
    assert params_mod.HANDID_HEAD_MODES == handid_mod.HEAD_MODES


@pytest.mark.parametrize("backbone", BACKBONES)
def test_lr_trajectory_is_clip_handids(backbone):
    """Both groups follow R's LRScheduler.update(epoch) for the 0-based epoch (T:77-80):
    0.01·lr + 0.99·lr·e/10 in the warmup, then lr·0.5^(#milestones <= e)."""
    p = resolve_params(load_params_file(_path(backbone, "dorsal_r")), stage="handid")
    encoder, new = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))

    def reference(e: int, base: float) -> float:
        if e < 10:
            return 0.01 * base + (base - 0.01 * base) * e / 10
        return base * 0.5 ** sum(1 for s in (40, 60) if s <= e)

    for group, base in ((0, 5e-6), (1, 5e-5)):
        optimizer = torch.optim.Adam([{"params": [encoder], "lr": p["lr"]},
                                      {"params": [new], "lr": p["lr_new"]}])
        traj = lr_trajectory(image_stage_scheduler(optimizer, p), p["epochs"], group=group)
        assert len(traj) == 70
        for e, lr in enumerate(traj):
            assert lr == pytest.approx(reference(e, base), rel=1e-9), (group, e)
