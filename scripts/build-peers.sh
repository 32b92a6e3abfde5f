#!/usr/bin/env bash
# Build the runtimes tests/bench/bench_peers.py measures clearcri against, from the Go
# module proxy, into a cache directory; skip what is already built for the pinned
# versions (a stamp file per group of binaries).
#   usage: scripts/build-peers.sh [BINDIR]    (default: ~/.cache/clearcri/peers/bin)
#
# - gVisor (GVISOR_VERSION, a pseudo-version of gVisor's `go` branch, which is what
#   `gvisor.dev/gvisor@latest` resolves to): runsc, static (CGO_ENABLED=0: runsc
#   re-executes itself inside an empty chroot, where a dynamic binary finds no loader),
#   and containerd-shim-runsc-v1. The shim lowers its own oom_score_adj at start and fails
#   when it may not (no CAP_SYS_RESOURCE, as in an unprivileged container); this script
#   edits that one call site so that a permission error leaves the inherited score, and
#   says nothing (containerd parses what the shim prints at start as its reply).
# - containerd (CONTAINERD_VERSION, the version the gVisor shim is built against):
#   containerd, containerd-shim-runc-v2 and ctr. `go install` refuses the module (its
#   go.mod has exclude directives), so a copy of it is built as the main module.
# - runc is Debian's (installed when missing).
set -euo pipefail
gvisor_version=${GVISOR_VERSION:-v0.0.0-20260905035102-160fafc42237}
containerd_version=${CONTAINERD_VERSION:-v2.1.5}
# Bump when the gVisor shim edit below changes, so that a cached shim is rebuilt.
shim_edit=oom-score-permission-1
bindir=$(realpath -m "${1:-$HOME/.cache/clearcri/peers/bin}")
cd "$(dirname "$0")/.."
scripts/apt-ensure.sh runc
mkdir -p "$bindir"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOSUMDB=${GOSUMDB:-off} GOMAXPROCS=2

# built STAMP KEY BINARY...: true when every binary exists and STAMP holds KEY.
built() {
    local stamp=$bindir/$1 key=$2 binary
    shift 2
    for binary in "$@"; do
        [ -x "$bindir/$binary" ] || return 1
    done
    [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]
}

module_dir() {
    go mod download -json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gvisor_key="gvisor $gvisor_version $shim_edit"
if ! built .gvisor.stamp "$gvisor_key" runsc containerd-shim-runsc-v1; then
    echo "building gVisor $gvisor_version (runsc, containerd-shim-runsc-v1) into $bindir" >&2
    rm -f "$bindir/.gvisor.stamp"
    src=$(module_dir "gvisor.dev/gvisor@$gvisor_version")
    mkdir -p "$work/gvisor"
    cp -r "$src"/. "$work/gvisor"/
    chmod -R u+w "$work/gvisor"
    # The one call site: keep the inherited score on EPERM/EACCES (os.IsPermission), fail
    # on anything else; "os" is imported by that file already.
    python3 - "$work/gvisor/pkg/shim/v1/manager.go" <<'EOF'
import sys
path = sys.argv[1]
old = "if err := sys.SetOOMScore(cmd.Process.Pid, oomScoreMax); err != nil {"
new = (
    "if err := sys.SetOOMScore(cmd.Process.Pid, oomScoreMax); "
    "err != nil && !os.IsPermission(err) {"
)
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"build-peers: expected exactly one line {old!r} in {path}; the gVisor "
             "shim changed, update the edit in scripts/build-peers.sh")
if '\t"os"\n' not in text:
    sys.exit(f"build-peers: {path} no longer imports os; update scripts/build-peers.sh")
open(path, "w").write(text.replace(old, new))
EOF
    ldflags="-X gvisor.dev/gvisor/runsc/version.version=$gvisor_version"
    (
        cd "$work/gvisor"
        go build -p 2 -trimpath -mod=mod -ldflags "$ldflags" -o "$bindir/runsc" ./runsc
        go build -p 2 -trimpath -mod=mod -o "$bindir/containerd-shim-runsc-v1" ./shim
    )
    echo "$gvisor_key" >"$bindir/.gvisor.stamp"
fi

containerd_key="containerd $containerd_version"
if ! built .containerd.stamp "$containerd_key" containerd containerd-shim-runc-v2 ctr; then
    echo "building containerd $containerd_version into $bindir" >&2
    rm -f "$bindir/.containerd.stamp"
    src=$(module_dir "github.com/containerd/containerd/v2@$containerd_version")
    mkdir -p "$work/containerd"
    cp -r "$src"/. "$work/containerd"/
    chmod -R u+w "$work/containerd"
    rm -rf "$work/containerd/vendor"
    pkg=github.com/containerd/containerd/v2
    ldflags="-X $pkg/version.Version=$containerd_version -X $pkg/version.Package=$pkg"
    tags="no_btrfs no_devmapper no_zfs"
    (
        cd "$work/containerd"
        for cmd in containerd containerd-shim-runc-v2 ctr; do
            go build -p 2 -trimpath -mod=mod -tags "$tags" -ldflags "$ldflags" \
                -o "$bindir/$cmd" "./cmd/$cmd"
        done
    )
    echo "$containerd_key" >"$bindir/.containerd.stamp"
fi
