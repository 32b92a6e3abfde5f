#!/usr/bin/env bash
# The main job: set everything up, start `clearcri serve`, and run a demo pod in a VM
# with crictl. The daemon keeps serving until Ctrl-C; then the demo pod, the daemon and
# the demo registry are stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
clearcri guest build
scripts/build-cri-tools.sh
bin="$HOME/.cache/clearcri/bin"
socket=/run/clearcri/clearcri.sock
work=$(mktemp -d /tmp/clearcri-demo.XXXXXX)
pids=()
cleanup() {
    set +e
    if [ -n "${pod:-}" ]; then
        "${crictl[@]}" rmp -f "$pod" >/dev/null 2>&1
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    ip link del clearcri-demo 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT
trap "exit 143" TERM

# An offline registry with a busybox image (nothing is downloaded).
if ! (exec 3<>/dev/tcp/127.0.0.1/5000) 2>/dev/null; then
    # own sessions: Ctrl-C reaches the whole foreground process group, and the daemon
    # must outlive it long enough for the clean-up to remove the demo pod through it
    setsid docker-registry serve scripts/registry.yml >"$work/registry.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/5000) 2>/dev/null && break; sleep 0.1; done
fi
clearcri image push-busybox 127.0.0.1:5000/demo/busybox:1

# The demo's own CNI network: a bridge with a private subnet, no NAT, removed at exit.
mkdir -p "$work/net.d" "$work/ipam"
cat >"$work/net.d/10-demo.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "clearcri-demo", "plugins": [
  {"type": "bridge", "bridge": "clearcri-demo", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$work/ipam",
            "ranges": [[{"subnet": "10.231.7.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
cat >"$work/config.toml" <<TOML
[vm.network]
conf_dirs = ["$work/net.d"]
TOML
setsid clearcri serve --config "$work/config.toml" >"$work/clearcri.log" 2>&1 &
daemon=$!
pids=("$daemon" "${pids[@]}")
for _ in $(seq 600); do
    [ -S "$socket" ] && break
    if ! kill -0 "$daemon" 2>/dev/null; then
        echo "clearcri serve exited before serving:" >&2
        tail -n 20 "$work/clearcri.log" >&2
        exit 1
    fi
    sleep 0.1
done
[ -S "$socket" ] || { echo "clearcri serve did not serve within 60 s:" >&2; tail -n 20 "$work/clearcri.log" >&2; exit 1; }
printf 'runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 120\n' "$socket" "$socket" >"$work/crictl.yaml"
crictl=("$bin/crictl" --config "$work/crictl.yaml")

cat >"$work/pod.json" <<JSON
{"metadata": {"name": "demo", "namespace": "default", "uid": "demo-$(date +%s)"},
 "hostname": "demo", "log_directory": "$work/logs",
 "dns_config": {"servers": ["10.96.0.10"], "searches": ["default.svc.cluster.local"]}}
JSON
cat >"$work/container.json" <<JSON
{"metadata": {"name": "hello"}, "image": {"image": "127.0.0.1:5000/demo/busybox:1"},
 "command": ["sh", "-c", "echo hello from \$(hostname), kernel \$(uname -r); exec httpd -f -p 8080 -h /etc"],
 "log_path": "hello.log"}
JSON
"${crictl[@]}" pull 127.0.0.1:5000/demo/busybox:1
start=$(date +%s.%N)
pod=$("${crictl[@]}" runp "$work/pod.json")
ctr=$("${crictl[@]}" create "$pod" "$work/container.json" "$work/pod.json")
"${crictl[@]}" start "$ctr" >/dev/null
end=$(date +%s.%N)
echo "pod $pod and its container started in $(python3 -c "print(round($end - $start, 2))") s (a VM boot included)"
"${crictl[@]}" pods
"${crictl[@]}" ps
echo "--- exec in the pod VM:"
"${crictl[@]}" exec "$ctr" sh -c 'uname -a; cat /etc/resolv.conf; wget -qO- http://127.0.0.1:8080/hostname'
ip=$("${crictl[@]}" inspectp -o go-template --template '{{.status.network.ip}}' "$pod")
echo "--- the pod's IP is $ip; from the host, http://$ip:8080/hostname says:"
python3 -c "import urllib.request, sys; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())" "http://$ip:8080/hostname"
echo "--- container log:"
"${crictl[@]}" logs "$ctr"
echo
echo "clearcri is serving on unix://$socket with the demo pod running."
echo "Try: $bin/crictl --runtime-endpoint unix://$socket ps   (Ctrl-C here to stop)"
wait "$daemon"
