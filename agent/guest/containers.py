"""Containers and exec processes in the guest, run with crun."""

# try/except/pass is used instead of contextlib.suppress to keep contextlib out of the
# guest start-up imports.
# ruff: noqa: SIM105

from __future__ import annotations

import json
import os
import stat
import threading
import time

from agent.guest import hostmounts, idmap, oci, share, system
from agent.guest.errors import OpError, already_exists, internal, invalid, not_found, precondition
from agent.guest.procs import decode_status
from agent.guest.stdio import ConsoleReceiver, OutputPump, StdinFeeder, set_window_size
from agent.guest.watched import WatchedVolumes
from agent.mountapi import unmount_under
from agent.protocol import (
    EVENT,
    EVENT_CONTAINER_EXITED,
    EVENT_CONTAINER_OOM,
    EVENT_EXEC_EXITED,
    STDERR,
    STDOUT,
    ContainerInfo,
    ContainerSpec,
    ContainerStats,
    ExecSpec,
    ExecStarted,
    ExitStatus,
    Mount,
    encode_json,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from agent.guest.channel import Writer
    from agent.guest.procs import Spawner
    from agent.guest.settings import Settings

#: How long output may keep flowing after a process exited before its exit is reported
#: (a background child can hold the pipe open forever).
DRAIN_TIMEOUT = 1.0
#: How long a delete waits for a concurrent delete of the same container.
DELETE_WAIT = 30.0

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def check_id(kind: str, value: str) -> None:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 128
        or value[0] in ".-"
        or not set(value) <= _ID_CHARS
    ):
        raise invalid(f"{kind} {value!r} is not valid: use 1-128 of [A-Za-z0-9_.-]")


class StreamTarget:
    """What host DATA/CLOSE frames and resize/signal requests on a stream act on."""

    def __init__(self, stdin: StdinFeeder | None, tty_fd: int | None, stdin_once: bool) -> None:
        self.stdin = stdin
        self.tty_fd = tty_fd
        self.stdin_once = stdin_once
        self.generation = 0  # connection that attached the stream (execs only)

    def write_stdin(self, data: bytes) -> None:
        if self.stdin is not None:
            self.stdin.write(data)

    def close_stdin(self, *, detach: bool = False) -> None:
        """Host closed stdin; a container without stdin_once keeps it for the next attach."""
        if self.stdin is not None and (self.stdin_once or not detach):
            self.stdin.close()

    def resize(self, cols: int, rows: int) -> None:
        if self.tty_fd is None:
            raise precondition("the stream has no terminal")
        set_window_size(self.tty_fd, cols, rows)


class _Process:
    """Stdio plumbing shared by containers and exec processes."""

    def __init__(self) -> None:
        self.pumps: list[OutputPump] = []
        self.tty_fd: int | None = None
        self.stdin: StdinFeeder | None = None
        self.exited = threading.Event()

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for pump in self.pumps:
            pump.join(max(0.0, deadline - time.monotonic()))

    def close_tty(self) -> None:
        if self.tty_fd is not None:
            try:
                os.close(self.tty_fd)
            except OSError:
                pass
            self.tty_fd = None


class Container(_Process):
    def __init__(self, container_id: str, spec: ContainerSpec, stream: int, bundle: str) -> None:
        super().__init__()
        self.id = container_id
        self.spec = spec
        self.stream = stream
        self.bundle = bundle
        self.rootfs = f"{bundle}/rootfs"
        #: the filesystem of the writable layer (a tmpfs of its own in the VM)
        self.layer = f"{bundle}/layer"
        self.upper = f"{self.layer}/upper"
        self.state = "creating"
        self.pid = 0
        self.created_at_ns = time.time_ns()
        self.started_at_ns = 0
        self.exit_status: ExitStatus | None = None
        #: seconds each step of the last create or start took (ContainerInfo.timings)
        self.timings: dict[str, float] = {}
        #: cgroup v2 directory (None without cgroups or with cgroup v1)
        self.cgroup_dir: str | None = None
        #: the cgroup path (in every v1 hierarchy, or below the v2 root)
        self.cgroup_path: str | None = None
        self.lock = threading.Lock()
        #: set while one delete removes the container; concurrent ones wait on it
        self.deleting: threading.Event | None = None

    def info(self) -> ContainerInfo:
        return ContainerInfo(
            id=self.id,
            state=self.state,
            pid=self.pid,
            stream=self.stream,
            image_id=self.spec.image_id,
            created_at_ns=self.created_at_ns,
            exit_status=self.exit_status,
            timings=dict(self.timings),
        )


class ExecProcess(_Process):
    def __init__(self, container: Container, stream: int) -> None:
        super().__init__()
        self.container = container
        self.stream = stream
        self.pid = 0
        self.exit_code: int | None = None


