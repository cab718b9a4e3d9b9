"""The layout of hod/: every module sits in one stage of the pipeline, says so in its
docstring, imports only earlier stages (and shared modules), and keeps its functions short.

The pipeline, in order: trace, split, analyze, plan, derive, assemble, passes, codegen,
compile; the driver (``_build.py``) runs the stages and the api calls the driver. The
records passed between stages are in ``_records.py``, shared by all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HOD = Path(__file__).resolve().parent.parent / "hod"

#: Each top-level module or package of hod/, by layer, in pipeline order. A new module
#: must be placed here: its layer says what it may import.
LAYERS: dict[str, tuple[str, ...]] = {
    "shared": ("_records", "_emitter", "_combinatorics", "_op_table", "errors"),
    "trace": ("_tracing", "_product_sums", "decompositions"),
    "split": ("_split",),
    "analyze": ("_analysis", "_sparsity"),
    "plan": ("_plan", "_cost", "_per_example", "_row_blocks", "_directions", "_coloring"),
    "derive": ("_derive", "_jet", "_collapse", "rules"),
    "assemble": ("_assemble",),
    "passes": ("passes",),
    "codegen": ("_codegen",),
    "compile": ("_compiled",),
    "driver": ("_build", "_taylor", "_adjoint", "_adjoint_top", "_recompute"),
    "api": ("_signature", "_series", "_vmap", "_shard", "_function", "_taylor_api",
            "_directional", "_chunked", "_sparse", "_api", "_operators", "__init__"),
}
RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}
LAYER = {name: layer for layer, names in LAYERS.items() for name in names}

#: Imports against the pipeline order, each with its reason.
ALLOWED_UPWARD = {
    # The driver flattens the split's inner call (g's) as the api flattens the user's.
    ("_build", "_signature"),
}

#: How the docstring of a stage's module (or package) begins.
STAGE_LABELS = {
    "trace": "Trace stage:", "split": "Split stage:", "analyze": "Analyze stage:",
    "plan": "Plan stage:", "derive": "Derive stage:", "assemble": "Assemble stage:",
    "passes": "Passes stage:", "codegen": "Codegen stage:", "compile": "Compile stage:",
    "api": "API stage:",
}

MAX_FUNCTION_LINES = 60
MAX_DRIVER_LINES = 300

SOURCES = sorted(HOD.rglob("*.py"))


def _top(path: Path) -> str:
    """The top-level module or package of hod/ that ``path`` belongs to."""
    return path.relative_to(HOD).parts[0].removesuffix(".py")


def _name(path: Path) -> str:
    """``path``'s dotted module name (a package by its ``__init__``)."""
    parts = ("hod", *path.relative_to(HOD).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The hod modules ``path`` imports, as dotted names (anywhere in the file)."""
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "hod"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "hod":
                continue
            for alias in node.names:  # `from . import x` may import a submodule x
                sub = f"{base}.{alias.name}"
                found.add(sub if (HOD.parent / sub.replace(".", "/")).exists()
                          or (HOD.parent / (sub.replace(".", "/") + ".py")).exists() else base)
    return found


def _top_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert sorted({_top(p) for p in SOURCES} - set(RANK)) == []
    assert sorted(set(RANK) - {_top(p) for p in SOURCES}) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(HOD)))
def test_imports_follow_the_pipeline(path):
    """A module imports only its own layer, earlier layers and shared modules."""
    here = _top(path)
    upward = sorted(
        module for module in _imports(path)
        if RANK[_top_of(module)] > RANK[here] and (here, _top_of(module)) not in ALLOWED_UPWARD
    )
    assert upward == [], f"{path.relative_to(HOD)} ({LAYER[here]}) imports later stages"


def test_no_import_cycles():
    graph = {_name(p): {m for m in _imports(p) if m != _name(p)} for p in SOURCES}
    state: dict[str, str] = {}

    def visit(module: str, chain: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            assert state.get(target) != "open", "import cycle: " + " -> ".join(
                chain[chain.index(target):] + [module, target] if target in chain
                else [*chain, module, target]
            )
            if target not in state:
                visit(target, [*chain, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(HOD)))
def test_functions_are_short(path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_driver_is_short():
    assert len((HOD / "_build.py").read_text().splitlines()) <= MAX_DRIVER_LINES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(HOD)))
def test_docstrings_name_the_stage(path):
    """Every module has a docstring; a stage's modules, and a stage package's
    ``__init__``, begin it with the stage's name; the driver and the records say what
    they are."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.relative_to(HOD)} has no module docstring"
    top, layer = _top(path), LAYER[_top(path)]
    at_top = path.parent == HOD or path.name == "__init__.py"
    if top == "__init__" or not at_top:
        return  # hod's own namespace; a module inside a stage package is that stage's
    if layer in STAGE_LABELS:
        assert doc.startswith(STAGE_LABELS[layer]), doc.splitlines()[0]
    elif top == "_build":
        assert doc.startswith("The driver:"), doc.splitlines()[0]
    elif top == "_records":
        assert doc.startswith("Records passed between the stages"), doc.splitlines()[0]
