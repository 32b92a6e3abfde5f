"""Pulling from a real registry (Debian's docker-registry on 127.0.0.1) into a real store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cri.images.errors import (
    ContentVerificationError,
    ImageNotFound,
    InvalidImageReference,
    RegistryUnavailable,
    UnsafeLayer,
    UnsupportedImage,
)
from cri.images.hosts import RegistryHosts
from cri.images.manifest import Platform
from cri.images.store import ImageStore
from cri.store import Store
from tests.registry import (
    Entry,
    Layer,
    RegistryServer,
    busybox_layer,
    fresh_registry,
    push_image,
    push_index,
    registry,
)

__all__ = ["fresh_registry", "registry"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _store(root: Path, **kw: object) -> ImageStore:
    return ImageStore(Store(root / "state.db"), root / "images", **kw)  # type: ignore[arg-type]


@pytest.fixture
async def images(tmp_path: Path) -> AsyncIterator[ImageStore]:
    store = _store(tmp_path)
    try:
        yield store
    finally:
        await store.aclose()


def _blobs(store: ImageStore) -> set[str]:
    return store.content.digests()


def _leftovers(store: ImageStore) -> list[str]:
    """Temporary files and trees that must not outlive an operation."""
    found = [str(p) for p in store.content.tmp_dir.iterdir()]
    found += [str(p) for p in store.unpack_dir.iterdir()]
    found += [str(p) for p in store.rootfs_dir.iterdir() if p.name.startswith(".")]
    return found


async def test_pull_by_tag_and_digest(registry: RegistryServer, images: ImageStore) -> None:
    pushed = await push_image(registry.host, "pull/busybox", ["1.0"], [busybox_layer()])
    record = await images.pull(f"{registry.host}/pull/busybox:1.0")
    assert record.id == pushed.config_digest
    assert record.repo_tags == (f"{registry.host}/pull/busybox:1.0",)
    assert record.repo_digests == (f"{registry.host}/pull/busybox@{pushed.manifest_digest}",)
    assert record.manifest_digest == pushed.manifest_digest
    assert record.config.cmd == ("sh",)
    assert record.size > 1_000_000

    by_digest = await images.pull(f"{registry.host}/pull/busybox@{pushed.manifest_digest}")
    assert by_digest.id == record.id
    assert by_digest.repo_tags == record.repo_tags  # a digest pull adds no tag
    # every way of naming it finds it
    for name in (
        record.id,
        record.id.split(":", 1)[1],
        f"{registry.host}/pull/busybox:1.0",
        f"{registry.host}/pull/busybox@{pushed.manifest_digest}",
        f"{registry.host}/pull/busybox:1.0@{pushed.manifest_digest}",
    ):
        found = images.get(name)
        assert found is not None and found.id == record.id, name
    assert images.get(f"{registry.host}/pull/busybox:2.0") is None
    assert _leftovers(images) == []


async def test_docker_schema2_and_tag_plus_digest(
    registry: RegistryServer, images: ImageStore
) -> None:
    pushed = await push_image(
        registry.host, "pull/docker-types", ["v1"], [busybox_layer()], docker_types=True
    )
    record = await images.pull(f"{registry.host}/pull/docker-types:v1@{pushed.manifest_digest}")
    assert record.id == pushed.config_digest
    assert record.repo_tags == ()  # like containerd: tag+digest pulls by digest only


async def test_multi_tag_image(registry: RegistryServer, images: ImageStore) -> None:
    pushed = await push_image(registry.host, "pull/multi", ["a", "b", "c"], [busybox_layer()])
    for tag in ("a", "b", "c"):
        await images.pull(f"{registry.host}/pull/multi:{tag}")
    (record,) = [r for r in images.list() if r.id == pushed.config_digest]
    assert sorted(record.repo_tags) == [f"{registry.host}/pull/multi:{t}" for t in "abc"]
    assert len(record.repo_digests) == 1
    assert images.stats.blob_downloads == 1  # one layer, fetched once


async def test_index_picks_linux_amd64(registry: RegistryServer, images: ImageStore) -> None:
    amd64 = await push_image(
        registry.host, "pull/multiarch", [], [busybox_layer()], config={"Cmd": ["amd64"]}
    )
    arm64 = await push_image(
        registry.host,
        "pull/multiarch",
        [],
        [Layer([Entry("arm", data=b"arm")])],
        architecture="arm64",
        config={"Cmd": ["arm64"]},
    )
    index = await push_index(
        registry.host,
        "pull/multiarch",
        ["latest"],
        {"linux/arm64/v8": arm64, "linux/amd64": amd64, "windows/amd64": arm64},
    )
    record = await images.pull(f"{registry.host}/pull/multiarch")
    assert record.id == amd64.config_digest
    assert record.config.cmd == ("amd64",)
    assert record.manifest_digest == amd64.manifest_digest
    # the repo digest is the index's, as with containerd
    assert record.repo_digests == (f"{registry.host}/pull/multiarch@{index.manifest_digest}",)
    assert arm64.config_digest not in _blobs(images)

    other = _store(images.root.parent / "arm", platform=Platform("linux", "arm64", "v8"))
    try:
        arm = await other.pull(f"{registry.host}/pull/multiarch:latest")
        assert arm.config.cmd == ("arm64",)
    finally:
        await other.aclose()

    s390 = _store(images.root.parent / "s390", platform=Platform("linux", "s390x"))
    try:
        with pytest.raises(UnsupportedImage, match=r"no manifest for linux/s390x.*linux/amd64"):
            await s390.pull(f"{registry.host}/pull/multiarch:latest")
    finally:
        await s390.aclose()


async def test_docker_manifest_list(registry: RegistryServer, images: ImageStore) -> None:
    amd64 = await push_image(registry.host, "pull/dlist", [], [busybox_layer()], docker_types=True)
    await push_index(registry.host, "pull/dlist", ["1"], {"linux/amd64": amd64}, docker_types=True)
    record = await images.pull(f"{registry.host}/pull/dlist:1")
    assert record.id == amd64.config_digest


async def test_mirror_serves_canonical_name(registry: RegistryServer, tmp_path: Path) -> None:
    pushed = await push_image(registry.host, "x", ["1"], [busybox_layer()])
    await push_image(registry.host, "pause", ["3.9"], [busybox_layer()], config={"Cmd": ["/pause"]})
    hosts = RegistryHosts.from_dict(
        {
            "mirrors": {
                "registry.k8s.io": {"endpoints": [f"http://{registry.host}"]},
                "k8s.gcr.io": {"endpoints": [f"http://{registry.host}"]},
            }
        }
    )
    images = _store(tmp_path, hosts=hosts)
    try:
        record = await images.pull("registry.k8s.io/x:1")
        assert record.id == pushed.config_digest
        assert record.repo_tags == ("registry.k8s.io/x:1",)
        assert record.repo_digests == (f"registry.k8s.io/x@{pushed.manifest_digest}",)
        # one image, two canonical names (as critest expects of pause:3.9)
        a = await images.pull("registry.k8s.io/pause:3.9")
        b = await images.pull("k8s.gcr.io/pause:3.9")
        assert a.id == b.id
        record_b = images.get("k8s.gcr.io/pause:3.9")
        assert record_b is not None
        assert set(record_b.repo_tags) == {"registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"}
        # nothing is listed under the mirror's own address
        names = [t for r in images.list() for t in (*r.repo_tags, *r.repo_digests)]
        assert not [n for n in names if n.startswith(registry.host)]
    finally:
        await images.aclose()


async def test_mirror_falls_through_to_next_endpoint(
    registry: RegistryServer, tmp_path: Path
) -> None:
    pushed = await push_image(registry.host, "fallthrough", ["1"], [busybox_layer()])
    dead = f"http://127.0.0.1:{_closed_port()}"
    hosts = RegistryHosts(mirrors={"mirrored.example": [dead, f"http://{registry.host}"]})
    images = _store(tmp_path, hosts=hosts)
    images.registry.retry = type(images.registry.retry)(attempts=2, backoff=0.01)
    try:
        record = await images.pull("mirrored.example/fallthrough:1")
        assert record.id == pushed.config_digest
    finally:
        await images.aclose()


def _closed_port() -> int:
    from tests.registry import free_port

    return free_port()


async def test_unreachable_and_missing(registry: RegistryServer, images: ImageStore) -> None:
    images.registry.retry = type(images.registry.retry)(attempts=2, backoff=0.01)
    with pytest.raises(RegistryUnavailable, match="cannot reach registry"):
        await images.pull(f"127.0.0.1:{_closed_port()}/nothing:1")
    with pytest.raises(ImageNotFound, match="not found"):
        await images.pull(f"{registry.host}/does/not-exist:1")
    with pytest.raises(InvalidImageReference, match="lowercase"):
        await images.pull("Not/Valid")
    assert images.list() == []


async def test_corrupted_blob_stores_nothing(
    fresh_registry: RegistryServer, images: ImageStore
) -> None:
    layer = busybox_layer()
    await push_image(fresh_registry.host, "corrupt/me", ["1"], [layer])
    blob = fresh_registry.blob_path(layer.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    blob.write_bytes(bytes(data))
    with pytest.raises(ContentVerificationError, match="does not match its digest"):
        await images.pull(f"{fresh_registry.host}/corrupt/me:1")
    assert images.list() == []
    assert _blobs(images) == set()
    assert _leftovers(images) == []

    blob.write_bytes(blob.read_bytes() + b"tail")  # longer than the manifest says
    with pytest.raises(ContentVerificationError, match="bytes"):
        await images.pull(f"{fresh_registry.host}/corrupt/me:1")
    assert images.list() == [] and _blobs(images) == set() and _leftovers(images) == []


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([Entry("../../escape", data=b"x")], "'..'"),
        ([Entry("/abs", data=b"x")], "absolute"),
        (
            [Entry("link", "symlink", linkname="../../../.."), Entry("link/tmp/escape", data=b"")],
            "leaves the image root",
        ),
        ([Entry("hard", "hardlink", linkname="../../../etc/shadow")], "'..'"),
        (
            [Entry("up", "symlink", linkname="/../.."), Entry("h", "hardlink", linkname="up/etc")],
            "leaves the image root",
        ),
    ],
    ids=["traversal", "absolute", "symlink-escape", "hardlink-escape", "hardlink-via-symlink"],
)
async def test_malicious_layers_are_refused(
    registry: RegistryServer, images: ImageStore, entries: list[Entry], message: str
) -> None:
    name = f"evil/{abs(hash(message)) % 10_000}-{len(entries)}"
    await push_image(registry.host, name, ["1"], [busybox_layer(), Layer(entries)])
    with pytest.raises(UnsafeLayer, match=message):
        await images.pull(f"{registry.host}/{name}:1")
    assert images.list() == []
    assert _blobs(images) == set()
    assert _leftovers(images) == []
    assert list(images.rootfs_dir.iterdir()) == []


async def test_zstd_and_uncompressed_layers(registry: RegistryServer, images: ImageStore) -> None:
    pushed = await push_image(
        registry.host,
        "pull/compression",
        ["1"],
        [
            busybox_layer("zstd"),
            Layer([Entry("plain", data=b"uncompressed")], "none"),
        ],
    )
    record = await images.pull(f"{registry.host}/pull/compression:1")
    assert record.id == pushed.config_digest
    image = await images.rootfs_image(record.id)
    out = images.root.parent / "extract"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(image.path)], check=True)
    assert (out / "plain").read_bytes() == b"uncompressed"
    assert (out / "bin/busybox").stat().st_size > 100_000


async def test_removal_and_garbage_collection(registry: RegistryServer, images: ImageStore) -> None:
    shared = busybox_layer()
    one = await push_image(
        registry.host, "gc/one", ["1", "2"], [shared, Layer([Entry("one", data=b"1")])]
    )
    two = await push_image(
        registry.host, "gc/two", ["1"], [shared, Layer([Entry("two", data=b"2")])]
    )
    a = await images.pull(f"{registry.host}/gc/one:1")
    await images.pull(f"{registry.host}/gc/one:2")
    b = await images.pull(f"{registry.host}/gc/two:1")
    assert images.stats.blob_downloads == 3  # the shared layer once
    before = _blobs(images)
    assert images.rootfs_path(a.id).exists() and images.rootfs_path(b.id).exists()

    # untagging one of two tags keeps the image
    assert await images.remove(f"{registry.host}/gc/one:1")
    kept = images.get(a.id)
    assert kept is not None and kept.repo_tags == (f"{registry.host}/gc/one:2",)
    assert _blobs(images) == before
    # removing the last tag removes the image; shared blobs stay for the other image
    assert await images.remove(f"{registry.host}/gc/one:2")
    assert images.get(a.id) is None
    assert images.get(f"{registry.host}/gc/one@{one.manifest_digest}") is None
    assert not images.rootfs_path(a.id).exists()
    remaining = _blobs(images)
    assert shared.digest in remaining
    assert one.manifest_digest not in remaining and one.config_digest not in remaining
    # removing by id removes everything of it
    assert await images.remove(b.id)
    assert images.list() == []
    assert _blobs(images) == set()
    assert list(images.rootfs_dir.iterdir()) == []
    assert two.config_digest not in _blobs(images)
    # removing what is not there is not an error
    assert not await images.remove(b.id)
    assert not await images.remove(f"{registry.host}/gc/two:1")


async def test_removal_by_repo_digest(registry: RegistryServer, images: ImageStore) -> None:
    pushed = await push_image(registry.host, "gc/bydigest", ["x", "y"], [busybox_layer()])
    await images.pull(f"{registry.host}/gc/bydigest:x")
    await images.pull(f"{registry.host}/gc/bydigest:y")
    assert await images.remove(f"{registry.host}/gc/bydigest@{pushed.manifest_digest}")
    assert images.list() == []


async def test_concurrent_pulls_do_the_work_once(
    registry: RegistryServer, images: ImageStore
) -> None:
    layers = [busybox_layer(), Layer([Entry("big", data=os.urandom(4 << 20))], "none")]
    pushed = await push_image(registry.host, "conc/img", ["a", "b"], layers)
    ref = f"{registry.host}/conc/img:a"
    results = await asyncio.gather(*(images.pull(ref) for _ in range(5)))
    assert {r.id for r in results} == {pushed.config_digest}
    assert images.stats.pulls == 1
    assert images.stats.blob_downloads == 2
    assert images.stats.rootfs_builds == 1
    # two names of one image at once: blobs and the rootfs are still made once
    await images.remove(pushed.config_digest)
    before = images.stats.blob_downloads
    await asyncio.gather(
        images.pull(f"{registry.host}/conc/img:a"), images.pull(f"{registry.host}/conc/img:b")
    )
    assert images.stats.blob_downloads - before == 2
    assert images.stats.rootfs_builds == 2
    record = images.get(pushed.config_digest)
    assert record is not None and len(record.repo_tags) == 2


async def test_rootfs_image_built_once_and_reused(registry: RegistryServer, tmp_path: Path) -> None:
    pushed = await push_image(
        registry.host,
        "rootfs/img",
        ["1"],
        [busybox_layer(), Layer([Entry(".wh.tmp"), Entry("hello", data=b"world")])],
        config={"User": "app", "Entrypoint": ["/bin/sh"], "WorkingDir": "/home"},
    )
    images = _store(tmp_path, unpack_on_pull=False)
    try:
        record = await images.pull(f"{registry.host}/rootfs/img:1")
        assert images.stats.rootfs_builds == 0
        assert not images.rootfs_path(record.id).exists()
        first, second = await asyncio.gather(
            images.rootfs_image(record.id), images.rootfs_image(record.id)
        )
        assert first == second
        assert images.stats.rootfs_builds == 1
        assert first.image_id == record.rootfs_id and len(first.image_id) == 16
        assert first.size % (2 << 20) == 0
        inode = first.path.stat().st_ino
        again = await images.rootfs_image(f"{registry.host}/rootfs/img:1")
        assert again.path.stat().st_ino == inode and images.stats.rootfs_builds == 1
        assert list(images.unpack_dir.iterdir()) == []  # the unpacked tree is gone
        config = images.image_config(record.id)
        assert config.user == "app" and config.entrypoint == ("/bin/sh",)
        assert config.working_dir == "/home"
        user = await images.resolve_user(record.id)
        assert (user.uid, user.gid, user.additional_gids) == (1000, 1000, (10,))
        www = await images.resolve_user(record.id, "www-data")
        assert (www.uid, www.gid) == (33, 33)

        out = tmp_path / "extract"
        subprocess.run(["fsck.erofs", f"--extract={out}", str(first.path)], check=True)
        assert (out / "hello").read_bytes() == b"world"
        assert not (out / "tmp").exists()  # whited out by the upper layer
        assert os.readlink(out / "bin/ls") == "busybox"
    finally:
        await images.aclose()
    # after a restart the file is reused, not rebuilt
    restarted = _store(tmp_path, unpack_on_pull=False)
    try:
        image = await restarted.rootfs_image(record.id)
        assert image.path.stat().st_ino == inode
        assert restarted.stats.rootfs_builds == 0
        assert (await restarted.resolve_user(record.id)).uid == 1000
    finally:
        await restarted.aclose()
    _ = pushed


# --------------------------------------------------------------------------- killed pull

_PULL_SCRIPT = """
import asyncio, sys
from pathlib import Path
from cri.store import Store
from cri.images.hosts import RegistryHosts
from cri.images.store import ImageStore

