"""The layers stand: cri/ → sandbox/ → agent/, and no import runs back up. cri/ reaches
the pod backends only through their port (sandbox/api.py) and the agent only through
its wire records (agent/protocol.py); only the daemon's composition root (the modules
that build the node's sandbox layer from the config and start it) names the backends."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: where the daemon is put together: they make the SandboxHost and hand cri/ its provider
COMPOSITION_ROOT = {"cri/server.py", "cri/cli.py", "cri/config.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import is (function bodies and
    TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def crossing(package: str, prefix: str) -> list[tuple[str, str]]:
    out = []
    for path in package_files(package):
        rel = str(path.relative_to(ROOT))
        out += [(rel, m) for m in imported_modules(path) if m.split(".")[0] == prefix]
    return out


@pytest.mark.parametrize(
    ("package", "prefix"),
    [("sandbox", "cri"), ("agent", "cri"), ("agent", "sandbox")],
)
def test_no_import_runs_back_up(package: str, prefix: str) -> None:
    assert crossing(package, prefix) == []


def test_cri_knows_the_sandbox_layer_only_by_its_port() -> None:
    wrong = [
        (rel, module)
        for rel, module in crossing("cri", "sandbox")
        if module != "sandbox.api" and rel not in COMPOSITION_ROOT
    ]
    assert wrong == []


def test_cri_knows_the_agent_only_by_its_wire_records() -> None:
    wrong = [
        (rel, module)
        for rel, module in crossing("cri", "agent")
        if module != "agent.protocol" and rel not in COMPOSITION_ROOT
    ]
    assert wrong == []


def test_the_guest_agent_shares_only_the_protocol_and_mount_calls_with_the_host() -> None:
    shared = {"agent.protocol", "agent.mountapi"}
    wrong = [
        (rel, module)
        for rel, module in crossing("agent/guest", "agent")
        if module not in shared and not module.startswith("agent.guest")
    ]
    assert wrong == []
