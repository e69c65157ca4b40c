"""The import contract: imports point down the layers only, and no gradwatch module imports itself back
through others (DESIGN.md, "Layers").

functional (L0) < checks, cadence, registry, options, config, knobs, environment, resolve (shared declarations)
< metrics (L1) < engine (L2)
< integrations (L3) < callbacks (L4) < the command line. Every import statement in the package is checked, lazy
ones (inside functions) included; the exceptions are a module-level ``__getattr__`` that keeps an old import
path working and imports for type checking only (``if TYPE_CHECKING:``).
Lightning and transformers are imported only in integrations/ and callbacks/.

Cycles: module A depends on module B when A imports B, or imports something inside package B (whose
``__init__`` then runs first), unless A lies inside B itself (a package's own ``__init__`` is already running
when its modules load). The graph of the imports that run when a module is imported (module level, ``if`` /
``try`` blocks and class bodies included; TYPE_CHECKING-only imports excluded) has no cycle, and neither has
the graph with the lazy imports inside functions added (old-path ``__getattr__`` shims included: a shim may
reach up, not back).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

import gradwatch

PACKAGE = Path(gradwatch.__file__).parent

RANK = {"functional": 0, "checks": 1, "cadence": 2, "registry": 3, "options": 3, "config": 4, "knobs": 5,
        "environment": 5, "resolve": 5, "metrics": 6, "engine": 7,
        "integrations": 8, "scoring": 8, "callbacks": 9, "cli": 10, "__main__": 10, "_report_to": 10}
HOSTS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "gradwatch" or len(parts) == 1:
        return None
    return parts[1]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, whether inside a module-level __getattr__ or TYPE_CHECKING block)."""
    tree = ast.parse(path.read_text(), str(path))
    shims = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
             for n in ast.walk(f)}
    shims |= {id(n) for f in ast.walk(tree) if _is_type_checking(f) for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, id(node) in shims) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno, id(node) in shims))
    return out


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out.append((name, path))
    return out


