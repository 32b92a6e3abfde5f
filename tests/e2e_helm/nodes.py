"""The Helm suite's cluster: nodes of their own on this machine, the chart, and what is
read off a node (its clearcri processes, its installed release, its pod VMs).

Each node is a ``Cluster`` node in PID and mount namespaces of its own
(tests/e2e/node_host.py): the chart's installer enters PID 1's mount namespace, which is
then the node's, and installs under the real paths (``/opt/clearcri``,
``/etc/clearcri``, ...) of that node only. The first node also runs the control plane;
the second joins it. Both start on containerd (Debian's, with runc), as a node does
before clearcri is installed on it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.supervisor import remove_cgroup
from sandbox.procfs import read_cmdline
from tests.e2e.cluster import Cluster, ClusterConfig, wait_for

E2E_IMAGE_PATH = "e2e/busybox"
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "clearcri"
RELEASE = "clearcri"
NAMESPACE = "kube-system"
#: What the DaemonSet's pods carry (the chart's selector labels).
DS_SELECTOR = f"app.kubernetes.io/name=clearcri,app.kubernetes.io/instance={RELEASE}"
NODE_LABEL = "clearcri.io/runtime"
#: The installed release, as seen in a node.
VENV_PYTHON = "/opt/clearcri/venv/bin/python3"
CLEARCRI = "/opt/clearcri/venv/bin/clearcri"
SOCKET_IN_NODE = "/run/clearcri/clearcri.sock"
#: The cgroup `clearcri supervise` runs in, for an install into a node's own root.
SUPERVISOR_CGROUP = "clearcri.service"
#: `python3 -m deploy.kubelet_runtime`, with the installed release's interpreter
EDIT_KUBELET_CONFIG = [VENV_PYTHON, "-m", "deploy.kubelet_runtime"]


def node_config(work: Path, index: int, registry: str) -> ClusterConfig:
    return ClusterConfig(
        work=work / f"node{index}",
        node_name=f"clearcri-helm-{index}",
        node_address=f"10.231.{236 + 2 * index}.1/24",
        pod_subnet=f"10.231.{237 + 2 * index}.0/24",
        bridge_prefix=f"cchelm{index}",
        runtime="containerd",
        registry=registry,
        mirrored=("registry.k8s.io",),
        node_host=True,
    )


def first_node(work: Path, registry: str) -> Cluster:
    return Cluster(node_config(work, 1, registry))


@dataclass
class NodeImages:
    """Two tags of the node image, each carrying a release of its own (the second one's
    version has a local suffix), pushed to the suite's registry."""

    first: str
    second: str

    @classmethod
    def build(cls, registry: str) -> NodeImages:
        from deploy.node_image import build_node_image

        first = build_node_image(registry)
        second = build_node_image(registry, local_version="upgrade")
        return cls(first.reference, second.reference)


