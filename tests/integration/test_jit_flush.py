"""An idle pod VM gives back its translated code (sandbox/jit.py and the VMM's
``jit-flush``, TCG only): the memory goes back to the host and the pod works as before."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from pathlib import Path

import pytest

from agent.protocol import ContainerSpec, ExecSpec
from sandbox import jit
from sandbox.api import RootfsImage, SandboxSpec
from sandbox.node import SandboxHost
from sandbox.vmpod import create_vm_pod, vm_backend

pytestmark = pytest.mark.vm


def translated_code_kib(pid: int) -> int:
    """Resident KiB of the QEMU's translation cache (its anonymous rwx mappings)."""
    total, in_cache = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            fields = line.split()
            in_cache = fields[1] == "rwxp" and len(fields) == 5
        elif in_cache and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


async def test_an_idle_pod_vm_gives_back_its_translated_code_and_still_works(
    sandbox_host: SandboxHost, busybox_image: RootfsImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sandbox_host.accel == "kvm":
        pytest.skip("with KVM there is no translated code")
    sandbox_host.config = dataclasses.replace(sandbox_host.config, jit_flush_idle_s=2.0)
    monkeypatch.setattr(jit, "POLL_S", 1.0)
    pod = create_vm_pod(sandbox_host, SandboxSpec("jit-" + str(time.monotonic_ns())[-8:]))
    try:
        await pod.start()
        backend = vm_backend(pod)
        assert backend.jit is not None
        await pod.create_container("c", ContainerSpec(args=["sleep", "3600"]), busybox_image)
        await pod.start_container("c")
        session = await pod.exec("c", ExecSpec(args=["true"]))
        assert await session.wait(30) == 0
        before = translated_code_kib(pod.pid)
        assert before > 8 * 1024, "a pod that ran a container holds its translated code"
        deadline = time.monotonic() + 60
        while backend.jit.flushes == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert backend.jit.flushes == 1
        await asyncio.sleep(2)  # the idle guest translates its timer ticks again
        after = translated_code_kib(pod.pid)
        assert after < before / 3, (before, after)
        # the pod works as before: its container runs, an exec answers
        session = await pod.exec("c", ExecSpec(args=["sh", "-c", "echo still here"]))
        output = b"".join([data async for _channel, data in session])
        assert await session.wait(30) == 0
        assert output == b"still here\n"
        # a second flush waits twice as long an idle time
        assert backend.jit.window == 4.0
    finally:
        await pod.destroy()
    assert vm_backend(pod).jit is None, "removing the pod stops following its VM"
