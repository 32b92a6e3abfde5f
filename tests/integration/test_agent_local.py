"""The guest agent run on this host against the real host client and real crun.

The agent runs as a root subprocess in a private mount namespace (so its overlay mounts
and crun's view of cgroups stay out of the host's way). A small relay stands in for QEMU's
virtio-serial chardev: a unix socket server with at most one host connection, which
throws away what the guest writes while no host is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.client import AgentClient
from agent.errors import (
    AgentError,
    AgentUnavailable,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from agent.protocol import STDERR, STDOUT, ContainerSpec, ExecSpec, ImageSource, Rlimit

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = shutil.which("busybox")
CRUN = shutil.which("crun")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, crun)"),
    pytest.mark.skipif(CRUN is None, reason="crun is not installed"),
]


@pytest.fixture(scope="module")
def nsexec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exec helper, built as the guest build builds it."""
    from guestbuild.osimage import build_nsexec

    target = tmp_path_factory.mktemp("nsexec") / "nsexec"
    build_nsexec(REPO / "agent" / "guest" / "nsexec.c", target)
    return target


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if BUSYBOX is None:
        pytest.fail("busybox (static) is needed to build the test rootfs")
    root = tmp_path_factory.mktemp("rootfs")
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (root / sub).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


class Relay:
    """Stands in for QEMU's `-chardev socket,server=on,wait=off` + virtserialport."""

    def __init__(self, guest: socket.socket, path: Path) -> None:
        self.guest_sock = guest
        self.path = path
        self.client: asyncio.StreamWriter | None = None
        self.guest_writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        reader, self.guest_writer = await asyncio.open_unix_connection(sock=self.guest_sock)
        self._tasks.append(asyncio.create_task(self._from_guest(reader)))
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))

    async def _from_guest(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(1 << 16):
            client = self.client
            if client is not None and not client.is_closing():
                client.write(data)  # else dropped, as QEMU does

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.client is not None:
            writer.close()
            return
        self.client = writer
        try:
            while data := await reader.read(1 << 16):
                assert self.guest_writer is not None
                self.guest_writer.write(data)
                await self.guest_writer.drain()
        except ConnectionError:
            pass
        finally:
            self.client = None
            writer.close()

    def drop_client(self) -> None:
        if self.client is not None:
            self.client.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        if self.guest_writer is not None:
            self.guest_writer.close()


class LocalAgent:
    def __init__(self, tmp: Path, nsexec: Path | None = None) -> None:
        self.tmp = tmp
        self.nsexec = nsexec
        self.run_dir = tmp / "run"
        self.socket_path = tmp / "agent.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.relay: Relay | None = None

    async def start(self) -> None:
        guest, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        script = 'mountpoint -q /sys/fs/cgroup/unified && umount /sys/fs/cgroup/unified; exec "$@"'
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                sys.executable,
                "-S",
                "-s",
                "-B",
                "-c",
                "from agent.guest.server import main; main()",
                f"--port-fd={guest.fileno()}",
                f"--run-dir={self.run_dir}",
                "--cgroup=disabled",
                "--no-poweroff",
                "--pod-namespaces=",
                f"--busybox={BUSYBOX}",
                f"--nsexec={self.nsexec or ''}",
            ],
            pass_fds=(guest.fileno(),),
            env=env,
            stderr=open(self.tmp / "agent.log", "wb"),  # noqa: SIM115
        )
        guest.close()
        self.relay = Relay(host, self.socket_path)
        await self.relay.start()

    def mounts(self) -> list[str]:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/mounts") as f:
            return [line.split()[1] for line in f]

    def crun_state(self, container_id: str) -> str:
        """What crun itself says of a container's status."""
        out = subprocess.run(
            [CRUN or "crun", f"--root={self.run_dir}/crun", "state", container_id],
            capture_output=True,
            text=True,
        ).stdout
        return str(json.loads(out)["status"]) if out else ""

    def crun_list(self) -> str:
        return subprocess.run(
            [CRUN or "crun", f"--root={self.run_dir}/crun", "list", "-q"],
            capture_output=True,
            text=True,
        ).stdout

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
        if self.process is not None and self.process.poll() is None:
            # The agent is a subreaper: whatever it started is still below it.
            for pid in descendants(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
async def local_agent(tmp_path: Path, nsexec: Path) -> AsyncIterator[LocalAgent]:
    agent = LocalAgent(tmp_path, nsexec)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


@pytest.fixture
async def client(local_agent: LocalAgent, rootfs: Path) -> AsyncIterator[AgentClient]:
    c = await AgentClient.connect(local_agent.socket_path, timeout=20)
    await c.mount_image("busybox", ImageSource(dir=str(rootfs)))
    try:
        yield c
    finally:
        with contextlib.suppress(Exception):
            await c.shutdown(grace=1.0)
        await c.close()


def spec(*args: str, **kwargs: object) -> ContainerSpec:
    return ContainerSpec(args=list(args), image_id="busybox", **kwargs)  # type: ignore[arg-type]


async def collect(output: AsyncIterable[tuple[int, bytes]]) -> dict[int, bytes]:
    chunks: dict[int, bytes] = {STDOUT: b"", STDERR: b""}
    async for channel, data in output:
        chunks[channel] = chunks.get(channel, b"") + data
    return chunks


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    start = time.monotonic()
    yield
    assert time.monotonic() - start < seconds


async def test_hello_reports_guest_facts(client: AgentClient) -> None:
    ready = client.ready
    assert ready.protocol_version == 1
    assert ready.kernel_release == os.uname().release
    assert ready.mem_total_kib > 0
    assert "agent_ready" in ready.boot_times
    assert abs(ready.guest_time_ns - time.time_ns()) < 60 * 10**9


async def test_echo_hello_streams_output(client: AgentClient) -> None:
    info = await client.create_container("c1", spec("echo", "hello"))
    assert info.state == "created"
    # the agent says where its time went
    assert set(info.timings) == {"layer", "overlay", "mounts", "config", "crun_create"}
    assert all(seconds >= 0 for seconds in info.timings.values())
    assert info.timings["crun_create"] > 0
    output = client.subscribe_output("c1")
    started = await client.start_container("c1")
    # started without running crun again: the agent lets the init go itself
    assert set(started.timings) == {"release"}
    chunks = await asyncio.wait_for(collect(output), 20)
    status = await client.wait_container("c1")
    assert chunks[STDOUT] == b"hello\n"
    assert status.exit_code == 0
    assert status.reason == "Completed"
    assert status.finished_at_ns >= status.started_at_ns > 0
    await client.delete_container("c1")


async def test_exit_code_and_stderr(client: AgentClient) -> None:
    await client.create_container("c3", spec("sh", "-c", "echo oops >&2; exit 3"))
    output = client.subscribe_output("c3")
    await client.start_container("c3")
    status = await client.wait_container("c3", timeout=20)
    chunks = await asyncio.wait_for(collect(output), 5)
    assert (status.exit_code, status.signal, status.reason) == (3, 0, "Error")
    assert chunks[STDERR] == b"oops\n"
    listed = {c.id: c for c in await client.list_containers()}
    assert listed["c3"].state == "exited"
    assert listed["c3"].exit_status == status
    await client.delete_container("c3")


async def test_sigterm_stops_sleep(client: AgentClient) -> None:
    # In a shared pod pid namespace the sleep is not its namespace's init, so SIGTERM's
    # default action applies (an init process ignores signals it has no handler for).
    await client.create_container("s1", spec("sleep", "1000", pid_namespace="pod"))
    await client.start_container("s1")
    await asyncio.sleep(0.2)
    await client.signal_container("s1", signal.SIGTERM)
    status = await client.wait_container("s1", timeout=20)
    assert status.signal == signal.SIGTERM
    assert status.exit_code == 128 + signal.SIGTERM
    assert status.reason == "Error"
    await client.delete_container("s1")


async def test_a_started_container_is_running_for_crun_too(
    client: AgentClient, local_agent: LocalAgent
) -> None:
    """The agent starts a created container without crun (it lets the init go through
    crun's exec fifo); crun's own view must follow: created, then running, then
    stopped, and its kill and delete still work."""
    await client.create_container("r0", spec("sleep", "1000"))
    assert local_agent.crun_state("r0") == "created"
    await client.start_container("r0")
    assert local_agent.crun_state("r0") == "running"
    await client.signal_container("r0", signal.SIGKILL)
    await client.wait_container("r0", timeout=20)
    assert local_agent.crun_state("r0") == "stopped"
    await client.delete_container("r0")
    assert "r0" not in local_agent.crun_list()


async def test_a_container_whose_init_died_before_start_fails_to_start(
    client: AgentClient, local_agent: LocalAgent
) -> None:
    info = await client.create_container("r1", spec("sleep", "1000"))
    os.kill(info.pid, signal.SIGKILL)  # the init, waiting on its fifo
    await asyncio.sleep(0.5)
    with pytest.raises(AgentError):
        await asyncio.wait_for(client.start_container("r1"), 20)
    await client.delete_container("r1", force=True)


async def test_sigkill_stops_init_sleep(client: AgentClient) -> None:
    await client.create_container("s2", spec("sleep", "1000"))
    await client.start_container("s2")
    await client.signal_container("s2", signal.SIGKILL)
    status = await client.wait_container("s2", timeout=20)
    assert status.signal == signal.SIGKILL
    await client.delete_container("s2")


async def test_exec_with_pipes_and_stdin(client: AgentClient) -> None:
    await client.create_container("e1", spec("sleep", "1000"))
    await client.start_container("e1")

    result = await client.exec_sync("e1", ["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (result.exit_code, result.stdout, result.stderr) == (4, b"out\n", b"err\n")

    session = await client.exec("e1", ExecSpec(args=["cat"], stdin=True))
    await session.write_stdin(b"ping\n")
    await session.write_stdin(b"pong\n")
    await session.close_stdin()
    chunks = await asyncio.wait_for(collect(session), 20)
    assert await session.wait() == 0
    assert chunks[STDOUT] == b"ping\npong\n"

    fed = await client.exec_sync("e1", ["wc", "-c"], stdin=b"x" * 200_000)
    assert fed.stdout.strip() == b"200000"

    # The session ends when the process exits even though stdin stays open.
    session = await client.exec("e1", ExecSpec(args=["sh", "-c", "echo bye"], stdin=True))
    with deadline(10):
        assert await session.wait(10) == 0
    assert (await collect(session))[STDOUT] == b"bye\n"

    timed = await client.exec_sync("e1", ["sleep", "100"], timeout=0.5)
    assert timed.timed_out
    assert timed.exit_code == 128 + signal.SIGKILL
    await client.delete_container("e1", force=True)


IDENTITY = (
    "id -u; id -g; id -G; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status; "
    "pwd; echo $A; ulimit -n; ulimit -Hn; umask; "
    "[ $(readlink /proc/self/ns/pid) = $(readlink /proc/1/ns/pid) ] && echo same-pid-ns; "
    "[ $(readlink /proc/self/ns/mnt) = $(readlink /proc/1/ns/mnt) ] && echo same-mnt-ns; "
    '[ "$(cat /proc/self/cgroup)" = "$(cat /proc/1/cgroup)" ] && echo same-cgroups; '
    "ls -1 /; echo done"
)


async def test_exec_without_crun_is_the_process_crun_would_start(client: AgentClient) -> None:
    """An exec without a terminal is started by the static helper (nsexec.c), one with a
    terminal by crun: the same command must see the same identity, capabilities, limits,
    namespaces, cgroups and root either way."""
    await client.create_container(
        "id1",
        spec(
            "sleep",
            "1000",
            uid=1000,
            gid=1000,
            additional_gids=[2000, 3000],
            capabilities=["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            no_new_privs=True,
            cwd="/tmp",
            env=["A=from-the-container"],
            rlimits=[Rlimit(type="RLIMIT_NOFILE", soft=100, hard=200)],
        ),
    )
    await client.start_container("id1")
    session = await client.exec("id1", ExecSpec(args=["sh", "-c", IDENTITY]))
    assert set(session.timings) == {"process", "nsexec"}
    helper = await asyncio.wait_for(collect(session), 20)
    assert await session.wait(10) == 0, helper
    session = await client.exec("id1", ExecSpec(args=["sh", "-c", IDENTITY], tty=True))
    assert set(session.timings) == {"process", "crun_exec"}
    crun = await asyncio.wait_for(collect(session), 20)
    assert await session.wait(10) == 0
    assert helper[STDERR] == b""
    lines = helper[STDOUT].decode().splitlines()
    assert lines == crun[STDOUT].decode().replace("\r\n", "\n").splitlines()
    assert lines[:3] == ["1000", "1000", "1000 2000 3000"]
    assert "same-pid-ns" in lines and "same-mnt-ns" in lines and "same-cgroups" in lines
    assert lines[-1] == "done" and "from-the-container" in lines
    # a command that is not there: the exec fails, saying so, and nothing is left
    with pytest.raises(AgentError, match="no-such-command"):
        await client.exec("id1", ExecSpec(args=["no-such-command"]))
    await client.delete_container("id1", force=True)


async def test_exec_with_tty_and_resize(client: AgentClient) -> None:
    await client.create_container("t1", spec("sleep", "1000"))
    await client.start_container("t1")

    session = await client.exec("t1", ExecSpec(args=["tty"], tty=True))
    chunks = await asyncio.wait_for(collect(session), 20)
    assert await session.wait() == 0
    assert re.fullmatch(rb"/dev/pts/\d+\r?\n", chunks[STDOUT]), chunks

    session = await client.exec("t1", ExecSpec(args=["sh"], tty=True, stdin=True))
    await session.resize(cols=123, rows=45)
    await session.write_stdin(b"stty size; exit 7\n")
    chunks = await asyncio.wait_for(collect(session), 20)
    assert await session.wait() == 7
    assert b"45 123" in chunks[STDOUT]
    await client.delete_container("t1", force=True)


async def test_container_with_tty(client: AgentClient) -> None:
    await client.create_container("t2", spec("sh", "-c", "tty; stty size", tty=True))
    output = client.subscribe_output("t2")
    await client.start_container("t2")
    chunks = await asyncio.wait_for(collect(output), 20)
    status = await client.wait_container("t2")
    assert status.exit_code == 0
    assert re.match(rb"/dev/pts/\d+", chunks[STDOUT]), chunks
    await client.delete_container("t2")


async def test_two_containers_share_image_and_pid_namespace(
    client: AgentClient, local_agent: LocalAgent
) -> None:
    await client.create_container("a", spec("sleep", "1000", pid_namespace="pod"))
    await client.create_container("b", spec("sleep", "999", pid_namespace="pod"))
    await client.start_container("a")
    await client.start_container("b")
    # Both run on the one read-only image; writes land in each one's own upper layer.
    await client.exec_sync("a", ["sh", "-c", "echo from-a > /tmp/mark"])
    seen = await client.exec_sync("b", ["sh", "-c", "cat /tmp/mark || echo none"])
    assert seen.stdout == b"none\n"
    ps = await client.exec_sync("b", ["ps", "-o", "args"])
    assert b"sleep 1000" in ps.stdout and b"sleep 999" in ps.stdout
    image_mounts = [m for m in local_agent.mounts() if m.endswith("/images/busybox")]
    assert len(image_mounts) == 1
    listed = sorted(c.id for c in await client.list_containers())
    assert listed == ["a", "b"]
    stats = await client.container_stats()
    assert sorted(s.id for s in stats.containers) == ["a", "b"]
    assert stats.guest is not None and stats.guest.mem_total_kib > 0
    assert all(s.detail is None for s in stats.containers) and stats.interfaces == []
    # without cgroups, detail counts each container's process tree and its own layer
    detailed = await client.container_stats(detail=True)
    by_id = {s.id: s.detail for s in detailed.containers}
    a, b = by_id["a"], by_id["b"]
    assert a is not None and b is not None
    assert a.cgroup == "" and a.limits is None and a.cpu_user_usec is None
    assert a.processes == 1 and a.threads == 1 and (a.file_descriptors or 0) >= 3
    assert a.fs is not None and b.fs is not None
    assert a.fs.usage_bytes > b.fs.usage_bytes or a.fs.inodes_used > b.fs.inodes_used
    for cid in ("a", "b"):
        await client.delete_container(cid, force=True)


async def test_reconnect_keeps_containers(local_agent: LocalAgent, rootfs: Path) -> None:
    first = await AgentClient.connect(local_agent.socket_path, timeout=20)
    await first.mount_image("busybox", ImageSource(dir=str(rootfs)))
    await first.create_container("r1", spec("sh", "-c", "sleep 2; echo done; exit 5"))
    await first.start_container("r1")
    pending = asyncio.ensure_future(first.wait_container("r1"))
    await asyncio.sleep(0.1)
    # A host dying mid-frame: a header promising far more payload than follows.
    assert local_agent.relay is not None and local_agent.relay.client is not None
    raw = b"\xc1\xcc\x01\x01\x00\x00\x00\x00\x00\x00\x10\x00" + b"{partial"
    local_agent.relay.guest_writer.write(raw)  # type: ignore[union-attr]
    local_agent.relay.drop_client()
    with pytest.raises(AgentUnavailable):
        await asyncio.wait_for(pending, 5)
    await first.close()

    second = await AgentClient.connect(local_agent.socket_path, timeout=20)
    try:
        assert second.ready.connection > first.ready.connection
        infos = {c.id: c for c in await second.list_containers()}
        assert infos["r1"].state in ("running", "exited")
        status = await second.wait_container("r1", timeout=20)
        assert status.exit_code == 5
        await second.delete_container("r1")
        assert await second.list_containers() == []
    finally:
        await second.shutdown(grace=1.0)
        await second.close()


async def test_delete_leaves_nothing_behind(client: AgentClient, local_agent: LocalAgent) -> None:
    info = await client.create_container("d1", spec("sleep", "1000"))
    await client.start_container("d1")
    listed = {c.id: c for c in await client.list_containers()}
    pid = listed["d1"].pid
    assert pid > 0 and Path(f"/proc/{pid}").exists()
    bundle = local_agent.run_dir / "containers" / "d1"
    assert any(m == f"{bundle}/rootfs" for m in local_agent.mounts())

    with pytest.raises(FailedPrecondition):
        await client.delete_container("d1")
    await client.delete_container("d1", force=True)
    await client.delete_container("d1", force=True)  # idempotent

    assert not bundle.exists()
    assert not any(str(bundle) in m for m in local_agent.mounts())
    assert "d1" not in local_agent.crun_list()
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        await asyncio.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists()
    assert info.stream > 0
    assert await client.list_containers() == []


async def test_concurrent_deletes_remove_once(client: AgentClient, local_agent: LocalAgent) -> None:
    await client.create_container("d2", spec("sleep", "1000"))
    await client.start_container("d2")
    bundle = local_agent.run_dir / "containers" / "d2"
    await asyncio.gather(*(client.delete_container("d2", force=True) for _ in range(3)))
    assert not bundle.exists()
    assert not any(str(bundle) in m for m in local_agent.mounts())
    log = (local_agent.tmp / "agent.log").read_text(errors="replace")
    assert "umount" not in log and "Invalid argument" not in log, log[-2000:]
    assert await client.list_containers() == []


async def test_errors_carry_codes(client: AgentClient) -> None:
    with pytest.raises(NotFound):
        await client.start_container("nope")
    with pytest.raises(NotFound):
        await client.wait_container("nope")
    with pytest.raises(InvalidArgument):
        await client.create_container("bad/id", spec("true"))
    with pytest.raises(InvalidArgument):
        await client.create_container("x1", ContainerSpec(args=[], image_id="busybox"))
    with pytest.raises(FailedPrecondition):
        await client.create_container("x2", ContainerSpec(args=["true"], image_id="missing"))
    await client.create_container("x3", spec("true"))
    with pytest.raises(AlreadyExists):
        await client.create_container("x3", spec("true"))
    # A failing crun is reported with its own message and leaves nothing behind.
    with pytest.raises(Exception, match="crun"):
        await client.create_container("x4", spec("true", cwd="/", uid=0, sysctls={"bad": "1"}))
    assert sorted(c.id for c in await client.list_containers()) == ["x3"]
    await client.delete_container("x3")


async def test_many_requests_in_flight(client: AgentClient) -> None:
    await client.create_container("p1", spec("sleep", "1000"))
    await client.start_container("p1")
    slow = asyncio.ensure_future(client.wait_container("p1"))
    with deadline(20):
        results = await asyncio.gather(
            *(client.exec_sync("p1", ["echo", str(i)]) for i in range(6))
        )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(6)]
    assert not slow.done()
    await client.signal_container("p1", signal.SIGKILL)
    status = await asyncio.wait_for(slow, 20)
    assert status.signal == signal.SIGKILL
    await client.delete_container("p1")


async def test_pod_config_and_clock(client: AgentClient, local_agent: LocalAgent) -> None:
    await client.set_pod_config(resolv_conf="nameserver 10.0.0.10\n", hosts="127.0.0.1 localhost\n")
    assert (local_agent.run_dir / "etc" / "resolv.conf").read_text() == "nameserver 10.0.0.10\n"
    await client.create_container("n1", spec("cat", "/etc/resolv.conf"))
    output = client.subscribe_output("n1")
    await client.start_container("n1")
    chunks = await asyncio.wait_for(collect(output), 20)
    assert chunks[STDOUT] == b"nameserver 10.0.0.10\n"
    await client.delete_container("n1")
