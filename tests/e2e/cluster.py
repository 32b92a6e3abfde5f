"""A single-node Kubernetes cluster on this machine, with clearcri as the node's runtime.

Every part is the real upstream program: etcd (Debian's etcd-server), kube-apiserver,
kube-controller-manager, kube-scheduler and kubelet built from the Go module proxy
(scripts/build-kubernetes.sh), driven with kubectl. The control plane listens on
127.0.0.1; kubelet refuses a loopback node IP, so the node's address lives on a bridge
the harness creates (and removes). The node's runtime is a ``clearcri serve`` with its
own socket, state, run dir, CNI network (a second bridge) and VM templates.

Every process is started here and stopped by its PID; ``Cluster.stop`` deletes the
workloads first so that the runtime removes its pod VMs through kubelet, as on a node.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.cgroups import hierarchies, make_cgroup
from tests.conformance.run import processes_mentioning, unmount_under
from tests.e2e.node_host import NodeHost, wait_child
from tests.e2e.pki import ClusterPki, KeyPair

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = os.environ.get("KUBERNETES_VERSION", "v1.34.4")
DEFAULT_BINDIR = Path.home() / ".cache" / "clearcri" / "kubernetes" / KUBERNETES_VERSION
SERVICE_CIDR = "10.0.0.0/24"
CLUSTER_DNS = "10.0.0.10"
CRICTL = Path.home() / ".cache" / "clearcri" / "bin" / "crictl"  # scripts/build-cri-tools.sh
# kubelet keeps its device plugin socket here whatever its --root-dir (and makes pods/)
KUBELET_FIXED_DIR = Path("/var/lib/kubelet")


class ClusterError(Exception):
    """The cluster could not be started or did not reach the wanted state."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise ClusterError(f"{what} not reached within {timeout:.0f} s")


