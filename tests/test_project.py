"""Project shape: dependencies agree, notebooks are clean narrations, CI calls the README."""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"]}
    wanted |= {_norm(r) for r in project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_norm(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, (f"only in pyproject: {sorted(wanted - listed)}; "
                              f"only in environment.yml: {sorted(listed - wanted)}")


def test_required_packages_are_declared():
    deps = " ".join(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                    ["dependencies"]).lower()
    for name in ["torch", "torchvision", "openai-clip", "setuptools<81", "jupyterlab",
                 "ipywidgets", "matplotlib", "seaborn", "papermill", "nbval", "scikit-learn",
                 "pyyaml", "tqdm", "pillow"]:
        assert name in deps, name


def test_reading_a_notebook_does_not_build_an_iri_parser():
    """Every grid job, papermill command line and nbval session imports nbformat, and so
    jsonschema: from jsonschema 4.25 that import builds rfc3987-syntax's Earley parser (1.6 s of
    CPU per process here), hence the pin in pyproject.toml. A fresh process, as a job is."""
    code = ("import sys, papermill, jsonschema; "
            "print(jsonschema.__version__ if 'rfc3987_syntax' in sys.modules else 'ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "ok", (f"importing papermill imported rfc3987_syntax (jsonschema {out}): "
                         f"keep jsonschema below 4.25 (pyproject.toml explains why)")


def test_top_level_layout():
    for name in ["notebooks", "handclip_nb", "params", "outputs", "tests", "environment.yml",
                 "README.md", "pyproject.toml", "Makefile", ".ci/run", "outputs/README.md"]:
        assert (REPO / name).exists(), name
    ignored = (REPO / ".gitignore").read_text()
    assert "outputs/*" in ignored and "!outputs/README.md" in ignored


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert re.search(r"^make test", ci, re.M)


def test_notebooks_have_a_tagged_parameters_cell_and_no_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{path.name}: committed with outputs"
                assert cell.get("execution_count") is None, f"{path.name}: execution counts"
        assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state committed"


def test_notebooks_contain_no_training_loop_metric_or_loss():
    """Notebooks narrate; loops, losses and metrics live in handclip_nb (tested there)."""
    forbidden = re.compile(r"\bfor\b.*\bin\b.*loader|\.backward\(|optimizer\.step|argsort|"
                           r"def \w+\(|cross_entropy|class \w+")
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                assert not forbidden.search(src), f"{path.name}: logic in a notebook:\n{src}"


def test_notebooks_do_not_shadow_a_params_section_or_a_parameter():
    """papermill injects a params file's stage sections as variables (``pretrain = {...}``); a
    notebook that binds the same name (``from handclip_nb.train import pretrain``) silently drops
    that section, and the run uses the notebook's defaults instead of the file's values. A
    parameter's name bound by an import (``from handclip_nb.evaluate import tsne``) replaces
    the parameter's value before it is read."""
    from handclip_nb.params import SCHEMA, STAGES
    from handclip_nb.pipeline import NOTEBOOK_STAGES, OTHER_NOTEBOOKS

    assert {p.name for p in NOTEBOOKS} == set(NOTEBOOK_STAGES) | set(OTHER_NOTEBOOKS)
    for path in NOTEBOOKS:
        if path.name in OTHER_NOTEBOOKS:  # no schema parameters to shadow (grid_dir only)
            continue
        stage = NOTEBOOK_STAGES[path.name]
        own = [n for n, spec in SCHEMA.items() if "common" in spec.stages or stage in spec.stages]
        names = "|".join([*STAGES, *own])
        binds = re.compile(rf"^[ \t]*(({names})\s*=|from \S+ import .*\b({names})\b[ \t]*($|,|#)|"
                           rf"import .* as ({names})\b)", re.MULTILINE)
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:  # what runs before the parameters are resolved
            if cell["cell_type"] == "code" and "parameters" not in cell["metadata"].get("tags", []):
                src = "".join(cell["source"])
                head = src.split("params_from_namespace(globals()")[0]
                assert not binds.search(head), f"{path.name} binds a stage or parameter name:\n{src}"
                if "params_from_namespace(globals()" in src:
                    break


def test_the_repo_does_not_point_outside_itself_for_its_design():
    """The design lives in docs/; nothing cites the design note that stays outside the repo."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile("DESIGN" + r"(\.md)? ?§|shared/" + "DESIGN")
    cited = [f for f in files if not f.startswith("tests/golden/")
             and (REPO / f).is_file() and (REPO / f).suffix in (".py", ".md", ".yaml", ".ipynb", ".cfg", ".toml")
             and outside.search((REPO / f).read_text(errors="replace"))]
    assert not cited, f"files citing the design note outside the repo (use docs/): {cited}"
    for name in ("architecture", "contracts", "protocols", "methods", "mistakes"):
        assert (REPO / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"
