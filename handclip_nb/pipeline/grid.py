"""The experiment grid: one YAML file describes a results table, one command runs it.

A grid file (``params/grids/<name>.yaml``)::

    base: params/smoke.yaml        # optional: the params file every run starts from; it may
                                   # name axes, e.g. params/{backbone}-{aspect}.yaml
    # or one recipe per method (stage), each stage's runs starting from their own file:
    # base: {default: params/{backbone}-{aspect}.yaml,
    #        stage3: params/other-{backbone}-{aspect}.yaml}
    params: {num_splits: 10}       # optional: overrides for every run
    axes:                          # every combination is one set of linked runs
      aspect: [dorsal_r, dorsal_l]
      backbone: [vitb16, rn50]
      seed: [0, 1, 2]
    stages: [stage0, stage1, stage2, stage3]
    slurm: {partition: gpu, gpus: 1, time: "04:00:00", mem: 32G,   # optional: any sbatch
            account: myproject, python: /shared/venv/bin/python}      # option, and the nodes'
                                                                      # Python and kernel

expands into runs (:func:`expand_grid`). The stages of one combination are linked as in the
demo: stage 2 reads that combination's stage-1 prompts (``stage1_dir``). A run is named by its
stage and the axis values its result depends on, and combinations that resolve to the same
run are one run: a parameter that does not apply to a stage (``lr`` for zero-shot) or does not
change its result (``seed`` for the zero-shot ranking of a pretrained backbone) is left out of
its identity (``params.run_identity``). Every run is validated against the parameter schema
before anything starts.

A ``base`` mapping gives each stage of ``stages`` its recipe: the file of its own key, else
the file of ``default``; ``null`` means no base file for that stage. Every stage the grid runs
must be covered, and every key must be a stage the grid runs (or ``default``), so a recipe is
never silently dropped. A run takes its values from its own stage's file only (that file's
common values and its own stage's section): the stage-2 recipe's ``stage1`` section does not
reach a stage-1 run whose recipe is another file. Runs that read each other (a stage 2 and its
stage 1) must agree on the data and the backbone (``LINK_MUST_AGREE``); the grid refuses a
mismatch before anything runs.

Values the grid names beat the base file's stage sections, as ``-p`` beats a ``-f`` file's:
an axis value and a common value of ``params`` apply to every stage, and ``params``' own
sections are merged over the base file's, name by name. An axis that a section of ``params``
itself sets is refused (the grid file would say two things). Each run gets its values flat
(its stage's section applied), so the notebook resolves exactly what the grid planned.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..params import (SCHEMA, STAGES, ParamError, load_params_file, resolve_params, run_identity,
                      set_twice, stage_values)
from ..runs import resolve_path
from .steps import Step

__all__ = ["GRID_STAGES", "STAGE_NOTEBOOKS", "SLURM_KEYS", "BASE_DEFAULT", "LINK_MUST_AGREE",
           "Grid", "GridRun", "GridError", "load_grid", "expand_grid", "slurm_settings",
           "check_slurm_options"]

#: Stages a grid may run, in dependency order, and their notebooks.
GRID_STAGES = ("stage0", "stage1", "stage2", "stage3", "handid")
STAGE_NOTEBOOKS = {"stage0": "stage0_zeroshot.ipynb", "stage1": "stage1_prompt.ipynb",
                   "stage2": "stage2_image.ipynb", "stage3": "stage3.ipynb",
                   "handid": "stage_handid.ipynb"}

#: The key of a ``base:`` mapping whose file serves every stage without an entry of its own.
BASE_DEFAULT = "default"
#: Parameters a run and the run it reads (``stage1_dir``) must share: the data file and the
#: aspect (stage 2 needs prompts learned on the same data, for its own training identities)
#: and the backbone. Stage 2 refuses such a mismatch too (``load_stage1_prompts``), but only
#: once it runs; settings it accepts (another ``weights`` file, ``split_seed``) pass here.
LINK_MUST_AGREE = ("dataset", "data_root", "synthetic_subjects", "synthetic_images",
                   "synthetic_seed", "aspect", "backbone")

#: Slurm settings with a command-line option of their own; any other key of a grid file's
#: ``slurm:`` mapping (account, qos, constraint, reservation, ...) is passed to sbatch as it is
#: (``--<key>=<value>``), and so is ``--slurm-option KEY=VALUE``. ``python`` and ``kernel`` name
#: the interpreter and the Jupyter kernel the jobs use on the compute nodes.
SLURM_KEYS = ("partition", "gpus", "time", "mem", "cpus", "python", "kernel")
#: sbatch options the grid sets itself: a grid file may not change them.
SLURM_RESERVED = frozenset({"job_name", "job-name", "output", "error", "open-mode", "signal",
                            "dependency", "array", "wckey"})


class GridError(ValueError):
    """A grid file that cannot run; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Grid:
    path: Path
    #: each stage's base params file (possibly with {axis} fields), None: no base file
    base: dict[str, str | None]
    params: dict
    axes: dict[str, list]
    stages: tuple[str, ...]
    slurm: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class GridRun:
    """One run of the grid: a notebook step with its parameters and links."""

    name: str
    stage: str
    values: dict  # the parameter values given to papermill (base file + params + combination)
    axes: dict  # the axis values this run depends on
    key: str  # identity: the stage and every parameter that can change its numbers
    links: dict = field(default_factory=dict)  # {"stage1_dir": run name}
    combinations: list = field(default_factory=list)  # every combination that needs it

    @property
    def notebook(self) -> str:
        return STAGE_NOTEBOOKS[self.stage]

    def step(self) -> Step:
        return Step(self.name, self.notebook, None, dict(self.values), links=dict(self.links))

    def upstream(self) -> list[str]:
        return list(self.links.values())


