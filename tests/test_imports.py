"""The package's import graph, read from the source (every import: top level, inside functions,
under TYPE_CHECKING): no cycle, and each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "warp_rlhf"

LAYERS = {
    "errors": set(),
    "layout": set(),
    "config": {"errors"},
    "checkpoint": {"errors"},
    "cpu": set(),
    "policy": {"cpu"},
    "algorithm": {"policy", "cpu", "checkpoint", "config", "errors", "layout"},
    "runners": {"algorithm", "cpu", "config", "errors"},
    "stages": {"algorithm", "runners", "policy", "checkpoint", "config", "errors", "layout"},
    "cli": {"stages", "cpu", "checkpoint", "config", "errors", "layout"},
    "trainer": {"stages", "checkpoint", "config", "errors", "layout"},
    "__init__": {"config", "errors", "trainer"},
}
"""What each top-level module or sub-package of warp_rlhf may import, besides itself."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("warp_rlhf")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("warp_rlhf"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found += [(s, []) for s in submodules]
            if len(submodules) < len(names):
                found.append((base, [n for n in names if f"{base}.{n}" not in MODULES]))
    return found


GRAPH = {name: sorted({target for target, _ in imports(name) if target != name}) for name in MODULES}


def test_every_import_resolves_to_a_module_of_the_package():
    unknown = {(name, target) for name, targets in GRAPH.items() for target in targets if target not in MODULES}
    assert not unknown


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in GRAPH[name]:
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_layer_imports_only_the_layers_below_it(name):
    allowed = LAYERS[layer(name)] | {layer(name)}
    assert {layer(target) for target in GRAPH[name]} <= allowed, GRAPH[name]


def test_the_cpu_fast_paths_are_entered_through_one_place():
    for name in MODULES:
        if layer(name) != "cpu":
            assert not [t for t in GRAPH[name] if t.startswith("warp_rlhf.cpu.")], name


def test_the_algorithm_takes_one_cpu_entry_point():
    taken = {
        n
        for name in MODULES
        if layer(name) == "algorithm"
        for t, ns in imports(name)
        if t == "warp_rlhf.cpu"
        for n in ns
    }
    assert taken == {"lean_backward"}


def test_a_cycle_is_found(monkeypatch):
    """The cycle check itself can fail: a graph with a cycle through three modules."""
    monkeypatch.setitem(GRAPH, "warp_rlhf.cpu.gemm", [*GRAPH["warp_rlhf.cpu.gemm"], "warp_rlhf.policy.sampling"])
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*warp_rlhf.cpu.gemm"):
        test_there_is_no_import_cycle()