class ContainerManager:
    def __init__(self, settings: Settings, spawner: Spawner, writer: Writer) -> None:
        self.settings = settings
        self.spawner = spawner
        self.writer = writer
        self.containers: dict[str, Container] = {}
        self.execs: dict[int, ExecProcess] = {}
        self.streams: dict[int, StreamTarget] = {}
        self._lock = threading.Lock()
        self._next_stream = 1
        self._pod_pidns_pid = 0
        self._pod_userns_pid = 0
        self._pod_userns_maps: tuple[list[list[int]], list[list[int]]] | None = None
        self.watched = WatchedVolumes()
        os.makedirs(settings.containers_dir, exist_ok=True)
        os.makedirs(settings.crun_root, exist_ok=True)

    # ------------------------------------------------------------------ helpers

    def _new_stream(self) -> int:
        with self._lock:
            stream = self._next_stream
            self._next_stream += 1
            return stream

    def get(self, container_id: str) -> Container:
        container = self.containers.get(container_id)
        if container is None or container.state == "creating":
            raise not_found(f"container {container_id!r} does not exist in the guest")
        return container

    def _crun(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        argv = [*self.settings.crun_global_args(), *args]
        code, out, err = self.spawner.run(argv, timeout=timeout)
        return code, (out + err).decode(errors="replace").strip()

    def _cgroup_dir(self, container_id: str) -> str | None:
        if self.settings.cgroup_mode != "v2":
            return None
        return f"{self.settings.cgroup_root}{self.settings.container_cgroup(container_id)}"

    def _v1_file(self, container: Container, controller: str, name: str) -> str:
        return f"{self.settings.cgroup_root}/{controller}{container.cgroup_path}/{name}"

    def _prepare_cgroup_parent(self) -> None:
        parent = f"{self.settings.cgroup_root}{self.settings.cgroup_parent}"
        if os.path.isdir(parent):
            return
        os.makedirs(parent, exist_ok=True)
        try:
            with open(f"{self.settings.cgroup_root}/cgroup.subtree_control") as f:
                enabled = f.read().split()
            if enabled:
                with open(f"{parent}/cgroup.subtree_control", "w") as f:
                    f.write(" ".join(f"+{c}" for c in enabled))
        except OSError:
            pass  # crun enables what it needs; this only saves it the work

    def _start_holder(self, unshare_args: list[str], own_ns: str, holder_ns: str) -> int:
        """Start a process that holds new namespaces for the pod (``busybox unshare
        <args> busybox sleep``) and wait until its ``holder_ns`` differs from the agent's
        ``own_ns``. Holders are killed with the pod (``shutdown``)."""
        from agent.guest.procs import which

        busybox = which(self.settings.busybox)
        if busybox is None:
            raise internal(f"{self.settings.busybox} not found: needed for a pod namespace")
        pid = self.spawner.spawn(
            [busybox, "unshare", *unshare_args, busybox, "sleep", "2147483647"]
        )
        own = os.readlink(f"/proc/self/ns/{own_ns}")
        deadline = time.monotonic() + 5.0
        while True:
            try:
                if os.readlink(f"/proc/{pid}/ns/{holder_ns}") != own:
                    return pid
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise internal(f"the pod's {own_ns} namespace did not come up")
            time.sleep(0.005)

    def _pod_pid_namespace(self) -> str:
        """Path of the pod-wide pid namespace, started on first use."""
        with self._lock:
            pid = self._pod_pidns_pid
            if not (pid and os.path.exists(f"/proc/{pid}/ns/pid_for_children")):
                pid = self._start_holder(["--pid", "--fork"], "pid", "pid_for_children")
                self._pod_pidns_pid = pid
        return f"/proc/{pid}/ns/pid_for_children"

    def _pod_user_namespace(self, spec: ContainerSpec) -> str:
        """Path of the pod's user namespace (mode POD), started on first use with the
        spec's mappings; every container of the pod joins it, and a spec asking for
        other mappings is refused (they are the pod's, fixed at its start)."""
        maps = (spec.uid_mappings, spec.gid_mappings)
        with self._lock:
            pid = self._pod_userns_pid
            if pid and os.path.exists(f"/proc/{pid}/ns/user"):
                if maps != self._pod_userns_maps:
                    raise invalid("the pod's user namespace has other id mappings")
                return f"/proc/{pid}/ns/user"
            pid = self._start_holder(["--user"], "user", "user")
            try:
                for name, mappings in (("uid_map", maps[0]), ("gid_map", maps[1])):
                    with open(f"/proc/{pid}/{name}", "w") as f:
                        f.write("".join(f"{c} {h} {n}\n" for c, h, n in mappings))
            except OSError as exc:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
                raise invalid(f"the pod's id mappings were refused: {exc}") from exc
            self._pod_userns_pid = pid
            self._pod_userns_maps = maps
        return f"/proc/{pid}/ns/user"

    # ------------------------------------------------------------------ create

    def create(self, container_id: str, spec: ContainerSpec) -> ContainerInfo:
        check_id("container id", container_id)
        try:
            oci.validate_spec(spec)
        except ValueError as exc:
            raise invalid(str(exc)) from exc
        if spec.image_id:
            check_id("image id", spec.image_id)
            lower = f"{self.settings.images_dir}/{spec.image_id}"
            if not os.path.isdir(lower) or lower not in system.mount_points():
                raise precondition(f"image {spec.image_id!r} is not mounted: call mount_image")
        elif spec.rootfs_dir:
            lower = spec.rootfs_dir
            if not os.path.isdir(lower):
                raise invalid(f"rootfs_dir {lower!r} is not a directory")
        else:
            raise invalid("the spec names neither image_id nor rootfs_dir")

        bundle = f"{self.settings.containers_dir}/{container_id}"
        with self._lock:
            if container_id in self.containers:
                raise already_exists(f"container {container_id!r} already exists")
            container = Container(container_id, spec, 0, bundle)
            self.containers[container_id] = container  # reserves the id
        try:
            container.stream = self._new_stream()
            self._create(container, lower)
        except BaseException:
            self._discard(container)
            raise
        container.state = "created"
        return container.info()

    def _create(self, container: Container, lower: str) -> None:
        spec = container.spec
        if spec.privileged:
            # every capability the agent itself may hand out (a host's bounding set may
            # lack some; crun's capset would fail on those)
            spec.capabilities = oci.capabilities_in(_own_bounding_set())
        bundle = container.bundle
        timings = container.timings
        t0 = time.monotonic()
        if os.path.exists(bundle):
            self._remove_tree(bundle)
        os.makedirs(container.rootfs, exist_ok=True)
        self._mount_layer(container)
        t1 = time.monotonic()
        timings["layer"] = t1 - t0
        userns = self._pod_user_namespace(spec) if spec.uid_mappings else None
        if userns is not None:
            lower = self._idmapped_lower(container, lower, userns)
        system.mount(
            "overlay",
            container.rootfs,
            "overlay",
            0,
            f"lowerdir={lower},upperdir={container.upper},workdir={container.layer}/work",
        )
        t2 = time.monotonic()
        timings["overlay"] = t2 - t1
        if self.settings.host_mntns_fd is not None:
            spec = self._stage_host_mounts(container, userns)
        elif any(share.names_share(m.source) for m in spec.mounts):
            share.ensure_mounted()
            spec = self._follow_watched_volumes(container)
        for mount in spec.mounts:
            if mount.type == "bind" and not os.path.lexists(mount.source):
                raise invalid(f"mount {mount.destination}: {mount.source} does not exist")
        pidns = self._pod_pid_namespace() if spec.pid_namespace == "pod" else None
        t3 = time.monotonic()
        timings["mounts"] = t3 - t2
        cgroup_path: str | None = None
        if self.settings.cgroup_mode != "disabled":
            cgroup_path = self.settings.container_cgroup(container.id)
            container.cgroup_path = cgroup_path
        if self.settings.cgroup_mode == "v2":
            self._prepare_cgroup_parent()
            container.cgroup_dir = self._cgroup_dir(container.id)
        etc_dir = self.settings.etc_dir
        self._ensure_etc_files(etc_dir)
        try:
            config = oci.build_oci_config(
                spec,
                rootfs=container.rootfs,
                cgroup_path=cgroup_path,
                pid_namespace_path=pidns,
                etc_dir=etc_dir,
                cgroup_namespace=self.settings.cgroup_mode == "v2",
                shm_dir=self.settings.shm_dir,
                host_devices=_host_devices() if spec.privileged else None,
                pod_namespaces=self.settings.pod_namespace_paths(),
                user_namespace_path=userns,
            )
        except ValueError as exc:
            raise invalid(str(exc)) from exc
        with open(f"{bundle}/config.json", "w") as f:
            json.dump(config, f)
        t4 = time.monotonic()
        timings["config"] = t4 - t3

        console: ConsoleReceiver | None = None
        child_fds: list[int] = []
        stdin_w: int | None = None
        out_r: list[int] = []
        try:
            argv = [
                *self.settings.crun_global_args(),
                f"--log={bundle}/crun.log",
                "create",
                f"--bundle={bundle}",
                f"--pid-file={bundle}/pid",
            ]
            if spec.tty:
                console = ConsoleReceiver(f"{bundle}/console.sock")
                argv.append(f"--console-socket={console.path}")
                stdin_fd = out_fd = err_fd = None
            else:
                stdin_fd = None
                if spec.stdin:
                    stdin_fd, stdin_w = os.pipe()
                    child_fds.append(stdin_fd)
                r1, out_fd = os.pipe()
                r2, err_fd = os.pipe()
                out_r = [r1, r2]
                child_fds += [out_fd, err_fd]
            argv.append(container.id)
            pid = self.spawner.spawn(argv, stdin=stdin_fd, stdout=out_fd, stderr=err_fd)
            for fd in child_fds:
                os.close(fd)
            child_fds = []
            status = self.spawner.reaper.wait(pid, 120.0)
            code = decode_status(status)[0] if status is not None else -1
            if code != 0:
                raise internal(f"crun create failed: {self._read_log(bundle) or f'exit {code}'}")
            if console is not None:
                container.tty_fd = console.result()
                console = None
            with open(f"{bundle}/pid") as f:
                container.pid = int(f.read().strip())
            timings["crun_create"] = time.monotonic() - t4
        except BaseException:
            for fd in child_fds + out_r + ([stdin_w] if stdin_w is not None else []):
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        finally:
            if console is not None:
                console.close()

        stream = container.stream
        if container.tty_fd is not None:
            master = container.tty_fd
            container.pumps.append(OutputPump(self.writer, stream, STDOUT, master, close=False))
            if spec.stdin:
                container.stdin = StdinFeeder(os.dup(master), tty=True)
        else:
            container.pumps.append(OutputPump(self.writer, stream, STDOUT, out_r[0], close=True))
            container.pumps.append(OutputPump(self.writer, stream, STDERR, out_r[1], close=True))
            if stdin_w is not None:
                container.stdin = StdinFeeder(stdin_w, tty=False)
        self.streams[stream] = StreamTarget(container.stdin, container.tty_fd, spec.stdin_once)
        self.spawner.reaper.watch(container.pid, lambda st: self._on_exit(container, st))

    def _ensure_etc_files(self, etc_dir: str) -> None:
        for name in ("hosts", "resolv.conf", "hostname"):
            path = f"{etc_dir}/{name}"
            if not os.path.exists(path):
                default = "127.0.0.1\tlocalhost\n::1\tlocalhost\n" if name == "hosts" else ""
                system.write_file(path, default)

    def _read_log(self, bundle: str) -> str:
        try:
            with open(f"{bundle}/crun.log", errors="replace") as f:
                text = f.read().strip()
        except OSError:
            return ""
        # crun writes one message per line (or glued together); keep the last ones.
        return text[-2000:]

    def _on_exit(self, container: Container, status: int) -> None:
        finished = time.time_ns()
        # Draining output may take a moment; never hold up the reaper for it.
        threading.Thread(
            target=self._finish, args=(container, status, finished), daemon=True
        ).start()

    def _finish(self, container: Container, status: int, finished: int) -> None:
        container.drain(DRAIN_TIMEOUT)
        code, sig = decode_status(status)
        oom = self._oom_kills(container) > 0
        reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
        exit_status = ExitStatus(
            exit_code=code,
            signal=sig,
            started_at_ns=container.started_at_ns,
            finished_at_ns=finished,
            reason=reason,
        )
        with container.lock:
            container.exit_status = exit_status
            container.state = "exited"
        if oom:
            self.writer.send(
                encode_json(
                    EVENT,
                    container.stream,
                    {"event": EVENT_CONTAINER_OOM, "container_id": container.id},
                )
            )
        self.writer.send(
            encode_json(
                EVENT,
                container.stream,
                {
                    "event": EVENT_CONTAINER_EXITED,
                    "container_id": container.id,
                    "stream": container.stream,
                    "status": exit_status.to_dict(),
                },
            )
        )
        container.exited.set()

    def _oom_kills(self, container: Container) -> int:
        if self.settings.cgroup_mode == "v1" and container.cgroup_path is not None:
            path = self._v1_file(container, "memory", "memory.oom_control")
        elif container.cgroup_dir is not None:
            path = f"{container.cgroup_dir}/memory.events"
        else:
            return 0
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, container_id: str) -> ContainerInfo:
        container = self.get(container_id)
        with container.lock:
            if container.state != "created":
                raise precondition(f"container {container_id!r} is {container.state}, not created")
            # Set before crun start: a short-lived process may exit before crun returns.
            container.started_at_ns = time.time_ns()
            t0 = time.monotonic()
            released = self._release(container)
            if released:
                container.timings = {"release": time.monotonic() - t0}
            else:
                code, output = self._crun("start", container.id)
                container.timings = {"crun_start": time.monotonic() - t0}
                if code != 0:
                    container.started_at_ns = 0
                    raise internal(f"crun start failed: {output}")
            if container.state == "created":
                container.state = "running"
        return container.info()

    def _release(self, container: Container) -> bool:
        """Start a created container the way ``crun start`` does, without running crun
        (a whole process start, which costs hundreds of milliseconds under TCG): its
        init waits reading ``<crun root>/<id>/exec.fifo``; the starter opens it for
        writing, unlinks it (crun then reports the container running) and writes one
        byte. False when there is no such fifo (another crun), so crun starts it; a
        container whose init is gone raises."""
        fifo = f"{self.settings.crun_root}/{container.id}/exec.fifo"
        try:
            if not stat.S_ISFIFO(os.lstat(fifo).st_mode):
                return False
            # no reader (the init died) fails at once instead of blocking
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            container.started_at_ns = 0
            raise internal(f"container {container.id!r} cannot start: {exc}") from exc
        try:
            os.unlink(fifo)
            os.write(fd, b"\0")
        except OSError as exc:
            container.started_at_ns = 0
            raise internal(f"container {container.id!r} cannot start: {exc}") from exc
        finally:
            os.close(fd)
        return True

    def signal(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        container = self.get(container_id)
        if not 0 < signal < 65:
            raise invalid(f"signal {signal} is out of range")
        if container.state == "exited" or container.exited.is_set():
            return
        if all_processes and self.settings.cgroup_mode != "disabled":
            if self._signal_cgroup(container, signal):
                return
            code, output = self._crun("kill", "--all", container.id, str(signal))
            if code != 0 and not container.exited.is_set():
                raise internal(f"crun kill failed: {output}")
            return
        try:
            os.kill(container.pid, signal)
        except ProcessLookupError:
            pass

    def _container_cgroups(self, container: Container) -> list[str]:
        """The container's cgroup directories that exist: its v2 directory, or its
        directory in each v1 hierarchy."""
        if container.cgroup_dir is not None:
            return [container.cgroup_dir] if os.path.isdir(container.cgroup_dir) else []
        if container.cgroup_path is None:
            return []
        root = self.settings.cgroup_root
        try:
            controllers = sorted(os.listdir(root))
        except OSError:
            return []
        found = [f"{root}/{c}{container.cgroup_path}" for c in controllers]
        return [d for d in found if os.path.isfile(f"{d}/cgroup.procs")]

    def _signal_cgroup(self, container: Container, signal: int) -> bool:
        """Send ``signal`` to every process in the container's cgroup (and the cgroups
        below it), as ``crun kill --all`` does, without running crun (a whole process
        start under TCG). SIGKILL on cgroup v2 is one write to ``cgroup.kill``. False
        when the container has no cgroup to read (crun does it then)."""
        directories = self._container_cgroups(container)
        if not directories:
            return False
        if signal == 9 and container.cgroup_dir is not None:
            try:
                with open(f"{container.cgroup_dir}/cgroup.kill", "w") as f:
                    f.write("1")
                return True
            except OSError:
                pass  # a kernel before 5.14: signal each process
        pids: set[int] = set()
        # one hierarchy lists every process of the container (each v1 one does)
        for dirpath, _dirs, _files in os.walk(directories[0]):
            try:
                with open(f"{dirpath}/cgroup.procs") as f:
                    pids.update(int(line) for line in f if line.strip())
            except (OSError, ValueError):
                continue
        for pid in pids:
            try:
                os.kill(pid, signal)
            except ProcessLookupError:
                pass
        return True

    def wait(self, container_id: str, timeout: float | None = None) -> ExitStatus:
        container = self.get(container_id)
        if not container.exited.wait(timeout):
            raise OpError("DEADLINE_EXCEEDED", f"container {container_id!r} is still running")
        assert container.exit_status is not None
        return container.exit_status

    def delete(self, container_id: str, force: bool = False) -> None:
        """Remove a container. Concurrent deletes of one container do the work once; the
        others wait for it (two RemoveContainer calls raced over its unmount)."""
        with self._lock:
            container = self.containers.get(container_id)
            if container is None or container.state == "creating":
                return
            deleting = container.deleting
            if deleting is None:
                running = container.state == "running" and not container.exited.is_set()
                if running and not force:
                    raise precondition(
                        f"container {container_id!r} is running: stop it or delete with force"
                    )
                mine = container.deleting = threading.Event()
        if deleting is not None:
            deleting.wait(DELETE_WAIT)
            return
        try:
            if not container.exited.is_set():
                self._kill_and_wait(container, 5.0)
            self._crun("delete", "--force", container.id)
            self._discard(container)
        except BaseException:
            container.deleting = None  # a later delete tries again
            raise
        finally:
            mine.set()

    def _mount_layer(self, container: Container) -> None:
        """The writable layer's own filesystem. In the VM, a tmpfs per container (at most
        the container's memory limit, else the kernel's default of half the guest's
        memory): a container that fills its layer gets ENOSPC alone, while the agent's
        run dir, exec and the pod's other containers keep working (the writes count
        against the container's memory cgroup all the same). A host pod's layer is a
        directory on the host's disk, as with other runtimes."""
        os.makedirs(container.layer, exist_ok=True)
        if self.settings.layer_fs == "tmpfs":
            resources = container.spec.resources
            limit = resources.memory_limit if resources is not None else None
            options = "mode=0755" + (f",size={limit}" if limit else "")
            try:
                system.mount("tmpfs", container.layer, "tmpfs", 0, options)
            except OSError as exc:
                raise internal(f"writable layer of {container.id}: {exc}") from exc
        for sub in ("upper", "work"):
            os.makedirs(f"{container.layer}/{sub}", exist_ok=True)

    def _idmapped_lower(self, container: Container, lower: str, userns_path: str) -> str:
        """A container in the pod's user namespace: the image through a mount idmapped
        by that namespace, the upper layer owned by the mapped root (see idmap)."""
        spec = container.spec
        try:
            uid = idmap.mapped_root(spec.uid_mappings)
            gid = idmap.mapped_root(spec.gid_mappings)
            userns = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                mapped = f"{container.bundle}/lower"
                os.makedirs(mapped, exist_ok=True)
                idmap.idmapped_bind(lower, mapped, userns)
            finally:
                os.close(userns)
            os.chown(container.upper, uid, gid)
        except OSError as exc:
            raise internal(f"user namespace rootfs: {exc}") from exc
        return mapped

    def _follow_watched_volumes(self, container: Container) -> ContainerSpec:
        """The spec with each watched volume's source replaced by its guest copy (in the
        bundle, so it goes with the container); see agent/guest/watched.py."""
        spec = container.spec
        if not any(m.watch for m in spec.mounts):
            return spec
        sources = {}
        for i, mount in enumerate(spec.mounts):
            if mount.watch and share.names_share(mount.source):
                sources[i] = f"{container.bundle}/watched/{i}"
                self.watched.add(mount.source, sources[i])
        return _with_mount_sources(spec, sources)

    def _stage_host_mounts(self, container: Container, userns: str | None) -> ContainerSpec:
        """Host pods: clone each host-path bind from the host's mount namespace into the
        bundle (see hostmounts) and point the container's bind there."""
        host_ns = self.settings.host_mntns_fd
        assert host_ns is not None
        spec = container.spec
        sources = {}
        own = self.settings.run_dir.rstrip("/") + "/"
        for i, mount in enumerate(spec.mounts):
            # the agent's own paths (image volumes, etc files) are not the host's
            if (
                mount.type == "bind"
                and mount.source.startswith("/")
                and not mount.source.startswith(own)
            ):
                staged = f"{container.bundle}/mounts/{i}"
                try:
                    hostmounts.clone_host_path(host_ns, mount.source, staged, userns)
                except hostmounts.HostMountError as exc:
                    raise precondition(f"mount {mount.destination}: {exc}") from exc
                sources[i] = staged
        return _with_mount_sources(spec, sources)

    def _kill_and_wait(self, container: Container, timeout: float) -> None:
        if container.pid:
            try:
                os.kill(container.pid, 9)
            except ProcessLookupError:
                pass
        container.exited.wait(timeout)

    def _discard(self, container: Container) -> None:
        """Release everything a container holds; safe on half-created containers."""
        for exec_process in [e for e in self.execs.values() if e.container is container]:
            if exec_process.pid:
                try:
                    os.kill(exec_process.pid, 9)
                except ProcessLookupError:
                    pass
        if container.stdin is not None:
            container.stdin.close()
        container.drain(DRAIN_TIMEOUT)
        container.close_tty()
        self.streams.pop(container.stream, None)
        self.watched.remove_under(container.bundle)
        if container.state == "creating":
            self._crun("delete", "--force", container.id)
        rootfs = container.rootfs
        if rootfs in system.mount_points():
            try:
                system.umount(rootfs)
            except OSError:
                system.umount(rootfs, detach=True)
        self._remove_tree(container.bundle)
        for directory in self._container_cgroups(container):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        with self._lock:
            if self.containers.get(container.id) is container:
                del self.containers[container.id]

    @staticmethod
    def _remove_tree(path: str) -> None:
        import shutil

        # never descend into a mount (a host pod's staged host paths live in bundles)
        unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)

    def list_all(self) -> list[ContainerInfo]:
        return [c.info() for c in list(self.containers.values()) if c.state != "creating"]

    # ------------------------------------------------------------------ stats

    def stats(self, container_id: str | None) -> list[ContainerStats]:
        if container_id:
            targets = [self.get(container_id)]
        else:
            targets = [c for c in list(self.containers.values()) if c.state != "creating"]
        return [self._stats(c) for c in targets]

    def _stats(self, container: Container) -> ContainerStats:
        stats = ContainerStats(id=container.id, timestamp_ns=time.time_ns())
        if self.settings.cgroup_mode == "v1" and container.cgroup_path is not None:
            return self._stats_v1(container, stats)
        cgroup = container.cgroup_dir
        if cgroup is None or not os.path.isdir(cgroup):
            return stats
        cpu = _read_keyed(f"{cgroup}/cpu.stat")
        memory = _read_keyed(f"{cgroup}/memory.stat")
        stats.cpu_usage_usec = cpu.get("usage_usec", 0)
        stats.memory_current = _read_int(f"{cgroup}/memory.current")
        stats.memory_anon = memory.get("anon", 0)
        stats.memory_file = memory.get("file", 0)
        stats.memory_working_set = max(0, stats.memory_current - memory.get("inactive_file", 0))
        stats.pids_current = _read_int(f"{cgroup}/pids.current")
        return stats

    def _stats_v1(self, container: Container, stats: ContainerStats) -> ContainerStats:
        memory = _read_keyed(self._v1_file(container, "memory", "memory.stat"))
        stats.cpu_usage_usec = _read_int(self._v1_file(container, "cpuacct", "cpuacct.usage"))
        stats.cpu_usage_usec //= 1000
        stats.memory_current = _read_int(
            self._v1_file(container, "memory", "memory.usage_in_bytes")
        )
        stats.memory_anon = memory.get("total_rss", 0)
        stats.memory_file = memory.get("total_cache", 0)
        stats.memory_working_set = max(
            0, stats.memory_current - memory.get("total_inactive_file", 0)
        )
        stats.pids_current = _read_int(self._v1_file(container, "pids", "pids.current"))
        return stats

    # ------------------------------------------------------------------ exec

    def exec(
        self, container_id: str, spec: ExecSpec, generation: int
    ) -> tuple[ExecStarted, Callable[[], None]]:
        """Start an exec; the returned function starts its output once the reply is out."""
        container = self.get(container_id)
        if container.state != "running" or container.exited.is_set():
            raise precondition(f"container {container_id!r} is not running")
        if not spec.args:
            raise invalid("exec args must not be empty")
        t0 = time.monotonic()
        stream = self._new_stream()
        process = ExecProcess(container, stream)
        bundle = container.bundle
        process_path = f"{bundle}/exec-{stream}.json"
        pid_path = f"{bundle}/exec-{stream}.pid"
        log_path = f"{bundle}/exec-{stream}.log"
        process_config = oci.build_exec_process(container.spec, spec)
        helper = self._nsexec_spec(container, spec, process_config, pid_path, log_path)
        if helper is not None:
            # no crun: the small static helper joins the container (see nsexec.c)
            with open(process_path, "wb") as spec_file:
                spec_file.write(helper)
            argv = [self.settings.nsexec, process_path]
        else:
            with open(process_path, "w") as f:
                json.dump(process_config, f)
            argv = [
                *self.settings.crun_global_args(),
                f"--log={log_path}",
                "exec",
                f"--process={process_path}",
                "--detach",
                f"--pid-file={pid_path}",
            ]
        t1 = time.monotonic()
        console: ConsoleReceiver | None = None
        child_fds: list[int] = []
        parent_fds: list[int] = []
        stdin_fd = out_fd = err_fd = None
        stdin_w: int | None = None
        try:
            if spec.tty:
                console = ConsoleReceiver(f"{bundle}/exec-{stream}.sock")
                argv.append(f"--console-socket={console.path}")
            else:
                if spec.stdin:
                    stdin_fd, stdin_w = os.pipe()
                    child_fds.append(stdin_fd)
                    parent_fds.append(stdin_w)
                r1, out_fd = os.pipe()
                r2, err_fd = os.pipe()
                child_fds += [out_fd, err_fd]
                parent_fds += [r1, r2]
            if helper is None:
                argv.append(container.id)
            crun_pid = self.spawner.spawn(argv, stdin=stdin_fd, stdout=out_fd, stderr=err_fd)
            for fd in child_fds:
                os.close(fd)
            child_fds = []
            status = self.spawner.reaper.wait(crun_pid, 60.0)
            code = decode_status(status)[0] if status is not None else -1
            if code != 0:
                try:
                    with open(log_path, errors="replace") as f:
                        message = f.read().strip()[-2000:]
                except OSError:
                    message = f"exit {code}"
                starter = "crun exec" if helper is None else "nsexec"
                raise internal(f"{starter} failed: {message}")
            if console is not None:
                process.tty_fd = console.result()
                console = None
            with open(pid_path) as f:
                process.pid = int(f.read().strip())
        except BaseException:
            for fd in child_fds + parent_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            for path in (process_path, pid_path, log_path):
                _unlink(path)
            raise
        finally:
            if console is not None:
                console.close()

        if process.tty_fd is not None:
            if spec.stdin:
                process.stdin = StdinFeeder(os.dup(process.tty_fd), tty=True)
        elif stdin_w is not None:
            process.stdin = StdinFeeder(stdin_w, tty=False)
        target = StreamTarget(process.stdin, process.tty_fd, True)
        target.generation = generation
        self.streams[stream] = target
        self.execs[stream] = process
        for path in (process_path, pid_path, log_path):
            _unlink(path)

        def activate() -> None:
            # Runs once the reply is queued, so the host knows the stream before its data.
            if process.tty_fd is not None:
                master = process.tty_fd
                process.pumps.append(OutputPump(self.writer, stream, STDOUT, master, close=False))
            else:
                out_fd, err_fd = parent_fds[-2], parent_fds[-1]
                process.pumps.append(OutputPump(self.writer, stream, STDOUT, out_fd, close=True))
                process.pumps.append(OutputPump(self.writer, stream, STDERR, err_fd, close=True))
            if spec.timeout is not None and spec.timeout > 0:
                timer = threading.Timer(spec.timeout, self._exec_timeout, args=(process,))
                timer.daemon = True
                timer.start()
            self.spawner.reaper.watch(process.pid, lambda st: self._on_exec_exit(process, st))

        step = "nsexec" if helper is not None else "crun_exec"
        timings = {"process": t1 - t0, step: time.monotonic() - t1}
        return ExecStarted(stream=stream, pid=process.pid, timings=timings), activate

    def _nsexec_spec(
        self,
        container: Container,
        spec: ExecSpec,
        process: dict[str, Any],
        pid_path: str,
        log_path: str,
    ) -> bytes | None:
        """The helper's spec for an exec it can start (nsexec.c), or None: crun starts
        it (a terminal, a seccomp profile, a user namespace, no helper, no cgroup)."""
        cspec = container.spec
        if (
            not self.settings.nsexec
            or spec.tty
            or cspec.seccomp not in (None, "unconfined")
            or cspec.uid_mappings
            or not os.path.isfile(self.settings.nsexec)
        ):
            return None
        cgroups: list[str] = []
        if self.settings.cgroup_mode != "disabled":
            cgroups = [f"{d}/cgroup.procs" for d in self._container_cgroups(container)]
            if not cgroups:
                return None
        records = [f"pid={container.pid}", f"pidfile={pid_path}", f"log={log_path}"]
        for name in ("ipc", "uts", "net", "cgroup", "pid", "mnt"):
            try:
                theirs = os.stat(f"/proc/{container.pid}/ns/{name}").st_ino
                ours = os.stat(f"/proc/self/ns/{name}").st_ino
            except OSError:
                return None
            if theirs != ours:
                records.append(f"ns={name}")
        records += [f"cgroup={path}" for path in cgroups]
        user = process["user"]
        records += [f"uid={int(user['uid'])}", f"gid={int(user['gid'])}"]
        records += [f"group={int(g)}" for g in user.get("additionalGids", [])]
        names = process["capabilities"]["bounding"]
        records += [f"cap={oci.CAPABILITY_NUMBERS.index(n)}" for n in names]
        if process.get("noNewPrivileges"):
            records.append("nnp=1")
        for limit in process.get("rlimits", []):
            number = oci.rlimit_number(limit["type"])
            if number is None:
                return None
            records.append(f"rlimit={number} {int(limit['soft'])} {int(limit['hard'])}")
        records.append(f"cwd={process['cwd']}")
        records += [f"env={item}" for item in process["env"]]
        records += [f"arg={arg}" for arg in process["args"]]
        return b"".join(record.encode() + b"\0" for record in records)

    def _exec_timeout(self, process: ExecProcess) -> None:
        if not process.exited.is_set():
            try:
                os.kill(process.pid, 9)
            except ProcessLookupError:
                pass

    def _on_exec_exit(self, process: ExecProcess, status: int) -> None:
        threading.Thread(target=self._finish_exec, args=(process, status), daemon=True).start()

    def _finish_exec(self, process: ExecProcess, status: int) -> None:
        process.drain(DRAIN_TIMEOUT)
        code, sig = decode_status(status)
        process.exit_code = code
        self.writer.send(
            encode_json(
                EVENT,
                process.stream,
                {
                    "event": EVENT_EXEC_EXITED,
                    "stream": process.stream,
                    "exit_code": code,
                    "signal": sig,
                },
            )
        )
        process.exited.set()
        if process.stdin is not None:
            process.stdin.close()
        process.close_tty()
        self.streams.pop(process.stream, None)
        self.execs.pop(process.stream, None)

    def signal_exec(self, stream: int, signal: int) -> None:
        process = self.execs.get(stream)
        if process is None:
            raise not_found(f"exec stream {stream} does not exist")
        try:
            os.kill(process.pid, signal)
        except ProcessLookupError:
            pass

    def reset_connection(self, generation: int) -> None:
        """A new host connected: exec sessions of the old one lose their stdin."""
        for target in list(self.streams.values()):
            if target.generation and target.generation != generation and target.stdin:
                target.stdin.close()

    def stop_all(self, grace: float, *, release: bool = True) -> None:
        """Stop every container (SIGTERM, ``grace``, SIGKILL). With ``release``, also
        delete them and what the pod holds; a pod VM about to power off skips that (its
        host kills the VM right after: nothing in it outlives it)."""
        running = [c for c in list(self.containers.values()) if c.pid and not c.exited.is_set()]
        for container in running:
            try:
                os.kill(container.pid, 15)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for container in running:
            container.exited.wait(max(0.0, deadline - time.monotonic()))
        for container in running:
            if not container.exited.is_set():
                self._kill_and_wait(container, 2.0)
        if not release:
            return
        for container in list(self.containers.values()):
            try:
                self.delete(container.id, force=True)
            except OpError:
                pass
        for holder in (self._pod_pidns_pid, self._pod_userns_pid):
            if holder:
                try:
                    os.kill(holder, 9)
                except ProcessLookupError:
                    pass
        self._pod_pidns_pid = self._pod_userns_pid = 0
        self._pod_userns_maps = None


