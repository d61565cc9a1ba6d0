"""Every notebook's parameters cell repeats the schema's defaults for its stage exactly, so a
notebook opened in JupyterLab, run by papermill without parameters, and a direct
``resolve_params(stage=...)`` call all mean the same run."""
from __future__ import annotations

import ast
import json

import pytest

from handclip_nb.params import SCHEMA, STAGES, ParamSpec
from handclip_nb.pipeline import NOTEBOOK_STAGES, NOTEBOOKS_DIR


def parameters_cell(notebook: str) -> dict:
    """Name -> value of the assignments in the notebook's cell tagged ``parameters``."""
    nb = json.loads((NOTEBOOKS_DIR / notebook).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{notebook}: expected one cell tagged 'parameters', found {len(cells)}"
    values = {}
    for node in ast.parse("".join(cells[0]["source"])).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, (
            f"{notebook}: the parameters cell holds only `name = literal` lines "
            f"(line {node.lineno})")
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def default_drift(notebook: str, stage: str) -> list[str]:
    problems = []
    for name, value in parameters_cell(notebook).items():
        spec: ParamSpec | None = SCHEMA.get(name)
        if name in STAGES:  # a params file's section: declared, so papermill knows the name
            if value is not None:
                problems.append(f"{notebook}: section {name} = {value!r}; declare it None")
        elif spec is None:
            problems.append(f"{notebook}: {name} is not in the schema (handclip_nb/params.py)")
        elif "common" not in spec.stages and stage not in spec.stages:
            problems.append(f"{notebook}: {name} does not apply to stage {stage}")
        elif value != spec.default_for(stage):
            problems.append(f"{notebook}: {name} = {value!r} in the parameters cell, but the "
                            f"schema's {stage} default is {spec.default_for(stage)!r}")
    return problems


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_STAGES))
def test_parameters_cell_defaults_match_the_schema(notebook):
    assert not default_drift(notebook, NOTEBOOK_STAGES[notebook])


def test_drift_is_reported_with_notebook_and_parameter(monkeypatch):
    """The guard fails, naming notebook and parameter, when a default changes on one side."""
    spec = SCHEMA["lr"]
    changed = ParamSpec(**{**spec.__dict__,
                           "stage_defaults": {**spec.stage_defaults, "stage2": 1.0}})
    monkeypatch.setitem(SCHEMA, "lr", changed)
    assert default_drift("stage2_image.ipynb", "stage2") == [
        "stage2_image.ipynb: lr = 0.0003 in the parameters cell, but the schema's stage2 "
        "default is 1.0"]


def test_every_stage_has_its_notebook():
    assert set(NOTEBOOK_STAGES.values()) == set(STAGES)


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_STAGES))
def test_every_notebook_declares_every_stage_section(notebook):
    """papermill warns "Passed unknown parameter" for every name a parameters cell does not
    assign: a -f file's sections (stage1: ...) are declared (None) in every notebook."""
    declared = parameters_cell(notebook)
    assert [s for s in STAGES if s not in declared] == []


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_STAGES))
def test_papermill_reads_every_line_of_the_parameters_cell(notebook, caplog):
    """papermill parses a parameters cell line by line (``name = value  # help``); a line it
    cannot parse (an ``=`` in the comment) logs "Unable to parse line" on every run and makes
    ``-p`` of that name warn "Passed unknown parameter"."""
    import logging

    import papermill as pm

    with caplog.at_level(logging.WARNING):
        found = pm.inspect_notebook(str(NOTEBOOKS_DIR / notebook))
    assert "Unable to parse" not in caplog.text
    assert set(found) == set(parameters_cell(notebook))
