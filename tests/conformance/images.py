"""The image set critest pulls, rebuilt offline from Debian packages.

critest (cri-tools v1.37) pulls 19 images from registry.k8s.io and gcr.io. This module
builds stand-ins with the behaviour the specs check, from Debian packages fetched with
``apt-get download`` (busybox, nginx and the libraries their ELF headers ask for) and two
tiny static C programs in ``src/`` (a pause process and a setuid "effective uid"
printer), then pushes them to a plain-HTTP registry under the *path* of their upstream
name: ``gcr.io/k8s-staging-cri-tools/test-image-tag:test`` becomes
``<registry>/k8s-staging-cri-tools/test-image-tag:test``. The runtime under test mirrors
registry.k8s.io, gcr.io and k8s.gcr.io to that one registry, so ``registry.k8s.io/
pause:3.9`` and ``k8s.gcr.io/pause:3.9`` are one manifest, as critest requires.

Layers are reproducible: entries sorted, owner 0:0 unless stated, mtime 0, gzip header
without a time or name. The same package versions give the same digests.

    python3 -m tests.conformance.images --registry 127.0.0.1:5000 [--cache DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SRC_DIR = Path(__file__).resolve().parent / "src"
DEFAULT_CACHE = Path.home() / ".cache" / "clearcri" / "conformance-images"

# What to download: busybox (the dynamic build: the shell and coreutils of every image),
# nginx for the web server images, and the libraries both need.
PACKAGES = (
    "busybox",
    "nginx",
    "nginx-common",
    "libc6",
    "libcrypt1",
    "libpcre2-8-0",
    "libssl3",
    "zlib1g",
)
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

E2E = "e2e-test-images/"  # registry.k8s.io/e2e-test-images/...
CRI_TOOLS = "k8s-staging-cri-tools/"  # gcr.io/k8s-staging-cri-tools/...
SANDBOX_IMAGE_PATH = "clearcri-conformance/sandbox-pause:1"

USERS = (
    ("root", 0, 0, "/root", "/bin/sh"),
    ("daemon", 1, 1, "/usr/sbin", "/usr/sbin/nologin"),
    ("www-data", 33, 33, "/var/www", "/usr/sbin/nologin"),
    ("nobody", 65534, 65534, "/nonexistent", "/usr/sbin/nologin"),
)
GROUPS = (("root", 0, ""), ("daemon", 1, ""), ("www-data", 33, ""), ("nogroup", 65534, ""))

# Debian's busybox has neither applet; critest runs `pgrep sleep` and `ipcs -m`.
PGREP_SCRIPT = """#!/bin/sh
# pgrep PATTERN: the PIDs of processes whose name matches the extended regex PATTERN.
if [ $# -ne 1 ]; then echo "usage: pgrep PATTERN" >&2; exit 2; fi
found=1
for stat in /proc/[0-9]*/comm; do
    pid=${stat#/proc/}; pid=${pid%/comm}
    [ "$pid" = "$$" ] && continue
    name=$(cat "$stat" 2>/dev/null) || continue
    if printf '%s\\n' "$name" | grep -Eq -- "$1"; then echo "$pid"; found=0; fi
done
exit $found
"""
IPCS_SCRIPT = """#!/bin/sh
# ipcs [-m]: the System V shared memory segments visible in this IPC namespace.
echo
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch     status"
awk 'NR > 1 { printf "0x%08x %-10s %-10s %-10s %-10s %-10s\\n", $1, $2, $8, $3, $4, $7 }' \\
    /proc/sysvipc/shm 2>/dev/null
echo
"""
HTTPD_FOREGROUND = """#!/bin/sh
# Stand-in for the httpd image's entrypoint: busybox httpd in the foreground, after a
# start-up line that names it (critest looks for "httpd" in the container log).
echo "httpd: serving /usr/local/apache2/htdocs on port 80"
exec httpd -f -v -p 80 -h /usr/local/apache2/htdocs
"""
NGINX_CONF = """user www-data;
worker_processes 1;
pid /run/nginx.pid;
error_log stderr notice;
events {
    worker_connections 64;
}
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    include /etc/nginx/conf.d/*.conf;
}
"""
NGINX_SITE = """server {
    listen %d;
    server_name localhost;
    location / {
        root /usr/share/nginx/html;
        index index.html;
    }
}
"""


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The unpacked Debian packages and the compiled helpers, cached across runs."""

    cache: Path
    packages: tuple[str, ...] = PACKAGES
    root: Path = field(init=False)  # every package unpacked into one tree
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.cache / "root"

    def prepare(self) -> None:
        debs = self.cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        for package in self.packages:
            found = sorted(debs.glob(f"{package}_*.deb"))
            if not found:
                subprocess.run(
                    ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
                    cwd=debs,
                    check=True,
                )
                found = sorted(debs.glob(f"{package}_*.deb"))
            if not found:
                raise SystemExit(f"apt-get download {package} left no .deb in {debs}")
            deb = found[-1]
            self.versions[package] = deb.name.split("_")[1]
            marker = self.cache / "unpacked" / deb.name
            if not marker.exists():
                subprocess.run(["dpkg-deb", "-x", str(deb), str(self.root)], check=True)
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
        bin_dir = self.cache / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for program in ("pause", "nonewprivs", "nmeter"):
            source = SRC_DIR / f"{program}.c"
            out = bin_dir / program
            if not out.exists() or out.stat().st_mtime < source.stat().st_mtime:
                subprocess.run(
                    ["gcc", "-static", "-O2", "-s", "-o", str(out), str(source)], check=True
                )

    def path(self, relative: str) -> Path:
        return self.root / relative

    def program(self, name: str) -> bytes:
        return (self.cache / "bin" / name).read_bytes()

    def needed(self, binary: Path) -> list[str]:
        """The DT_NEEDED sonames of an ELF file."""
        out = subprocess.run(
            ["readelf", "-d", str(binary)], capture_output=True, text=True, check=True
        ).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)

    def resolve(self, relative: str, hops: int = 16) -> Path | None:
        """The regular file a path in the unpacked tree names, following symlinks inside
        the tree (an absolute link target means the tree's root, not the host's)."""
        path = self.root / relative
        for _ in range(hops):
            if path.is_symlink():
                target = os.readlink(path)
                path = (
                    self.root / target.lstrip("/")
                    if target.startswith("/")
                    else path.parent / target
                )
                continue
            return path if path.is_file() else None
        return None

    def library(self, soname: str) -> tuple[str, Path]:
        """Where a library lives in the unpacked packages: (path in image, real file)."""
        for directory in LIBRARY_DIRS:
            real = self.resolve(f"{directory}/{soname}")
            if real is not None:
                return f"{directory}/{soname}", real
        raise SystemExit(f"no package in {self.packages} provides {soname}")

    def closure(self, binaries: Iterable[Path]) -> dict[str, Path]:
        """Every library the binaries load, directly or not (path in image -> file)."""
        result: dict[str, Path] = {}
        todo = [soname for binary in binaries for soname in self.needed(binary)]
        while todo:
            soname = todo.pop()
            image_path, real = self.library(soname)
            if image_path in result:
                continue
            result[image_path] = real
            todo.extend(self.needed(real))
        return result


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Entry:
    kind: str  # "dir", "file", "symlink", "hardlink"
    mode: int
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0


class Layer:
    """A filesystem layer under construction; parent directories appear by themselves."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: dict[str, Entry] = {}
        self._blob: tuple[bytes, str] | None = None

    def _parents(self, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            self.entries.setdefault(parent, Entry("dir", 0o755))

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        self.entries[path] = Entry("dir", mode)

    def file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        self._parents(path)
        raw = data.encode() if isinstance(data, str) else data
        self.entries[path] = Entry("file", mode, data=raw)

    def copy(self, path: str, source: Path, mode: int = 0o755) -> None:
        self.file(path, source.read_bytes(), mode)

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self.entries[path] = Entry("symlink", 0o777, target=target)

    def hardlink(self, path: str, target: str) -> None:
        self._parents(path)
        self.entries[path] = Entry("hardlink", 0o755, target=target)

    def blob(self) -> tuple[bytes, str]:
        """(gzip-compressed tar, diff_id of the uncompressed tar)."""
        if self._blob is None:
            raw = io.BytesIO()
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                # a hard link may only name a file written before it
                for path in sorted(
                    self.entries, key=lambda p: (self.entries[p].kind == "hardlink", p)
                ):
                    tar.addfile(*self._member(path, self.entries[path]))
            plain = raw.getvalue()
            packed = io.BytesIO()
            with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0) as gz:
                gz.write(plain)
            self._blob = (packed.getvalue(), digest_of(plain))
        return self._blob

    @staticmethod
    def _member(path: str, entry: Entry) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
        info = tarfile.TarInfo(path)
        info.mode, info.mtime = entry.mode, 0
        info.uid, info.gid, info.uname, info.gname = entry.uid, entry.gid, "", ""
        if entry.kind == "dir":
            info.type = tarfile.DIRTYPE
            return info, None
        if entry.kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, entry.target
            return info, None
        if entry.kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, entry.target
            return info, None
        info.size = len(entry.data)
        return info, io.BytesIO(entry.data)


def passwd(extra: Iterable[tuple[str, int, int, str, str]] = ()) -> str:
    return "".join(
        f"{name}:x:{uid}:{gid}:{name}:{home}:{shell}\n"
        for name, uid, gid, home, shell in (*USERS, *extra)
    )


def group(extra: Iterable[tuple[str, int, str]] = ()) -> str:
    return "".join(f"{name}:x:{gid}:{members}\n" for name, gid, members in (*GROUPS, *extra))


def busybox_layer(inputs: Inputs) -> Layer:
    """A small Linux userland: busybox with its applets, glibc, users, pgrep and ipcs."""
    layer = Layer("busybox")
    for path in ("proc", "sys", "dev", "etc", "home", "mnt", "run", "var/log", "var/www"):
        layer.directory(path)
    layer.directory("root", 0o700)
    layer.directory("tmp", 0o1777)
    layer.directory("var/tmp", 0o1777)
    layer.symlink("var/run", "../run")
    busybox = inputs.path("bin/busybox")
    layer.copy("bin/busybox", busybox)
    applets = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            # Hard links, not symlinks: masking a path bind-mounts /dev/null over it, and
            # a symlink would carry the mask to busybox itself.
            layer.hardlink(applet, "bin/busybox")
    for image_path, real in sorted(inputs.closure([busybox]).items()):
        layer.copy(image_path, real)
    layer.symlink("lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    layer.file("etc/passwd", passwd())
    layer.file("etc/group", group())
    layer.file("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")
    layer.file("usr/bin/pgrep", PGREP_SCRIPT, 0o755)
    layer.file("usr/bin/ipcs", IPCS_SCRIPT, 0o755)
    return layer


def marker_layer(name: str) -> Layer:
    """One empty file named for the image, so images built alike still differ."""
    layer = Layer(f"marker {name}")
    layer.file(name, b"")
    return layer


def default_user_layer() -> Layer:
    """uid 1000 (default-user) and gid 50000, a group defined only in the image."""
    layer = Layer("default-user")
    layer.file(
        "etc/passwd", passwd([("default-user", 1000, 1000, "/home/default-user", "/bin/sh")])
    )
    layer.file(
        "etc/group",
        group([("default-user", 1000, ""), ("group-defined-in-image", 50000, "default-user")]),
    )
    layer.directory("home/default-user")
    return layer


def nginx_layer(inputs: Inputs) -> Layer:
    layer = Layer("nginx")
    nginx = inputs.path("usr/sbin/nginx")
    layer.copy("usr/sbin/nginx", nginx)
    for image_path, real in sorted(inputs.closure([nginx]).items()):
        layer.copy(image_path, real)
    layer.copy("etc/nginx/mime.types", inputs.path("etc/nginx/mime.types"), 0o644)
    layer.file("etc/nginx/nginx.conf", NGINX_CONF)
    layer.file("etc/nginx/conf.d/default.conf", NGINX_SITE % 80)
    layer.file("usr/share/nginx/html/index.html", "<h1>Welcome to nginx!</h1>\n")
    for path in ("var/lib/nginx", "var/log/nginx", "usr/lib/nginx/modules"):
        layer.directory(path)
    return layer


def nginx_port_layer(port: int) -> Layer:
    layer = Layer(f"nginx on {port}")
    layer.file("etc/nginx/conf.d/default.conf", NGINX_SITE % port)
    return layer


def httpd_layer() -> Layer:
    layer = Layer("httpd")
    layer.file("usr/local/apache2/htdocs/index.html", "<h1>It works!</h1>\n")
    layer.file("usr/local/bin/httpd-foreground", HTTPD_FOREGROUND, 0o755)
    return layer


def nonewprivs_layer(inputs: Inputs) -> Layer:
    layer = Layer("nonewprivs")
    layer.file("usr/local/bin/nnp", inputs.program("nonewprivs"), 0o4755)
    return layer


def pause_layer(inputs: Inputs) -> Layer:
    layer = Layer("pause")
    layer.file("pause", inputs.program("pause"), 0o755)
    return layer


# --------------------------------------------------------------------------- images


@dataclass
class Image:
    paths: list[str]  # repository:tag paths in the registry (host left out)
    layers: list[Layer]
    config: dict[str, Any]

    def documents(self) -> tuple[bytes, bytes]:
        """(manifest, config) as the bytes pushed."""
        diff_ids, descriptors = [], []
        for layer in self.layers:
            data, diff_id = layer.blob()
            diff_ids.append(diff_id)
            descriptors.append(
                {"mediaType": OCI_LAYER_GZIP, "digest": digest_of(data), "size": len(data)}
            )
        config = canonical_json(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": self.config,
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [
                    {"created_by": f"tests/conformance/images.py: {la.name}"} for la in self.layers
                ],
            }
        )
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": digest_of(config),
                    "size": len(config),
                },
                "layers": descriptors,
            }
        )
        return manifest, config


def image_set(inputs: Inputs) -> list[Image]:
    base = busybox_layer(inputs)
    nginx = nginx_layer(inputs)
    pause = pause_layer(inputs)
    shell = {"Env": [DEFAULT_PATH], "Cmd": ["sh"]}
    web = {"Env": [DEFAULT_PATH], "Cmd": ["nginx", "-g", "daemon off;"]}
    pause_config = {"Env": [DEFAULT_PATH], "Entrypoint": ["/pause"], "User": "65535:65535"}
    images = [
        Image([E2E + "busybox:1.29-2"], [base], shell),
        Image(
            [CRI_TOOLS + "test-image-latest:latest"],
            [base, marker_layer("test-image-latest")],
            shell,
        ),
        Image([CRI_TOOLS + "test-image-tag:test"], [base, marker_layer("test")], shell),
        Image([CRI_TOOLS + "test-image-tag:all"], [base, marker_layer("all")], shell),
        Image(
            [CRI_TOOLS + f"test-image-tags:{n}" for n in (1, 2, 3)],
            [base, marker_layer("test-image-tags")],
            shell,
        ),
        Image([E2E + "nginx:1.14-2"], [base, nginx], dict(web, ExposedPorts={"80/tcp": {}})),
        Image(
            [CRI_TOOLS + "hostnet-nginx-amd64:latest"],
            [base, nginx, nginx_port_layer(12003)],
            dict(web, ExposedPorts={"12003/tcp": {}}),
        ),
        Image(
            [E2E + "httpd:2.4.39-4"],
            [base, httpd_layer()],
            {"Env": [DEFAULT_PATH], "Cmd": ["httpd-foreground"], "ExposedPorts": {"80/tcp": {}}},
        ),
        Image(
            [E2E + "nonewprivs:1.3"],
            [base, nonewprivs_layer(inputs)],
            {"Env": [DEFAULT_PATH], "Entrypoint": ["/usr/local/bin/nnp"]},
        ),
        Image(
            [CRI_TOOLS + "test-image-predefined-group:latest"],
            [base, default_user_layer()],
            dict(shell, User="1000"),
        ),
        Image(["pause:3.9"], [pause], pause_config),
        # The sandbox image of the runtime under test must not be critest's pause:3.9:
        # critest counts that image's tags and removes it.
        Image([SANDBOX_IMAGE_PATH], [pause], dict(pause_config, Labels={"role": "sandbox"})),
    ]
    images += [
        Image(
            [CRI_TOOLS + f"test-image-{n}:latest"], [base, marker_layer(f"test-image-{n}")], shell
        )
        for n in (1, 2, 3)
    ]
    images += [
        Image([CRI_TOOLS + f"test-image-user-{suffix}:latest"], [base], dict(shell, User=user))
        for suffix, user in (
            ("uid", "1002"),
            ("username", "www-data"),
            ("uid-group", "1003:1004"),
            ("username-group", "www-data:1004"),
        )
    ]
    return images


# --------------------------------------------------------------------------- registry


class Registry:
    """Pushes blobs and manifests to a registry over plain HTTP (docker-registry v2 API)."""

    def __init__(self, host: str) -> None:
        self.base = f"http://{host}"

    def _call(
        self, method: str, url: str, body: bytes | None = None, content_type: str = ""
    ) -> tuple[int, dict[str, str]]:
        headers = {"Content-Type": content_type} if content_type else {}
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            if method == "HEAD" and exc.code == 404:
                return 404, {}
            raise SystemExit(f"{method} {url}: HTTP {exc.code} {detail}") from None

    def push_blob(self, repository: str, data: bytes) -> None:
        digest = digest_of(data)
        status, _ = self._call("HEAD", f"{self.base}/v2/{repository}/blobs/{digest}")
        if status == 200:
            return
        _, headers = self._call("POST", f"{self.base}/v2/{repository}/blobs/uploads/", b"")
        location = headers.get("Location", "")
        if location.startswith("/"):
            location = self.base + location
        separator = "&" if "?" in location else "?"
        self._call("PUT", f"{location}{separator}digest={digest}", data, "application/octet-stream")

    def push_manifest(self, repository: str, tag: str, manifest: bytes) -> str:
        _, headers = self._call(
            "PUT", f"{self.base}/v2/{repository}/manifests/{tag}", manifest, OCI_MANIFEST
        )
        return headers.get("Docker-Content-Digest", "")


def push_all(registry: str, images: list[Image]) -> None:
    client = Registry(registry)
    for image in images:
        manifest, config = image.documents()
        for path in image.paths:
            repository, tag = path.rsplit(":", 1)
            for layer in image.layers:
                client.push_blob(repository, layer.blob()[0])
            client.push_blob(repository, config)
            pushed = client.push_manifest(repository, tag, manifest)
            if pushed and pushed != digest_of(manifest):
                raise SystemExit(f"{path}: registry says {pushed}, built {digest_of(manifest)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and push the offline critest image set.")
    parser.add_argument("--registry", default="127.0.0.1:5000", help="host:port (plain HTTP)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="package/build cache")
    parser.add_argument("--list", action="store_true", help="print the digests; push nothing")
    args = parser.parse_args(argv)
    inputs = Inputs(args.cache)
    inputs.prepare()
    images = image_set(inputs)
    if not args.list:
        push_all(args.registry, images)
    for image in images:
        manifest, _ = image.documents()
        print(f"{digest_of(manifest)}  {' '.join(image.paths)}")
    versions = " ".join(f"{name}={version}" for name, version in sorted(inputs.versions.items()))
    print(f"{len(images)} images from {versions}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
