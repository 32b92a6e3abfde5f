"""The images upstream node conformance (test/e2e_node) pulls, built offline.

The NodeConformance specs of Kubernetes v1.34 pull these from registry.k8s.io; this
module builds stand-ins with the behaviour the specs use and pushes them to a plain-HTTP
registry under the *path* of their upstream name (``registry.k8s.io/e2e-test-images/
agnhost:2.56`` becomes ``<registry>/e2e-test-images/agnhost:2.56``); the node's runtime
mirrors registry.k8s.io to that registry.

- agnhost: the real program, built from ``test/images/agnhost`` of the same Kubernetes
  tree (``KUBERNETES_TARGETS=agnhost scripts/build-kubernetes.sh``), on the busybox
  userland of the critest image set, with what its upstream image adds that the specs
  use: curl and nc (node-to-pod checks run them in a host-network agnhost pod), the
  porter TLS pair at ``/localhost.crt``, ``/agnhost-2``, ``/uploads``, and the user and
  group defined in the image (uid 1000, gid 50000);
- busybox, nginx (two tags), httpd (two tags), nonewprivs, nonroot (uid 1234) and pause,
  from the critest image set's layers.

Every image but pause has a second layer for what upstream's busybox 1.37 does that
Debian's 1.35 does not (``shell_layer``): a ``sh`` that hands on environment variables
whose names are no identifiers, and ``nmeter``.

Not built (the specs that need them are listed as not runnable offline in
docs/conformance.md): perl, etcd, the node-perf workloads, kitten/nautilus, cadvisor,
and the busybox image pinned by a digest of the upstream registry.

    python3 -m tests.e2e.node_images --registry 127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conformance.images import (
    DEFAULT_CACHE,
    DEFAULT_PATH,
    E2E,
    PACKAGES,
    Image,
    Inputs,
    Layer,
    busybox_layer,
    digest_of,
    group,
    httpd_layer,
    marker_layer,
    nginx_layer,
    nonewprivs_layer,
    passwd,
    pause_layer,
    push_all,
)
from tests.e2e.cluster import DEFAULT_BINDIR, KUBERNETES_VERSION

# curl and nc with every library package their ELF headers may ask for (Debian 12's
# dependency closure of the two, libraries only)
TOOL_PACKAGES = (
    "bash",
    "libtinfo6",
    "curl",
    "netcat-openbsd",
    "libbrotli1",
    "libbsd0",
    "libcom-err2",
    "libcurl4",
    "libffi8",
    "libgcc-s1",
    "libgmp10",
    "libgnutls30",
    "libgssapi-krb5-2",
    "libhogweed6",
    "libidn2-0",
    "libk5crypto3",
    "libkeyutils1",
    "libkrb5-3",
    "libkrb5support0",
    "libldap-2.5-0",
    "libmd0",
    "libnettle8",
    "libnghttp2-14",
    "libp11-kit0",
    "libpsl5",
    "librtmp1",
    "libsasl2-2",
    "libssh2-1",
    "libtasn1-6",
    "libunistring2",
    "libzstd1",
)
AGNHOST_PORTS = (80, 8080, 8081, 9376, 5000)
PAUSE_IMAGE = "pause:3.10.1"  # registry.k8s.io/pause:3.10.1, kubelet 1.34's default
CONTAINERD_PAUSE_IMAGE = "pause:3.10"  # the baseline containerd's sandbox image


def kubernetes_source(version: str = KUBERNETES_VERSION) -> Path:
    """The k8s.io/kubernetes module tree (from the Go module cache or proxy)."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"},
    ).stdout
    return Path(json.loads(out)["Dir"])


def shell_layer(inputs: Inputs) -> Layer:
    """What upstream's busybox 1.37 does and Debian's 1.35 does not: a ``sh`` that passes
    environment variables whose names are no shell identifiers (``data-1``, from a
    ConfigMap or Secret by envFrom) on to its children — Debian's bash — and nmeter
    (timestamps with milliseconds, tests/conformance/src/nmeter.c)."""
    layer = Layer("sh and nmeter")
    bash = inputs.path("bin/bash")
    layer.copy("bin/bash", bash)
    layer.symlink("bin/sh", "bash")
    for image_path, real in sorted(inputs.closure([bash]).items()):
        layer.copy(image_path, real)
    layer.file("usr/bin/nmeter", inputs.program("nmeter"), 0o755)
    return layer


