"""QMP control of one pod VM: status, hot-plug of DAX images, vCPUs and memory, template
state save and restore, quit, lifecycle events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, QMPClient, QMPError

from agent.transport import socket_address
from sandbox.hotplug import VIRTIO_MEM_ID, HotplugError, cpus_to_plug

log = logging.getLogger(__name__)

# Events that tell why a VM went away.
LIFECYCLE_EVENTS = ("SHUTDOWN", "GUEST_PANICKED", "RESET", "STOP")


class QmpError(Exception):
    """A QMP command failed or QEMU could not be reached."""


#: What qemu.qmp logs (as an error, then a traceback) for each failed connection attempt.
CONNECT_FAILURE = "Failed to establish connection"


class _RetriedConnectFilter(logging.Filter):
    """Drops qemu.qmp's own record of a failed connection attempt: QmpControl.connect
    retries while QEMU is still setting up its socket (the file is there a moment before
    QEMU listens on it) and raises QmpError itself once it gives up, so the daemon's log
    shows no error for an attempt that was retried."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and args and args[0] == CONNECT_FAILURE)


_RETRIED_CONNECT_FILTER = _RetriedConnectFilter()


class QmpControl:
    """A connected QMP session with the events we care about recorded."""

    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)
        self._client.logger.addFilter(_RETRIED_CONNECT_FILTER)
        self._listener = EventListener(LIFECYCLE_EVENTS)
        self._events_task: asyncio.Task[None] | None = None
        self.shutdown_reason: str | None = None
        self.panicked = False
        self._on_event: list[Callable[[str, dict[str, Any]], None]] = []

    async def connect(self, path: Path, *, timeout: float = 10.0) -> None:
        """Connect to QEMU's QMP socket, retrying while it is not there yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not path.exists():
            if loop.time() >= deadline:
                raise QmpError(f"QMP socket {path} did not appear within {timeout:.0f} s")
            await asyncio.sleep(0.01)
        while True:
            try:
                with socket_address(path) as address:
                    await self._client.connect(address)
                break
            except QMPError as exc:
                if loop.time() >= deadline:
                    raise QmpError(f"cannot connect to QMP at {path}: {exc}") from exc
                await asyncio.sleep(0.02)
        self._client.register_listener(self._listener)
        self._events_task = asyncio.create_task(self._pump_events())

    def on_event(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        self._on_event.append(callback)

    async def _pump_events(self) -> None:
        async for event in self._listener:
            name = str(event["event"])
            data = cast(dict[str, Any], event.get("data", {}))
            if name == "SHUTDOWN":
                self.shutdown_reason = str(data.get("reason", "unknown"))
            elif name == "GUEST_PANICKED":
                self.panicked = True
            log.info("qmp event %s %s", name, data)
            for callback in self._on_event:
                callback(name, data)

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> Any:
        try:
            return await self._client.execute(cmd, args)
        except QMPError as exc:
            raise QmpError(f"QMP {cmd} failed: {exc}") from exc

    async def status(self) -> str:
        result = await self.execute("query-status")
        return str(result["status"])

    async def hotplug_pmem(self, *, dev_id: str, bus: str, path: Path, size: int) -> None:
        """Plug ``path`` read-only and shared as a virtio-pmem device into root port ``bus``."""
        mem_id = f"{dev_id}-mem"
        await self.execute(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": mem_id,
                "mem-path": str(path),
                "size": size,
                "share": True,
                "readonly": True,
            },
        )
        try:
            await self.execute(
                "device_add",
                {"driver": "virtio-pmem-pci", "id": dev_id, "memdev": mem_id, "bus": bus},
            )
        except QmpError:
            with contextlib.suppress(QmpError):
                await self.execute("object-del", {"id": mem_id})
            raise

    async def _pass_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU under ``name`` (SCM_RIGHTS on the QMP socket)."""
        with contextlib.suppress(QmpError):
            await self.execute("closefd", {"fdname": name})
        self._client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def _wait_migration(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status", "none")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', 'no detail')}")
            if loop.time() > deadline:
                raise QmpError(f"migration still {status} after {timeout:.0f} s")
            await asyncio.sleep(0.005)

    async def save_state(self, path: Path, *, timeout: float = 60.0) -> None:
        """Pause the VM and write its device state to ``path``; RAM that lives in a
        shared file is skipped (x-ignore-shared), so the file holds only devices."""
        await self.execute("stop")
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self._pass_fd(fd, "state")
        finally:
            os.close(fd)
        await self.execute("migrate", {"uri": "fd:state"})
        await self._wait_migration(timeout)

    async def restore_state(self, path: Path, *, timeout: float = 60.0, run: bool = True) -> None:
        """Load device state saved by ``save_state`` into a VM started with
        ``-incoming defer`` whose RAM maps the template's file, then run it (unless
        ``run`` is false: it stays paused until ``cont``)."""
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._pass_fd(fd, "state")
        finally:
            os.close(fd)
        await self.execute("migrate-incoming", {"uri": "fd:state"})
        await self._wait_migration(timeout)
        if run:
            await self.execute("cont")

    async def plug(self, *, vcpus: int, memory_bytes: int) -> None:
        """Hot-plug ``vcpus`` more vCPUs (into the free slots QEMU lists) and set the
        virtio-mem device's plugged size to ``memory_bytes`` (sandbox/hotplug.py). Works
        on a paused VM: the guest hears of both when it runs."""
        if vcpus > 0:
            slots = await self.execute("query-hotpluggable-cpus")
            try:
                plan = cpus_to_plug(list(slots), vcpus)
            except HotplugError as exc:
                raise QmpError(str(exc)) from exc
            for args in plan:
                await self.execute("device_add", args)
        if memory_bytes > 0:
            await self.execute(
                "qom-set",
                {
                    "path": f"/machine/peripheral/{VIRTIO_MEM_ID}",
                    "property": "requested-size",
                    "value": memory_bytes,
                },
            )

    async def flush_translated_code(self) -> bool:
        """Have TCG drop the VM's translated code and free its memory (sandbox/jit.py);
        False when the VMM has no ``jit-flush`` command (not our build)."""
        out = await self.execute("human-monitor-command", {"command-line": "jit-flush"})
        return "unknown command" not in str(out)

    async def quit(self) -> None:
        with contextlib.suppress(QmpError, EOFError, ConnectionError):
            await self.execute("quit")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events_task
