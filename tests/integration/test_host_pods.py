"""The ``host`` runtime handler end to end: `clearcri serve` as a real process, pods run
on this host by their own agent process with crun, a real registry, real CNI plugins on
a test-owned bridge.

Each test checks that a removed pod leaves nothing behind: no processes, mounts, loop
devices, network namespaces, cgroups or run directories.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from sandbox.procfs import pid_alive
from tests.integration.conftest import GUEST_DIR
from tests.integration.cri_daemon import CriDaemon
from tests.integration.test_network import CNI_BIN_DIRS, CniLab
from tests.registry import RegistryServer, busybox_layer, push_image, registry  # noqa: F401

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts, crun)"),
    pytest.mark.skipif(shutil.which("crun") is None, reason="crun is not installed"),
    pytest.mark.skipif(
        not all(any((d / p).exists() for d in CNI_BIN_DIRS) for p in ("bridge", "host-local")),
        reason="CNI plugins are not installed",
    ),
]

LOG_LINE = re.compile(rb"^\S+Z (stdout|stderr) (F|P) (.*)$")
Stub = api_pb2_grpc.RuntimeServiceStub


@pytest.fixture(scope="module")
def image_ref(registry: RegistryServer) -> str:  # noqa: F811
    asyncio.run(push_image(registry.host, "library/busybox", ["1"], [busybox_layer()]))
    return f"{registry.host}/library/busybox:1"


class HostPodDaemon(CriDaemon):
    """A daemon whose pods join a test CNI lab, host pods allowed; without VM templates
    unless asked (no pod VM is started here)."""

    def __init__(
        self, root: Path, lab: CniLab, *, host_pods: bool = True, templates: bool = False
    ) -> None:
        super().__init__(root, GUEST_DIR, network=lab.daemon_network())
        text = self.config_path.read_text()
        if not templates:
            text = text.replace("[vm]\n", "[vm]\ntemplates = false\n", 1)
        text = text.replace(
            "[daemon]\n", f"[daemon]\nhost_pods = {'true' if host_pods else 'false'}\n", 1
        )
        self.config_path.write_text(text)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[CniLab]:
    lab = CniLab(tmp_path / "cni")
    lab.write(lab.conflist(v6=False, portmap=False))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def daemon(lab: CniLab) -> Iterator[HostPodDaemon]:
    root = Path(f"/tmp/cc-host-{os.getpid()}-{os.urandom(3).hex()}")
    root.mkdir()
    d = HostPodDaemon(root, lab)
    try:
        d.start()
    except BaseException:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield d
    finally:
        d.stop()
        if list((root / "run" / "sandboxes").glob("*/state.json")):
            d.start()
            asyncio.run(_remove_all(d))
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _remove_all(d: CriDaemon) -> None:
    async with d.channel() as channel:
        rt = Stub(channel)  # type: ignore[no-untyped-call]
        for pod in (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items:
            await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


@pytest.fixture
async def stubs(
    daemon: HostPodDaemon, image_ref: str
) -> AsyncIterator[tuple[Stub, api_pb2_grpc.ImageServiceStub]]:
    async with daemon.channel() as channel:
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
        yield Stub(channel), images  # type: ignore[no-untyped-call]


def pod_config(
    name: str,
    log_dir: Path,
    *,
    network: int = api_pb2.POD,
    pid: int = api_pb2.POD,
    ipc: int = api_pb2.POD,
    privileged: bool = False,
) -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="kube-system", uid=f"uid-{name}"),
        hostname=name,
        log_directory=str(log_dir),
        labels={"app": name},
    )
    sec = config.linux.security_context
    sec.namespace_options.network = network  # type: ignore[assignment]
    sec.namespace_options.pid = pid  # type: ignore[assignment]
    sec.namespace_options.ipc = ipc  # type: ignore[assignment]
    sec.privileged = privileged
    config.linux.cgroup_parent = f"/cc-hostpod-test/{name}-{os.urandom(3).hex()}"
    return config


def container_config(
    name: str, image: str, pod: api_pb2.PodSandboxConfig, *cmd: str
) -> api_pb2.ContainerConfig:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=image),
        command=list(cmd),
        log_path=f"{name}.log",
    )
    sec = config.linux.security_context
    sec.namespace_options.CopyFrom(pod.linux.security_context.namespace_options)
    sec.privileged = pod.linux.security_context.privileged
    return config


async def run_pod(
    rt: Stub, config: api_pb2.PodSandboxConfig, handler: str = ""
) -> tuple[str, dict[str, object]]:
    pod_id = (
        await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler))
    ).pod_sandbox_id
    pod_id = str(pod_id)
    status = await rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
    )
    assert status.status.state == api_pb2.SANDBOX_READY
    info: dict[str, object] = json.loads(status.info["info"])
    return pod_id, info


async def start_container(
    rt: Stub, pod_id: str, pod: api_pb2.PodSandboxConfig, image: str, *cmd: str
) -> str:
    config = container_config("main", image, pod, *cmd)
    cid = (
        await rt.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        )
    ).container_id
    await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    return str(cid)


async def exec_out(rt: Stub, cid: str, *cmd: str) -> str:
    result = await rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=30))
    assert result.exit_code == 0, (cmd, result.stdout, result.stderr)
    return bytes(result.stdout).decode()


async def log_lines(path: Path, want: int, timeout: float = 20) -> list[tuple[bytes, bytes]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_bytes().splitlines() if path.exists() else []
        matches = [LOG_LINE.match(line) for line in lines]
        if len(matches) >= want or time.monotonic() > deadline:
            assert all(matches), lines
            return [(m.group(1), m.group(3)) for m in matches if m]
        await asyncio.sleep(0.2)


def host_leftovers(
    daemon: CriDaemon, pod_id: str, agent_pid: int, cgroup: str, *, image_in_use: bool = False
) -> list[str]:
    """Whatever of a removed host pod is still on this host (its image's loop device is
    kept while ``image_in_use`` by another host pod)."""
    found = []
    if agent_pid and pid_alive(agent_pid):
        found.append(f"agent process {agent_pid}")
    run_dir = daemon.root / "run" / "sandboxes" / pod_id
    if run_dir.exists():
        found.append(f"run dir {run_dir}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if pod_id in line:
            found.append(f"mount {line}")
    images = daemon.root / "state" / "images"
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
    ).stdout
    if not image_in_use:
        found += [f"loop device {line}" for line in loops.splitlines() if str(images) in line]
    for hierarchy in ("memory", "pids", "cpu", "cpuset", "systemd"):
        path = Path("/sys/fs/cgroup") / hierarchy / cgroup.lstrip("/")
        if path.exists():
            found.append(f"cgroup {path}")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if pod_id.encode() in cmdline:
                found.append(f"process {proc.name}: {cmdline[:120]!r}")
    return found


async def remove_and_check(
    rt: Stub,
    daemon: CriDaemon,
    pod_id: str,
    agent_pid: int,
    cgroup: str,
    *,
    image_in_use: bool = False,
) -> None:
    await rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert host_leftovers(daemon, pod_id, agent_pid, cgroup, image_in_use=image_in_use) == []


async def http_get(url: str, attempts: int = 50) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=5) as response:
            data: bytes = response.read()
            return data

    for attempt in range(attempts):
        try:
            return await asyncio.to_thread(get)
        except OSError:
            if attempt + 1 == attempts:
                raise
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


def host_interfaces() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def container_interfaces(text: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in text.splitlines() if ":" in line}


async def test_status_advertises_both_handlers(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
) -> None:
    rt, _ = stubs
    status = await rt.Status(api_pb2.StatusRequest())
    assert {"clearcri", "host"} <= {h.name for h in status.runtime_handlers}


async def test_host_network_pod_sees_the_host_interfaces(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    tmp_path: Path,
) -> None:
    rt, _ = stubs
    config = pod_config("kube-proxy", tmp_path, network=api_pb2.NODE)
    pod_id, info = await run_pod(rt, config)
    assert info["runtimeHandler"] == "host"
    host_info = info["host"]
    assert isinstance(host_info, dict)
    agent_pid = int(host_info["agentPid"])
    listed = await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())
    assert [p.runtime_handler for p in listed.items if p.id == pod_id] == ["host"]

    cid = await start_container(
        rt, pod_id, config, image_ref, "sh", "-c", "ip -o link; echo to-stderr >&2; exec sleep 1000"
    )
    # one line per host interface, then stderr: wait for the stderr line (the host may
    # have more interfaces than the lines asked for while other tests run)
    want = len(host_interfaces()) + 1
    lines = await log_lines(tmp_path / "main.log", want)
    for _ in range(50):
        if (b"stderr", b"to-stderr") in lines:
            break
        await asyncio.sleep(0.2)
        lines = await log_lines(tmp_path / "main.log", want)
    logged = b"\n".join(text for _, text in lines).decode()
    assert (b"stderr", b"to-stderr") in lines
    host = host_interfaces()
    seen = container_interfaces(logged)
    assert "lo" in seen and seen == host, (seen, host)

    assert (await exec_out(rt, cid, "hostname")).strip() == os.uname().nodename
    stats = await rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid))
    assert stats.stats.memory.working_set_bytes.value > 0
    await remove_and_check(rt, daemon, pod_id, agent_pid, str(host_info["cgroupParent"]))


async def test_host_pid_pod_sees_host_processes(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    tmp_path: Path,
) -> None:
    rt, _ = stubs
    config = pod_config("node-agent", tmp_path, pid=api_pb2.NODE, ipc=api_pb2.NODE)
    pod_id, info = await run_pod(rt, config)
    host_info = info["host"]
    assert isinstance(host_info, dict)
    cid = await start_container(rt, pod_id, config, image_ref, "sleep", "1000")
    assert daemon.proc is not None
    cmdline = await exec_out(rt, cid, "cat", f"/proc/{daemon.proc.pid}/cmdline")
    assert "serve" in cmdline.replace("\0", " ")
    # its own network namespace: only loopback and the CNI interface
    assert container_interfaces(await exec_out(rt, cid, "ip", "-o", "link")) == {"lo", "eth0"}
    await remove_and_check(
        rt, daemon, pod_id, int(host_info["agentPid"]), str(host_info["cgroupParent"])
    )


async def test_privileged_pod_can_mount(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    tmp_path: Path,
) -> None:
    rt, _ = stubs
    config = pod_config("cni-daemon", tmp_path, privileged=True)
    pod_id, info = await run_pod(rt, config)
    host_info = info["host"]
    assert isinstance(host_info, dict)
    cid = await start_container(rt, pod_id, config, image_ref, "sleep", "1000")
    out = await exec_out(
        rt,
        cid,
        "sh",
        "-c",
        "mkdir -p /mnt/t && mount -t tmpfs none /mnt/t && grep /mnt/t /proc/mounts",
    )
    assert "tmpfs" in out
    status = await exec_out(rt, cid, "grep", "CapEff", "/proc/self/status")
    # every capability this host lets a process have
    bounding = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if "CapBnd" in line
    )
    assert int(status.split()[1], 16) == int(bounding.split()[1], 16)
    assert "loop-control" in await exec_out(rt, cid, "ls", "/dev")  # host devices

    # a plain host pod cannot
    plain = pod_config("plain", tmp_path)
    plain_id, plain_info = await run_pod(rt, plain, handler="host")
    plain_cid = await start_container(rt, plain_id, plain, image_ref, "sleep", "1000")
    result = await rt.ExecSync(
        api_pb2.ExecSyncRequest(
            container_id=plain_cid, cmd=["mount", "-t", "tmpfs", "none", "/mnt"]
        )
    )
    assert result.exit_code != 0
    plain_host = plain_info["host"]
    assert isinstance(plain_host, dict)
    # both pods use the image through one loop device: it stays for the other pod
    loops = subprocess.run(["losetup", "--list"], capture_output=True, text=True).stdout
    assert sum(str(daemon.root) in line for line in loops.splitlines()) == 1
    await remove_and_check(
        rt,
        daemon,
        plain_id,
        int(plain_host["agentPid"]),
        str(plain_host["cgroupParent"]),
        image_in_use=True,
    )
    await remove_and_check(
        rt, daemon, pod_id, int(host_info["agentPid"]), str(host_info["cgroupParent"])
    )


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(path) or line.split()[4].startswith(prefix)
    ]


def _unmount_all(path: Path) -> None:
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _host_mount(
    host: Path,
    target: str,
    *,
    readonly: bool = False,
    rro: bool = False,
    propagation: int = api_pb2.PROPAGATION_PRIVATE,
) -> api_pb2.Mount:
    return api_pb2.Mount(
        host_path=str(host),
        container_path=target,
        readonly=readonly,
        recursive_read_only=rro,
        propagation=propagation,  # type: ignore[arg-type]
    )


async def test_host_paths_follow_the_hosts_mounts(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    tmp_path: Path,
) -> None:
    """A host pod's containers see host paths as the host sees them at creation (mounts
    made after the pod started included), HostToContainer and Bidirectional mounts
    propagate like under runc on the host, read-only is per mount unless recursive, and
    removing the container never touches the host's files."""
    rt, _ = stubs
    config = pod_config("volumes", tmp_path, privileged=True)
    pod_id, info = await run_pod(rt, config)
    host_info = info["host"]
    assert isinstance(host_info, dict)

    top = tmp_path / "vols"
    shared, src, ro, plain = top / "shared", top / "src", top / "ro", top / "plain"
    for d in (shared, src, ro / "tmpfs", plain):
        d.mkdir(parents=True)
    (src / "flag").write_text("from the host\n")
    try:
        # made after the pod's agent started: it must still be seen
        _sh("mount", "-t", "tmpfs", "none", str(ro / "tmpfs"))
        _sh("mount", "--bind", str(shared), str(shared))
        _sh("mount", "--make-rshared", str(shared))

        ctr = container_config("vols", image_ref, config, "sleep", "1000")
        ctr.mounts.extend(
            [
                _host_mount(shared, "/shared", propagation=api_pb2.PROPAGATION_BIDIRECTIONAL),
                _host_mount(ro, "/ro", readonly=True),
                _host_mount(ro, "/rro", readonly=True, rro=True),
            ]
        )
        cid = (
            await rt.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=ctr, sandbox_config=config
                )
            )
        ).container_id
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))

        # host -> container, after the container started
        (shared / "inner").mkdir()
        _sh("mount", "--bind", str(src), str(shared / "inner"))
        assert await exec_out(rt, cid, "cat", "/shared/inner/flag") == "from the host\n"
        # container -> host
        await exec_out(
            rt, cid, "sh", "-c", "mkdir -p /shared/back && mount --bind /etc /shared/back"
        )
        assert (shared / "back" / "hostname").exists()
        # read-only: the bind itself, not the tmpfs below it; recursive: both
        await exec_out(rt, cid, "touch", "/ro/tmpfs/file")
        for path in ("/ro/file", "/rro/tmpfs/other"):
            result = await rt.ExecSync(
                api_pb2.ExecSyncRequest(container_id=cid, cmd=["touch", path], timeout=30)
            )
            assert result.exit_code != 0 and b"Read-only" in result.stderr, (path, result)

        # a mount that cannot propagate is refused with what to fix
        bad = container_config("bad", image_ref, config, "true")
        bad.mounts.append(
            _host_mount(plain, "/p", propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rt.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=bad, sandbox_config=config
                )
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "make-rshared" in str(err.value.details())
        bad.mounts[0].CopyFrom(_host_mount(ro, "/p", rro=True))  # rro needs readonly
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rt.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=bad, sandbox_config=config
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        await rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1))
        await rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
        # the host's files under every host path are untouched
        assert (src / "flag").read_text() == "from the host\n"
        assert (ro / "tmpfs" / "file").exists()
        await remove_and_check(
            rt, daemon, pod_id, int(host_info["agentPid"]), str(host_info["cgroupParent"])
        )
    finally:
        _unmount_all(top)
    assert _mounts_under(top) == []


