#!/usr/bin/env bash
# Install what clearcri needs on a Debian 12 host: QEMU, crun, erofs-utils, busybox,
# CNI plugins, the test registry, and the Python package with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt_packages=(
    qemu-system-x86 qemu-system-data qemu-utils
    crun erofs-utils busybox-static cpio zstd xz-utils
    containernetworking-plugins iproute2 util-linux procps
    docker-registry apache2-utils skopeo
    etcd-server
)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
