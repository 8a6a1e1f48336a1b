"""The layout's rules, read from the source: the shells import the library and never the other way round, the
library never imports Prefect, the operations sit beside the method, and no two modules import each other
(directly or round a longer loop), counting imports inside functions too.

Layers, bottom to top: ``mgpo_core`` (the method, and ``mgpo_core.ops`` beside it) → ``tasks`` → ``flows`` →
``mgpo_cli``. ``TYPE_CHECKING`` imports are annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mgpo_core", "tasks", "flows", "mgpo_cli")
#: What each top-level package may import of the project (itself included).
ALLOWED = {
    "mgpo_core": {"mgpo_core"},
    "tasks": {"mgpo_core", "tasks"},
    "flows": {"mgpo_core", "tasks", "flows"},
    "mgpo_cli": {"mgpo_core", "tasks", "flows", "mgpo_cli"},
}
#: The operations only the shells (and ``ops`` itself) call; ``ops.tracking`` is the leaf the trainer logs through.
SHELL_ONLY_OPS = ("mgpo_core.ops.registry", "mgpo_core.ops.eval_log", "mgpo_core.ops.servers")
MAX_LINES = 600
#: Old import paths kept so that pickles written before the move still load (model versions' pyfunc).
PICKLE_SHIMS = {"mgpo_core.registry": "mgpo_core.ops.registry"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) for name, path in sources.items()}


def _prefect_importers() -> list[str]:
    out = []
    for name, path in _sources().items():
        if not name.startswith("mgpo_core"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(m == "prefect" or m.startswith("prefect.") for m in mods):
                out.append(name)
    return out


def test_each_layer_imports_only_the_layers_below_it(graph) -> None:
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]
    ]
    assert not wrong, "imports up the layers:\n" + "\n".join(sorted(wrong))


def test_the_library_never_imports_prefect() -> None:
    assert _prefect_importers() == []


def test_the_method_does_not_call_the_shell_only_operations(graph) -> None:
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod.startswith("mgpo_core") and not mod.startswith("mgpo_core.ops") and mod not in PICKLE_SHIMS
        for dep in deps
        if dep.startswith(SHELL_ONLY_OPS)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_command_line_helpers_sit_at_the_bottom_of_the_cli(graph) -> None:
    assert {d for d in graph["mgpo_cli.common"] if d.startswith("mgpo_cli")} == set()
    importers_of_main = [m for m, deps in graph.items() if "mgpo_cli.main" in deps and m != "mgpo_cli.__main__"]
    assert importers_of_main == [], "sub-commands must not import the dispatcher"


def test_pickle_shims_only_re_export(graph) -> None:
    for shim, target in PICKLE_SHIMS.items():
        assert graph[shim] == {target}
        assert len(_sources()[shim].read_text().splitlines()) <= 10


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles(graph) -> None:
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_files_stay_small_enough_to_read() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in _sources().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}