async def test_host_pod_user_namespace(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    tmp_path: Path,
) -> None:
    """User namespace mode POD on the host handler: the container's root is host uid
    200000, the image appears as its own (idmapped lower layer) and files it writes
    belong to 200000 on the host."""
    rt, _ = stubs
    config = pod_config("userns", tmp_path)
    userns = config.linux.security_context.namespace_options.userns_options
    userns.mode = api_pb2.POD
    userns.uids.add(container_id=0, host_id=200000, length=65536)
    userns.gids.add(container_id=0, host_id=200000, length=65536)
    pod_id, info = await run_pod(rt, config, handler="host")
    host_info = info["host"]
    assert isinstance(host_info, dict)
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "owned").write_text("x")
    os.chown(volume / "owned", 1234, 1234)
    ctr = container_config("main", image_ref, config, "sleep", "1000")
    ctr.mounts.add(host_path=str(volume), container_path="/vol")
    cid = (
        await rt.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=ctr, sandbox_config=config)
        )
    ).container_id
    await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
    out = await exec_out(
        rt, cid, "sh", "-c", "cat /proc/self/uid_map; touch /new; stat -c %u /bin/busybox /new"
    )
    assert out.split() == ["0", "200000", "65536", "0", "0"]
    # host paths are idmapped binds: the host's owners inside, and back on the host
    out = await exec_out(rt, cid, "sh", "-c", "touch /vol/new && stat -c %u /vol/owned /vol/new")
    assert out.split() == ["1234", "0"]
    assert (volume / "new").stat().st_uid == 0
    agent_pid = int(host_info["agentPid"])
    bundle = daemon.root / "run" / "sandboxes" / pod_id / "agent" / "containers" / cid
    assert (bundle / "layer" / "upper" / "new").stat().st_uid == 200000
    await remove_and_check(rt, daemon, pod_id, agent_pid, str(host_info["cgroupParent"]))