def _fail(path: Path, why: str) -> GridError:
    return GridError(f"grid file {path}: {why}")


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file: its keys, axes (schema parameters with non-empty value
    lists), stages and Slurm settings; every run's parameters are validated by
    :func:`expand_grid`."""
    given = path
    path = _find(path)
    if path is None:
        raise GridError(f"grid file {given} does not exist (looked in {_places(given)}; the "
                        f"shipped grids are params/grids/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(path, "must hold a mapping with axes and stages")
    unknown = sorted(set(data) - {"base", "params", "axes", "stages", "slurm"})
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; valid: base, params, axes, stages, slurm")
    base = data.get("base")
    if base is not None and not isinstance(base, (str, dict)):
        raise _fail(path, f"base must be a params file path or a mapping of stage: params "
                          f"file path (e.g. {{default: params/smoke.yaml, stage3: "
                          f"params/other.yaml}}), got {base!r}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise _fail(path, "params must be a mapping of name: value")
    bad = sorted((k for k in params if k not in SCHEMA and k not in STAGES), key=str)
    if bad:
        raise _fail(path, f"params: unknown parameter(s) {bad}")
    try:
        twice = set_twice(params)
    except ParamError as exc:
        raise _fail(path, f"params: {exc}") from None
    if twice:
        raise _fail(path, f"params: {twice[0]}")
    axes = data.get("axes") or {}
    if not isinstance(axes, dict):
        raise _fail(path, "axes must be a mapping of parameter: [values]")
    for name, values in axes.items():
        if name not in SCHEMA:
            raise _fail(path, f"axis {name!r} is not a parameter (handclip_nb/params.py)")
        if name in ("output_dir", "stage1_dir", "init_from"):
            raise _fail(path, f"axis {name!r} is set by the grid itself")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"axis {name!r} needs a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < len(values):
            raise _fail(path, f"axis {name!r} lists a value twice: {values!r}")
    stages = data.get("stages") or list(GRID_STAGES)
    if not isinstance(stages, list) or not stages:
        raise _fail(path, "stages must be a non-empty list, e.g. [stage0, stage1, stage2]")
    wrong = [s for s in stages if s not in GRID_STAGES]
    if wrong:
        raise _fail(path, f"unknown stage(s) {wrong}; a grid runs {', '.join(GRID_STAGES)}")
    if "stage2" in stages and "stage1" not in stages:
        raise _fail(path, "stage2 reads stage 1's prompts: add stage1 to stages")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise _fail(path, "slurm must be a mapping of sbatch option: value, e.g. "
                          "{partition: gpu, gpus: 1, time: '04:00:00', account: myproject}")
    try:
        check_slurm_options(slurm)
    except ValueError as exc:
        raise _fail(path, f"slurm: {exc}") from None
    ordered = tuple(s for s in GRID_STAGES if s in stages)
    grid = Grid(path=path, base=_stage_bases(path, base, ordered, axes), params=dict(params),
                axes=dict(axes), stages=ordered, slurm=dict(slurm))
    _shadowed_axes(grid)
    return grid


def _stage_bases(path: Path, base: str | dict | None, stages: tuple[str, ...],
                 axes: Mapping[str, Any]) -> dict[str, str | None]:
    """Each stage's base file pattern from a grid file's ``base:`` (one path for every stage,
    or a mapping of stage or ``default``: path or null), its ``{axis}`` fields checked."""
    if not isinstance(base, dict):
        bases = {stage: base for stage in stages}
        where = {base: "base"}
    else:
        keys = [k for k in base if k != BASE_DEFAULT]
        wrong = [k for k in keys if k not in GRID_STAGES]
        if wrong:
            raise _fail(path, f"base: unknown key(s) {wrong}; its keys are the stages of the "
                              f"grid ({', '.join(GRID_STAGES)}) or {BASE_DEFAULT!r}")
        idle = [k for k in keys if k not in stages]
        if idle:
            raise _fail(path, f"base gives a file for {idle}, which the grid does not run: add "
                              f"{'it' if len(idle) == 1 else 'them'} to stages or remove "
                              f"{', '.join(f'base.{k}' for k in idle)}")
        for key, pattern in base.items():
            if pattern is not None and not isinstance(pattern, str):
                raise _fail(path, f"base.{key} must be a params file path or null (no base file "
                                  f"for that stage), got {pattern!r}")
        uncovered = [s for s in stages if s not in base and BASE_DEFAULT not in base]
        if uncovered:
            raise _fail(path, f"base gives no file for {uncovered}: add "
                              f"{', '.join(f'{s}: <file>' for s in uncovered)} or "
                              f"{BASE_DEFAULT}: <file> to base (null: no base file)")
        bases = {stage: base.get(stage, base.get(BASE_DEFAULT)) for stage in stages}
        where = {}
        for key, pattern in base.items():
            where.setdefault(pattern, f"base.{key}")
    for pattern in dict.fromkeys(bases.values()):
        if pattern is None:
            continue
        fields = set(re.findall(r"{(\w+)}", pattern))
        if fields - set(axes):
            raise _fail(path, f"{where[pattern]} {pattern!r} names {sorted(fields - set(axes))}, "
                              f"which are not axes")
    return bases


def check_slurm_options(options: Mapping[str, Any]) -> None:
    """Refuse sbatch options the grid sets itself and values sbatch cannot take."""
    for key, value in options.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ValueError(f"{key!r} is not an sbatch option name")
        if key in SLURM_RESERVED or key.replace("-", "_") in SLURM_RESERVED:
            raise ValueError(f"{key!r} is set by the grid itself (job names, logs, signals, "
                             f"dependencies); leave it out")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected one value, got {value!r}")


def _shadowed_axes(grid: Grid) -> None:
    """Refuse an axis that a stage section of the grid's own ``params`` sets: the grid file
    would say two things about one parameter. (A base file's section yields to the axis.)"""
    for axis in grid.axes:
        for stage in grid.stages:
            section = grid.params.get(stage)
            if isinstance(section, Mapping) and axis in section:
                raise _fail(grid.path, f"axis {axis!r} is also set by {grid.path.name} params, "
                                       f"section {stage!r} (key {stage}.{axis}: "
                                       f"{section[axis]!r}); remove {stage}.{axis} from that "
                                       f"section, or drop the axis")


def _grid_values(base: Mapping[str, Any], grid: Grid, combo: Mapping[str, Any]) -> tuple[dict, set]:
    """One combination's values before a stage is chosen, and the names the grid gives
    explicitly (its axes and ``params``' common values), which no base section overrides.
    ``params``' sections are merged over the base file's name by name."""
    own = {k: v for k, v in grid.params.items() if k not in STAGES}
    given = {**{k: v for k, v in base.items() if k not in STAGES}, **own, **combo}
    for stage in STAGES:
        section = {**(base.get(stage) or {}), **(grid.params.get(stage) or {})}
        if section:
            given[stage] = section
    return given, set(own) | set(combo)


def _base_values(grid: Grid, stage: str, combo: Mapping[str, Any], loaded: dict) -> dict:
    """The base params file of one stage and combination (its ``{axis}`` fields filled), each
    file read once."""
    pattern = grid.base[stage]
    if pattern is None:
        return {}
    name = pattern.format(**combo)
    if name not in loaded:
        found = _find(name)
        if found is None:
            raise _fail(grid.path, f"base {name} (for {stage}) does not exist (looked in "
                                   f"{_places(name)})")
        try:
            loaded[name] = load_params_file(found)
        except ParamError as exc:
            raise _fail(grid.path, f"base {name} (for {stage}): {exc}") from None
    return loaded[name]


#: The checkout this package lives in: shipped grids and params files are found there too.
REPO = Path(__file__).resolve().parents[2]


def _candidates(path: str | Path) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    return list(dict.fromkeys([Path.cwd() / p, resolve_path(p), REPO / p]))


def _find(path: str | Path) -> Path | None:
    """A grid or params file named on the command line or in a grid: absolute, else relative
    to the current folder, the project root (``$HANDCLIP_HOME``) or this checkout."""
    return next((c.resolve() for c in _candidates(path) if c.is_file()), None)


def _places(path: str | Path) -> str:
    return ", ".join(str(c) for c in _candidates(path))


def _slug(axis: str, value: Any) -> str:
    """A run-name part: a word as it is (``dorsal_r``, ``vitb16``), a path by its file name,
    anything else with its axis name (``seed0``, ``lr0.0003``, ``weightsNone``)."""
    if isinstance(value, str):
        text = Path(value).name if "/" in value else value  # a file: its name
    else:
        text = f"{axis}{value if value is None else json.dumps(value, default=str)}"
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or axis


def _stage_values(flat: Mapping[str, Any], stage: str) -> dict:
    """What papermill gets for one stage: its flat values (:func:`params.stage_values`) that
    apply to it (another stage's settings must not change this run's fingerprint)."""
    return {name: value for name, value in flat.items()
            if "common" in SCHEMA[name].stages or stage in SCHEMA[name].stages}


def expand_grid(grid: Grid) -> list[GridRun]:
    """The grid's runs in dependency order, each validated (``resolve_params``), combinations
    that resolve to the same run merged into one."""
    names = list(grid.axes)
    runs: dict[str, GridRun] = {}
    loaded: dict[str, dict] = {}
    for values in itertools.product(*(grid.axes[n] for n in names)):
        combo = dict(zip(names, values))
        by_stage: dict[str, str] = {}
        for stage in grid.stages:
            given, explicit = _grid_values(_base_values(grid, stage, combo, loaded), grid, combo)
            try:
                resolved = resolve_params(given, stage=stage, explicit=explicit)
                flat = stage_values(given, stage, explicit)
            except ParamError as exc:
                raise _fail(grid.path, f"combination {combo} for {stage}: {exc}") from None
            identity = run_identity(resolved)
            links = {"stage1_dir": by_stage["stage1"]} if stage == "stage2" else {}
            for link, upstream in links.items():
                _check_link(grid, stage, flat, runs[upstream], link, combo)
            depends = {axis: value for axis, value in combo.items() if axis in identity}
            name = "-".join([stage, *(_slug(a, v) for a, v in depends.items())])
            record = json.dumps({"stage": stage, "identity": identity,
                                 "links": {k: runs[v].key for k, v in links.items()}},
                                sort_keys=True, default=str)
            key = hashlib.sha256(record.encode()).hexdigest()
            if name in runs and runs[name].key != key:
                raise _fail(grid.path, f"two different {stage} runs would both be named {name!r}; "
                                       f"give the axes distinct values")
            run = runs.setdefault(name, GridRun(name=name, stage=stage,
                                                values=_stage_values(flat, stage),
                                                axes=depends, key=key, links=links))
            run.combinations.append(combo)
            by_stage[stage] = name
    order = {s: i for i, s in enumerate(GRID_STAGES)}
    return sorted(runs.values(), key=lambda r: order[r.stage])


def _check_link(grid: Grid, stage: str, flat: Mapping[str, Any], upstream: GridRun, link: str,
                combo: Mapping[str, Any]) -> None:
    """Refuse a run whose recipe and the recipe of the run it reads disagree on the data or
    the backbone (``LINK_MUST_AGREE``): with a base file per stage they can."""
    for name in LINK_MUST_AGREE:
        mine, theirs = flat.get(name), upstream.values.get(name)
        if mine != theirs:
            mine_from = grid.base[stage] or "no base file"
            theirs_from = grid.base[upstream.stage] or "no base file"
            raise _fail(grid.path, f"combination {combo}: {stage} ({mine_from}) has "
                                   f"{name}={mine!r} but the {upstream.stage} run it reads "
                                   f"({link}, from {theirs_from}) has "
                                   f"{name}={theirs!r}; give both stages' base files the same "
                                   f"{name}, or set it in the grid's params or axes")


def slurm_settings(grid: Grid, overrides: Mapping[str, Any]) -> dict:
    """The Slurm settings of a grid: its ``slurm:`` mapping, overridden by the command line
    (``--slurm-partition`` ..., ``--slurm-option KEY=VALUE``)."""
    out = dict(grid.slurm)
    given = {k: v for k, v in overrides.items() if v is not None}
    check_slurm_options(given)
    out.update(given)
    return out