class Process:
    """One program of the cluster, its output in ``<logs>/<name>.log``. In a node of its
    own (``node``), it runs below ``nsenter``, and ``pid`` is the program's own."""

    def __init__(
        self, name: str, argv: Sequence[str], logs: Path, node: NodeHost | None = None
    ) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                node.enter(argv) if node is not None else list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.pid = wait_child(self.popen.pid) if node is not None else self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-3000:]
            raise ClusterError(f"{self.name} exited ({self.popen.returncode}):\n{tail}")

    def stop(self, grace: float = 30.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(10)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@dataclass
class NodeBridge:
    """A bridge holding one address: the node IP kubelet registers (no dummy netdev here)."""

    name: str
    address: str  # e.g. 10.231.250.1/24

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    def create(self) -> None:
        self.remove()
        for args in (
            ("link", "add", self.name, "type", "bridge"),
            ("addr", "add", self.address, "dev", self.name),
            ("link", "set", self.name, "up"),
        ):
            result = _ip(*args)
            if result.returncode != 0:
                raise ClusterError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def remove(self) -> None:
        _ip("link", "del", self.name)


@dataclass
class ClusterConfig:
    work: Path
    bindir: Path = DEFAULT_BINDIR
    guest_dir: Path = Path(os.environ.get("CLEARCRI_GUEST_DIR", "/var/lib/clearcri/guest"))
    node_name: str = "clearcri-e2e"
    node_address: str = "10.231.250.1/24"
    pod_subnet: str = "10.231.251.0/24"
    bridge_prefix: str = "cce2e"
    # extra lines for the runtime's config.toml (registry mirrors, for instance)
    runtime_config: list[str] = field(default_factory=list)
    # "clearcri" (the runtime under test) or "containerd" (Debian's, with runc: the
    # baseline of benchmarks)
    runtime: str = "clearcri"
    # host:port of the plain-HTTP test registry, and registries it stands in for
    registry: str = ""
    mirrored: tuple[str, ...] = ()
    # The node in PID and mount namespaces of its own (tests/e2e/node_host.py), so that
    # what is installed on "the host" (PID 1's mount namespace) is the node's: for a node
    # runtime installed by a DaemonSet, and for several nodes on one machine. Its CNI
    # config is then /etc/cni/net.d of the node, as on a real node.
    node_host: bool = False


class Cluster:
    """Start with ``start()``; ``kubectl(...)`` drives it; ``stop()`` ends every process."""

    # the control plane's, shared by the nodes that join it
    apiserver_port: int
    etcd_port: int
    etcd_peer_port: int
    kubeconfig: Path
    admin_token: str
    pki: ClusterPki

    def __init__(self, config: ClusterConfig, control_plane: Cluster | None = None) -> None:
        """With ``control_plane``, this is one more node joining that cluster: only the
        node's runtime and kubelet are started."""
        self.config = config
        self.work = config.work
        self.logs = self.work / "logs"
        self.processes: list[Process] = []
        self.control_plane = control_plane
        self.node_bridge = NodeBridge(f"{config.bridge_prefix}-node", config.node_address)
        self.pod_bridge = f"{config.bridge_prefix}-pods"
        self.node_ip = self.node_bridge.ip
        self.kubelet_port = free_port()
        self.node_root = self.work / "node-root"
        self.node: NodeHost | None = None
        if config.node_host:
            self.node = NodeHost(self.node_root, self.logs / "node-init.log")
        # the runtime's socket as seen from here, and the endpoint kubelet is given (they
        # differ for a runtime installed in a node of its own: see switch_kubelet_runtime)
        self.own_runtime_socket = self.work / "runtime" / "run" / "runtime.sock"
        self.runtime_socket = self.own_runtime_socket
        self.kubelet_endpoint = f"unix://{self.runtime_socket}"
        self.runtime_metrics_port = free_port()
        if control_plane is not None:
            self.apiserver_port = control_plane.apiserver_port
            self.etcd_port = control_plane.etcd_port
            self.etcd_peer_port = control_plane.etcd_peer_port
            self.kubeconfig = control_plane.kubeconfig
            self.admin_token = control_plane.admin_token
        else:
            self.apiserver_port = free_port()
            self.etcd_port = free_port()
            self.etcd_peer_port = free_port()
            self.kubeconfig = self.work / "admin.kubeconfig"
            # a bearer token of the system:masters group, for clients that take no
            # kubeconfig (upstream node conformance)
            self.admin_token = secrets.token_hex(16)
        self.apiserver_url = f"https://127.0.0.1:{self.apiserver_port}"
        self.kubelet_dir = self.work / "kubelet"
        self.pod_logs_dir = self.work / "pod-logs"
        self.cgroup_root = f"/{config.bridge_prefix}"
        self.runtime: Process | None = None
        self.kubelet: Process | None = None

    # ------------------------------------------------------------------ binaries

    def binary(self, name: str) -> str:
        path = self.config.bindir / name
        if not path.exists():
            raise ClusterError(f"{path} is missing: run scripts/build-kubernetes.sh")
        return str(path)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        # (a node of its own has a /var/lib/kubelet of its own)
        self.made_kubelet_fixed_dir = self.node is None and not KUBELET_FIXED_DIR.exists()
        try:
            self.node_bridge.create()
            if self.control_plane is None:
                self._pki()
                self._start_etcd()
                self._start_apiserver()
                self._start_controllers()
            else:
                self.pki = self.control_plane.pki
            self._node_pki()
            if self.node is not None:
                self.node.start()
            self._start_runtime()
            self._start_kubelet()
            self.wait_node_ready()
            wait_for(
                "the default service account",
                lambda: (
                    self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0
                ),
                60,
            )
        except BaseException:
            self.stop()
            raise

    def _pki(self) -> None:
        pki = ClusterPki(self.work / "pki")
        self.pki = pki
        self.apiserver_cert = pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            ips=("127.0.0.1", self.node_ip, "10.0.0.1"),
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        )
        self.apiserver_kubelet_client = pki.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            organization="system:masters",
            client=True,
        )
        admin = pki.issue("admin", "admin", organization="system:masters", client=True)
        self._write_kubeconfig(self.kubeconfig, admin)
        for component in ("kube-controller-manager", "kube-scheduler"):
            pair = pki.issue(component, f"system:{component}", client=True)
            self._write_kubeconfig(self.work / f"{component}.kubeconfig", pair)

    def _node_pki(self) -> None:
        """The kubelet's serving certificate and its client identity, from the cluster's
        CA (named by node, since nodes that join share the control plane's directory)."""
        name = self.config.node_name
        self.kubelet_serving = self.pki.issue(
            f"kubelet-serving-{name}", name, server=True, ips=(self.node_ip,), dns=(name,)
        )
        node = self.pki.issue(
            f"kubelet-{name}", f"system:node:{name}", organization="system:nodes", client=True
        )
        self.kubelet_kubeconfig = self.work / "kubelet.kubeconfig"
        self._write_kubeconfig(self.kubelet_kubeconfig, node)

    def _write_kubeconfig(self, path: Path, pair: KeyPair) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "e2e",
                    "cluster": {
                        "server": self.apiserver_url,
                        "certificate-authority": str(self.pki.ca.cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "user",
                    "user": {
                        "client-certificate": str(pair.cert),
                        "client-key": str(pair.key),
                    },
                }
            ],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "user"}}],
            "current-context": "e2e",
        }
        path.write_text(json.dumps(config, indent=1))

    def _spawn(self, name: str, argv: Sequence[str], in_node: bool = False) -> Process:
        process = Process(name, argv, self.logs, self.node if in_node else None)
        self.processes.append(process)
        return process

    def _start_etcd(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise ClusterError("etcd is not installed (apt-get install etcd-server)")
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        proc = self._spawn(
            "etcd",
            [
                etcd,
                "--name=e2e",
                f"--data-dir={self.work / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=e2e={peer}",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
                "--unsafe-no-fsync",
            ],
        )

        def healthy() -> bool:
            proc.check()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.etcd_port), timeout=1),
            ):
                return True
            return False

        wait_for("etcd", healthy, 30, 0.2)

    def _start_apiserver(self) -> None:
        pki = self.pki
        tokens = self.work / "tokens.csv"
        tokens.write_text(f'{self.admin_token},e2e-admin,e2e-admin,"system:masters"\n')
        tokens.chmod(0o600)
        proc = self._spawn(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                f"--advertise-address={self.node_ip}",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={self.apiserver_cert.cert}",
                f"--tls-private-key-file={self.apiserver_cert.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--token-auth-file={tokens}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                f"--kubelet-client-certificate={self.apiserver_kubelet_client.cert}",
                f"--kubelet-client-key={self.apiserver_kubelet_client.key}",
                f"--kubelet-certificate-authority={pki.ca.cert}",
                "--kubelet-preferred-address-types=InternalIP",
                "--enable-admission-plugins=NodeRestriction",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
        )

        def ready() -> bool:
            proc.check()
            result = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
            return result.returncode == 0 and result.stdout.strip() == "ok"

        wait_for("kube-apiserver /readyz", ready, 120, 1.0)

    def _start_controllers(self) -> None:
        pki = self.pki
        self._spawn(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                f"--kubeconfig={self.work / 'kube-controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.work / 'kube-controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.work / 'kube-controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                self.binary("kube-scheduler"),
                f"--kubeconfig={self.work / 'kube-scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={self.work / 'kube-scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={self.work / 'kube-scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
            ],
        )

    def _cni_config(self, root: Path) -> Path:
        """The pod network both runtimes use: a bridge of the suite's own."""
        net_d = root / "net.d"
        net_d.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "clearcri-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.pod_bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(root / "ipam"),
                        "ranges": [[{"subnet": self.config.pod_subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (net_d / "10-e2e.conflist").write_text(json.dumps(conflist, indent=1))
        return net_d

    def _runtime_config(self) -> Path:
        root = self.work / "runtime"
        net_d = self._cni_config(root)
        mirrors = [
            line
            for host in self.config.mirrored
            for line in (
                f'[registry.mirrors."{host}"]',
                f'endpoints = ["http://{self.config.registry}"]',
            )
        ]
        lines = [
            "[daemon]",
            f'socket = "{self.own_runtime_socket}"',
            f'state_dir = "{root / "state"}"',
            f'run_dir = "{root / "run"}"',
            f'log_dir = "{root / "log"}"',
            "[vm]",
            f'guest_dir = "{self.config.guest_dir}"',
            f'template_dir = "/dev/shm/clearcri-e2e-templates-{os.getpid()}"',
            "[vm.network]",
            f'conf_dirs = ["{net_d}"]',
            f'netns_dir = "{root / "netns"}"',
            "[streaming]",
            'address = "127.0.0.1"',
            "[metrics]",
            'address = "127.0.0.1"',
            f"port = {self.runtime_metrics_port}",
            *mirrors,
            *self.config.runtime_config,
        ]
        path = root / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _containerd_config(self) -> Path:
        root = self.work / "runtime"
        net_d = self._cni_config(root)
        if self.node is not None:
            # the node's own CNI config, where a runtime installed later finds it too
            node_net_d = self.node_root / "etc/cni/net.d"
            node_net_d.mkdir(parents=True, exist_ok=True)
            shutil.copy(net_d / "10-e2e.conflist", node_net_d / "10-e2e.conflist")
            net_d = Path("/etc/cni/net.d")
        certs = root / "certs.d"
        for host in (self.config.registry, *self.config.mirrored):
            (certs / host).mkdir(parents=True, exist_ok=True)
            (certs / host / "hosts.toml").write_text(
                f'server = "http://{self.config.registry}"\n\n'
                f'[host."http://{self.config.registry}"]\n'
                '  capabilities = ["pull", "resolve"]\n'
            )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        text = "\n".join(
            [
                "version = 2",
                f'root = "{root / "containerd-root"}"',
                f'state = "{root / "containerd-state"}"',
                f'[grpc]\n  address = "{self.own_runtime_socket}"',
                f'[ttrpc]\n  address = "{self.own_runtime_socket}.ttrpc"',
                f"[{cri}]",
                '  sandbox_image = "registry.k8s.io/pause:3.10"',
                # these hosts lack CAP_SYS_RESOURCE
                "  restrict_oom_score_adj = true",
                f"[{cri}.containerd]",
                '  default_runtime_name = "runc"',
                f"[{cri}.containerd.runtimes.runc]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"[{cri}.cni]",
                '  bin_dir = "/usr/lib/cni"',
                f'  conf_dir = "{net_d}"',
                f"[{cri}.registry]",
                f'  config_path = "{certs}"',
            ]
        )
        path = root / "containerd.toml"
        path.write_text(text + "\n")
        return path

    def start_own_runtime(self) -> None:
        """Start the harness's runtime again (after ``stop_old_runtime``), and give
        kubelet's endpoint back to it in what this object says."""
        self.runtime_socket = self.own_runtime_socket
        self.own_runtime_socket.unlink(missing_ok=True)
        self._start_runtime()

    def _start_runtime(self) -> None:
        self.runtime_socket.parent.mkdir(parents=True, exist_ok=True)
        if self.config.runtime == "containerd":
            self.runtime = self._spawn(
                "containerd",
                ["containerd", "--config", str(self._containerd_config())],
                in_node=True,
            )
            containerd = self.runtime

            def answering() -> bool:
                containerd.check()
                return self.runtime_socket.exists()

            wait_for("containerd serving", answering, 60, 0.2)
            return
        config = self._runtime_config()
        self.runtime = self._spawn(
            "clearcri",
            [sys.executable, "-m", "cri.cli", "serve", "--config", str(config)],
            in_node=True,
        )
        runtime = self.runtime

        def serving() -> bool:
            runtime.check()
            return self.runtime_socket.exists()

        wait_for("clearcri serving", serving, 180, 0.2)

    def restart_runtime(self) -> None:
        """Stop clearcri by its PID and start it again on the same state."""
        assert self.runtime is not None
        self.runtime.stop()
        self.processes.remove(self.runtime)
        self.runtime_socket.unlink(missing_ok=True)
        self._start_runtime()

    def _prepare_cgroup_root(self) -> None:
        """kubelet refuses a cgroup root that does not exist in every hierarchy."""
        for hierarchy in hierarchies():
            make_cgroup(hierarchy, self.cgroup_root.strip("/"))

    def _kubelet_config(self) -> Path:
        resolv = self.work / "resolv.conf"
        resolv.write_text(f"nameserver {CLUSTER_DNS}\nsearch cluster.local\n")
        self.static_pods = self.work / "static-pods"
        self.static_pods.mkdir(exist_ok=True)
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "tlsCertFile": str(self.kubelet_serving.cert),
            "tlsPrivateKeyFile": str(self.kubelet_serving.key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.pki.ca.cert)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failSwapOn": False,
            "failCgroupV1": False,
            "containerRuntimeEndpoint": self.kubelet_endpoint,
            "imageServiceEndpoint": self.kubelet_endpoint,
            "runtimeRequestTimeout": "4m",
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": "cluster.local",
            "resolvConf": str(resolv),
            "staticPodPath": str(self.static_pods),
            "podLogsDir": str(self.pod_logs_dir),
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
            "containerLogMaxSize": "1Mi",
            "containerLogMaxFiles": 3,
            "evictionHard": {
                "memory.available": "200Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "evictionPressureTransitionPeriod": "10s",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 110,
            "protectKernelDefaults": False,
            "localStorageCapacityIsolation": True,
        }
        path = self.work / "kubelet-config.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def _start_kubelet(self, keep_config: bool = False) -> None:
        self._prepare_cgroup_root()
        self.kubelet_dir.mkdir(exist_ok=True)
        config = self.work / "kubelet-config.json"
        if not (keep_config and config.exists()):
            config = self._kubelet_config()
        self.kubelet = self._spawn(
            "kubelet",
            [
                self.binary("kubelet"),
                f"--config={config}",
                f"--kubeconfig={self.kubelet_kubeconfig}",
                f"--root-dir={self.kubelet_dir}",
                f"--hostname-override={self.config.node_name}",
                f"--node-ip={self.node_ip}",
                "--v=2",
            ],
            in_node=True,
        )

    def restart_kubelet(self) -> None:
        assert self.kubelet is not None
        self.kubelet.stop()
        self.processes.remove(self.kubelet)
        self._start_kubelet()
        self.wait_node_ready()

    def switch_kubelet_runtime(self, endpoint: str, socket: Path, edit: Sequence[str]) -> None:
        """Move the node's kubelet to another runtime, as docs/install.md says to: drain
        the node, stop kubelet, point its configuration file at ``endpoint`` with the
        command ``edit`` (run in the node, given the file's path), start kubelet, and
        uncordon. ``socket`` is that endpoint's socket as seen from here. The pods the
        old runtime still runs (those of DaemonSets) are left to the caller."""
        assert self.kubelet is not None
        node = self.config.node_name
        self.kubectl(
            "drain",
            node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--grace-period=10",
            "--timeout=300s",
            timeout=330,
        )
        self.kubelet.stop()
        self.processes.remove(self.kubelet)
        config = str(self.work / "kubelet-config.json")
        argv = [*edit, "--config", config, "--endpoint", endpoint]
        if self.node is not None:
            self.node.run(argv)
        else:
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
        self.runtime_socket = socket
        self.kubelet_endpoint = endpoint
        self._start_kubelet(keep_config=True)
        self.wait_node_ready()
        self.kubectl("uncordon", node)

    def stop_old_runtime(self) -> None:
        """After a switch: remove what the harness's own runtime still runs and stop it
        (containerd's shims outlive it: they are ended too)."""
        if self.runtime is None:
            return
        self._remove_runtime_pods(self.own_runtime_socket)
        self.runtime.stop()
        self.processes.remove(self.runtime)
        self.runtime = None
        if self.config.runtime == "containerd":
            self._stop_containerd_leftovers()

    def wait_node_ready(self, timeout: float = 180) -> None:
        def ready() -> bool:
            for proc in self.processes:
                proc.check()
            result = self.kubectl(
                "get",
                "node",
                self.config.node_name,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False,
            )
            return result.stdout.strip() == "True"

        wait_for(f"node {self.config.node_name} Ready", ready, timeout, 1.0)

    # ------------------------------------------------------------------ use

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.kubectl_argv(*args),
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def kubectl_argv(self, *args: str) -> list[str]:
        """The command line of kubectl against this cluster (for long-running ones)."""
        return [self.binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args]

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def kubelet_get(self, path: str, timeout: float = 30) -> Any:
        """GET a kubelet API path through the API server's node proxy."""
        result = self.kubectl(
            "get", "--raw", f"/api/v1/nodes/{self.config.node_name}/proxy{path}", timeout=timeout
        )
        return (
            json.loads(result.stdout)
            if result.stdout.strip().startswith(("{", "["))
            else result.stdout
        )

    def crictl_json(self, *args: str) -> Any:
        """crictl against the node's runtime, its JSON output parsed."""
        result = subprocess.run(
            [
                str(CRICTL),
                "--runtime-endpoint",
                f"unix://{self.runtime_socket}",
                *args,
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"crictl {' '.join(args)}: {result.stderr.strip()}")
        return json.loads(result.stdout)

    # ------------------------------------------------------------------ stop

    def delete_workloads(self, timeout: float = 240) -> None:
        """Delete every pod of every namespace through the API, and wait for the runtime to
        have removed them (kubelet stops and removes their sandboxes)."""
        self.kubectl(
            "delete", "all", "--all", "--all-namespaces", "--wait=false", check=False, timeout=60
        )
        self.kubectl(
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=5",
            "--wait=false",
            check=False,
            timeout=60,
        )
        with contextlib.suppress(ClusterError):
            wait_for(
                "all pods gone",
                lambda: not self.kubectl_json("get", "pods", "--all-namespaces")["items"],
                timeout,
                1.0,
            )

    def delete_node_pods(self, timeout: float = 240) -> None:
        """Delete the pods bound to this node (a node that joined: the others' stay)."""
        selector = f"spec.nodeName={self.config.node_name}"
        self.kubectl(
            "delete",
            "pods",
            "--all-namespaces",
            f"--field-selector={selector}",
            "--grace-period=5",
            "--wait=false",
            check=False,
            timeout=60,
        )
        with contextlib.suppress(ClusterError):
            wait_for(
                f"the pods of {self.config.node_name} gone",
                lambda: (
                    not self.kubectl_json(
                        "get", "pods", "--all-namespaces", f"--field-selector={selector}"
                    )["items"]
                ),
                timeout,
                1.0,
            )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.kubelet is not None and self.kubelet.alive():
                if self.control_plane is None:
                    self.delete_workloads()
                else:
                    self.delete_node_pods()
        # kubelet first, then the runtime, then the control plane, each by its PID
        ordered = sorted(
            self.processes,
            key=lambda p: {"kubelet": 0, "clearcri": 1, "containerd": 1}.get(p.name, 2),
        )
        for proc in ordered:
            with contextlib.suppress(Exception):
                proc.stop()
            if proc is self.kubelet:
                # kubelet removes stopped sandboxes only in its garbage collection, later:
                # what it left, the runtime removes now, as it would on a drained node
                self._remove_runtime_pods()
        self.processes.clear()
        if self.config.runtime == "containerd":
            self._stop_containerd_leftovers()
        if self.node is not None:
            # whatever still runs in the node (a runtime installed there, its VMs) ends
            # with the node's init
            self.node.stop()
        self.node_bridge.remove()
        _ip("link", "del", self.pod_bridge)
        # kubelet bind-mounts its root dir onto itself (to make it shared): gone with it
        unmount_under(self.kubelet_dir)
        self._remove_kubelet_fixed_dir()
        templates = Path(f"/dev/shm/clearcri-e2e-templates-{os.getpid()}")
        shutil.rmtree(templates, ignore_errors=True)
        self._remove_cgroup_root()

    def _remove_kubelet_fixed_dir(self) -> None:
        """What kubelet made below /var/lib/kubelet although its root dir is elsewhere,
        when that directory did not exist before (another node's kubelet may still use
        it: only emptied directories go)."""
        if not getattr(self, "made_kubelet_fixed_dir", False):
            return
        plugins = KUBELET_FIXED_DIR / "device-plugins"
        for name in ("kubelet.sock", "kubelet_internal_checkpoint"):
            with contextlib.suppress(OSError):
                (plugins / name).unlink()
        for path in (plugins, KUBELET_FIXED_DIR / "pods", KUBELET_FIXED_DIR):
            with contextlib.suppress(OSError):
                path.rmdir()

    def _remove_runtime_pods(self, socket: Path | None = None) -> None:
        """Every pod the runtime on ``socket`` (kubelet's, by default) still has."""
        socket = socket or self.runtime_socket
        if not socket.exists():
            return
        subprocess.run(
            [str(CRICTL), "--runtime-endpoint", f"unix://{socket}", "rmp", "-a", "-f"],
            capture_output=True,
            timeout=300,
            check=False,
        )

    def _stop_containerd_leftovers(self) -> None:
        """containerd's shims outlive it by design: end the ones of this cluster's
        containerd (their command line names its socket), then unmount its tree."""
        for pid in processes_mentioning(str(self.own_runtime_socket)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_under(self.work / "runtime")

    def _remove_cgroup_root(self) -> None:
        for hierarchy in hierarchies():
            root = hierarchy / self.cgroup_root.strip("/")
            if not root.is_dir():
                continue
            # deepest first; a cgroup with processes in it stays (and is reported)
            for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
