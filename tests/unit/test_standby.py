"""Which pods a standby VM serves (sandbox/standby.py), on a host of fake guest assets
and sandboxes that never start."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from agent.errors import AgentUnavailable
from sandbox import standby as standby_module
from sandbox.api import SandboxSpec, SandboxState
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.standby import StandbyPool
from sandbox.vmpod import VmBackend
from tests.unit.fake_guest import fake_host

MIB = 1 << 20


class RunningProcess:
    def __init__(self, alive: bool = True) -> None:
        self.alive = alive
        self.pid = 4242


def _standby(host: SandboxHost, name: str, *, networked: bool, alive: bool = True) -> PodSandbox:
    run_dir = host.standby_dir / name
    spec = SandboxSpec(name)
    backend = VmBackend(host, host.machine_for(spec, run_dir), spec)
    if networked:
        backend.own_netns = Path(f"/run/netns/clearcri-{name}")
    sandbox = PodSandbox(backend, name, host.config)
    sandbox.state = SandboxState.READY
    sandbox.process = RunningProcess(alive)  # type: ignore[assignment]
    return sandbox


def test_a_pod_of_the_default_shape_takes_a_standby_with_the_network_it_needs(
    tmp_path: Path,
) -> None:
    host = fake_host(tmp_path)
    pool = StandbyPool(host, 2)
    plain, networked = (
        _standby(host, "standby-a", networked=False),
        _standby(host, "standby-b", networked=True),
    )
    pool.ready = [plain, networked]
    pod = host.machine_for(SandboxSpec("p"), host.config.run_root / "p")
    assert pool.take(pod, networked=True) is networked
    assert pool.ready == [plain] and pool.taken == 1
    assert pool.take(pod, networked=True) is None
    assert pool.take(pod, networked=False) is plain
    assert pool.ready == [] and pool.taken == 2
    # a pod without a network may take one with a tap (which then leads nowhere)
    pool.ready = [_standby(host, "standby-c", networked=True)]
    assert pool.take(pod, networked=False) is not None


def test_other_pods_leave_the_standby(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    pool = StandbyPool(host, 1)
    standby = _standby(host, "standby-a", networked=False)
    pool.ready = [standby]
    run_root = host.config.run_root
    others = [
        # two vCPUs: the default base with a vCPU plugged
        SandboxSpec("cpu", cpu_quota_us=200_000, cpu_period_us=100_000),
        # a memory limit: another size
        SandboxSpec("mem", memory_limit_bytes=384 * MIB, memory_budget_bytes=552 * MIB),
        # extra QEMU arguments: a template of its own
        SandboxSpec("odd", extra_args=["-S"]),
    ]
    for spec in others:
        assert (
            pool.take(host.machine_for(spec, run_root / spec.sandbox_id), networked=False) is None
        )
    assert pool.ready == [standby] and pool.taken == 0


def test_a_standby_whose_vm_died_is_never_given(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    pool = StandbyPool(host, 2)
    dead = _standby(host, "standby-a", networked=False, alive=False)
    handed = _standby(host, "standby-b", networked=False)
    handed.state = SandboxState.REMOVED
    pool.ready = [dead, handed]
    pod = host.machine_for(SandboxSpec("p"), host.config.run_root / "p")
    assert pool.take(pod, networked=False) is None
    # left for the pool's loop to remove, which is woken
    assert pool._wake.is_set()
    fresh = _standby(host, "standby-c", networked=False)
    pool.ready.append(fresh)
    assert pool.take(replace(pod), networked=False) is fresh


def test_run_directories_without_state_or_target_are_listed_for_recovery(
    tmp_path: Path,
) -> None:
    """A daemon killed between making a run directory and saving into it, or a pod's
    link whose standby directory is gone: recovery finds them to remove."""
    host = fake_host(tmp_path)
    run_root = host.config.run_root
    (run_root / "saved").mkdir()
    (run_root / "saved" / "state.json").write_text("{}")
    (run_root / "unsaved").mkdir()
    (run_root / "dangling").symlink_to(host.standby_dir / "standby-gone")
    (run_root / ".tmp").mkdir()
    assert host.sandbox_ids() == ["dangling", "saved", "unsaved"]


async def test_a_standby_whose_agent_fails_is_retried_and_the_pool_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a standby's agent can go away while it is being made (its ping, its warm-up):
    # that is one failed standby, not the end of the pool
    host = fake_host(tmp_path)
    pool = StandbyPool(host, 1)
    monkeypatch.setattr(standby_module, "QUIET_S", 0.0)
    monkeypatch.setattr(standby_module, "RETRY_S", (0.0,))
    made = _standby(host, "standby-a", networked=False)
    attempts: list[int] = []

    async def make() -> PodSandbox:
        attempts.append(1)
        if len(attempts) == 1:
            raise AgentUnavailable("agent closed the connection")
        return made

    monkeypatch.setattr(pool, "_make", make)
    pool.start()
    for _ in range(200):
        if pool.ready:
            break
        await asyncio.sleep(0.01)
    assert pool.ready == [made] and len(attempts) == 2
    pool.ready = []  # nothing real to remove
    await pool.close()
