"""Sandbox states (sandbox/api.py) and how a state file that names none is met."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sandbox.api import SandboxNotFound, SandboxState
from sandbox.handlers import Sandboxes
from sandbox.lifecycle import STATE_FILE
from sandbox.node import SandboxConfig


def test_states_are_the_strings_state_files_hold() -> None:
    assert [s.value for s in SandboxState] == [
        "created",
        "booting",
        "ready",
        "stopping",
        "stopped",
        "dead",
        "removed",
    ]
    assert json.dumps({"state": SandboxState.READY}) == '{"state": "ready"}'
    assert {s for s in SandboxState if s.running} == {SandboxState.BOOTING, SandboxState.READY}
    assert {s for s in SandboxState if s.at_rest} == {
        SandboxState.CREATED,
        SandboxState.STOPPED,
        SandboxState.DEAD,
        SandboxState.REMOVED,
    }


def test_a_state_file_naming_no_state_is_not_adopted(tmp_path: Path) -> None:
    run_dir = tmp_path / "pod1"
    run_dir.mkdir()
    saved: dict[str, Any] = {
        "machine": {
            "name": "pod1",
            "kernel": "/k",
            "initrd": "/i",
            "os_image": "/o",
            "run_dir": str(run_dir),
        },
        "spec": {"sandbox_id": "pod1"},
        "state": "half-eaten",
        "created_at": 0.0,
    }
    (run_dir / STATE_FILE).write_text(json.dumps(saved))
    host: Any = SimpleNamespace(config=SandboxConfig(run_root=tmp_path))
    with pytest.raises(SandboxNotFound, match="no readable state"):
        asyncio.run(Sandboxes(host).adopt("pod1"))
    # nor one an unknown handler made
    saved["state"] = "stopped"
    saved["kind"] = "teleporter"
    (run_dir / STATE_FILE).write_text(json.dumps(saved))
    with pytest.raises(SandboxNotFound, match="unknown handler"):
        asyncio.run(Sandboxes(host).adopt("pod1"))


def test_a_pod_vm_s_status_tells_its_network_steps(tmp_path: Path) -> None:
    """Verbose PodSandboxStatus shows where the pod network's setup spent its time."""
    from sandbox.api import SandboxSpec
    from sandbox.vm import MachineSpec
    from sandbox.vmpod import VmBackend

    machine = MachineSpec(
        name="p1", kernel=tmp_path, initrd=tmp_path, os_image=tmp_path, run_dir=tmp_path
    )
    host: Any = SimpleNamespace(accel="tcg")
    backend = VmBackend(host, machine, SandboxSpec("p1"))
    assert backend.status_info()["networkSeconds"] == {}
    backend.network = SimpleNamespace(timings={"prepare": 0.002, "cni_add": 0.019})  # type: ignore[assignment]
    info = backend.status_info()
    assert info["networkSeconds"] == {"prepare": 0.002, "cni_add": 0.019}
    assert info["accelerator"] == "tcg" and info["vmmId"] is None


def test_a_run_root_link_that_leads_nowhere_is_removed_as_a_leftover(tmp_path: Path) -> None:
    """A pod that took over a standby VM is a link in the run root to the standby's
    directory; with that directory gone (a daemon killed half-way through removing it),
    recovery lists the link, and removing the leftover removes it."""
    link = tmp_path / "pod1"
    link.symlink_to(tmp_path / "standby" / "standby-gone")
    host: Any = SimpleNamespace(config=SandboxConfig(run_root=tmp_path))
    asyncio.run(Sandboxes(host).remove_leftover("pod1"))
    assert not link.is_symlink()
