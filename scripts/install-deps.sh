#!/usr/bin/env bash
# Install what clearcri needs on a Debian 12 host: QEMU, crun, erofs-utils, busybox,
# CNI plugins, the test registry, the guest kernel's and the VMM's build tools, what
# builds the node image without a Docker engine (buildah, mmdebstrap), containerd and
# runc (the node the Helm suite and the conformance baselines start with), and the
# Python package with its dev tools and the benchmarks' plotting library.
set -euo pipefail
cd "$(dirname "$0")/.."
apt_packages=(
    qemu-system-x86 qemu-system-data qemu-utils
    crun erofs-utils busybox-static cpio zstd xz-utils
    containernetworking-plugins iproute2 util-linux procps
    docker-registry apache2-utils skopeo
    buildah mmdebstrap
    containerd runc
    etcd-server
    gcc libc6-dev binutils make flex bison bc libelf-dev
    meson ninja-build pkg-config dpkg-dev patch libglib2.0-dev libpcre2-dev libpixman-1-dev
    zlib1g-dev libseccomp-dev libcap-ng-dev libattr1-dev libfdt-dev
)
scripts/apt-ensure.sh "${apt_packages[@]}"
python3 -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
