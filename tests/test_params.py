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


# ------------------------------------------------- the command line wins over a file's section


def test_an_explicit_value_wins_over_the_running_stages_section():
    """A file's section wins over its own common values; a value the user names (-p, a grid
    axis, a keyword override) wins over every section."""
    values = {"lr": 0.1, "stage1": {"epochs": 120, "lr": 3.5e-4}}
    assert resolve_params(values, stage="stage1").epochs == 120
    assert resolve_params({**values, "epochs": 1}, stage="stage1", explicit={"epochs"}).epochs == 1
    assert resolve_params(values, stage="stage1", epochs=1).epochs == 1
    # equal to the notebook's default is still the user's value
    default = SCHEMA["epochs"].default_for("stage1")
    assert resolve_params({**values, "epochs": default}, stage="stage1",
                          explicit={"epochs"}).epochs == default


def test_papermill_given_names_are_read_from_the_injected_cell():
    from handclip_nb.params import papermill_given_names

    history = ["", "epochs = 30\nlr = 0.001\n", "# Parameters\nepochs = 1\nstage1 = {\"lr\": 0.5}\n",
               "params = params_from_namespace(globals(), stage='stage1')"]
    assert papermill_given_names(history) == {"epochs", "stage1"}
    assert papermill_given_names(["", "# Parameter\nepochs = 1\n"]) == frozenset()
    assert papermill_given_names(None) == frozenset()
    # a notebook re-run with another injection: the latest one counts
    assert papermill_given_names(history + ["# Parameters\nlr = 0.2\n"]) == {"lr"}


def test_params_from_namespace_lets_a_papermill_value_beat_the_section(capsys):
    namespace = {"epochs": 30, "lr": 0.5, "stage1": {"epochs": 3, "lr": 1e-2},
                 "In": ["", "epochs = 30\n", "# Parameters\nepochs = 30\nstage1 = {}\n"]}
    p = params_from_namespace(namespace, stage="stage1")
    assert (p.epochs, p.lr) == (30, 1e-2)  # -p epochs 30 (= the default) wins; lr was not given
    assert "epochs = 30 (given explicitly) wins over section stage1's epochs: 3" in \
        capsys.readouterr().out
    del namespace["In"]  # outside a papermill kernel nothing was injected: the section applies
    assert params_from_namespace(namespace, stage="stage1").epochs == 3


def test_a_params_file_sets_each_name_once_per_stage(tmp_path):
    f = tmp_path / "twice.yaml"
    f.write_text("epochs: 5\nstage1:\n  epochs: 120\n")
    with pytest.raises(ParamError, match=r"'epochs' is set at the top level \(5\) and in section "
                                         r"'stage1' \(120\)"):
        load_params_file(f)


@pytest.mark.slow
def test_papermill_p_beats_a_section_of_its_f_file(tmp_path):
    """The issue's command: ``papermill stage1_prompt.ipynb out.ipynb -f params/smoke.yaml -p
    epochs 30``, with the real notebook's cells up to its parameters (papermill, a kernel, its
    injected cell). smoke.yaml's stage1 section says 3 epochs; 30 is also the notebook's
    default, so only the injected cell can tell that the user asked for it. No "Passed unknown
    parameter" warning for the file's sections."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    nb = json.loads((repo / "notebooks" / "stage1_prompt.ipynb").read_text())
    cells = []
    for cell in nb["cells"]:
        cells.append(cell)
        if "params_from_namespace(globals()" in "".join(cell["source"]):
            break
    probe = {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
             "source": ["print('RESOLVED', params.epochs, params.lr, params.batch_size)"]}
    nb["cells"] = cells + [probe]
    src = tmp_path / "stage1_head.ipynb"
    src.write_text(json.dumps(nb))
    out = tmp_path / "out.ipynb"
    done = subprocess.run([sys.executable, "-m", "papermill", str(src), str(out), "-f",
                           str(repo / "params" / "smoke.yaml"), "-p", "epochs", "30",
                           "-p", "output_dir", str(tmp_path / "run"), "--cwd", str(repo)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Passed unknown parameter" not in done.stderr
    text = "".join("".join(o.get("text", "")) for c in json.loads(out.read_text())["cells"]
                   for o in c.get("outputs", []))
    assert "RESOLVED 30 0.01 32" in text  # -p epochs; the section's lr and batch_size
    assert "epochs = 30 (given explicitly) wins over section stage1's epochs: 3" in text
