"""Which package may import which. The runtime packages (cri/, sandbox/, agent/,
deploy/) never import the guest build, the benchmarks or the demo; only the CLI reaches
them, from inside the command that runs each. The layers stand: cri/ → sandbox/ →
agent/, and no import runs back up; cri/ reaches the pod backends only through their
port (sandbox/api.py) and the agent only through its wire records (agent/protocol.py),
except the daemon's composition root, which builds the node's sandbox layer and hands
cri/ its provider."""

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


def test_no_import_runs_back_up() -> None:
    assert _scan(("sandbox", "agent"), ("cri",)) == []
    assert _scan(("agent",), ("sandbox",)) == []


#: where the daemon is put together: it makes the SandboxHost and hands cri/ its provider
COMPOSITION_ROOT = {"cri/server.py", "cri/cli.py", "cri/config.py"}


def _modules(package: str, prefix: str) -> list[tuple[str, str]]:
    """(file, module) for each import of ``prefix``'s modules under ``package``."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(), rel)
        out += [(rel, m) for _, m in _imports(tree) if m.split(".")[0] == prefix]
    return out


def test_metrics_depend_on_the_runtime_not_the_other_way() -> None:
    runtime = [rel for rel, module in _modules("cri/runtime", "cri") if module == "cri.metrics"]
    assert runtime == []


def test_cri_knows_the_sandbox_layer_only_by_its_port() -> None:
    wrong = [
        (rel, module)
        for rel, module in _modules("cri", "sandbox")
        if module != "sandbox.api" and rel not in COMPOSITION_ROOT
    ]
    assert wrong == []


def test_cri_knows_the_agent_only_by_its_wire_records() -> None:
    wrong = [
        (rel, module)
        for rel, module in _modules("cri", "agent")
        if module != "agent.protocol" and rel not in COMPOSITION_ROOT
    ]
    assert wrong == []


def test_the_guest_agent_shares_only_the_protocol_and_mount_calls_with_the_host() -> None:
    shared = {"agent.protocol", "agent.mountapi"}
    wrong = [
        (rel, module)
        for rel, module in _modules("agent/guest", "agent")
        if module not in shared and not module.startswith("agent.guest")
    ]
    assert wrong == []