async def test_host_pod_stats_count_the_whole_pod(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    tmp_path: Path,
) -> None:
    """PodSandboxStats of a host pod come from its cgroup: the containers' memory and
    CPU, not only the agent's."""
    rt, _ = stubs
    config = pod_config("stats", tmp_path)
    pod_id, info = await run_pod(rt, config, handler="host")
    host_info = info["host"]
    assert isinstance(host_info, dict)
    cid = await start_container(rt, pod_id, config, image_ref, "sleep", "1000")
    # 48 MiB in the pod's /dev/shm: charged to the container's cgroup, inside the pod's
    await exec_out(rt, cid, "dd", "if=/dev/zero", "of=/dev/shm/fill", "bs=1M", "count=48")
    stats = (
        await rt.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod_id))
    ).stats.linux
    assert stats.memory.working_set_bytes.value >= 48 << 20, stats.memory
    assert stats.memory.usage_bytes.value >= stats.memory.working_set_bytes.value
    assert stats.cpu.usage_core_nano_seconds.value > 0
    await remove_and_check(
        rt, daemon, pod_id, int(host_info["agentPid"]), str(host_info["cgroupParent"])
    )


async def test_host_handler_pod_gets_own_netns_and_cni_ip(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    lab: CniLab,
    tmp_path: Path,
) -> None:
    rt, _ = stubs
    config = pod_config("netpod", tmp_path)
    pod_id, info = await run_pod(rt, config, handler="host")
    host_info = info["host"]
    assert isinstance(host_info, dict)
    status = await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    ip = status.status.network.ip
    assert ip.startswith(lab.prefix4 + "."), ip
    cid = await start_container(
        rt,
        pod_id,
        config,
        image_ref,
        "sh",
        "-c",
        "echo served > /tmp/index.html && exec httpd -f -p 8080 -h /tmp",
    )
    addr = await exec_out(rt, cid, "ip", "-o", "-4", "addr", "show", "eth0")
    assert f"{ip}/24" in addr
    assert (await exec_out(rt, cid, "hostname")).strip() == "netpod"
    # the host reaches the pod through the test bridge
    assert await http_get(f"http://{ip}:8080/index.html") == b"served\n"
    await remove_and_check(
        rt, daemon, pod_id, int(host_info["agentPid"]), str(host_info["cgroupParent"])
    )
    assert lab.leftovers([pod_id]) == []


