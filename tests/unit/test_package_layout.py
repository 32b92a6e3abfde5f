"""Which top-level package may import which: the runtime packages (cri/, sandbox/,
agent/, deploy/) never import the guest build, the benchmarks or the demo; only the CLI
reaches them, from inside the command that runs each. The sandboxes never import cri/
(cri/ knows them through sandbox/api.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ("cri", "sandbox", "agent", "deploy")
#: Packages the runtime does not import (the CLI loads them for its commands).
NOT_RUNTIME = ("guestbuild", "bench", "demo")
CLI = Path("cri/cli.py")


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    found: list[tuple[ast.stmt, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node, node.module))
    return found


def _top_level(tree: ast.Module) -> set[ast.stmt]:
    return {node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}


def _scan(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """``file:line imports module`` for each import of a ``forbidden`` package under
    ``packages`` (the CLI's imports inside its commands excepted)."""
    problems = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            tree = ast.parse(path.read_text(), str(rel))
            top_level = _top_level(tree)
            for node, module in _imports(tree):
                if module.split(".")[0] not in forbidden:
                    continue
                if rel == CLI and node not in top_level:
                    continue  # a command's own lazy import
                problems.append(f"{rel}:{node.lineno} imports {module}")
    return problems


def test_runtime_packages_do_not_import_tools() -> None:
    assert _scan(RUNTIME, NOT_RUNTIME) == []


def test_sandboxes_do_not_import_cri() -> None:
    assert _scan(("sandbox", "agent"), ("cri",)) == []
