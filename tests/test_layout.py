"""The package's layering, read from the source with `ast`: no module of `espc/` imports
itself back through others, dependencies flow frontend ← model ← planner ← backend ←
runtime, the planner never imports torch, and the simulation world never imports the
compile world. An import inside `if TYPE_CHECKING:` is for annotations only and does not
count; an import inside a function does (it runs when the function does)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "espc"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement except those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _import_graph() -> tuple[nx.DiGraph, dict[str, set[str]]]:
    """Edges between espc modules, and every module's top-level external imports."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(paths)
    external: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import module` names a module; `from module import name` does not.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            for target in targets:
                if target in paths:
                    if target != name:
                        graph.add_edge(name, target)
                else:
                    external[name].add(target.split(".")[0])
    return graph, external


GRAPH, EXTERNAL = _import_graph()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "espc"


def test_the_walker_sees_the_package():
    assert "espc.planner.plan" in GRAPH and "espc.runtime.driver" in GRAPH
    assert GRAPH.has_edge("espc.planner.compile.scheduler", "espc.planner.plan")


def test_no_module_imports_itself_back():
    cycles = list(nx.simple_cycles(GRAPH))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle + cycle[:1]) for cycle in cycles)


# Which layers each layer may import: frontend at the bottom, the public API (espc/__init__.py,
# the CLI) at the top. The model sits below the backend and the runtime, which both build it.
ALLOWED = {
    "frontend": {"frontend"},
    "model": {"frontend", "model"},
    "planner": {"frontend", "planner", "_version"},
    "backend": {"frontend", "model", "planner", "backend"},
    "runtime": {"frontend", "model", "planner", "backend", "runtime", "_version"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_dependencies_flow_one_way(layer):
    wrong = sorted(
        f"{source} -> {target}"
        for source, target in GRAPH.edges
        if _layer(source) == layer and _layer(target) not in ALLOWED[layer]
    )
    assert wrong == []


def test_the_simulation_world_never_imports_the_compile_world():
    wrong = sorted(
        f"{source} -> {target}"
        for source, target in GRAPH.edges
        if source.startswith("espc.planner.sim") and target.startswith("espc.planner.compile")
    )
    assert wrong == []


@pytest.mark.parametrize("layer", ["frontend", "planner"])
def test_torch_stays_out_of_the_lower_layers(layer):
    assert sorted(module for module, names in EXTERNAL.items() if _layer(module) == layer and "torch" in names) == []
