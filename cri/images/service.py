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

import json
import logging
from collections.abc import Callable

from cri_api.v1 import api_pb2, api_pb2_grpc

from cri.edge import Context, cri_call
from cri.images.auth import Credentials
from cri.images.errors import ImageError, InvalidImageReference
from cri.images.reference import is_image_id
from cri.images.store import ImageRecord, ImageStore

log = logging.getLogger(__name__)


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


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, images: ImageStore) -> None:
        self.images = images
        self.observe: Callable[[str, str, float], None] | None = None

    @cri_call
    async def PullImage(
        self, request: api_pb2.PullImageRequest, context: Context
    ) -> api_pb2.PullImageResponse:
        text = request.image.image
        if not text:
            raise InvalidImageReference("PullImage needs an image name")
        if is_image_id(text):
            raise InvalidImageReference(
                f"{text!r} is an image id; pull by name (repository[:tag] or @digest)"
            )
        try:
            creds = credentials_from(request.auth if request.HasField("auth") else None)
            record = await self.images.pull(text, creds)
        except ImageError as exc:
            log.warning("PullImage image=%s failed: %s", text, exc)
            raise
        return api_pb2.PullImageResponse(image_ref=record.id)

    @cri_call
    async def ListImages(
        self, request: api_pb2.ListImagesRequest, context: Context
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

    @cri_call
    async def ImageStatus(
        self, request: api_pb2.ImageStatusRequest, context: Context
    ) -> api_pb2.ImageStatusResponse:
        record = self.images.get(request.image.image)
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

    @cri_call
    async def RemoveImage(
        self, request: api_pb2.RemoveImageRequest, context: Context
    ) -> api_pb2.RemoveImageResponse:
        text = request.image.image
        if not text:
            raise InvalidImageReference("RemoveImage needs an image name or id")
        await self.images.remove(text)
        return api_pb2.RemoveImageResponse()

    @cri_call
    async def ImageFsInfo(
        self, request: api_pb2.ImageFsInfoRequest, context: Context
    ) -> api_pb2.ImageFsInfoResponse:
        usage = await self.images.filesystem_usage()
        fs = api_pb2.FilesystemUsage(
            timestamp=usage.timestamp_ns,
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=usage.mountpoint),
        )
        fs.used_bytes.value = usage.used_bytes
        fs.inodes_used.value = usage.inodes_used
        return api_pb2.ImageFsInfoResponse(image_filesystems=[fs], container_filesystems=[fs])
