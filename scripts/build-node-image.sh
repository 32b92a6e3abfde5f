#!/usr/bin/env bash
# Build the Helm chart's node image (packaging/Containerfile) with buildah, without a
# Docker engine, and push it to a registry (deploy/node_image.py, docs/install.md):
#   scripts/build-node-image.sh --registry HOST:PORT [--tag TAG] [--local-version LABEL]
#                               [--guest-dir DIR | --build-guest] [--verify] ...
# The guest assets come from GUEST_DIR (default /var/lib/clearcri/guest; `make guest`).
# The last line printed is the image reference.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/apt-ensure.sh buildah mmdebstrap skopeo >&2
exec python3 -m deploy.node_image build "$@"