def _own_bounding_set() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return (1 << len(oci.CAPABILITY_NUMBERS)) - 1


def _host_devices() -> list[dict[str, Any]]:
    """Every device node under /dev, for a privileged container (as runc's host device
    list: not the terminal, shared-memory and message-queue trees it gets its own of)."""
    skip_dirs = {"/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/fd"}
    skip_files = {"/dev/console", "/dev/ptmx"}
    found: list[dict[str, Any]] = []
    for root, dirs, files in os.walk("/dev"):
        dirs[:] = [d for d in dirs if f"{root}/{d}" not in skip_dirs]
        for name in files:
            path = f"{root}/{name}"
            if path in skip_files:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            entry = oci.device_entry(path, st.st_mode, st.st_rdev, st.st_uid, st.st_gid)
            if entry is not None:
                found.append(entry)
    return found


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _read_keyed(path: str) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                try:
                    values[key] = int(value)
                except ValueError:
                    continue
    except OSError:
        pass
    return values


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def spec_from_args(args: dict[str, Any]) -> ContainerSpec:
    try:
        spec: ContainerSpec = ContainerSpec.from_dict(args.get("spec") or {})
    except ValueError as exc:
        raise invalid(f"bad container spec: {exc}") from exc
    return spec


def _with_mount_sources(spec: ContainerSpec, sources: dict[int, str]) -> ContainerSpec:
    """A copy of ``spec`` whose mount number i has source ``sources[i]``."""
    if not sources:
        return spec
    copy: ContainerSpec = ContainerSpec.from_dict(spec.to_dict())
    copy.mounts = [
        Mount(
            destination=m.destination,
            source=sources.get(i, m.source),
            type=m.type,
            options=list(m.options),
        )
        for i, m in enumerate(spec.mounts)
    ]
    return copy
