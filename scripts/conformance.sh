#!/usr/bin/env bash
# Run critest offline against clearcri (default) or, with --runtime containerd, against
# Debian's containerd + runc; see docs/conformance.md. Arguments go to
# tests/conformance/run.py (--expected-only, --focus, --skip, --parallel, --check, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
# image set: apt-get download + dpkg-deb, gcc -static, readelf; the registry; ipcmk
packages=(gcc libc6-dev binutils dpkg docker-registry util-linux iproute2)
for arg in "$@"; do
    if [ "$arg" = containerd ] || [ "$arg" = --runtime=containerd ]; then
        packages+=(containerd runc containernetworking-plugins iptables)
    fi
done
scripts/apt-ensure.sh "${packages[@]}"
exec python3 -m tests.conformance.run "$@"
