"""When an idle pod VM's translated code is flushed (sandbox/jit.py): after the idle time,
once per busy spell, each flush waiting twice as long as the one before; never for a busy
VM, and not at all once the VMM says it cannot."""

from __future__ import annotations

import asyncio

import pytest

from sandbox import jit
from sandbox.jit import JitFlusher

POLL = 5.0


class FakeVm:
    """A VM whose CPU use per poll is scripted: ``busy[i]`` seconds of CPU in poll i
    (the clock advances by POLL per poll); gone after the script."""

    def __init__(self, busy: list[float], *, can_flush: bool = True) -> None:
        self.busy = busy
        self.can_flush = can_flush
        self.polls = 0
        self.cpu = 0
        self.flushed_at: list[int] = []  # poll numbers

    def cpu_ns(self, pid: int) -> int | None:
        if self.polls > len(self.busy):
            return None
        return self.cpu

    def clock(self) -> float:
        # called right after cpu_ns in each poll: move on to the next poll
        now = self.polls * POLL
        if self.polls < len(self.busy):
            self.cpu += int(self.busy[self.polls] * 1e9)
        self.polls += 1
        return now

    async def flush(self) -> bool:
        self.flushed_at.append(self.polls - 1)
        return self.can_flush


def follow(vm: FakeVm, idle_s: float = 60.0) -> JitFlusher:
    flusher = JitFlusher(
        "pod", 1, vm.flush, idle_s=idle_s, poll_s=0, cpu_ns=vm.cpu_ns, clock=vm.clock
    )
    asyncio.run(flusher.follow())
    return flusher


IDLE = 0.001  # an idle clone's timer ticks over one poll
BUSY = 1.0  # a container at work


def test_an_idle_vm_is_flushed_once_after_the_idle_time() -> None:
    vm = FakeVm([IDLE] * 60)
    flusher = follow(vm)
    # 12 polls of 5 s = 60 s idle; nothing new to drop afterwards
    assert vm.flushed_at == [12]
    assert flusher.flushes == 1


def test_a_busy_vm_is_never_flushed() -> None:
    vm = FakeVm([BUSY] * 60)
    follow(vm)
    assert vm.flushed_at == []


def test_the_idle_time_counts_from_the_last_busy_poll() -> None:
    vm = FakeVm([IDLE] * 10 + [BUSY] + [IDLE] * 20)
    follow(vm)
    assert vm.flushed_at == [23]


def test_each_flush_after_a_busy_spell_waits_twice_as_long() -> None:
    # flushed at 60 s idle; busy again; the next flush needs 120 s idle, then 240 s
    script = [IDLE] * 12 + [BUSY] + [IDLE] * 30 + [BUSY] + [IDLE] * 60
    vm = FakeVm(script)
    flusher = follow(vm)
    assert vm.flushed_at == [12, 13 + 24, 13 + 30 + 1 + 48]
    assert flusher.window == 60.0 * 8


def test_each_flush_is_reported() -> None:
    vm = FakeVm([IDLE] * 12 + [BUSY] + [IDLE] * 30)
    reported: list[int] = []
    flusher = JitFlusher(
        "pod",
        1,
        vm.flush,
        idle_s=60.0,
        poll_s=0,
        cpu_ns=vm.cpu_ns,
        clock=vm.clock,
        on_flush=lambda: reported.append(vm.polls - 1),
    )
    asyncio.run(flusher.follow())
    assert reported == vm.flushed_at == [12, 13 + 24]


def test_the_wait_stops_growing_at_its_cap() -> None:
    # eight busy spells, each followed by 200 s idle: flushed after 10, 20, 40, 80 s
    # of idling, then always after 160 s (16 x 10 s)
    vm = FakeVm(([BUSY] + [IDLE] * 40) * 8)
    flusher = follow(vm, idle_s=10.0)
    assert flusher.window == 10.0 * jit.MAX_BACKOFF
    idle_polls = [at - 41 * spell - 1 for spell, at in enumerate(vm.flushed_at)]
    assert idle_polls == [2, 4, 8, 16, 32, 32, 32, 32]


def test_a_vmm_that_cannot_flush_is_asked_once() -> None:
    vm = FakeVm([IDLE] * 12 + [BUSY] + [IDLE] * 30, can_flush=False)
    flusher = follow(vm)
    assert vm.flushed_at == [12]
    assert flusher.flushes == 0
    assert vm.polls == 13 < len(vm.busy)  # it stopped following the VM


def test_following_ends_with_the_vm() -> None:
    vm = FakeVm([IDLE] * 3)
    follow(vm)
    assert vm.flushed_at == []


def test_a_failing_flush_ends_following_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> bool:
        raise ConnectionResetError("QMP socket closed")

    vm = FakeVm([IDLE] * 20)

    async def run() -> None:
        flusher = JitFlusher(
            "pod", 1, broken, idle_s=10.0, poll_s=0, cpu_ns=vm.cpu_ns, clock=vm.clock
        )
        flusher.start()
        assert flusher._task is not None
        await flusher._task  # ends, does not raise
        await flusher.stop()

    asyncio.run(run())
    assert "no longer flushed" in caplog.text


def test_stop_cancels_following() -> None:
    async def run() -> None:
        vm = FakeVm([IDLE] * 10**6)
        flusher = JitFlusher(
            "pod", 1, vm.flush, idle_s=1e9, poll_s=0.001, cpu_ns=vm.cpu_ns, clock=vm.clock
        )
        flusher.start()
        await asyncio.sleep(0.05)
        await flusher.stop()
        polls = vm.polls
        await asyncio.sleep(0.02)
        assert vm.polls == polls

    asyncio.run(run())


def test_no_idle_time_means_never() -> None:
    async def run() -> None:
        vm = FakeVm([IDLE] * 10)
        flusher = JitFlusher("pod", 1, vm.flush, idle_s=0, cpu_ns=vm.cpu_ns, clock=vm.clock)
        flusher.start()
        assert flusher._task is None

    asyncio.run(run())


def test_a_vmm_without_the_command_says_so_through_qmp(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.qmp import QmpControl

    replies = {"ours": "", "debian": "unknown command: 'jit-flush'\r\n"}
    sent: list[tuple[str, object]] = []

    async def run() -> list[bool]:
        results = []
        for vmm in ("ours", "debian"):
            qmp = QmpControl("vm")

            async def execute(cmd: str, args: object = None, vmm: str = vmm) -> str:
                sent.append((cmd, args))
                return replies[vmm]

            monkeypatch.setattr(qmp, "execute", execute)
            results.append(await qmp.flush_translated_code())
        return results

    assert asyncio.run(run()) == [True, False]
    assert sent[0] == ("human-monitor-command", {"command-line": "jit-flush"})