def tools_layer(inputs: Inputs) -> Layer:
    layer = Layer("curl and nc")
    binaries = [inputs.path("usr/bin/curl"), inputs.path("bin/nc.openbsd")]
    layer.copy("usr/bin/curl", binaries[0])
    layer.copy("usr/bin/nc", binaries[1])
    for image_path, real in sorted(inputs.closure(binaries).items()):
        layer.copy(image_path, real)
    return layer


def agnhost_layer(agnhost: Path, source: Path) -> Layer:
    layer = Layer("agnhost")
    layer.copy("agnhost", agnhost)
    layer.symlink("agnhost-2", "agnhost")
    layer.directory("uploads")
    porter = source / "test" / "images" / "agnhost" / "porter"
    layer.copy("localhost.crt", porter / "localhost.crt", 0o644)
    layer.copy("localhost.key", porter / "localhost.key", 0o644)
    layer.file(
        "etc/passwd",
        passwd([("user-defined-in-image", 1000, 1000, "/home/user-defined-in-image", "/bin/sh")]),
    )
    layer.file(
        "etc/group",
        group(
            [
                ("user-defined-in-image", 1000, ""),
                ("group-defined-in-image", 50000, "user-defined-in-image"),
            ]
        ),
    )
    layer.directory("home/user-defined-in-image")
    return layer


def image_set(inputs: Inputs, agnhost: Path, source: Path) -> list[Image]:
    busybox = busybox_layer(inputs)
    shell = shell_layer(inputs)
    nginx = nginx_layer(inputs)
    pause = pause_layer(inputs)
    sh: dict[str, Any] = {"Env": [DEFAULT_PATH], "Cmd": ["sh"]}
    web = {"Env": [DEFAULT_PATH], "Cmd": ["nginx", "-g", "daemon off;"]}
    httpd = {"Env": [DEFAULT_PATH], "Cmd": ["httpd-foreground"], "ExposedPorts": {"80/tcp": {}}}
    pause_config = {"Env": [DEFAULT_PATH], "Entrypoint": ["/pause"], "User": "65535:65535"}
    return [
        Image(
            [E2E + "agnhost:2.56"],
            [busybox, shell, tools_layer(inputs), agnhost_layer(agnhost, source)],
            {
                "Env": [DEFAULT_PATH],
                "Entrypoint": ["/agnhost"],
                "Cmd": ["pause"],
                "ExposedPorts": {f"{port}/tcp": {} for port in AGNHOST_PORTS},
            },
        ),
        Image([E2E + "busybox:1.37.0-1"], [busybox, shell], sh),
        Image(
            [E2E + "nginx:1.14-4"], [busybox, shell, nginx], dict(web, ExposedPorts={"80/tcp": {}})
        ),
        Image(
            [E2E + "nginx:1.15-4"],
            [busybox, shell, nginx, marker_layer("nginx-new")],
            dict(web, ExposedPorts={"80/tcp": {}}),
        ),
        Image([E2E + "httpd:2.4.38-4"], [busybox, shell, httpd_layer()], httpd),
        Image(
            [E2E + "httpd:2.4.39-4"],
            [busybox, shell, httpd_layer(), marker_layer("httpd-new")],
            httpd,
        ),
        Image(
            [E2E + "nonewprivs:1.3"],
            [busybox, shell, nonewprivs_layer(inputs)],
            {"Env": [DEFAULT_PATH], "Entrypoint": ["/usr/local/bin/nnp"]},
        ),
        Image([E2E + "nonroot:1.4"], [busybox, shell], dict(sh, User="1234")),
        Image([PAUSE_IMAGE, CONTAINERD_PAUSE_IMAGE], [pause], pause_config),
    ]


def build_and_push(
    registry: str, cache: Path = DEFAULT_CACHE, bindir: Path = DEFAULT_BINDIR
) -> list[Image]:
    agnhost = bindir / "agnhost"
    if not agnhost.exists():
        raise SystemExit(
            f"{agnhost} is missing: KUBERNETES_TARGETS=agnhost scripts/build-kubernetes.sh"
        )
    inputs = Inputs(cache, PACKAGES + TOOL_PACKAGES)
    inputs.prepare()
    images = image_set(inputs, agnhost, kubernetes_source())
    if registry:
        push_all(registry, images)
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and push the node conformance images.")
    parser.add_argument("--registry", default="127.0.0.1:5000", help="host:port (plain HTTP)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="package/build cache")
    parser.add_argument("--list", action="store_true", help="print the digests; push nothing")
    args = parser.parse_args(argv)
    images = build_and_push("" if args.list else args.registry, args.cache)
    for image in images:
        manifest, _ = image.documents()
        print(f"{digest_of(manifest)}  {' '.join(image.paths)}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
