"""The Helm chart installed on a real cluster, as docs/install.md says to use it.

One story, step by step (each test builds on the one before; pytest runs them in order):
the chart on a node whose kubelet still uses containerd; kubelet switched to clearcri;
RuntimeClass pods in VMs with the overhead; ``helm upgrade`` rolling the node with its
pod VMs kept; a second node joining, switched the same way; a rolling update going node
by node; pods spread over both nodes; one node drained without touching the other's VMs;
``helm uninstall`` and ``clearcri node uninstall`` leaving what the docs say.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from sandbox.cgroups import hierarchies
from tests.e2e.cluster import CRICTL, Cluster, ClusterError, wait_for
from tests.e2e_helm.nodes import (
    CLEARCRI,
    E2E_IMAGE_PATH,
    EDIT_KUBELET_CONFIG,
    NAMESPACE,
    SOCKET_IN_NODE,
    SUPERVISOR_CGROUP,
    HelmSuite,
    daemon_pids,
    installed_release,
    installed_socket,
    node_processes,
    pod_image,
    pod_ready,
    qemu_pids,
)

APPS = "helm-apps"


def vm_pod(suite: HelmSuite, name: str, node: Cluster | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "runtimeClassName": "clearcri",
        "terminationGracePeriodSeconds": 2,
        "containers": [
            {
                "name": "main",
                "image": f"{suite.registry}/{E2E_IMAGE_PATH}:1",
                "command": ["sh", "-c", "uname -r; sleep 36000"],
                # a quarter CPU (one vCPU): with the overhead, three such pods fit
                # a 2-CPU node, as the drain needs
                "resources": {"limits": {"memory": "128Mi", "cpu": "250m"}},
            }
        ],
    }
    if node is not None:
        spec["nodeName"] = node.config.node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def apply(suite: HelmSuite, obj: dict[str, Any]) -> None:
    suite.cluster.kubectl("apply", "-n", APPS, "-f", "-", input=json.dumps(obj))


def get_pod(suite: HelmSuite, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = suite.cluster.kubectl_json("get", "pod", "-n", APPS, name)
    return pod


def wait_running(suite: HelmSuite, name: str, timeout: float = 600) -> dict[str, Any]:
    wait_for(f"pod {name} Ready", lambda: pod_ready(get_pod(suite, name)), timeout, 2.0)
    return get_pod(suite, name)


def exec_in(suite: HelmSuite, pod: str, *argv: str) -> str:
    return suite.cluster.kubectl("exec", "-n", APPS, pod, "--", *argv, timeout=120).stdout


def test_chart_installs_clearcri_on_a_containerd_node(suite: HelmSuite) -> None:
    node = suite.cluster
    assert suite.runtime_version(node).startswith("containerd://")
    suite.install(suite.images.first)
    suite.wait_ds_ready(node, suite.images.first)
    # the node's own install: a release, a supervised daemon answering on its socket
    assert installed_release(node)
    assert len(daemon_pids(node)) == 1
    assert node_processes(node, "supervise"), "no supervisor runs the daemon"
    assert node.node is not None
    node.node.run([CLEARCRI, "--help"])
    assert installed_socket(node).is_socket()
    # the dashboard, where Grafana's sidecar finds it
    dashboard = suite.cluster.kubectl_json(
        "get", "configmap", "-n", NAMESPACE, "clearcri-dashboard"
    )
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["clearcri.json"])["panels"]
    # kubelet still uses containerd: no label, so no VM pod is scheduled here yet
    time.sleep(8)
    assert suite.label(node) is None
    suite.cluster.kubectl("create", "namespace", APPS)


def test_kubelet_switched_to_clearcri_gets_the_label(suite: HelmSuite) -> None:
    node = suite.cluster
    suite.switch_to_clearcri(node)
    assert suite.runtime_version(node).startswith("clearcri://")

    # the DaemonSet's pod runs again, now on clearcri (the host handler: hostPID); the
    # API may still show it Ready from containerd until kubelet has synced with clearcri
    def ds_pods_on_clearcri() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = node.crictl_json(
            "pods", "--label", "app.kubernetes.io/name=clearcri"
        )["items"]
        return items

    wait_for("the DaemonSet's pod on clearcri", lambda: bool(ds_pods_on_clearcri()), 600, 2.0)
    suite.wait_ds_ready(node, suite.images.first, timeout=600)
    pods = ds_pods_on_clearcri()
    assert pods and {p["runtimeHandler"] for p in pods} == {"host"}
    wait_for("the node label", lambda: suite.label(node) == "true", 120)


def test_runtimeclass_pods_run_in_vms_with_the_overhead(suite: HelmSuite) -> None:
    node = suite.cluster
    apply(suite, vm_pod(suite, "vm-1"))
    pod = wait_running(suite, "vm-1")
    assert pod["spec"]["nodeName"] == node.config.node_name
    assert pod["spec"]["overhead"] == {"cpu": "250m", "memory": "208Mi"}
    # the guest's kernel, not this machine's
    assert exec_in(suite, "vm-1", "uname", "-r").strip() != os.uname().release
    sandboxes = node.crictl_json("pods", "--name", "vm-1")["items"]
    assert [s["runtimeHandler"] for s in sandboxes] == ["clearcri"]
    assert len(qemu_pids(node)) == 1


def test_helm_upgrade_rolls_the_node_and_keeps_its_pod_vms(suite: HelmSuite) -> None:
    node = suite.cluster
    before = get_pod(suite, "vm-1")
    release, daemons, vms = installed_release(node), daemon_pids(node), qemu_pids(node)
    suite.upgrade(suite.images.second)
    suite.wait_ds_ready(node, suite.images.second)
    wait_for("the new release installed", lambda: installed_release(node) != release, 300)
    wait_for("the new daemon", lambda: daemon_pids(node) not in ([], daemons), 120)
    after = get_pod(suite, "vm-1")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert (
        after["status"]["containerStatuses"][0]["containerID"]
        == before["status"]["containerStatuses"][0]["containerID"]
    )
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    # the pod VM kept running through the daemon's restart, and is the new daemon's
    assert qemu_pids(node) == vms
    assert exec_in(suite, "vm-1", "echo", "adopted").strip() == "adopted"


def test_a_second_node_joins_and_is_switched_the_same_way(suite: HelmSuite) -> None:
    second = suite.add_node()
    assert suite.runtime_version(second).startswith("containerd://")
    suite.wait_ds_ready(second, suite.images.second)
    assert installed_release(second) == installed_release(suite.cluster)
    assert suite.label(second) is None
    suite.switch_to_clearcri(second)
    suite.wait_ds_ready(second, suite.images.second, timeout=600)
    wait_for("the second node's label", lambda: suite.label(second) == "true", 120)
    # the first node's VM was not touched
    assert pod_ready(get_pod(suite, "vm-1"))


def test_the_rolling_update_goes_node_by_node(suite: HelmSuite) -> None:
    names = [n.config.node_name for n in suite.nodes]
    # (time, {node: (a Ready pod not being deleted, that pod runs the new image)})
    samples: list[tuple[float, dict[str, tuple[bool, bool]]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                pods = suite.ds_pods()
            except ClusterError:
                continue  # one kubectl call that failed: the next sample
            state = {}
            for name in names:
                pod = pods.get(name)
                up = (
                    pod is not None
                    and pod_ready(pod)
                    and "deletionTimestamp" not in pod["metadata"]
                )
                state[name] = (up, up and pod is not None and pod_image(pod) == suite.images.first)
            samples.append((time.monotonic(), state))
            time.sleep(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        suite.upgrade(suite.images.first)
        for node in suite.nodes:
            suite.wait_ds_ready(node, suite.images.first)
        time.sleep(1.5)  # a sample of the end state
    finally:
        done.set()
        watcher.join(30)
    # maxUnavailable 1: never were both nodes without a serving pod
    assert all(any(up for up, _ in s.values()) for _, s in samples)
    # one node after the other: the second one's old pod went only once the first one's
    # new pod was Ready
    updated = {name: min(t for t, s in samples if s[name][1]) for name in names}
    first, second = sorted(names, key=lambda n: updated[n])
    second_down = [t for t, s in samples if not s[second][0]]
    assert second_down, "the second node's pod was never seen replaced"
    assert min(second_down) >= updated[first] - 1.0, (updated, min(second_down))


def test_runtimeclass_pods_spread_over_both_nodes(suite: HelmSuite) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "spread"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "spread"}},
            "template": {
                "metadata": {"labels": {"app": "spread"}},
                "spec": {
                    **vm_pod(suite, "x")["spec"],
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "DoNotSchedule",
                            # a cordoned (drained) node is no domain to spread over
                            "nodeTaintsPolicy": "Honor",
                            "labelSelector": {"matchLabels": {"app": "spread"}},
                        }
                    ],
                },
            },
        },
    }
    apply(suite, deployment)
    suite.cluster.kubectl(
        "rollout", "status", "-n", APPS, "deployment/spread", "--timeout=600s", timeout=620
    )
    pods = suite.cluster.kubectl_json("get", "pods", "-n", APPS, "-l", "app=spread")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(
        n.config.node_name for n in suite.nodes
    )
    for node in suite.nodes:
        # every pod VM the node runs: vm-1 on the first, one spread pod on each
        assert len(qemu_pids(node)) == (2 if node is suite.cluster else 1)


def test_draining_one_node_leaves_the_other_nodes_vms(suite: HelmSuite) -> None:
    first, second = suite.nodes
    kept = qemu_pids(first)
    vm1 = get_pod(suite, "vm-1")["status"]["containerStatuses"][0]["containerID"]
    suite.cluster.kubectl(
        "drain",
        second.config.node_name,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--grace-period=5",
        "--timeout=300s",
        timeout=330,
    )
    wait_for("the drained node's VMs gone", lambda: not qemu_pids(second), 300)
    # the evicted replica runs again, on the first node; nothing there was restarted
    suite.cluster.kubectl(
        "rollout", "status", "-n", APPS, "deployment/spread", "--timeout=600s", timeout=620
    )
    assert set(kept) <= set(qemu_pids(first))
    assert get_pod(suite, "vm-1")["status"]["containerStatuses"][0]["containerID"] == vm1
    suite.cluster.kubectl("uncordon", second.config.node_name)


def test_uninstall_leaves_what_the_docs_say(suite: HelmSuite) -> None:
    suite.cluster.kubectl("delete", "namespace", APPS, "--timeout=300s", timeout=320)
    suite.uninstall()
    # the DaemonSet's pods end after their preStop hook and grace period
    wait_for("the DaemonSet's pods gone", lambda: not suite.ds_pods(), 180, 2.0)
    assert suite.cluster.kubectl("get", "runtimeclass", "clearcri", check=False).returncode != 0
    for node in suite.nodes:
        # the preStop hook took the label away; clearcri still serves kubelet
        assert suite.label(node) is None
        assert daemon_pids(node)
    for node in suite.nodes:
        assert node.node is not None
        # back to containerd, as docs/install.md "Uninstall" says, then the node uninstall
        node.start_own_runtime()
        node.switch_kubelet_runtime(
            f"unix://{node.own_runtime_socket}", node.own_runtime_socket, EDIT_KUBELET_CONFIG
        )
        # what kubelet stopped but had not removed yet
        node.node.run(
            [str(CRICTL), "--runtime-endpoint", f"unix://{SOCKET_IN_NODE}", "rmp", "-a", "-f"]
        )
        result = node.node.run([CLEARCRI, "node", "uninstall"])
        assert "removed clearcri" in result.stdout, result.stdout
        suite.wait_runtime(node, "containerd://")
        root = node.node_root
        assert not (root / "opt/clearcri/venv").exists()
        assert not (root / "opt/clearcri/install.json").exists()
        assert not (root / "etc/clearcri/config.toml").exists()
        assert not daemon_pids(node) and not node_processes(node, "supervise")
        assert not qemu_pids(node)
        # the daemon's state and the staged release stay (docs/install.md)
        assert (root / "var/lib/clearcri").is_dir()
        assert (root / "var/lib/clearcri-deploy/release").is_dir()
    # the supervisors' cgroup went with the last of them
    assert not [h for h in hierarchies() if (h / SUPERVISOR_CGROUP).exists()]