async def main() -> None:
    root = Path(sys.argv[1])
    hosts = RegistryHosts(mirrors={"registry.test": [sys.argv[3]]})
    images = ImageStore(Store(root / "state.db"), root / "images", hosts=hosts)
    await images.pull(sys.argv[2])

asyncio.run(main())
"""


class StallingProxy:
    """Forwards registry requests; sends half of one blob, then stalls."""

    def __init__(self, upstream: str, stall_digest: str) -> None:
        self.upstream = upstream
        self.stall_digest = stall_digest
        self.stalled = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            headers = {}
            for line in head.decode().split("\r\n")[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    if k.lower() == "accept":
                        headers["Accept"] = v.strip()
            async with httpx.AsyncClient() as client:
                resp = await client.request(method, self.upstream + path, headers=headers)
            body = resp.content
            out = [f"HTTP/1.1 {resp.status_code} X"]
            for k in ("content-type", "docker-content-digest", "www-authenticate"):
                if k in resp.headers:
                    out.append(f"{k}: {resp.headers[k]}")
            out += [f"content-length: {len(body)}", "connection: close", "", ""]
            writer.write("\r\n".join(out).encode())
            if self.stall_digest in path:
                writer.write(body[: len(body) // 2])
                await writer.drain()
                self.stalled.set()
                await asyncio.sleep(3600)
            writer.write(body)
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_pull_killed_half_way_then_clean_retry(
    registry: RegistryServer, tmp_path: Path
) -> None:
    big = Layer([Entry("big", data=os.urandom(8 << 20))], "none")
    pushed = await push_image(registry.host, "killed/img", ["1"], [busybox_layer(), big])
    proxy = StallingProxy(registry.url, big.digest)
    await proxy.start()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _PULL_SCRIPT,
            str(tmp_path),
            "registry.test/killed/img:1",
            f"http://127.0.0.1:{proxy.port}",
        ],
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        await asyncio.wait_for(proxy.stalled.wait(), 60)
        await asyncio.sleep(0.3)  # let the client write what it got
        partial = list((tmp_path / "images/tmp").iterdir())
        assert partial, "the pull should be half-way, with a temporary blob"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        await proxy.stop()

    hosts = RegistryHosts(mirrors={"registry.test": [registry.url]})
    images = _store(tmp_path, hosts=hosts)
    try:
        assert images.list() == []
        assert _leftovers(images) == []
        assert _blobs(images) == set()  # finished blobs of the dead pull were orphans
        record = await images.pull("registry.test/killed/img:1")
        assert record.id == pushed.config_digest
        assert record.repo_tags == ("registry.test/killed/img:1",)
        assert _leftovers(images) == []
        assert json.loads(images.content.read(record.manifest_digest))["layers"][1]["digest"] == (
            big.digest
        )
    finally:
        await images.aclose()
