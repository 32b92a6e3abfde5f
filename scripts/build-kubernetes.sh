#!/usr/bin/env bash
# Build the upstream Kubernetes programs the e2e harness runs (kubelet, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl) and the node conformance test binary
# (test/e2e_node, a ginkgo suite) from the Go module proxy into a cache directory; skip
# the work when the binaries of that version are already there.
#   usage: scripts/build-kubernetes.sh [BINDIR]   (default: ~/.cache/clearcri/kubernetes/VERSION)
#   KUBERNETES_VERSION (default v1.34.4: 1.35 and later refuse cgroup v1 by default)
#   KUBERNETES_TARGETS  (default: the five programs; e2e_node.test is the node
#                        conformance test binary, agnhost the test image's program,
#                        ginkgo the suite runner at the version the tree requires)
# The k8s.io/kubernetes module zip lacks staging/, so the build drops its replace
# directives and requires the k8s.io/* v0.X.Y releases published from the same tag.
set -euo pipefail
version=${KUBERNETES_VERSION:-v1.34.4}
bindir=$(realpath -m "${1:-$HOME/.cache/clearcri/kubernetes/$version}")
targets=${KUBERNETES_TARGETS:-"kubelet kube-apiserver kube-controller-manager kube-scheduler kubectl"}
mkdir -p "$bindir"
missing=()
for target in $targets; do
    [ -x "$bindir/$target" ] || missing+=("$target")
done
[ ${#missing[@]} -eq 0 ] && exit 0

export GOTOOLCHAIN=local GOFLAGS="-trimpath -mod=mod" CGO_ENABLED=0 GOSUMDB=${GOSUMDB:-off}
src=$(go mod download -json "k8s.io/kubernetes@$version" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
# One work tree per version, kept under the cache so a second build reuses go's build cache
# paths; it is rebuilt from the module each time.
work=$(realpath -m "$bindir/../.src-$version")
rm -rf "$work"
mkdir -p "$work"
cp -r "$src"/. "$work"/
chmod -R u+w "$work"
rm -rf "$work/vendor" "$work/go.work" "$work/go.work.sum"
staging=${version/#v1./v0.}
python3 - "$work/go.mod" "$staging" <<'EOF'
import re
import sys

path, staging = sys.argv[1], sys.argv[2]
text = open(path).read()
# Drop the replace block that points k8s.io/* at ./staging, and pin those modules to the
# release published from the same tag.
text = re.sub(r"\nreplace \((?:[^)]*?=> \./staging[^\n]*\n)+\)\n", "\n", text)
text = re.sub(r"^(\tk8s\.io/[\w.-]+) v0\.0\.0$", rf"\1 {staging}", text, flags=re.M)
if "=> ./staging" in text:
    sys.exit("go.mod still replaces a module with ./staging")
open(path, "w").write(text)
EOF
cd "$work"
echo "building Kubernetes $version ($targets) into $bindir" >&2

commit=0000000000000000000000000000000000000000
pkgs="k8s.io/component-base/version k8s.io/client-go/pkg/version"
ldflags="-s -w"
for pkg in $pkgs; do
    ldflags="$ldflags -X $pkg.gitVersion=$version -X $pkg.gitCommit=$commit"
    ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    major=${version#v}
    minor=${major#*.}
    ldflags="$ldflags -X $pkg.gitMajor=${major%%.*} -X $pkg.gitMinor=${minor%%.*}"
done
for target in "${missing[@]}"; do
    case "$target" in
    e2e_node.test) go test -c -ldflags "$ldflags" -o "$bindir/$target.tmp" ./test/e2e_node ;;
    ginkgo) go build -o "$bindir/$target.tmp" github.com/onsi/ginkgo/v2/ginkgo ;;
    agnhost) go build -ldflags "$ldflags" -o "$bindir/$target.tmp" ./test/images/agnhost ;;
    *) go build -ldflags "$ldflags" -o "$bindir/$target.tmp" "./cmd/$target" ;;
    esac
    mv "$bindir/$target.tmp" "$bindir/$target"
    echo "built $bindir/$target" >&2
done
rm -rf "$work"
