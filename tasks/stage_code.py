"""Which source code a stage runs, as a digest for its cache key: a change elsewhere does not invalidate it.

A digest of every ``.py`` file would send a 7B model back to training for a typo fixed in the evaluation code.
Instead each stage's key covers:

- its task function's body and the module-level helpers and constants of its own module that the body names,
  transitively (a stage module holds several stages: editing one stage's body leaves the others' keys alone);
- every project module those import (module level of the stage's module included), and transitively every
  project module those import — anywhere in the file, function-level imports too, and module names written as
  strings (``python -m mgpo_core.training.entry``), so the closure over-approximates rather than misses code;
  only imports under ``if TYPE_CHECKING:`` are left out (they never run).

The closure does not enter the shell modules that only print, record and retry around a stage
(``SHELL_MODULES``): they cannot change a stage's result. The caching machinery itself (``tasks.common``,
``tasks.validate``) is part of every closure that imports it.

Library modules count whole: a change anywhere in a module a stage imports reruns the stage, even when the
stage uses one function of it (training digests its export with ``ops.registry.checkpoint_digest``, so an edit
to the registry module reruns training too — a finished run directory then resumes at its end and trains zero
steps). Finer (per-function) slicing across modules would miss code that runs by registration at import.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("mgpo_core", "tasks", "flows")
#: Around a stage body but never shaping its result: console output, the execution record and hooks, retries,
#: the lock that keeps two runs of one key apart, what the Prefect UI shows, and this digest itself (a change
#: to how code is digested changes the digests anyway).
SHELL_MODULES = frozenset(
    {"tasks.console", "tasks.hooks", "tasks.retry", "tasks.locks", "tasks.artifacts", "tasks.stage_code"}
)


def module_file(name: str, root: Path = SOURCE_ROOT) -> Path | None:
    """The source file of project module ``name`` under ``root`` (None when it is not a project module)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    p = root.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_run_time(tree: ast.AST):  # noqa: ANN202
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:`` (imports for annotations never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_names(tree: ast.AST, module: str, is_package: bool = False) -> set[str]:
    """Project module names ``tree`` imports anywhere (``from a import b`` yields ``a`` and ``a.b``: b may be a
    submodule), plus dotted project module names written as string constants."""
    out: set[str] = set()
    for n in _walk_run_time(tree):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = _absolute(n, module, is_package)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in n.names)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(PROJECT_PACKAGES):
            out.add(n.value.split(":")[0].strip())
    return {m for m in out if m.split(".")[0] in PROJECT_PACKAGES}


def module_closure(roots: Iterable[str], root: Path = SOURCE_ROOT) -> dict[str, Path]:
    """Every project module reachable from ``roots`` by imports (parent packages included, shells excluded)."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in SHELL_MODULES:
            continue
        f = module_file(name, root)
        if f is None:
            continue
        seen[name] = f
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_names(ast.parse(f.read_text()), name, f.name == "__init__.py"))
    return seen


def _function_slice(tree: ast.Module, start: str) -> tuple[list[ast.AST], set[str]]:
    """The module-level definitions ``start`` needs (itself, the helpers and constants its body names,
    transitively), and the modules bound by the module-level imports it uses."""
    defs: dict[str, ast.AST] = {}
    bound: dict[str, str] = {}  # a name bound by a module-level import -> the module it comes from
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    defs[t.id] = node
        elif isinstance(node, ast.Import):
            for a in node.names:
                bound[(a.asname or a.name).split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
    picked: dict[str, ast.AST] = {}
    modules: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in picked or name not in defs:
            continue
        node = defs[name]
        picked[name] = node
        body = node.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else [node]
        for sub in body:
            for n in ast.walk(sub):
                if isinstance(n, ast.Name):
                    todo.append(n.id)
                    if n.id in bound:
                        modules.update({bound[n.id], bound[n.id].rsplit(".", 1)[0]})
    return list(picked.values()), modules


@functools.cache
def stage_code_digest(fn: Callable, root: Path = SOURCE_ROOT) -> str:
    """Digest of the code task function ``fn`` runs (see the module docstring); the same on every clone."""
    fn = inspect.unwrap(getattr(fn, "fn", fn))  # a Prefect task -> its function -> under its decorators
    module = fn.__module__
    path = module_file(module, root)
    if path is None:
        raise ValueError(f"{fn.__qualname__} is not defined in a project module ({module}); cannot digest its code")
    tree = ast.parse(path.read_text())
    nodes, bound = _function_slice(tree, fn.__name__)
    if not nodes:
        raise ValueError(f"{fn.__name__} is not a module-level function of {path}; cannot digest its code")
    own = ast.Module(body=list(nodes), type_ignores=[])
    roots = bound | imported_names(own, module)
    modules = module_closure(roots - {module}, root)
    h = hashlib.sha256()
    for node in nodes:
        h.update(ast.dump(node, include_attributes=False).encode())  # code, not comments or line numbers
    for name in sorted(modules):
        h.update(name.encode())
        h.update(modules[name].read_bytes())
    return h.hexdigest()[:16]


def stage_modules(fn: Callable, root: Path = SOURCE_ROOT) -> list[str]:
    """The project modules ``fn``'s digest covers (for the log and for tests), sorted."""
    fn = inspect.unwrap(getattr(fn, "fn", fn))
    tree = ast.parse(module_file(fn.__module__, root).read_text())  # type: ignore[union-attr]
    nodes, bound = _function_slice(tree, fn.__name__)
    roots = bound | imported_names(ast.Module(body=list(nodes), type_ignores=[]), fn.__module__)
    return sorted(module_closure(roots - {fn.__module__}, root))
