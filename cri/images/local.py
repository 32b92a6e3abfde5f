"""Publish an image built from a local directory to a registry.

The demo and the offline lab have no internet: this turns a root filesystem tree (for
example the busybox tree from `cri.images.rootfs.make_busybox_tree`) into a one-layer OCI
image and pushes it with our own registry client.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from cri.images.reference import parse_reference
from cri.images.registry import RegistryClient

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_tree(root: Path) -> bytes:
    """A reproducible tar of ``root``: sorted, mtime 0, numeric owners kept."""
    raw = io.BytesIO()

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=normalize)
    return raw.getvalue()


async def push_tree(root: Path, reference: str, *, config: dict[str, Any] | None = None) -> str:
    """Push ``root`` as a one-layer image named ``reference``; return the manifest digest."""
    ref = parse_reference(reference)
    layer_tar = tar_tree(root)
    layer = gzip.compress(layer_tar, compresslevel=6, mtime=0)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            **(config or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": _digest(layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    client = RegistryClient()
    try:
        repo = client.repositories(ref, None, actions=("pull", "push"))[0]
        await repo.push_blob(config_bytes)
        await repo.push_blob(layer)
        return await repo.push_manifest(ref.tag or "latest", manifest_bytes, OCI_MANIFEST)
    finally:
        await client.aclose()
