#!/usr/bin/env bash
# Install the Debian packages named as arguments that are not installed yet (one apt-get
# update and install for all of them; nothing when every one is there).
#   usage: scripts/apt-ensure.sh PACKAGE...
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
