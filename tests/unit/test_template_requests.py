"""What a template VM's agent is asked before its state is saved (sandbox/template.py)."""

from __future__ import annotations

from typing import Any, cast

from agent.client import AgentClient
from sandbox.template import TEMPLATE_HOSTNAME, run_clone_requests


class RecordingAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def reseed(self, entropy: bytes) -> None:
        self.calls.append(("reseed", {"bytes": len(entropy)}))

    async def sync_clock(self, unix_ns: int | None = None) -> int:
        self.calls.append(("sync_clock", {"unix_ns": unix_ns}))
        return 0

    async def set_pod_config(self, **kwargs: Any) -> None:
        self.calls.append(("set_pod_config", kwargs))

    async def configure_network(self, interfaces: list[Any]) -> list[Any]:
        self.calls.append(("configure_network", {"interfaces": interfaces}))
        return []


async def test_a_template_runs_the_clone_requests_once_and_writes_no_etc_file() -> None:
    """The requests every clone gets after its restore run once in the template, so their
    first run (imports, Python's specialising) is in the memory clones share; nothing of
    them may outlive a clone's own: a hostname (each clone sets its pod's), no NIC, and
    neither resolv.conf nor hosts (a clone without DNS settings writes none)."""
    agent = RecordingAgent()
    await run_clone_requests(cast(AgentClient, agent))
    assert [name for name, _ in agent.calls] == [
        "reseed",
        "sync_clock",
        "set_pod_config",
        "configure_network",
    ]
    assert agent.calls[0][1] == {"bytes": 64}
    assert agent.calls[2][1] == {"hostname": TEMPLATE_HOSTNAME}
    assert agent.calls[3][1] == {"interfaces": []}
