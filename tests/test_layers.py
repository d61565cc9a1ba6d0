"""The package's layering (docs/architecture.md): imports go down only, no module-level cycle,
and an import inside a function only where it saves start-up time, with a comment saying so.

Every ``import``/``from ... import`` of the package is read from the source (imports inside
functions included), so a cycle cannot hide behind a function-level import.
"""
from __future__ import annotations

import ast
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "handclip_nb"

#: Units of the package (a top-level module or subpackage) and their layer, bottom to top.
#: A unit may import its own modules and units of strictly lower layers, nothing else.
LAYERS = {
    "constants": 0, "progress": 0, "host": 0, "locks": 0,
    "backbone_specs": 1,
    "params": 2,
    "runs": 3, "device": 3,
    "checkpoint": 4,
    "data": 5, "models": 5, "losses": 5,
    "run_loader": 6,
    "evaluate": 7,
    "train": 8,
    "viz": 9, "attention": 9,
    "pipeline": 10, "search": 10,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path):
    """(target module, line, inside a function) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node)
                            if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        inner = id(node) in in_function
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "handclip_nb":
                # `from . import x` / `from ..pkg import mod` may name submodules
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    yield (sub if _is_module(sub) else target), node.lineno, inner
            elif inner:
                yield target, node.lineno, inner
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "handclip_nb" or inner:
                    yield alias.name, node.lineno, inner


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in _sources()} - {None}
    assert units <= set(LAYERS), (
        f"package units without a layer: {sorted(units - set(LAYERS))}; add them to LAYERS here "
        f"and to docs/architecture.md")


def test_imports_go_down_only():
    wrong = []
    for path in _sources():
        source = _module_name(path)
        src_unit = _unit(source)
        for target, line, _ in _imports(path):
            dst_unit = _unit(target)
            if not target.startswith("handclip_nb") or dst_unit is None or src_unit is None:
                continue
            if dst_unit != src_unit and LAYERS[dst_unit] >= LAYERS[src_unit]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src_unit} "
                             f"(layer {LAYERS[src_unit]}) imports {target} "
                             f"(layer {LAYERS[dst_unit]})")
    assert not wrong, "imports that go up or sideways in the layering:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for path in _sources():
        graph[_module_name(path)] = {t for t, _, _ in _imports(path)
                                     if t.startswith("handclip_nb") and _is_module(t)}
    # a package's __init__ importing its own modules is not a cycle with them: drop the edges
    # from a module to its own parent packages (`from . import x` resolves to the sibling)
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _comments(path: Path) -> dict[int, str]:
    with open(path, "rb") as fh:
        return {tok.start[0]: tok.string for tok in tokenize.tokenize(fh.readline)
                if tok.type == tokenize.COMMENT}


def test_imports_inside_functions_say_why():
    """An import inside a function must save real start-up time and say so in a comment on its
    line or the line above; one that hides a cycle fails the tests above instead."""
    silent = []
    count = 0
    for path in _sources():
        comments = _comments(path)
        for target, line, inner in _imports(path):
            if not inner:
                continue
            count += 1
            if line not in comments and (line - 1) not in comments:
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{line}: import {target}")
    assert not silent, ("imports inside functions without a comment saying what start-up time "
                        "they save (move them to the top otherwise):\n" + "\n".join(silent))
    assert count < 30, f"{count} imports inside functions: move those that save nothing to the top"
