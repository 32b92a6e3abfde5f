"""A real registry for tests: Debian's ``docker-registry`` on 127.0.0.1, plus image builders.

- ``RegistryServer``: ``docker-registry serve`` on a free loopback port, storage in a
  temp dir; open (anonymous), behind token auth (``TokenServer``, a small realm with its
  own test key pair that issues ES256 JWTs for user/password or refresh tokens), or
  behind htpasswd basic auth (needs ``htpasswd`` from apache2-utils; the password goes
  in on stdin). Stopped by PID.
- ``Layer``: builds a layer tar (gzip, zstd or none) from entries, including hostile
  ones (``..`` names, absolute names, links that leave the root).
- ``push_image`` / ``push_index``: push with clearcri's own registry client.
- ``busybox_layer``: /bin/busybox from the host's busybox-static, applet symlinks,
  /etc/passwd and /etc/group.
- pytest fixtures ``registry`` (module scope), ``fresh_registry`` (per test),
  ``token_registry``.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cri.images.auth import Credentials
from cri.images.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from cri.images.reference import parse_reference
from cri.images.registry import RegistryClient, Repository

REGISTRY_BINARY = "docker-registry"
BUSYBOX = "/bin/busybox"
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\nwww-data:x:33:\napp:x:1000:\nwheel:x:10:app\nnogroup:x:65534:\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------- token realm


class TokenServer:
    """A token realm for docker-registry's ``auth: token``: users with passwords, and
    refresh tokens (identity tokens); grants what is asked to known users only."""

    def __init__(self, workdir: Path, users: dict[str, str], service: str = "test-registry"):
        self.users = dict(users)
        self.refresh_tokens: dict[str, str] = {}  # token -> user
        self.service = service
        self.issuer = "clearcri-test-issuer"
        self.requests = 0
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clearcri test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                server.requests += 1
                query = parse_qs(urlsplit(self.path).query)
                ok, user = server._basic_user(self.headers.get("Authorization", ""))
                if not ok:
                    self._reply(401, {"details": "bad credentials"})
                    return
                self._reply(200, server.issue(user, query.get("scope", [])))

            def do_POST(self) -> None:
                server.requests += 1
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                token = form.get("refresh_token", [""])[0]
                user = server.refresh_tokens.get(token)
                if form.get("grant_type") != ["refresh_token"] or user is None:
                    self._reply(401, {"details": "bad refresh token"})
                    return
                scopes = form.get("scope", [""])[0].split()
                body = server.issue(user, scopes)
                self._reply(200, {"access_token": body["token"], "expires_in": 300})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _basic_user(self, header: str) -> tuple[bool, str]:
        """(credentials acceptable, user name); anonymous is acceptable as user ""."""
        if not header:
            return True, ""
        if not header.startswith("Basic "):
            return False, ""
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        if self.users.get(user) != password:
            return False, ""
        return True, user

    def issue(self, user: str, scopes: list[str]) -> dict[str, Any]:
        access = []
        if user:
            for scope in scopes:
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind == "repository" and name:
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
        return {"token": self.jwt(user, access), "expires_in": 300}

    def jwt(self, user: str, access: list[dict[str, Any]]) -> str:
        der = self._cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(signature)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# --------------------------------------------------------------------------- registry


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storage under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        token: TokenServer | None = None,
        htpasswd: dict[str, str] | None = None,
    ) -> None:
        if shutil.which(REGISTRY_BINARY) is None:
            pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.token = token
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
        ]
        if token is not None:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {token.realm}",
                f"    service: {token.service}",
                f"    issuer: {token.issuer}",
                f"    rootcertbundle: {token.cert_path}",
            ]
        elif htpasswd is not None:
            if shutil.which("htpasswd") is None:
                pytest.skip("htpasswd (apache2-utils) is not installed")
            path = workdir / "htpasswd"
            for i, (user, password) in enumerate(htpasswd.items()):
                flags = "-Bi" + ("c" if i == 0 else "")
                subprocess.run(
                    ["htpasswd", flags, str(path), user],
                    input=password.encode(),
                    check=True,
                    capture_output=True,
                )
            lines += ["auth:", "  htpasswd:", "    realm: clearcri-test", f"    path: {path}"]
        self.config = workdir / "registry.yml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = workdir / "registry.log"
        with open(self.log, "wb") as log_file:
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.process.pid
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start within 15 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, 9)
                self.process.wait()

    def blob_path(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


# --------------------------------------------------------------------------- layers


@dataclass
class Entry:
    name: str
    kind: str = "file"  # file, dir, symlink, hardlink, fifo, chardev
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    xattrs: dict[str, str] = field(default_factory=dict)


class Layer:
    """A layer built from entries, in the order given (no parent directories added)."""

    def __init__(self, entries: list[Entry], compression: str = "gzip") -> None:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for e in entries:
                info = tarfile.TarInfo(e.name)
                info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, 0
                if e.xattrs:
                    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
                if e.kind == "file":
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
                    continue
                info.type = {
                    "dir": tarfile.DIRTYPE,
                    "symlink": tarfile.SYMTYPE,
                    "hardlink": tarfile.LNKTYPE,
                    "fifo": tarfile.FIFOTYPE,
                    "chardev": tarfile.CHRTYPE,
                }[e.kind]
                info.linkname = e.linkname
                if e.kind == "chardev":
                    info.devmajor, info.devminor = 1, 3
                tar.addfile(info)
        self.tar = raw.getvalue()
        self.diff_id = sha256(self.tar)
        if compression == "gzip":
            self.blob = gzip.compress(self.tar, compresslevel=6, mtime=0)
            self.media_type = OCI_LAYER_GZIP
        elif compression == "zstd":
            self.blob = subprocess.run(
                ["zstd", "-q", "-c"], input=self.tar, capture_output=True, check=True
            ).stdout
            self.media_type = OCI_LAYER_ZSTD
        else:
            self.blob = self.tar
            self.media_type = OCI_LAYER
        self.digest = sha256(self.blob)


def busybox_entries(extra_files: dict[str, bytes] | None = None) -> list[Entry]:
    """A busybox root: dirs, /bin/busybox, applet symlinks, passwd and group."""
    entries = [Entry(d, "dir", mode=0o755) for d in ("bin", "etc", "tmp", "root", "home")]
    entries[2].mode = 0o1777
    entries.append(Entry("bin/busybox", data=Path(BUSYBOX).read_bytes(), mode=0o755))
    applets = subprocess.run(
        [BUSYBOX, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries += [
        Entry(f"bin/{a}", "symlink", linkname="busybox", mode=0o777)
        for a in applets
        if a != "busybox"
    ]
    entries.append(Entry("etc/passwd", data=PASSWD.encode()))
    entries.append(Entry("etc/group", data=GROUP.encode()))
    for name, data in (extra_files or {}).items():
        entries.append(Entry(name, data=data))
    return entries


def busybox_layer(compression: str = "gzip") -> Layer:
    return Layer(busybox_entries(), compression)


# --------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushedImage:
    repository: str  # host/path
    manifest: bytes
    manifest_digest: str
    media_type: str
    config_digest: str  # the image id

    @property
    def size(self) -> int:
        return len(self.manifest)


def repository(
    client: RegistryClient, host: str, path: str, credentials: Credentials | None = None
) -> Repository:
    ref = parse_reference(f"{host}/{path}")
    return client.repositories(ref, credentials, actions=("pull", "push"))[0]


async def push_image(
    host: str,
    path: str,
    tags: list[str],
    layers: list[Layer],
    *,
    config: dict[str, Any] | None = None,
    architecture: str = "amd64",
    docker_types: bool = False,
    credentials: Credentials | None = None,
) -> PushedImage:
    """Push an image built from ``layers`` and tag it with each of ``tags``."""
    client = RegistryClient()
    try:
        repo = repository(client, host, path, credentials)
        image_config = {
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["sh"],
                **(config or {}),
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
        config_bytes = json.dumps(image_config, sort_keys=True).encode()
        config_digest = await repo.push_blob(config_bytes)
        for layer in layers:
            await repo.push_blob(layer.blob, layer.digest)
        layer_type = DOCKER_LAYER_GZIP if docker_types else None
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker_types else OCI_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG if docker_types else OCI_CONFIG,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": layer_type or layer.media_type,
                    "digest": layer.digest,
                    "size": len(layer.blob),
                }
                for layer in layers
            ],
        }
        data = json.dumps(manifest, indent=2).encode()
        media_type = str(manifest["mediaType"])
        digest = sha256(data)
        for tag in tags or [digest]:
            await repo.push_manifest(tag, data, media_type)
        return PushedImage(f"{host}/{path}", data, digest, media_type, config_digest)
    finally:
        await client.aclose()


async def push_index(
    host: str,
    path: str,
    tags: list[str],
    platforms: dict[str, PushedImage],
    *,
    docker_types: bool = False,
    credentials: Credentials | None = None,
) -> PushedImage:
    """Push an index whose entries are already pushed manifests, keyed "os/arch[/variant]"."""
    client = RegistryClient()
    try:
        repo = repository(client, host, path, credentials)
        entries = []
        for platform, image in platforms.items():
            os_name, arch, *variant = platform.split("/")
            plat: dict[str, str] = {"os": os_name, "architecture": arch}
            if variant:
                plat["variant"] = variant[0]
            entries.append(
                {
                    "mediaType": image.media_type,
                    "digest": image.manifest_digest,
                    "size": len(image.manifest),
                    "platform": plat,
                }
            )
        media_type = DOCKER_MANIFEST_LIST if docker_types else OCI_INDEX
        data = json.dumps(
            {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, indent=2
        ).encode()
        for tag in tags:
            await repo.push_manifest(tag, data, media_type)
        return PushedImage(f"{host}/{path}", data, sha256(data), media_type, "")
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An open registry shared by the tests of one module."""
    server = RegistryServer(tmp_path_factory.mktemp("registry"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """An open registry of one's own (for tests that damage its storage)."""
    server = RegistryServer(tmp_path / "registry")
    try:
        yield server
    finally:
        server.stop()


TOKEN_USERS = {"alice": "correct horse battery staple"}


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RegistryServer, TokenServer]]:
    """A registry behind bearer-token auth; user ``alice`` may push and pull."""
    workdir = tmp_path_factory.mktemp("token-registry")
    token = TokenServer(workdir, TOKEN_USERS)
    server = RegistryServer(workdir, token=token)
    try:
        yield server, token
    finally:
        server.stop()
        token.close()
