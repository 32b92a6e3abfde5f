"""OCI and Docker v2 schema 2 manifests, indexes and image configs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cri.images.errors import RegistryProtocolError, UnsupportedImage
from cri.images.reference import ReferenceError, validate_digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA1_PLAIN = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
LAYER_TYPES = (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        if not isinstance(data, Mapping):
            raise RegistryProtocolError(f"{where}: descriptor is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise RegistryProtocolError(f"{where}: descriptor needs a digest and a size")
        try:
            validate_digest(digest)
        except ReferenceError as exc:
            raise RegistryProtocolError(f"{where}: {exc}") from exc
        platform = None
        plat = data.get("platform")
        if isinstance(plat, Mapping):
            platform = Platform(
                str(plat.get("os", "")),
                str(plat.get("architecture", "")),
                str(plat.get("variant", "") or ""),
            )
        annotations = data.get("annotations") or {}
        return cls(
            str(data.get("mediaType", "")),
            digest,
            size,
            platform,
            {str(k): str(v) for k, v in annotations.items()}
            if isinstance(annotations, Mapping)
            else {},
        )

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryProtocolError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RegistryProtocolError(f"{what} is not a JSON object")
    return doc


def parse_manifest(data: bytes, content_type: str, where: str) -> Manifest | Index:
    """Parse a manifest or index, whichever ``data`` is."""
    doc = _load_json(data, f"manifest {where}")
    media_type = str(doc.get("mediaType") or content_type.split(";")[0].strip())
    if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_PLAIN) or doc.get("schemaVersion") == 1:
        raise UnsupportedImage(
            f"{where} is a Docker schema 1 image, which is deprecated and not supported; "
            "push it again with a current Docker or buildah"
        )
    if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
        if "manifests" in doc:
            media_type = OCI_INDEX
        elif "layers" in doc and "config" in doc:
            media_type = OCI_MANIFEST
        else:
            raise UnsupportedImage(f"{where} has unsupported manifest type {media_type!r}")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise RegistryProtocolError(f"index {where} has no manifests list")
        return Index(
            media_type,
            tuple(Descriptor.from_json(e, f"index {where}") for e in entries),
        )
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise RegistryProtocolError(f"manifest {where} has no layers list")
    config = Descriptor.from_json(doc.get("config"), f"manifest {where} config")
    parsed = tuple(Descriptor.from_json(e, f"manifest {where} layer") for e in layers)
    for layer in parsed:
        if layer.media_type == DOCKER_FOREIGN_LAYER:
            raise UnsupportedImage(f"{where} has a foreign (Windows) layer {layer.digest}")
        if layer.media_type and layer.media_type not in LAYER_TYPES:
            raise UnsupportedImage(
                f"{where} has layer {layer.digest} of unsupported type {layer.media_type!r}"
            )
    return Manifest(media_type, config, parsed)


def choose_platform(index: Index, want: Platform, where: str) -> Descriptor:
    """The manifest of ``index`` for platform ``want`` (variant preferred, not required)."""
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.platform.os == want.os
        and d.platform.architecture == want.architecture
        and (d.media_type in (*MANIFEST_TYPES, "") or d.media_type in INDEX_TYPES)
    ]
    if want.variant:
        exact = [d for d in candidates if d.platform and d.platform.variant == want.variant]
        candidates = exact or candidates
    if not candidates:
        offered = sorted({str(d.platform) for d in index.manifests if d.platform}) or ["none"]
        raise UnsupportedImage(
            f"{where} has no manifest for {want} (it offers: {', '.join(offered)})"
        )
    return candidates[0]


@dataclass(frozen=True)
class ImageConfig:
    """What the container layer needs from an OCI image config."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    os: str = ""
    architecture: str = ""
    diff_ids: tuple[str, ...] = ()
    created: str = ""

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ImageConfig:
        doc = _load_json(data, f"image config {where}")
        cfg = doc.get("config") or {}
        if not isinstance(cfg, Mapping):
            raise RegistryProtocolError(f"image config {where}: 'config' is not an object")

        def strings(value: Any) -> tuple[str, ...]:
            if isinstance(value, list):
                return tuple(str(v) for v in value)
            return ()

        rootfs = doc.get("rootfs") or {}
        diff_ids = strings(rootfs.get("diff_ids")) if isinstance(rootfs, Mapping) else ()
        labels = cfg.get("Labels") or {}
        return cls(
            entrypoint=strings(cfg.get("Entrypoint")),
            cmd=strings(cfg.get("Cmd")),
            env=strings(cfg.get("Env")),
            working_dir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            exposed_ports=tuple(sorted(cfg.get("ExposedPorts") or {})),
            volumes=tuple(sorted(cfg.get("Volumes") or {})),
            labels={str(k): str(v) for k, v in labels.items()}
            if isinstance(labels, Mapping)
            else {},
            stop_signal=str(cfg.get("StopSignal") or ""),
            os=str(doc.get("os") or ""),
            architecture=str(doc.get("architecture") or ""),
            diff_ids=diff_ids,
            created=str(doc.get("created") or ""),
        )
