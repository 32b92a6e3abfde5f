"""The guest agent: PID 1 of the pod VM, serving the host over the virtio-serial port.

Start-up is on the pod's critical path, so this module imports only os, time, threading,
select and the protocol module; container machinery, ctypes and the like load on first
use (and are warmed up in the background right after the host's hello).
"""

# try/except/pass is used instead of contextlib.suppress to keep contextlib out of the
# guest start-up imports.
# ruff: noqa: SIM105

from __future__ import annotations

import os
import select
import sys
import threading
import time

from agent.guest.channel import Writer, open_port
from agent.guest.errors import OpError
from agent.guest.procs import Reaper, Spawner, which
from agent.guest.settings import Settings
from agent.protocol import (
    AGENT_PORT_NAME,
    AGENT_VERSION,
    CLOSE,
    DATA,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    PORT_FORWARD_STREAM_BASE,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    STDIN,
    SYNC,
    UNKNOWN_OP,
    Frame,
    FrameDecoder,
    ProtocolError,
    decode_json,
    encode_json,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from agent.guest.containers import ContainerManager
    from agent.guest.hotplug import CpuWatcher
    from agent.guest.portforward import PortForwards

_START_UPTIME: float | None = None


def _log(message: str) -> None:
    try:
        os.write(2, f"clearcri-agent: {message}\n".encode())
    except OSError:
        pass


class AfterReply:
    """A result plus work to do once its reply is queued (e.g. start streaming output)."""

    __slots__ = ("callback", "result")

    def __init__(self, result: Any, callback: Callable[[], None]) -> None:
        self.result = result
        self.callback = callback


#: Operations answered on the reader thread itself: short, never blocking, and on a
#: cloned pod's start path, where a thread of their own is a cost (the guest's first
#: threads after a restore run cold code under TCG).
INLINE_OPS = frozenset({"hello", "ping", "reseed", "sync_clock", "set_pod_config"})


class Server:
    #: every operation the agent serves, each by its method ``op_<name>`` (PROTOCOL.md's
    #: table lists the same)
    OPERATIONS = (
        "hello",
        "ping",
        "set_pod_config",
        "sync_clock",
        "configure_network",
        "mount_image",
        "unmount_image",
        "create_container",
        "start_container",
        "signal_container",
        "wait_container",
        "delete_container",
        "list_containers",
        "container_stats",
        "exec",
        "signal_exec",
        "resize",
        "shutdown",
        "reseed",
        "hotplug",
        "update_container",
        "port_forward",
    )

    def __init__(self, settings: Settings, fd: int) -> None:
        self.settings = settings
        self.fd = fd
        self.generation = 0
        self.writer = Writer(fd)
        self.reaper = Reaper()
        self.spawner = Spawner(self.reaper)
        self._manager: ContainerManager | None = None
        self._manager_lock = threading.Lock()
        self._forwards: PortForwards | None = None
        self._cpu_watcher: CpuWatcher | None = None
        self._ops: dict[str, Callable[[dict[str, Any], int], Any]] = {
            name: getattr(self, f"op_{name}") for name in self.OPERATIONS
        }

    # ------------------------------------------------------------------ main loop

    def serve(self) -> None:
        decoder = FrameDecoder()
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            revents = events[0][1] if events else 0
            data = b""
            if revents & select.POLLIN:
                try:
                    data = os.read(self.fd, 1 << 16)
                except InterruptedError:
                    continue
                except OSError as exc:
                    _log(f"port read failed: {exc}")
            if not data:
                # No host on the other end (POLLHUP/EOF): wait for the next one. Anything
                # half-received belongs to the host that left.
                if self.writer.connected:
                    self.writer.set_connected(False)
                decoder = FrameDecoder()
                time.sleep(0.05)
                continue
            for frame in decoder.feed(data):
                self.handle_frame(frame)

    def serve_listener(self, listener: Any) -> None:
        """Serve hosts that connect to ``listener`` (a listening unix socket), one at a
        time: the host handler's stand-in for QEMU's chardev. ``self.fd`` stays the
        same descriptor number throughout (the writer keeps using it): it is the current
        host's connection, or /dev/null while none is connected (the writer sends
        nothing then; events and output wait in its queue)."""
        idle = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        while True:
            try:
                conn, _ = listener.accept()
            except InterruptedError:
                continue
            except OSError as exc:
                _log(f"accept failed: {exc}")
                time.sleep(0.1)
                continue
            os.dup2(conn.fileno(), self.fd, inheritable=False)
            conn.close()
            decoder = FrameDecoder()
            while True:
                try:
                    data = os.read(self.fd, 1 << 16)
                except InterruptedError:
                    continue
                except OSError as exc:
                    _log(f"host connection read failed: {exc}")
                    data = b""
                if not data:
                    break
                for frame in decoder.feed(data):
                    self.handle_frame(frame)
            self.writer.set_connected(False)
            os.dup2(idle, self.fd, inheritable=False)

    def handle_frame(self, frame: Frame) -> None:
        if frame.kind == SYNC:
            self.generation += 1
            self.writer.resync(self.generation)
            if self._manager is not None:
                self._manager.reset_connection(self.generation)
            if self._forwards is not None:
                self._forwards.reset_connection(self.generation)
        elif frame.kind == REQUEST:
            self.handle_request(frame.payload)
        elif frame.kind in (DATA, CLOSE) and frame.stream >= PORT_FORWARD_STREAM_BASE:
            if self._forwards is not None:
                self._forwards.handle_frame(frame)
        elif frame.kind in (DATA, CLOSE):
            manager = self._manager
            target = manager.streams.get(frame.stream) if manager is not None else None
            if target is None or not frame.payload or frame.payload[0] != STDIN:
                return
            if frame.kind == DATA:
                target.write_stdin(frame.payload[1:])
            else:
                target.close_stdin(detach=len(frame.payload) > 1 and frame.payload[1] == 1)

    def handle_request(self, payload: bytes) -> None:
        generation = self.generation
        try:
            message = decode_json(payload)
            request_id = message["id"]
            op = message["op"]
            args = message.get("args") or {}
            if not isinstance(args, dict):
                raise ProtocolError("args must be an object")
        except (ProtocolError, KeyError) as exc:
            _log(f"dropping malformed request: {exc!r}")
            return
        handler = self._ops.get(op)
        if handler is None:
            self._respond_error(request_id, UNKNOWN_OP, f"unknown operation {op!r}", generation)
        elif op in INLINE_OPS:
            self._run(handler, request_id, args, generation)
        else:
            threading.Thread(
                target=self._run,
                args=(handler, request_id, args, generation),
                name=f"op-{op}",
                daemon=True,
            ).start()

    def _run(
        self,
        handler: Callable[[dict[str, Any], int], Any],
        request_id: Any,
        args: dict[str, Any],
        generation: int,
    ) -> None:
        try:
            result = handler(args, generation)
        except OpError as exc:
            self._respond_error(request_id, exc.code, exc.message, generation)
            return
        except (ValueError, TypeError, KeyError) as exc:
            self._respond_error(request_id, INVALID_ARGUMENT, f"bad arguments: {exc}", generation)
            return
        except Exception as exc:
            _log(f"request {request_id} failed: {exc!r}")
            self._respond_error(request_id, INTERNAL, f"{type(exc).__name__}: {exc}", generation)
            return
        after = None
        if isinstance(result, AfterReply):
            result, after = result.result, result.callback
        response = {"id": request_id, "ok": True, "result": result}
        self.writer.send(encode_json(RESPONSE, 0, response), generation=generation)
        if after is not None:
            after()

    def _respond_error(self, request_id: Any, code: str, message: str, generation: int) -> None:
        response = {"id": request_id, "ok": False, "error": {"code": code, "message": message}}
        self.writer.send(encode_json(RESPONSE, 0, response), generation=generation)

    @property
    def manager(self) -> ContainerManager:
        with self._manager_lock:
            if self._manager is None:
                from agent.guest.containers import ContainerManager

                self._manager = ContainerManager(self.settings, self.spawner, self.writer)
            return self._manager

    def warm_up(self) -> None:
        """Load the heavier modules while the host is busy with its own work."""
        try:
            _ = self.manager
            from agent.guest import system

            system.libc()
            import shutil  # noqa: F401

            from agent.guest import network  # noqa: F401  (configure_network comes next)
        except Exception as exc:
            _log(f"warm-up failed: {exc!r}")

    # ------------------------------------------------------------------ operations

    def op_hello(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        from agent.guest import system

        times = system.read_boot_times(self.settings.boot_times_path)
        if _START_UPTIME is not None:
            times["agent_start"] = _START_UPTIME
        times["agent_ready"] = system.uptime()
        mem_total = 0
        try:
            mem_total = system.meminfo().get("MemTotal", 0)
        except OSError:
            pass
        if not getattr(self, "_warmed", False):
            self._warmed = True
            if os.getpid() == 1:
                # in a VM (a template's first hello): vCPUs hot-added to its clones go
                # online as soon as the kernel adds them
                from agent.guest import hotplug

                self._cpu_watcher = hotplug.CpuWatcher()
            threading.Thread(target=self.warm_up, name="warm-up", daemon=True).start()
        return {
            "agent_version": AGENT_VERSION,
            "protocol_version": PROTOCOL_VERSION,
            "boot_times": times,
            "guest_time_ns": time.time_ns(),
            "dax": system.read_flag(self.settings.dax_path),
            "kernel_release": os.uname().release,
            "mem_total_kib": mem_total,
            "connection": generation,
        }

    def op_ping(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        return {"time_ns": time.time_ns()}

    def op_set_pod_config(self, args: dict[str, Any], generation: int) -> None:
        from agent.guest import system

        etc = self.settings.etc_dir
        hostname = args.get("hostname")
        if hostname:
            if not isinstance(hostname, str) or len(hostname) > 64:
                raise OpError(INVALID_ARGUMENT, f"bad hostname {hostname!r}")
            system.sethostname(hostname)
            system.write_file(f"{etc}/hostname", hostname + "\n")
        for key, name in (("resolv_conf", "resolv.conf"), ("hosts", "hosts")):
            text = args.get(key)
            if text is not None:
                if not isinstance(text, str):
                    raise OpError(INVALID_ARGUMENT, f"{key} must be text")
                system.write_file(f"{etc}/{name}", text)

    def op_sync_clock(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        from agent.guest import system

        unix_ns = args["unix_ns"]
        if not isinstance(unix_ns, int) or unix_ns <= 0:
            raise OpError(INVALID_ARGUMENT, "unix_ns must be a positive integer")
        before = time.time_ns()
        system.set_clock(unix_ns)
        return {"offset_ns": unix_ns - before}

    def op_configure_network(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        from agent.guest import network

        interfaces = args["interfaces"]
        if not isinstance(interfaces, list) or not all(isinstance(i, dict) for i in interfaces):
            raise OpError(INVALID_ARGUMENT, "interfaces must be a list of objects")
        try:
            configured = network.configure(interfaces)
        except network.NetworkConfigError as exc:
            raise OpError(FAILED_PRECONDITION, str(exc)) from exc
        return {"interfaces": configured}

    def op_mount_image(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        from agent.guest import images, system
        from agent.guest.containers import check_id

        image_id = args["image_id"]
        check_id("image id", image_id)
        source = images.image_source(args["source"])
        target = f"{self.settings.images_dir}/{image_id}"
        with self._manager_lock:  # one mount at a time keeps the idempotence check honest
            if target not in system.mount_points():
                os.makedirs(target, exist_ok=True)
                images.mount(source, target)
            return {"path": target, "options": system.mount_options(target) or ""}

    def op_unmount_image(self, args: dict[str, Any], generation: int) -> None:
        from agent.guest import system
        from agent.guest.containers import check_id

        image_id = args["image_id"]
        check_id("image id", image_id)
        target = f"{self.settings.images_dir}/{image_id}"
        if target in system.mount_points():
            system.umount(target)
        try:
            os.rmdir(target)
        except OSError:
            pass

    def op_create_container(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        from agent.guest.containers import spec_from_args

        spec = spec_from_args(args)
        return self.manager.create(args["container_id"], spec).to_dict()

    def op_start_container(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        return self.manager.start(args["container_id"]).to_dict()

    def op_signal_container(self, args: dict[str, Any], generation: int) -> None:
        self.manager.signal(
            args["container_id"], int(args.get("signal", 15)), bool(args.get("all", False))
        )

    def op_wait_container(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        timeout = args.get("timeout")
        status = self.manager.wait(
            args["container_id"], float(timeout) if timeout is not None else None
        )
        return status.to_dict()

    def op_delete_container(self, args: dict[str, Any], generation: int) -> None:
        self.manager.delete(args["container_id"], bool(args.get("force", False)))

    def op_reseed(self, args: dict[str, Any], generation: int) -> None:
        import base64

        from agent.guest import system

        system.add_entropy(base64.b64decode(str(args["entropy"])))

    def op_hotplug(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        from agent.guest import hotplug

        vcpus, mem_total = args["vcpus"], args["mem_total_kib"]
        template_mem_total = args.get("template_mem_total_kib", 0)
        if not all(isinstance(v, int) for v in (vcpus, mem_total, template_mem_total)):
            raise OpError(INVALID_ARGUMENT, "vcpus and the MemTotal figures must be integers")
        if vcpus < 1:
            raise OpError(INVALID_ARGUMENT, "vcpus must be at least 1")
        watcher = self._cpu_watcher
        sized = hotplug.wait_for_size(
            vcpus,
            mem_total,
            float(args.get("timeout", 30)),
            grown=watcher.grown if watcher is not None else None,
        )
        if template_mem_total:
            started = time.monotonic()
            sized.raised = hotplug.grow_boot_limits(template_mem_total, sized.mem_total_kib)
            sized.limits_seconds = time.monotonic() - started
        return sized.to_dict()

    def op_update_container(self, args: dict[str, Any], generation: int) -> None:
        from agent.guest import resources

        update = resources.cgroup_update(args["resources"])
        container = self.manager.get(str(args["container_id"]))
        if self.settings.cgroup_mode == "v1":
            resources.update_cgroup_v1(self.settings.cgroup_root, container.cgroup_path, update)
        else:
            resources.update_cgroup(container.cgroup_dir, update)

    def op_list_containers(self, args: dict[str, Any], generation: int) -> list[dict[str, Any]]:
        return [info.to_dict() for info in self.manager.list_all()]

    def op_container_stats(self, args: dict[str, Any], generation: int) -> dict[str, Any]:
        from agent.guest import system

        containers = self.manager.stats(args.get("container_id") or None)
        mem = system.meminfo()
        cpu = system.cpu_times()
        guest = {
            "timestamp_ns": time.time_ns(),
            "mem_total_kib": mem.get("MemTotal", 0),
            "mem_free_kib": mem.get("MemFree", 0),
            "mem_available_kib": mem.get("MemAvailable", 0),
            "cpu_user": (cpu[0] + cpu[1]) if len(cpu) > 1 else 0,
            "cpu_system": (cpu[2] + cpu[5] + cpu[6]) if len(cpu) > 6 else 0,
            "cpu_idle": (cpu[3] + cpu[4]) if len(cpu) > 4 else 0,
            "cpu_total": sum(cpu[:8]),
        }
        result: dict[str, Any] = {"guest": guest}
        if args.get("detail"):
            from agent.guest import cstats

            for stats in containers:
                container = self.manager.containers.get(stats.id)
                if container is None:
                    continue
                try:
                    stats.detail = cstats.container_detail(container, self.settings)
                except Exception as exc:  # the base figures still go out
                    _log(f"stats detail of {stats.id} failed: {exc!r}")
            result["interfaces"] = [i.to_dict() for i in cstats.interfaces()]
        result["containers"] = [c.to_dict() for c in containers]
        return result

    def op_exec(self, args: dict[str, Any], generation: int) -> AfterReply:
        from agent.guest.errors import invalid
        from agent.protocol import ExecSpec

        try:
            spec: ExecSpec = ExecSpec.from_dict(args.get("spec") or {})
        except ValueError as exc:
            raise invalid(f"bad exec spec: {exc}") from exc
        started, activate = self.manager.exec(args["container_id"], spec, generation)
        return AfterReply(started.to_dict(), activate)

    def op_signal_exec(self, args: dict[str, Any], generation: int) -> None:
        self.manager.signal_exec(int(args["stream"]), int(args.get("signal", 15)))

    def op_resize(self, args: dict[str, Any], generation: int) -> None:
        from agent.guest.errors import not_found

        target = self.manager.streams.get(int(args["stream"]))
        if target is None:
            raise not_found(f"stream {args['stream']} does not exist")
        target.resize(int(args["cols"]), int(args["rows"]))

    def op_port_forward(self, args: dict[str, Any], generation: int) -> AfterReply:
        from agent.guest.portforward import PortForwards

        with self._manager_lock:
            if self._forwards is None:
                self._forwards = PortForwards(self.writer)
        result, forward = self._forwards.open(args, generation)
        return AfterReply(result, forward.start)

    def op_shutdown(self, args: dict[str, Any], generation: int) -> None:
        grace = float(args.get("grace", 10.0))
        if self._manager is not None:
            self._manager.stop_all(grace, release=not self.settings.power_off)
        os.sync()
        threading.Thread(target=self._power_off, name="power-off", daemon=True).start()

    def _power_off(self) -> None:
        # Let the reply reach the host first.
        self.writer.flush(2.0)
        time.sleep(0.05)
        if self.settings.power_off:
            from agent.guest import system

            try:
                system.power_off()
            except OSError as exc:
                _log(f"power off failed: {exc}")
                busybox = which(self.settings.busybox)
                if busybox:
                    os.execv(busybox, [busybox, "poweroff", "-f"])
        os._exit(0)


def _listen(path: str) -> Any:
    """A unix socket listening at ``path`` (any length: bound from its directory)."""
    import socket

    directory, _, name = path.rpartition("/")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    cwd = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.chdir(directory or "/")
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        listener.bind(name)
        os.chmod(name, 0o600)
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    listener.listen(4)
    return listener


def _open_channel(settings: Settings) -> int:
    if settings.port_fd is not None:
        os.set_inheritable(settings.port_fd, False)
        return settings.port_fd
    if settings.port_path is not None:
        return os.open(settings.port_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    return open_port(settings.port_name or AGENT_PORT_NAME)


def main(argv: list[str] | None = None) -> None:
    global _START_UPTIME
    try:
        with open("/proc/uptime") as f:
            _START_UPTIME = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        _START_UPTIME = None
    try:
        settings = Settings.from_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        _log(str(exc))
        if os.getpid() != 1:
            raise SystemExit(2) from exc
        settings = Settings()
    if os.getpid() == 1:
        # Ctrl-Alt-Del makes the kernel send SIGINT to init; it must not stop the agent.
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        from agent.guest import system

        system.set_child_subreaper()
    if settings.unrandomized_helpers:
        from agent.guest import system

        system.start_helpers_unrandomized()
    if settings.host_mntns_fd is not None:
        # the host's mount namespace: never inherited by crun or a container
        os.set_inheritable(settings.host_mntns_fd, False)
    resolved = which(settings.crun)
    if resolved is not None:
        settings.crun = resolved
    if settings.listen_path is not None:
        listener = _listen(settings.listen_path)
        server = Server(settings, os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        server.serve_listener(listener)
        return
    fd = _open_channel(settings)
    server = Server(settings, fd)
    try:
        server.serve()
    except BaseException as exc:
        if os.getpid() == 1:
            # PID 1 must never exit: the kernel would panic. Keep reaping and report.
            _log(f"serve loop crashed: {exc!r}; restarting it")
            while True:
                try:
                    server.serve()
                except BaseException as again:
                    _log(f"serve loop crashed again: {again!r}")
                    time.sleep(1.0)
        raise