async def test_daemon_restart_keeps_a_host_pod_running(
    image_ref: str, daemon: HostPodDaemon, lab: CniLab, tmp_path: Path
) -> None:
    config = pod_config("survivor", tmp_path, network=api_pb2.NODE)
    async with daemon.channel() as channel:
        rt = Stub(channel)  # type: ignore[no-untyped-call]
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
        pod_id, info = await run_pod(rt, config)
        cid = await start_container(
            rt, pod_id, config, image_ref, "sh", "-c", "echo before; exec sleep 1000"
        )
        before = await exec_out(rt, cid, "sh", "-c", "echo $PPID; cat /proc/1/cmdline")
    host_info = info["host"]
    assert isinstance(host_info, dict)
    agent_pid = int(host_info["agentPid"])
    daemon.stop()
    assert pid_alive(agent_pid)
    daemon.start()
    async with daemon.channel() as channel:
        rt = Stub(channel)  # type: ignore[no-untyped-call]
        status = await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        assert status.status.state == api_pb2.SANDBOX_READY
        ctr = await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))
        assert ctr.status.state == api_pb2.CONTAINER_RUNNING
        assert await exec_out(rt, cid, "sh", "-c", "echo $PPID; cat /proc/1/cmdline") == before
        # the re-adopted container's exit is still seen
        await rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=2))
        deadline = time.monotonic() + 30
        while True:
            ctr = await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))
            if ctr.status.state == api_pb2.CONTAINER_EXITED or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert ctr.status.state == api_pb2.CONTAINER_EXITED
        await remove_and_check(rt, daemon, pod_id, agent_pid, str(host_info["cgroupParent"]))


