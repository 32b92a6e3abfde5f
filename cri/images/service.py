"""CRI v1 ImageService on grpc.aio, backed by ``ImageStore``.

Semantics follow the CRI API and containerd:

- PullImage returns the image id (the config digest, ``sha256:...``).
- ImageStatus of an unknown image returns an empty response (no error).
- RemoveImage of an unknown image succeeds (the call is idempotent). By id or repo
  digest it removes the image; by tag it removes the tag, and the image with it when
  that was the image's last tag.
- ListImages with a filter returns the one image the filter names, if present.
- ImageFsInfo reports the image store's directory; the containers' writable layers live
  inside the pod VMs, so the container filesystem is reported as the same one.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from cri.images.auth import Credentials
from cri.images.errors import (
    ContentVerificationError,
    ImageError,
    ImageNotFound,
    InvalidImageReference,
    RegistryPermissionDenied,
    RegistryProtocolError,
    RegistryUnauthenticated,
    RegistryUnavailable,
    UnsafeLayer,
    UnsupportedImage,
)
from cri.images.reference import is_image_id
from cri.images.rootfs import RootfsBuildError
from cri.images.store import ImageRecord, ImageStore
from cri.images.users import UserNotFound

log = logging.getLogger(__name__)

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidImageReference, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageNotFound, grpc.StatusCode.NOT_FOUND),
    (RegistryUnauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (RegistryPermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ContentVerificationError, grpc.StatusCode.DATA_LOSS),
    (RegistryProtocolError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsupportedImage, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsafeLayer, grpc.StatusCode.FAILED_PRECONDITION),
    (UserNotFound, grpc.StatusCode.FAILED_PRECONDITION),
    (RootfsBuildError, grpc.StatusCode.INTERNAL),
]


def status_code_for(exc: Exception) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    await context.abort(status_code_for(exc), str(exc))
    raise AssertionError("unreachable")  # abort raises


def credentials_from(auth: api_pb2.AuthConfig | None) -> Credentials | None:
    if auth is None:
        return None
    return Credentials.from_auth_config(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )


def to_cri_image(record: ImageRecord) -> api_pb2.Image:
    image = api_pb2.Image(
        id=record.id,
        repo_tags=list(record.repo_tags),
        repo_digests=list(record.repo_digests),
        size=record.size,
        spec=api_pb2.ImageSpec(image=record.id),
        pinned=record.pinned,
    )
    user = record.config.user.split(":", 1)[0]
    if user.isdigit():
        image.uid.value = int(user)
    elif user:
        image.username = user
    return image


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Resp]]


def observed(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Report each call's method, status code and duration to ``self.observe`` (the
    same request counters as the RuntimeService's)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        started = time.perf_counter()
        code = "OK"
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            aborted = context.code()
            code = aborted.name if isinstance(aborted, grpc.StatusCode) else "UNKNOWN"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            if self.observe is not None:
                self.observe(method.__name__, code, time.perf_counter() - started)

    return wrapper


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, images: ImageStore) -> None:
        self.images = images
        self.observe: Callable[[str, str, float], None] | None = None

    @observed
    async def PullImage(
        self, request: api_pb2.PullImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.PullImageResponse:
        text = request.image.image
        if not text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullImage needs an image name")
        if is_image_id(text):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{text!r} is an image id; pull by name (repository[:tag] or @digest)",
            )
        try:
            creds = credentials_from(request.auth if request.HasField("auth") else None)
            record = await self.images.pull(text, creds)
        except ImageError as exc:
            log.warning("PullImage image=%s failed: %s", text, exc)
            await _abort(context, exc)
        return api_pb2.PullImageResponse(image_ref=record.id)

    @observed
    async def ListImages(
        self, request: api_pb2.ListImagesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.ListImagesResponse:
        wanted = request.filter.image.image if request.HasField("filter") else ""
        if wanted:
            try:
                record = self.images.get(wanted)
            except ImageError:
                return api_pb2.ListImagesResponse()
            records = [record] if record else []
        else:
            records = self.images.list()
        return api_pb2.ListImagesResponse(images=[to_cri_image(r) for r in records])

    @observed
    async def ImageStatus(
        self, request: api_pb2.ImageStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.ImageStatusResponse:
        try:
            record = self.images.get(request.image.image)
        except ImageError as exc:
            await _abort(context, exc)
        if record is None:
            return api_pb2.ImageStatusResponse()
        response = api_pb2.ImageStatusResponse(image=to_cri_image(record))
        if request.verbose:
            cfg = record.config
            info = {
                "imageSpec": {
                    "os": cfg.os,
                    "architecture": cfg.architecture,
                    "created": cfg.created,
                    "config": {
                        "Entrypoint": list(cfg.entrypoint),
                        "Cmd": list(cfg.cmd),
                        "Env": list(cfg.env),
                        "WorkingDir": cfg.working_dir,
                        "User": cfg.user,
                        "ExposedPorts": list(cfg.exposed_ports),
                        "Volumes": list(cfg.volumes),
                        "Labels": cfg.labels,
                        "StopSignal": cfg.stop_signal,
                    },
                    "rootfs": {"type": "layers", "diff_ids": list(cfg.diff_ids)},
                },
                "manifestDigest": record.manifest_digest,
                "layers": [d.to_json() for d in record.layers],
                "rootfsImage": str(self.images.rootfs_path(record.id)),
            }
            response.info["info"] = json.dumps(info)
        return response

    @observed
    async def RemoveImage(
        self, request: api_pb2.RemoveImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.RemoveImageResponse:
        text = request.image.image
        if not text:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "RemoveImage needs an image name or id"
            )
        try:
            await self.images.remove(text)
        except ImageError as exc:
            await _abort(context, exc)
        return api_pb2.RemoveImageResponse()

    @observed
    async def ImageFsInfo(
        self, request: api_pb2.ImageFsInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.ImageFsInfoResponse:
        usage = await self.images.filesystem_usage()
        fs = api_pb2.FilesystemUsage(
            timestamp=usage.timestamp_ns,
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=usage.mountpoint),
        )
        fs.used_bytes.value = usage.used_bytes
        fs.inodes_used.value = usage.inodes_used
        return api_pb2.ImageFsInfoResponse(image_filesystems=[fs], container_filesystems=[fs])
