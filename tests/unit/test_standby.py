"""Which pods a standby VM serves (sandbox/standby.py), on a host of fake guest assets
and sandboxes that never start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent.errors import AgentUnavailable
from sandbox import standby as standby_module
from sandbox.api import SandboxError, SandboxSpec, SandboxState
from sandbox.lifecycle import PodSandbox
from sandbox.node import SandboxHost
from sandbox.standby import BURST_IDLE_S, Lane, PoolTarget, StandbyPool
from sandbox.vm import MachineSpec
from sandbox.vmpod import VmBackend, vm_backend
from tests.unit.fake_guest import fake_host

MIB = 1 << 20


class RunningProcess:
    def __init__(self, alive: bool = True) -> None:
        self.alive = alive
        self.pid = 4242
        self._on_exit: list[Callable[[RunningProcess], None]] = []

    def on_exit(self, callback: Callable[[RunningProcess], None]) -> None:
        self._on_exit.append(callback)

    def exit(self) -> None:
        self.alive = False
        for callback in self._on_exit:
            callback(self)


def _standby(
    host: SandboxHost,
    name: str,
    *,
    networked: bool,
    alive: bool = True,
    base: MachineSpec | None = None,
) -> PodSandbox:
    """A standby VM that never started: of ``base`` (default: the default shape)."""
    run_dir = host.standby_dir / name
    spec = SandboxSpec(name)
    machine = host.machine_for(spec, run_dir) if base is None else base
    backend = VmBackend(host, replace(machine, name=name, run_dir=run_dir), spec)
    if networked:
        backend.own_netns = Path(f"/run/netns/clearcri-{name}")
    sandbox = PodSandbox(backend, name, host.config)
    sandbox.state = SandboxState.READY
    sandbox.process = RunningProcess(alive)  # type: ignore[assignment]
    return sandbox


class FakeLoop:
    """A pool (one standby VM, a burst of one) whose loop runs for real, inside ``async
    with``, with standby VMs that never start: ``made`` and ``removed`` in order;
    ``on_make`` runs as each is made."""

    def __init__(
        self,
        host: SandboxHost,
        monkeypatch: pytest.MonkeyPatch,
        *,
        burst_idle_s: float = BURST_IDLE_S,
        on_make: Callable[[Lane], None] = lambda lane: None,
    ) -> None:
        self.pool = pool = StandbyPool(host, 1, burst=1)
        self.made: list[PodSandbox] = []
        self.removed: list[PodSandbox] = []

        async def make(lane: Lane) -> PodSandbox:
            on_make(lane)
            name = f"standby-{len(self.made)}"
            self.made.append(_standby(host, name, networked=False, base=lane.machine))
            return self.made[-1]

        async def remove(standby: PodSandbox) -> None:
            self.removed.append(standby)

        monkeypatch.setattr(standby_module, "QUIET_S", 0.0)
        monkeypatch.setattr(standby_module, "BURST_IDLE_S", burst_idle_s)
        monkeypatch.setattr(pool, "_make", make)
        monkeypatch.setattr(pool, "_remove", remove)
        monkeypatch.setattr(pool, "remove_abandoned", lambda: asyncio.sleep(0, 0))

    async def __aenter__(self) -> FakeLoop:
        self.pool.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.pool.ready = []  # nothing real to remove
        await self.pool.close()


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


def test_bigger_pods_of_its_base_take_the_standby_and_others_leave_it(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    run_root = host.config.run_root
    bigger = [
        # two vCPUs: the default base with a vCPU plugged
        SandboxSpec("cpu", cpu_quota_us=200_000, cpu_period_us=100_000),
        # a memory limit above the default: the default base with memory plugged
        SandboxSpec("mem", memory_limit_bytes=384 * MIB, memory_budget_bytes=552 * MIB),
    ]
    for spec in bigger:
        pool = StandbyPool(host, 1)
        standby = _standby(host, "standby-a", networked=False)
        pool.ready = [standby]
        machine = host.machine_for(spec, run_root / spec.sandbox_id)
        assert pool.take(machine, networked=False) is standby, spec.sandbox_id
    pool = StandbyPool(host, 1)
    standby = _standby(host, "standby-a", networked=False)
    pool.ready = [standby]
    others = [
        # a memory limit below the default: the smallest VM's base
        SandboxSpec("small", memory_limit_bytes=64 * MIB, memory_budget_bytes=232 * MIB),
        # extra QEMU arguments: a template of its own
        SandboxSpec("odd", extra_args=["-S"]),
    ]
    for spec in others:
        assert (
            pool.take(host.machine_for(spec, run_root / spec.sandbox_id), networked=False) is None
        )
    assert pool.ready == [standby] and pool.taken == 0
    # without sizing at clone time a template per shape: only the standby's own size
    fixed = fake_host(tmp_path, hotplug=False)
    pool = StandbyPool(fixed, 1)
    pool.ready = [_standby(fixed, "standby-b", networked=False)]
    cpu = fixed.machine_for(bigger[0], run_root / "cpu")
    assert pool.take(cpu, networked=False) is None


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

    async def make(lane: Lane) -> PodSandbox:
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


def test_the_target_grows_by_each_pod_that_found_none_and_shrinks_when_pods_stop() -> None:
    target = PoolTarget(1, burst=2)
    assert target.size == 1 and target.next_shrink_s(0.0) is None
    assert target.missed(10.0) and target.size == 2
    assert target.missed(11.0) and target.size == 3
    assert not target.missed(12.0) and target.size == 3  # the burst's bound
    # pods taking standby VMs keep it large
    target.took(100.0)
    assert not target.shrink(100.0 + BURST_IDLE_S - 1)
    assert target.next_shrink_s(100.0 + BURST_IDLE_S - 1) == pytest.approx(1.0)
    # then one fewer per quiet interval, down to the base
    assert target.shrink(100.0 + BURST_IDLE_S) and target.size == 2
    assert not target.shrink(100.0 + BURST_IDLE_S + 1)
    assert target.shrink(100.0 + 2 * BURST_IDLE_S) and target.size == 1
    assert not target.shrink(1e9) and target.next_shrink_s(1e9) is None
    # no burst: always the base
    fixed = PoolTarget(1)
    assert not fixed.missed(0.0) and fixed.size == 1


def test_a_pod_that_finds_no_standby_makes_the_pool_keep_one_more_of_its_base(
    tmp_path: Path,
) -> None:
    host = fake_host(tmp_path)
    pool = StandbyPool(host, 1, burst=1)
    default, smallest = pool.lanes
    assert (default.machine.memory_mib, default.target.size) == (256, 1)
    assert (smallest.machine.memory_mib, smallest.target.size) == (96, 0)
    pod = host.machine_for(SandboxSpec("p"), host.config.run_root / "p")
    assert pool.take(pod, networked=False) is None
    assert default.target.size == 2 and pool.missed == 1 and pool._wake.is_set()
    assert not pool.take(pod, networked=False) and default.target.size == 2  # the burst's bound
    # a pod below the default's memory: one of the smallest VM's base from now on
    small = SandboxSpec("small", memory_limit_bytes=64 * MIB, memory_budget_bytes=232 * MIB)
    machine = host.machine_for(small, host.config.run_root / "small")
    assert pool.take(machine, networked=False) is None
    assert smallest.target.size == 1 and pool.size == 3 and pool.missed == 3
    # a pod no base serves (a template of its own) counts for none
    odd = SandboxSpec("odd", extra_args=["-S"])
    assert pool.take(host.machine_for(odd, host.config.run_root / "odd"), networked=False) is None
    assert pool.size == 3 and pool.missed == 3
    # without sizing at clone time one base, the default's
    assert len(StandbyPool(fake_host(tmp_path, hotplug=False), 1, burst=1).lanes) == 1


async def test_pods_below_the_default_get_a_standby_of_their_base_while_they_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fake_host(tmp_path)
    small = SandboxSpec("small", memory_limit_bytes=64 * MIB, memory_budget_bytes=232 * MIB)
    machine = host.machine_for(small, host.config.run_root / "small")
    async with FakeLoop(host, monkeypatch, burst_idle_s=0.5) as loop:
        pool, made = loop.pool, loop.made
        await _until(lambda: len(pool.ready) == 1)
        assert vm_backend(made[0]).machine.memory_mib == 256
        assert not pool.has_ready(machine, networked=False)
        assert pool.take(machine, networked=False) is None  # starts as a clone
        await _until(lambda: pool.has_ready(machine, networked=False))
        taken = pool.take(machine, networked=False)
        assert taken is made[1] and vm_backend(taken).machine.memory_mib == 96
        await _until(lambda: len(made) == 3)  # its base's next
        # no pod of that base for BURST_IDLE_S: its standby goes, the default's stays
        await _until(lambda: loop.removed == [made[2]])
        assert pool.ready == [made[0]] and pool.size == 1


async def _until(what: Callable[[], bool]) -> None:
    for _ in range(300):
        if what():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the pool did not get there")


async def test_a_pool_kept_larger_removes_its_extra_standby_when_pods_stop_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fake_host(tmp_path)
    pod = host.machine_for(SandboxSpec("p"), host.config.run_root / "p")
    async with FakeLoop(host, monkeypatch, burst_idle_s=0.3) as loop:
        pool, made = loop.pool, loop.made
        await _until(lambda: len(pool.ready) == 1)
        assert pool.take(pod, networked=False) is made[0]
        assert pool.take(pod, networked=False) is None  # came before the next was ready
        await _until(lambda: len(pool.ready) == 2)
        assert pool.size == 2 and loop.removed == []
        # no pod for BURST_IDLE_S: back to one, the newest removed
        await _until(lambda: len(pool.ready) == 1)
        assert pool.size == 1 and loop.removed == [made[-1]]


async def test_a_standby_is_grown_only_from_its_template(tmp_path: Path) -> None:
    """A pod bigger than the standby it took waits for the MemTotal its template gives
    that size; with the template gone (pruned, rebuilt) the start fails rather than run
    the pod in a VM smaller than it."""
    host = fake_host(tmp_path)
    run_root = host.config.run_root
    default = SandboxSpec("d")
    same = VmBackend(host, host.machine_for(default, run_root / "d"), default)
    assert await same._grow_standby(None) is None  # type: ignore[arg-type]
    bigger = SandboxSpec("cpu", cpu_quota_us=200_000, cpu_period_us=100_000)
    grown = VmBackend(host, host.machine_for(bigger, run_root / "cpu"), bigger)
    with pytest.raises(SandboxError, match="template is gone"):
        await grown._grow_standby(None)  # type: ignore[arg-type]


async def test_a_standby_made_while_its_base_stopped_wanting_it_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def shrink(lane: Lane) -> None:
        if lane.target.base == 0:  # the smallest VM's base
            lane.target.extra = 0  # its pods stopped coming while it started

    loop = FakeLoop(fake_host(tmp_path), monkeypatch, on_make=shrink)
    assert loop.pool.lanes[1].target.missed(time.monotonic())  # a pod of it found none
    async with loop:
        made = loop.made
        await _until(lambda: len(made) == 2 and len(loop.removed) == 1)
        await asyncio.sleep(0.05)
        assert loop.removed == [made[1]] and loop.pool.ready == [made[0]] and len(made) == 2


def test_the_report_counts_ready_vms_and_targets_by_base(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    pool = StandbyPool(host, 1, burst=1)
    pool.ready = [
        _standby(host, "standby-a", networked=False),
        _standby(host, "standby-b", networked=False, alive=False),  # dead: not counted
    ]
    small = SandboxSpec("small", memory_limit_bytes=64 * MIB, memory_budget_bytes=232 * MIB)
    assert (
        pool.take(host.machine_for(small, host.config.run_root / "small"), networked=False) is None
    )
    report = pool.report()
    assert [(b.vcpus, b.memory_mib, b.target, b.pids) for b in report.bases] == [
        (1, 256, 1, (4242,)),
        (1, 96, 1, ()),
    ]
    assert (report.taken, report.missed) == (0, 1)


async def test_a_standby_vm_that_dies_is_replaced_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeLoop(fake_host(tmp_path), monkeypatch) as loop:
        await _until(lambda: len(loop.pool.ready) == 1)
        dead = loop.made[0]
        assert isinstance(dead.process, RunningProcess)
        dead.process.exit()  # killed, crashed: no pod asked
        await _until(lambda: loop.removed == [dead] and len(loop.pool.ready) == 1)
        assert loop.pool.ready == [loop.made[1]]