async def test_dead_agent_makes_the_pod_notready(
    stubs: tuple[Stub, api_pb2_grpc.ImageServiceStub],
    image_ref: str,
    daemon: HostPodDaemon,
    tmp_path: Path,
) -> None:
    rt, _ = stubs
    config = pod_config("fragile", tmp_path, network=api_pb2.NODE)
    pod_id, info = await run_pod(rt, config)
    host_info = info["host"]
    assert isinstance(host_info, dict)
    agent_pid = int(host_info["agentPid"])
    cid = await start_container(rt, pod_id, config, image_ref, "sleep", "1000")
    os.kill(agent_pid, 9)
    deadline = time.monotonic() + 20
    while True:
        status = await rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        if status.status.state == api_pb2.SANDBOX_NOTREADY or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status.status.state == api_pb2.SANDBOX_NOTREADY
    ctr = await rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))
    assert ctr.status.state == api_pb2.CONTAINER_EXITED
    # the container outlived its agent; removal finds and kills it through its cgroup
    await remove_and_check(rt, daemon, pod_id, agent_pid, str(host_info["cgroupParent"]))


async def test_host_pods_can_be_refused(image_ref: str, lab: CniLab, tmp_path: Path) -> None:
    root = Path(f"/tmp/cc-host-{os.getpid()}-{os.urandom(3).hex()}")
    root.mkdir()
    d = HostPodDaemon(root, lab, host_pods=False)
    d.start()
    try:
        async with d.channel() as channel:
            rt = Stub(channel)  # type: ignore[no-untyped-call]
            status = await rt.Status(api_pb2.StatusRequest())
            assert "host" not in {h.name for h in status.runtime_handlers}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(
                        config=pod_config("refused", tmp_path, network=api_pb2.NODE)
                    )
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "host_pods" in (err.value.details() or "")
            assert (await rt.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items == []
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