def _import_time_statements(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: its body, into ``if`` / ``try`` / ``with``
    blocks and class bodies, not into functions, and not into ``if TYPE_CHECKING:``."""
    out: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                out.append(stmt)
            elif _is_type_checking(stmt):
                walk(stmt.orelse)  # type: ignore[attr-defined]
            elif isinstance(stmt, (ast.If, ast.Try, ast.With, ast.ClassDef)):
                for block in ("body", "orelse", "finalbody"):
                    walk(getattr(stmt, block, []))
                for handler in getattr(stmt, "handlers", []):
                    walk(handler.body)

    walk(tree.body)
    return out


def _lazy_statements(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement but those of TYPE_CHECKING blocks (lazy ones and old-path shims included)."""
    left_out = {id(n) for f in ast.walk(tree) if _is_type_checking(f) for n in ast.walk(f)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in left_out]


def _dependencies(statements: Callable[[ast.Module], list[ast.Import | ast.ImportFrom]]) -> dict[str, set[str]]:
    """Module -> the gradwatch modules it depends on through ``statements`` (see the module docstring)."""
    modules = dict(_modules())
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in statements(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                imported = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            for module in imported:
                parts = module.split(".")
                for i in range(1, len(parts) + 1):  # the module and the packages above it, whose __init__ runs
                    target = ".".join(parts[:i])
                    if target in modules and name != target and not name.startswith(target + "."):
                        targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_a_cycle_through(graph, set(component), min(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _a_cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest path from ``start`` back to itself inside ``component`` (for a readable message)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return [start]


def test_no_import_cycle_at_import_time() -> None:
    assert [" -> ".join(c) for c in _cycles(_dependencies(_import_time_statements))] == []


def test_no_import_cycle_through_lazy_imports() -> None:
    """A lazy import (inside a function) only defers a cycle to run time: ``gradwatch.config``'s old-path shim
    imported ``metrics.grad_spectrum``, which imported ``config`` back."""
    assert [" -> ".join(c) for c in _cycles(_dependencies(_lazy_statements))] == []


def test_the_cycle_check_finds_a_cycle() -> None:
    """The checks above would pass vacuously if the graph had no edges or the search no eyes."""
    graph = _dependencies(_import_time_statements)
    assert "gradwatch.metrics.base" in graph["gradwatch.metrics.grad_spectrum"]
    assert "gradwatch.functional" in graph["gradwatch.metrics.grad_spectrum"]  # the package above: its __init__ runs
    assert "gradwatch.metrics" not in graph["gradwatch.metrics.grad_spectrum"]  # its own package: no edge
    looped = {**graph, "gradwatch.cadence": graph["gradwatch.cadence"] | {"gradwatch.metrics.base"}}
    assert _cycles(looped) == [["gradwatch.cadence", "gradwatch.metrics.base", "gradwatch.cadence"]]


def test_imports_point_down_the_layers() -> None:
    violations = []
    for name, path in _modules():
        own = _layer(name)
        if own is None:
            continue  # the package root is the public facade and may import anything
        for imported, line, shim in _imports(path):
            target = _layer(imported)
            if imported == "gradwatch":
                if not shim and RANK[own] < RANK["cli"]:
                    violations.append(f"{path.name}:{line} imports the package root")
                continue
            if target is None or target == own or shim:
                continue
            if RANK[target] > RANK[own]:
                violations.append(f"{name}:{line} ({own}) imports {imported} ({target})")
    assert violations == []


def test_host_frameworks_only_in_integrations_and_callbacks() -> None:
    violations = []
    for name, path in _modules():
        if _layer(name) in ("integrations", "scoring", "callbacks", "cli", "__main__", "_report_to"):  # scoring: HF models
            continue
        for imported, line, _ in _imports(path):
            if imported.split(".")[0] in HOSTS:
                violations.append(f"{name}:{line} imports {imported}")
    assert violations == []


def test_the_contract_sees_every_layer() -> None:
    """The check above would pass vacuously if the walk found nothing."""
    layers = {_layer(n) for n, _ in _modules()} - {None}
    assert {"functional", "checks", "cadence", "metrics", "engine", "integrations", "callbacks", "config",
            "registry"} <= layers
    assert all(layer in RANK for layer in layers), layers - set(RANK)


def test_config_names_no_family() -> None:
    """``gradwatch.config`` takes its families from the registry: its code (docstrings aside) names no family's
    key, stem or config class, and it imports no family's module (nor anything under gradwatch.metrics)."""
    from gradwatch.registry import families

    tree = ast.parse((PACKAGE / "config.py").read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", node.value))
        elif isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    assert words & {n for f in families() for n in (f.key, f.stem, f.config_class.__name__)} == set()
    homes = {f.config_class.__module__ for f in families()}
    assert [m for m in imported if m in homes or m == "gradwatch.metrics" or m.startswith("gradwatch.metrics.")] == []


def test_no_metric_or_engine_module_depends_on_config() -> None:
    """The metrics and the engine's helpers take ``Cadence`` and the checks from ``gradwatch.cadence`` and
    ``gradwatch.checks``, below them; only the watcher, which is handed a ``WatchConfig``, names config."""
    graph = _dependencies(_lazy_statements)
    allowed = {"gradwatch.engine.watcher"}
    offenders = sorted(name for name, targets in graph.items()
                       if name.startswith(("gradwatch.metrics", "gradwatch.engine", "gradwatch.functional"))
                       and name not in allowed and "gradwatch.config" in targets)
    assert offenders == []
    assert "gradwatch.config" in graph["gradwatch.engine.watcher"]  # the check has eyes


MAX_LINES = 450
LONG_REASON = re.compile(r"\b(longer|over) (than )?\d+ lines because\b", re.IGNORECASE)


def _too_long(text: str) -> bool:
    """Over :data:`MAX_LINES` lines without a reason in the first line of the module docstring
    (``... (over 450 lines because <reason>)``)."""
    if len(text.splitlines()) <= MAX_LINES:
        return False
    doc = ast.get_docstring(ast.parse(text)) or ""
    return not LONG_REASON.search(doc.split("\n", 1)[0])


def test_no_file_over_450_lines_without_a_stated_reason() -> None:
    """One concept per file (issue 15): a module over 450 lines says why in its docstring's first line."""
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 20  # the walk sees the package
    long = [f"{p.relative_to(PACKAGE.parent)}: {len(p.read_text().splitlines())} lines" for p in paths
            if _too_long(p.read_text())]
    assert long == []
    body = "x = 1\n" * MAX_LINES
    assert not _too_long('"""Short."""\n' + "x = 1\n" * (MAX_LINES - 1))
    assert _too_long('"""A long one."""\n' + body)
    assert not _too_long('"""A long one (over 450 lines because its tables are data)."""\n' + body)