class HelmSuite:
    """The cluster, its nodes, and the chart's release on it."""

    def __init__(self, cluster: Cluster, registry: str, images: NodeImages, work: Path) -> None:
        import helm_python

        self.cluster = cluster
        self.nodes: list[Cluster] = [cluster]
        self.registry = registry
        self.images = images
        self.work = work
        self.helm = helm_python.Config(kubeconfig_path=cluster.kubeconfig, namespace=NAMESPACE)

    # ------------------------------------------------------------------ the chart

    def values(self, image: str) -> dict[str, Any]:
        repository, tag = image.rsplit(":", 1)
        return {
            "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
            # no systemd here: the daemon is supervised from the DaemonSet's pod
            "securityContext": {"privileged": True},
            "install": {"labelInterval": 3},
            # no kube-proxy here: the labeler goes to the API server's own address
            "apiServer": {"host": "127.0.0.1", "port": self.cluster.apiserver_port},
            # two nodes share this machine's network: each daemon on its own node IP
            "metrics": {"address": "hostIP"},
            "registry": {
                "mirrors": {"registry.k8s.io": [f"http://{self.registry}"]},
                "insecure": [self.registry],
            },
        }

    def install(self, image: str) -> dict[str, Any]:
        release: dict[str, Any] = self.helm.install(
            str(CHART), RELEASE, self.values(image), namespace=NAMESPACE, timeout=900
        )
        return release

    def upgrade(self, image: str) -> dict[str, Any]:
        release: dict[str, Any] = self.helm.upgrade(
            str(CHART), RELEASE, self.values(image), namespace=NAMESPACE, timeout=900
        )
        return release

    def uninstall(self) -> None:
        self.helm.uninstall(RELEASE, timeout=300, wait="watcher", ignore_not_found=True)

    # ------------------------------------------------------------------ nodes

    def add_node(self) -> Cluster:
        node = Cluster(
            node_config(self.work, len(self.nodes) + 1, self.registry), control_plane=self.cluster
        )
        node.start()
        self.nodes.append(node)
        return node

    def ds_pods(self) -> dict[str, dict[str, Any]]:
        """The DaemonSet's pods by node name (the newest one of each node)."""
        items = self.cluster.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", DS_SELECTOR)[
            "items"
        ]
        pods: dict[str, dict[str, Any]] = {}
        for pod in sorted(items, key=lambda p: p["metadata"]["creationTimestamp"]):
            node = pod["spec"].get("nodeName")
            if node:
                pods[node] = pod
        return pods

    def wait_ds_ready(self, node: Cluster, image: str, timeout: float = 900) -> dict[str, Any]:
        """The node's DaemonSet pod, once it runs ``image`` and is Ready."""

        def ready() -> bool:
            for proc in node.processes:
                proc.check()
            pod = self.ds_pods().get(node.config.node_name)
            return pod is not None and pod_ready(pod) and pod_image(pod) == image

        try:
            wait_for(f"the DaemonSet pod of {node.config.node_name} Ready", ready, timeout, 2.0)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.describe_ds(node)}") from exc
        return self.ds_pods()[node.config.node_name]

    def describe_ds(self, node: Cluster) -> str:
        pod = self.ds_pods().get(node.config.node_name)
        if pod is None:
            return "no DaemonSet pod"
        name = pod["metadata"]["name"]
        logs = self.cluster.kubectl("logs", "-n", NAMESPACE, name, "--tail=40", check=False).stdout
        status = json.dumps(pod.get("status", {}), indent=1)[-3000:]
        return f"pod {name}:\n{status}\nlogs:\n{logs}"

    def label(self, node: Cluster) -> str | None:
        labels = self.cluster.kubectl_json("get", "node", node.config.node_name)["metadata"][
            "labels"
        ]
        value = labels.get(NODE_LABEL)
        return str(value) if value is not None else None

    def runtime_version(self, node: Cluster) -> str:
        info = self.cluster.kubectl_json("get", "node", node.config.node_name)["status"]["nodeInfo"]
        return str(info["containerRuntimeVersion"])

    def switch_to_clearcri(self, node: Cluster) -> None:
        """docs/install.md "Point kubelet at clearcri", then the old runtime stopped."""
        node.switch_kubelet_runtime(
            f"unix://{SOCKET_IN_NODE}", installed_socket(node), EDIT_KUBELET_CONFIG
        )
        node.stop_old_runtime()
        self.wait_runtime(node, "clearcri://")

    def wait_runtime(self, node: Cluster, prefix: str) -> None:
        """Until the node's status names the runtime (kubelet reports it every few s)."""
        wait_for(
            f"{node.config.node_name} reporting {prefix}",
            lambda: self.runtime_version(node).startswith(prefix),
            60,
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.uninstall()
        for node in reversed(self.nodes):
            node.stop()
        # a supervisor that ended with its node (not by an uninstall) left its cgroup
        remove_cgroup(SUPERVISOR_CGROUP)
        self.helm.close()


# ---------------------------------------------------------------------- read off a node


def installed_socket(node: Cluster) -> Path:
    """The installed daemon's socket, as seen from outside the node."""
    return node.node_root / SOCKET_IN_NODE.lstrip("/")


def installed_release(node: Cluster) -> str | None:
    path = node.node_root / "opt/clearcri/install.json"
    if not path.exists():
        return None
    return str(json.loads(path.read_text())["release"])


def cmdline(pid: int) -> str:
    return " ".join(read_cmdline(pid))


def node_processes(node: Cluster, needle: str) -> list[int]:
    assert node.node is not None
    return sorted(pid for pid in node.node.pids() if needle in cmdline(pid))


def daemon_pids(node: Cluster) -> list[int]:
    """The installed daemon (``clearcri serve``) of a node."""
    return [
        pid for pid in node_processes(node, " serve --config") if "supervise" not in cmdline(pid)
    ]


def qemu_pids(node: Cluster) -> list[int]:
    """The node's pod VMs: not a template being built beside them, nor a standby VM no
    pod has taken over (sandbox/standby.py: a pod that took one links its run
    directory to the standby's)."""
    assert node.node is not None
    sandboxes = node.node_root / "run/clearcri/sandboxes"
    taken = {
        os.path.basename(os.readlink(link))
        for link in (sandboxes.iterdir() if sandboxes.is_dir() else [])
        if link.is_symlink()
    }
    pids = []
    for pid in node.node.pids():
        argv = read_cmdline(pid)
        if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
            continue
        name = argv[argv.index("-name") + 1].split(",")[0] if "-name" in argv else ""
        if name.startswith("clearcri-template-"):
            continue
        if name.startswith("clearcri-standby-") and name.removeprefix("clearcri-") not in taken:
            continue
        pids.append(pid)
    return sorted(pids)


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def pod_image(pod: dict[str, Any]) -> str:
    return str(pod["spec"]["containers"][0]["image"])
