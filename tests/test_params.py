"""The shared parameter schema: defaults, coercion of papermill/YAML values, clear errors."""
import pytest

from handclip_nb.backbone_specs import BACKBONES
from handclip_nb.params import (SCHEMA, ParamError, load_params_file,
                                params_from_namespace, resolve_params)


def test_defaults_resolve_to_the_embedded_default():
    p = resolve_params(stage="stage0")
    assert p.backbone == "handclip-mini" and p.data_root is None  # the shipped default
    assert p.image_size == [96, 128]  # handclip-mini's (and the tiny backbones') 4:3 default
    assert p.output_dir == "outputs/stage0-11k-dorsal_r-handclip-mini-seed0"
    assert p.stage == "stage0"


def test_real_backbones_get_a_landscape_default_size():
    assert resolve_params(backbone="vitb16").image_size == [224, 288]
    assert resolve_params(backbone="rn50").image_size == [224, 288]


@pytest.mark.parametrize("name, value, expected", [
    ("epochs", "3", 3), ("epochs", 3.0, 3), ("lr", "1e-4", 1e-4), ("lr", 1, 1.0),
    ("flip_tta", "true", True), ("flip_tta", "False", False), ("image_size", "[64, 96]", [64, 96]),
    ("image_size", 128, [128, 128]), ("image_size", (64, 96), [64, 96]),
    ("data_root", "~/x", None),
])
def test_coercion(name, value, expected):
    p = resolve_params({name: value})
    if name == "data_root":
        assert not p.data_root.startswith("~")
    else:
        assert p[name] == expected


@pytest.mark.parametrize("name, value, fragment", [
    ("backbone", "vit-huge", "Valid values: " + ", ".join(BACKBONES)),
    ("aspect", "dorsal", "palmar_l"),
    ("epochs", -1, "must be >= 0"),
    ("epochs", "ten", "expected an integer"),
    ("epochs", True, "expected an integer"),
    ("lr", "fast", "expected a number"),
    ("lr", float("nan"), "finite"),
    ("flip_tta", "maybe", "true or false"),
    ("image_size", [0, 10], "positive integers"),
    ("image_size", "[1, 2, 3]", "[height, width]"),
    ("dataset", "market1501", "11k, hd"),
    ("data_root", "", "non-empty path"),
    ("device", "tpu", "'cuda:N'"),
    ("val_fraction", 1.0, "must be < 1"),
    ("seed", None, "a value is required"),
])
def test_bad_values_name_the_parameter_and_the_fix(name, value, fragment):
    with pytest.raises(ParamError) as err:
        resolve_params({name: value})
    msg = str(err.value)
    assert repr(name) in msg and fragment in msg
    assert "-p " in msg  # says how to fix it


def test_unknown_parameter_name_is_refused():
    with pytest.raises(ParamError, match="unknown parameter.*'backbne'"):
        resolve_params({"backbne": "vitb16"})


def test_unknown_stage():
    with pytest.raises(ParamError, match="unknown stage"):
        resolve_params(stage="stage9")


def test_namespace_picks_only_schema_names():
    ns = {"backbone": "tiny-rn", "np": object(), "_private": 1, "seed": 3}
    p = params_from_namespace(ns, "stage0")
    assert p.backbone == "tiny-rn" and p.seed == 3
    assert "np" not in p


def test_params_yaml_round_trip(tmp_path):
    import yaml

    p = resolve_params(seed=7)
    assert yaml.safe_load(p.to_yaml())["seed"] == 7


def test_params_files_in_repo_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "params").glob("*.yaml"))
    assert files, "params/ must hold at least the smoke parameters"
    for f in files:
        resolve_params(load_params_file(f))


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ParamError, match="does not exist"):
        load_params_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params_file(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochz: 3\n")
    with pytest.raises(ParamError, match="epochz"):
        load_params_file(typo)


def test_every_spec_default_is_valid():
    from handclip_nb.params import STAGES

    seen = set()
    for stage in STAGES:
        seen |= set(resolve_params(stage=stage))
    assert set(SCHEMA) <= seen


def test_stage_sections_override_common_values():
    values = {"epochs": 1, "lr": 0.1, "stage1": {"epochs": 120, "lr": 3.5e-4},
              "stage2": {"epochs": 60, "lr": 5e-6}}
    assert resolve_params(values, stage="stage1").epochs == 120
    p2 = resolve_params(values, stage="stage2")
    assert (p2.epochs, p2.lr) == (60, 5e-6)
    assert resolve_params(values, stage="stage0").epochs == 1
    with pytest.raises(ParamError, match="section 'stage2'"):
        resolve_params({"stage2": {"epochz": 3}}, stage="stage1")


def test_stage_specific_parameters_only_apply_to_their_stage():
    assert "n_ctx" in resolve_params(stage="stage1")
    assert "n_ctx" not in resolve_params(stage="stage2")
    assert resolve_params(stage="stage2").milestones == [24]
    assert resolve_params(stage="stage3").milestones == [48]  # a stage default
    with pytest.raises(ParamError, match="list of non-negative integers"):
        resolve_params({"milestones": "[a]"}, stage="stage2")


@pytest.mark.parametrize("backbone, s1_epochs, s2_lr, s2_epochs, s2_milestones",
                         [("vitb16", 120, 5e-6, 60, [30, 50]), ("rn50", 60, 3.5e-4, 120, [40, 70])])
@pytest.mark.parametrize("target", ["dorsal_r", "dorsal_l", "palmar_r", "palmar_l", "hd"])
def test_reference_params_follow_design(backbone, s1_epochs, s2_lr, s2_epochs, s2_milestones,
                                        target):
    """docs/methods.md: the CLIP-ReID settings, per backbone, on every 11k aspect and HD (the
    field-by-field comparison with CLIP-ReID's configs is tests/test_reference_params.py)."""
    from pathlib import Path

    values = load_params_file(Path(__file__).resolve().parents[1] / "params"
                              / f"{backbone}-{target}.yaml")
    s1 = resolve_params(values, stage="stage1")
    s2 = resolve_params(values, stage="stage2")
    assert s1.backbone == s2.backbone == backbone
    assert (s1.epochs, s1.lr, s1.weight_decay, s1.warmup_epochs) == (s1_epochs, 3.5e-4, 1e-4, 5)
    assert (s2.epochs, s2.lr, s2.warmup_epochs, s2.milestones) == (s2_epochs, s2_lr, 10,
                                                                    s2_milestones)
    assert (s2.p_ids, s2.k_images, s2.triplet_margin, s2.label_smoothing) == (16, 4, 0.3, 0.1)
    assert s1.center_features is False and s2.random_erasing == 0.5 and s2.grad_clip == 0.0
    assert s1.dataset == ("hd" if target == "hd" else "11k")
    assert s1.data_root is not None  # never silently the synthetic default


@pytest.mark.parametrize("target", ["dorsal_r", "palmar_l", "hd"])
@pytest.mark.parametrize("backbone", ["vitb16", "rn50"])
def test_reference_promptsg_params(backbone, target):
    from pathlib import Path

    values = load_params_file(Path(__file__).resolve().parents[1] / "params"
                              / f"{backbone}-{target}.yaml")
    s3 = resolve_params(values, stage="stage3")
    assert (s3.lr, s3.lr_new, s3.supcon_weight, s3.id_weight) == (5e-6, 5e-5, 0.5, 1.0)
    assert s3.prompt_mode == "simplified" and s3.init_from is None
