#!/usr/bin/env bash
# Run upstream node conformance (k8s.io/kubernetes test/e2e_node, [NodeConformance])
# offline against a node with clearcri (default) or, with --runtime containerd, Debian's
# containerd + runc as its runtime; see docs/conformance.md. Arguments go to
# tests/e2e/node_conformance.py (--expected-only, --focus, --skip, --procs, --check, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
# image set: apt-get download + dpkg-deb, gcc -static, readelf; the registry; the node:
# etcd, bridges, CNI plugins
packages=(gcc libc6-dev binutils dpkg docker-registry etcd-server iproute2
    containernetworking-plugins)
for arg in "$@"; do
    if [ "$arg" = containerd ] || [ "$arg" = --runtime=containerd ]; then
        packages+=(containerd runc iptables)
    fi
done
scripts/apt-ensure.sh "${packages[@]}"
exec python3 -m tests.e2e.node_conformance "$@"
