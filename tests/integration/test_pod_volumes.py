"""Live volumes in a pod VM (sandbox/share.py): every host path a container mounts is
the host's own file seen through the pod's 9p share, in both directions, at once."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from sandbox.mounts import mounts_under
from tests.atomic_writer import write_version
from tests.integration.cri_daemon import CriDaemon
from tests.integration.test_cri_server import (  # noqa: F401
    _wait_state,
    container_config,
    create_in_pod,
    daemon,
    exec_in,
    image_ref,
    pod_config,
    stubs,
)
from tests.registry import registry  # noqa: F401

pytestmark = pytest.mark.vm

Stubs = tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub]


async def _out(rt: api_pb2_grpc.RuntimeServiceStub, cid: str, script: str) -> str:
    result = await exec_in(rt, cid, "sh", "-c", script)
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def test_volumes_are_live_and_shared(
    stubs: Stubs,  # noqa: F811 - the imported fixtures
    image_ref: str,  # noqa: F811
    tmp_path: Path,
    daemon: CriDaemon,  # noqa: F811
) -> None:
    rt, images = stubs
    await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir(mode=0o777)
    configmap = tmp_path / "configmap"
    write_version(configmap, "2026_12_06_1", {"key": "v1"})
    # where kubelet keeps a ConfigMap volume: the container gets a guest copy that the
    # agent keeps in step (so inotify fires in the container, agent/guest/watched.py)
    watched = tmp_path / "pods" / "uid" / "volumes" / "kubernetes.io~configmap" / "settings"
    watched.parent.mkdir(parents=True)
    write_version(watched, "2026_12_06_1", {"key": "w1"})
    host_dir = tmp_path / "hostpath"
    host_dir.mkdir()
    (host_dir / "from-host").write_text("host says hi")
    big = host_dir / "big"
    with big.open("wb") as f:
        f.truncate(1 << 30)
        f.seek((1 << 30) - 4)
        f.write(b"TAIL")
    term_log = tmp_path / "termination-log"
    term_log.write_text("")
    outside = tmp_path / "outside-marker"
    outside.write_text("must stay outside")
    (host_dir / "escape").symlink_to(str(outside))
    (host_dir / "root").symlink_to("/")

    config = pod_config("volumes", tmp_path)
    pod_id = (await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))).pod_sandbox_id
    try:
        info = json.loads(
            (
                await rt.PodSandboxStatus(
                    api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
                )
            ).info["info"]
        )
        assert info["vm"]["share"] is True
        assert info["vm"]["fromTemplate"] is True, info  # shares keep clones working

        # an init container writes into the emptyDir and exits; the main one reads it
        init = container_config("init", image_ref, "sh", "-c", "echo from-init > /data/msg")
        init.mounts.add(host_path=str(empty_dir), container_path="/data")
        init.mounts.add(host_path=str(term_log), container_path="/dev/termination-log")
        init_id = await create_in_pod(rt, pod_id, init, config)
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=init_id))
        status = await _wait_state(rt, init_id, api_pb2.CONTAINER_EXITED)
        assert status.exit_code == 0, status
        assert (empty_dir / "msg").read_text() == "from-init\n"

        def main_config(name: str) -> api_pb2.ContainerConfig:
            cfg = container_config(name, image_ref, "sleep", "1000")
            cfg.mounts.add(host_path=str(empty_dir), container_path="/data")
            cfg.mounts.add(host_path=str(configmap), container_path="/config", readonly=True)
            cfg.mounts.add(host_path=str(watched), container_path="/watched", readonly=True)
            cfg.mounts.add(host_path=str(host_dir), container_path="/host")
            cfg.mounts.add(host_path=str(term_log), container_path="/dev/termination-log")
            return cfg

        a = await create_in_pod(rt, pod_id, main_config("a"), config)
        b = await create_in_pod(rt, pod_id, main_config("b"), config)
        for cid in (a, b):
            await rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        assert await _out(rt, a, "cat /data/msg") == "from-init\n"
        # two running containers see each other's writes, and the host sees them
        await _out(rt, a, "echo from-a > /data/a")
        assert await _out(rt, b, "cat /data/a") == "from-a\n"
        await _out(rt, b, "echo from-b > /data/b")
        assert (empty_dir / "b").read_text() == "from-b\n"
        # hostPath both ways, at once
        assert await _out(rt, a, "cat /host/from-host") == "host says hi"
        (host_dir / "from-host").write_text("changed on the host")
        assert await _out(rt, a, "cat /host/from-host") == "changed on the host"
        await _out(rt, a, "dd if=/dev/zero of=/host/written bs=1M count=64 2>/dev/null")
        assert (host_dir / "written").stat().st_size == 64 << 20
        # any size: the last bytes of a 1 GiB file
        assert await _out(rt, a, "stat -c %s /host/big") == f"{1 << 30}\n"
        tail = await _out(rt, a, "dd if=/host/big bs=1 skip=1073741820 2>/dev/null")
        assert tail == "TAIL"
        # a ConfigMap's atomic swap is seen at once; the mount is read-only
        assert await _out(rt, a, "cat /config/key") == "v1"
        write_version(configmap, "2026_12_06_2", {"key": "v2"})
        started = time.monotonic()
        while (value := await _out(rt, b, "cat /config/key")) != "v2":
            assert time.monotonic() - started < 2, value
        assert await _out(rt, a, "cat /watched/key") == "w1"
        write_version(watched, "2026_12_06_2", {"key": "w2"})
        started = time.monotonic()
        while True:
            # the exec that reads it must start within 2 s (an exec's own round trip
            # under TCG on a busy machine is not the volume's delay)
            asked = time.monotonic()
            if await _out(rt, b, "cat /watched/key") == "w2":
                break
            assert asked - started < 2, "the watched copy was not updated within 2 s"
        listing = await _out(rt, a, "ls -a /watched")
        assert listing.split() == [".", "..", "..2026_12_06_2", "..data", "key"], listing
        refused = await exec_in(rt, a, "sh", "-c", "echo x > /config/key")
        assert refused.exit_code != 0
        assert "Read-only" in refused.stderr.decode(), refused
        # symlinks resolve in the container: they cannot reach the host's files
        leaked = await exec_in(rt, a, "cat", "/host/escape")
        assert leaked.exit_code != 0 and b"must stay outside" not in leaked.stdout
        assert str(tmp_path).startswith("/tmp/")
        listing = await _out(rt, a, "ls -a /host/root/tmp/")
        assert tmp_path.parts[2] not in listing, listing
        # a hard link cannot join two entries of the share (two host mounts)
        linked = await exec_in(rt, a, "ln", "/host/from-host", "/data/linked")
        assert linked.exit_code != 0 and not (empty_dir / "linked").exists()
        # a termination message reaches the file kubelet reads
        await _out(rt, b, "echo bye > /dev/termination-log")
        assert term_log.read_text() == "bye\n"
    finally:
        await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    # nothing of the share is left: no mount, no directory
    run_root = daemon.root / "run"
    assert mounts_under(run_root) == [], mounts_under(run_root)
    assert not (run_root / "sandboxes" / pod_id).exists()
    assert (host_dir / "from-host").read_text() == "changed on the host"
    assert outside.read_text() == "must stay outside"


async def test_special_host_paths_never_block_the_daemon(
    stubs: Stubs,  # noqa: F811 - the imported fixtures
    image_ref: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A hostPath of /proc (or a FIFO) is a bind like any other: six creations at once
    return promptly and the daemon keeps serving (RunPodSandbox included)."""
    rt, images = stubs
    await images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = pod_config("special", tmp_path)
    pod_id = (await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config))).pod_sandbox_id
    try:

        async def create(index: int) -> str:
            cfg = container_config(f"proc-{index}", image_ref, "sleep", "1000")
            cfg.mounts.add(host_path="/proc", container_path="/host/proc", readonly=True)
            cfg.mounts.add(host_path="/proc/kmsg", container_path="/host/kmsg", readonly=True)
            cfg.mounts.add(host_path=str(fifo), container_path="/fifo")
            return await create_in_pod(rt, pod_id, cfg, config)

        started = time.monotonic()
        ids = await asyncio.wait_for(asyncio.gather(*(create(i) for i in range(6))), 60)
        assert time.monotonic() - started < 60
        other = pod_config("special-2", tmp_path)
        other_id = await asyncio.wait_for(
            rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=other)), 60
        )
        await rt.RemovePodSandbox(
            api_pb2.RemovePodSandboxRequest(pod_sandbox_id=other_id.pod_sandbox_id)
        )
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=ids[0]))
        uptime = await _out(rt, ids[0], "cat /host/proc/uptime")
        assert float(uptime.split()[0]) > 0
        # the refused propagation says why
        bad = container_config("bidirectional", image_ref, "true")
        bad.mounts.add(
            host_path=str(tmp_path),
            container_path="/b",
            propagation=api_pb2.PROPAGATION_BIDIRECTIONAL,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create_in_pod(rt, pod_id, bad, config)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Bidirectional" in str(err.value.details())
        # host devices and resources no container starts with are refused, not dropped
        device = container_config("device", image_ref, "true")
        device.devices.add(container_path="/dev/x", host_path="/dev/null", permissions="rw")
        shares = container_config("shares", image_ref, "true")
        shares.linux.resources.cpu_shares = 2**62
        for refused in (device, shares):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await create_in_pod(rt, pod_id, refused, config)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    finally:
        await rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
