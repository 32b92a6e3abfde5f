"""The CRI ImageService over a real grpc.aio server and a real registry."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from cri.images.hosts import RegistryHosts
from cri.images.registry import RetryPolicy
from cri.images.service import ImageService
from cri.images.store import ImageStore
from cri.store import Store
from tests.registry import (
    TOKEN_USERS,
    Entry,
    Layer,
    RegistryServer,
    TokenServer,
    busybox_layer,
    free_port,
    push_image,
    registry,
    token_registry,
)

__all__ = ["registry", "token_registry"]


@pytest.fixture
async def cri(
    tmp_path: Path, registry: RegistryServer
) -> AsyncIterator[tuple[api_pb2_grpc.ImageServiceStub, ImageStore]]:
    hosts = RegistryHosts(mirrors={"registry.k8s.io": [registry.url]})
    images = ImageStore(Store(tmp_path / "state.db"), tmp_path / "images", hosts=hosts)
    images.registry.retry = RetryPolicy(attempts=2, backoff=0.01)
    server = grpc.aio.server()
    api_pb2_grpc.add_ImageServiceServicer_to_server(ImageService(images), server)  # type: ignore[no-untyped-call]
    socket = tmp_path / "cri.sock"
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    try:
        yield api_pb2_grpc.ImageServiceStub(channel), images  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        await server.stop(None)
        await images.aclose()


def _spec(name: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=name)


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_pull_status_list_remove(
    cri: tuple[Any, ImageStore], registry: RegistryServer
) -> None:
    stub, _ = cri
    pushed = await push_image(
        registry.host,
        "svc/busybox",
        ["1", "2"],
        [busybox_layer()],
        config={"User": "www-data", "Labels": {"a": "b"}, "StopSignal": "SIGQUIT"},
    )
    name = f"{registry.host}/svc/busybox:1"
    resp = await stub.PullImage(api_pb2.PullImageRequest(image=_spec(name)))
    assert resp.image_ref == pushed.config_digest
    await stub.PullImage(api_pb2.PullImageRequest(image=_spec(f"{registry.host}/svc/busybox:2")))

    status = await stub.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(name), verbose=True))
    image = status.image
    assert image.id == pushed.config_digest
    assert sorted(image.repo_tags) == [name, f"{registry.host}/svc/busybox:2"]
    assert list(image.repo_digests) == [f"{registry.host}/svc/busybox@{pushed.manifest_digest}"]
    assert image.size > 1_000_000
    assert image.username == "www-data" and not image.HasField("uid")
    assert image.spec.image == pushed.config_digest
    assert not image.pinned
    info = json.loads(status.info["info"])
    assert info["imageSpec"]["config"]["Labels"] == {"a": "b"}
    assert info["imageSpec"]["config"]["StopSignal"] == "SIGQUIT"

    by_id = await stub.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(image.id)))
    assert by_id.image.id == image.id and not by_id.info

    listed = await stub.ListImages(api_pb2.ListImagesRequest())
    assert [i.id for i in listed.images] == [image.id]
    filtered = await stub.ListImages(
        api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=_spec(name)))
    )
    assert [i.id for i in filtered.images] == [image.id]
    none = await stub.ListImages(
        api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=_spec("nothing:here")))
    )
    assert list(none.images) == []

    # untag one of two tags, then remove by id; both idempotent
    await stub.RemoveImage(api_pb2.RemoveImageRequest(image=_spec(name)))
    status = await stub.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(image.id)))
    assert list(status.image.repo_tags) == [f"{registry.host}/svc/busybox:2"]
    await stub.RemoveImage(api_pb2.RemoveImageRequest(image=_spec(image.id)))
    await stub.RemoveImage(api_pb2.RemoveImageRequest(image=_spec(image.id)))
    missing = await stub.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(image.id)))
    assert not missing.HasField("image")
    assert list((await stub.ListImages(api_pb2.ListImagesRequest())).images) == []


async def test_numeric_user_is_reported_as_uid(
    cri: tuple[Any, ImageStore], registry: RegistryServer
) -> None:
    stub, _ = cri
    await push_image(
        registry.host, "svc/uid", ["1"], [Layer([Entry("x", data=b"")])], config={"User": "1234:5"}
    )
    name = f"{registry.host}/svc/uid:1"
    await stub.PullImage(api_pb2.PullImageRequest(image=_spec(name)))
    status = await stub.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(name)))
    assert status.image.uid.value == 1234 and status.image.username == ""


async def test_pull_through_mirror_keeps_canonical_name(
    cri: tuple[Any, ImageStore], registry: RegistryServer
) -> None:
    stub, _ = cri
    await push_image(registry.host, "pause", ["3.9"], [busybox_layer()])
    resp = await stub.PullImage(api_pb2.PullImageRequest(image=_spec("registry.k8s.io/pause:3.9")))
    status = await stub.ImageStatus(api_pb2.ImageStatusRequest(image=_spec(resp.image_ref)))
    assert list(status.image.repo_tags) == ["registry.k8s.io/pause:3.9"]
    assert status.image.repo_digests[0].startswith("registry.k8s.io/pause@sha256:")


async def test_error_codes(cri: tuple[Any, ImageStore], registry: RegistryServer) -> None:
    stub, _ = cri
    code, msg = await _code(stub.PullImage(api_pb2.PullImageRequest(image=_spec("Bad/Name"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "lowercase" in msg
    code, msg = await _code(stub.PullImage(api_pb2.PullImageRequest(image=_spec(""))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = await _code(
        stub.PullImage(api_pb2.PullImageRequest(image=_spec("sha256:" + "a" * 64)))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image id" in msg
    code, msg = await _code(
        stub.PullImage(api_pb2.PullImageRequest(image=_spec(f"{registry.host}/no/such:1")))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "not found" in msg
    code, msg = await _code(
        stub.PullImage(api_pb2.PullImageRequest(image=_spec(f"127.0.0.1:{free_port()}/x:1")))
    )
    assert code == grpc.StatusCode.UNAVAILABLE and "cannot reach" in msg
    code, msg = await _code(stub.ImageStatus(api_pb2.ImageStatusRequest(image=_spec("UPPER/Case"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = await _code(stub.RemoveImage(api_pb2.RemoveImageRequest(image=_spec(""))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_auth_errors_and_credentials(
    cri: tuple[Any, ImageStore], token_registry: tuple[RegistryServer, TokenServer]
) -> None:
    stub, _ = cri
    server, _token = token_registry
    from cri.images.auth import Credentials

    alice = Credentials.from_auth_config(username="alice", password=TOKEN_USERS["alice"])
    await push_image(server.host, "svc/private", ["1"], [busybox_layer()], credentials=alice)
    name = f"{server.host}/svc/private:1"
    code, msg = await _code(stub.PullImage(api_pb2.PullImageRequest(image=_spec(name))))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "credentials" in msg
    wrong = api_pb2.AuthConfig(username="alice", password="guess")
    code, msg = await _code(stub.PullImage(api_pb2.PullImageRequest(image=_spec(name), auth=wrong)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "guess" not in msg
    good = api_pb2.AuthConfig(username="alice", password=TOKEN_USERS["alice"])
    resp = await stub.PullImage(api_pb2.PullImageRequest(image=_spec(name), auth=good))
    assert resp.image_ref.startswith("sha256:")


async def test_image_fs_info(cri: tuple[Any, ImageStore], registry: RegistryServer) -> None:
    stub, images = cri
    empty = await stub.ImageFsInfo(api_pb2.ImageFsInfoRequest())
    await push_image(registry.host, "svc/fs", ["1"], [busybox_layer()])
    await stub.PullImage(api_pb2.PullImageRequest(image=_spec(f"{registry.host}/svc/fs:1")))
    full = await stub.ImageFsInfo(api_pb2.ImageFsInfoRequest())
    (fs,) = full.image_filesystems
    assert fs.fs_id.mountpoint == str(images.root)
    assert fs.used_bytes.value > empty.image_filesystems[0].used_bytes.value + 1_000_000
    assert fs.inodes_used.value > 0 and fs.timestamp > 0
    assert full.container_filesystems[0].fs_id.mountpoint == str(images.root)
