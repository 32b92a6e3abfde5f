"""`clearcri serve`: the composition root of the daemon.

Loads the config, takes the lock file (a second daemon refuses to start), opens the
state database, re-adopts the pod VMs an earlier daemon left running, and serves CRI
on a unix socket with grpc.aio. SIGTERM/SIGINT stop serving and close connections to
the VMs but leave the pods running: the next daemon re-adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2_grpc

from cri.config import Config
from cri.images.hosts import RegistryHosts
from cri.images.service import ImageService
from cri.images.store import ImageStore
from cri.metrics import MetricsExporter, MetricsServer, RuntimeMetrics
from cri.runtime.service import Runtime, RuntimeService
from cri.runtime.state import RuntimeState
from cri.store import Store
from cri.streaming.agent_backend import AgentStreamingBackend
from cri.streaming.server import StreamingServer
from sandbox.guest import GuestAssetsMissing
from sandbox.handlers import Sandboxes
from sandbox.node import SandboxHost
from sandbox.standby import StandbyPool
from sandbox.template import VmTemplate
from sandbox.vm import configure_host_ksm

log = logging.getLogger("clearcri.server")


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class LockFile:
    """An exclusive flock on ``<run_dir>/clearcri.lock`` held for the daemon's life."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise DaemonError(
                f"another clearcri daemon holds {self.path} (pid {owner or 'unknown'}); "
                "stop it first or use another daemon.run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.lock = LockFile(config.daemon.run_dir / "clearcri.lock")
        self.server: grpc.aio.Server | None = None
        self.runtime: Runtime | None = None
        self.store: Store | None = None
        self.images: ImageStore | None = None
        self.extras: list[Any] = []
        self.streaming: StreamingServer | None = None
        self.warm_up: asyncio.Task[VmTemplate | None] | None = None
        self.standby: StandbyPool | None = None
        self.metrics = RuntimeMetrics()
        self.metrics_server: MetricsServer | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        self.lock.acquire()
        try:
            self.store = Store(cfg.daemon.state_dir / "state.db")
            hosts = RegistryHosts.from_dict(cfg.registry)
            self.images = ImageStore(self.store, cfg.daemon.state_dir / "images", hosts=hosts)
            self.images.pull_observer = self.metrics.image_pulled
            if cfg.vm.host_ksm:
                ksm = await asyncio.to_thread(configure_host_ksm, cfg.vm.ksm_pages_to_scan)
                log.info("%s", ksm)
            try:
                host = await asyncio.to_thread(SandboxHost, cfg.vm)
            except (GuestAssetsMissing, ValueError) as exc:
                raise DaemonError(str(exc)) from exc
            host.jit_flushed = self.metrics.jit_flushed
            state = RuntimeState(self.store)
            self.runtime = Runtime(cfg, state, Sandboxes(host), self.images)
            self.runtime.metrics = self.metrics
            await self.runtime.recover()
            # the first pod of the default size should start from a template too
            self.warm_up = host.warm_up()
            if host.templates is not None and cfg.vm.standby > 0:
                # and new pods of the default size take over a VM already running
                self.standby = StandbyPool(host, cfg.vm.standby, burst=cfg.vm.standby_burst)
                host.standby = self.standby
                self.standby.start()
            runtime = self.runtime
            self.streaming = StreamingServer(
                AgentStreamingBackend(
                    runtime.streaming_container_source,
                    runtime.streaming_pod_source,
                    runtime.attach_source,
                ),
                cfg.streaming.address,
                cfg.streaming.port,
            )
            try:
                await self.streaming.start()
            except OSError as exc:
                raise DaemonError(
                    f"cannot serve streaming on {cfg.streaming.address}:{cfg.streaming.port}: "
                    f"{exc.strerror or exc}; set [streaming] port"
                ) from exc
            service = RuntimeService(self.runtime, self.streaming)
            service.observe = self.metrics.observe_cri
            if cfg.metrics.enabled:
                exporter = MetricsExporter(
                    self.metrics,
                    self.runtime,
                    standby=self.standby.report if self.standby is not None else None,
                )
                self.metrics_server = MetricsServer(exporter, cfg.metrics.address, cfg.metrics.port)
                try:
                    await self.metrics_server.start()
                except OSError as exc:
                    raise DaemonError(
                        f"cannot serve metrics on {cfg.metrics.address}:{cfg.metrics.port}: "
                        f"{exc.strerror or exc}; set [metrics] port or enabled = false"
                    ) from exc
            server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", 16 << 20),
                    ("grpc.max_send_message_length", 16 << 20),
                ]
            )
            api_pb2_grpc.add_RuntimeServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
            image_service = ImageService(self.images)
            image_service.observe = self.metrics.observe_cri
            api_pb2_grpc.add_ImageServiceServicer_to_server(image_service, server)  # type: ignore[no-untyped-call]
            socket_path = cfg.daemon.socket
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            server.add_insecure_port(f"unix://{socket_path}")
            await server.start()
            os.chmod(socket_path, 0o660)
            self.server = server
            self.service = service
            log.info(
                "serving CRI on unix://%s accel=%s pods=%d",
                socket_path,
                host.accel,
                len(state.pods),
            )
        except BaseException:
            await self.close()
            raise

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        """Stop serving; leave pod VMs running for the next daemon."""
        if self.server is not None:
            await self.server.stop(grace=5)
            self.server = None
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        if self.streaming is not None:
            await self.streaming.stop()
            self.streaming = None
        if self.warm_up is not None:
            self.warm_up.cancel()
            with contextlib.suppress(BaseException):
                await self.warm_up
        if self.standby is not None:
            self.standby.host.standby = None
            await self.standby.close()
            self.standby = None
        for extra in self.extras:
            with contextlib.suppress(Exception):
                await extra.stop()
        if self.runtime is not None:
            for task in list(self.runtime.background):
                task.cancel()
            for io in self.runtime.io.values():
                io.log.close()
            for sandbox in self.runtime.sandboxes.values():
                await sandbox.close()
        if self.images is not None:
            await self.images.aclose()
        if self.store is not None:
            self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.daemon.socket.unlink()
        self.lock.release()


async def serve(config: Config) -> int:
    daemon = Daemon(config)
    await daemon.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    try:
        await daemon.wait()
        log.info("shutting down; pod VMs keep running")
    finally:
        await daemon.close()
    return 0
