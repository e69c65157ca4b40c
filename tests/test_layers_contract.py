"""The import contract: imports point down the layers only (DESIGN.md, "Layers").

functional (L0) < registry, config, knobs (shared declarations) < metrics (L1) < engine (L2) < integrations (L3)
< callbacks (L4) < the command line. Every import statement in the package is checked, lazy ones (inside
functions) included; the exceptions are a module-level ``__getattr__`` that keeps an old import path working and
imports for type checking only (``if TYPE_CHECKING:``).
Lightning and transformers are imported only in integrations/ and callbacks/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gradwatch

PACKAGE = Path(gradwatch.__file__).parent

RANK = {"functional": 0, "registry": 1, "config": 2, "knobs": 3, "metrics": 4, "engine": 5, "integrations": 6,
        "callbacks": 7, "cli": 8, "__main__": 8, "_report_to": 8}
HOSTS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "gradwatch" or len(parts) == 1:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, whether inside a module-level __getattr__)."""
    tree = ast.parse(path.read_text(), str(path))
    shims = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
             for n in ast.walk(f)}
    shims |= {id(n) for f in tree.body if isinstance(f, ast.If) and ast.unparse(f.test).endswith("TYPE_CHECKING")
              for n in ast.walk(f)}
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
        if _layer(name) in ("integrations", "callbacks", "cli", "__main__", "_report_to"):
            continue
        for imported, line, _ in _imports(path):
            if imported.split(".")[0] in HOSTS:
                violations.append(f"{name}:{line} imports {imported}")
    assert violations == []


def test_the_contract_sees_every_layer() -> None:
    """The check above would pass vacuously if the walk found nothing."""
    layers = {_layer(n) for n, _ in _modules()} - {None}
    assert {"functional", "metrics", "engine", "integrations", "callbacks", "config", "registry"} <= layers
    assert all(layer in RANK for layer in layers), layers - set(RANK)
