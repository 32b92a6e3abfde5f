"""kubelet's /stats/summary (eviction manager, metrics-server, kubectl top, HPA) on a
clearcri node: every pod and container, with CPU, memory, network, rootfs and logs."""

from __future__ import annotations

import time
from typing import Any

from tests.e2e.workloads import Workloads


def _summary_pod(summary: dict[str, Any], namespace: str, name: str) -> dict[str, Any] | None:
    for pod in summary.get("pods", []):
        ref = pod["podRef"]
        if ref["namespace"] == namespace and ref["name"] == name:
            return dict(pod)
    return None


def test_stats_summary_covers_vm_and_host_pods(k8s: Workloads) -> None:
    writer = [
        "sh",
        "-c",
        "dd if=/dev/zero of=/blob bs=1M count=8 2>/dev/null; echo written; sleep 3600",
    ]
    k8s.apply(
        k8s.pod("vm", [{"name": "main", "command": writer}]),
        k8s.pod(
            "onhost",
            [{"name": "main", "command": writer, "securityContext": {"privileged": True}}],
        ),
    )
    k8s.wait_ready("vm")
    k8s.wait_ready("onhost")
    k8s.wait("written", lambda: "written" in k8s.logs("vm") and "written" in k8s.logs("onhost"))
    found: dict[str, dict[str, Any]] = {}

    def complete() -> bool:
        summary = k8s.cluster.kubelet_get("/stats/summary")
        for name in ("vm", "onhost"):
            pod = _summary_pod(summary, k8s.namespace, name)
            if pod is None or not pod.get("containers"):
                return False
            container = pod["containers"][0]
            rootfs = container.get("rootfs", {})
            if not rootfs.get("usedBytes") or not container.get("cpu", {}).get(
                "usageCoreNanoSeconds"
            ):
                return False
            # the pod's own figures come from its cgroup (cAdvisor's first sample is 0)
            if not pod.get("cpu", {}).get("usageCoreNanoSeconds"):
                return False
            found[name] = pod
        return True

    # kubelet fills its stats cache every few seconds: give it a few rounds
    k8s.wait("/stats/summary with both pods' figures", complete, 90)
    for name, pod in found.items():
        container = pod["containers"][0]
        assert container["name"] == "main"
        assert container["memory"]["workingSetBytes"] > 0, name
        rootfs = container["rootfs"]
        # the 8 MiB the container wrote, on a filesystem kubelet can look up on the host
        assert rootfs["usedBytes"] >= 8 << 20, (name, rootfs)
        assert rootfs["capacityBytes"] > 0 and rootfs["availableBytes"] > 0, (name, rootfs)
        assert "logs" in container and container["logs"]["usedBytes"] > 0, name
        assert pod["cpu"]["usageCoreNanoSeconds"] > 0, name
        assert pod["memory"]["workingSetBytes"] > 0, name
        assert pod["ephemeral-storage"]["usedBytes"] >= 8 << 20, name
    kubelet_log = k8s.cluster.kubelet.log.read_text(errors="replace") if k8s.cluster.kubelet else ""
    failures = [
        line
        for line in kubelet_log.splitlines()
        if "failed to get summary stats" in line
        # before the node is registered, the eviction manager has no node to look up
        and "not found" not in line
        # while the restart scenario has the runtime stopped, its socket is gone
        and "while dialing" not in line
    ]
    assert failures == []
    assert "failed to get device for dir" not in kubelet_log


def test_pod_network_counters_reach_cri_stats(k8s: Workloads) -> None:
    """PodSandboxStats carries the guest's interfaces (kubelet reads them from CRI when
    its PodAndContainerStatsFromCRI gate is on; metrics-server from the summary)."""
    k8s.apply(
        k8s.pod(
            "net",
            [
                {
                    "name": "httpd",
                    "command": ["httpd", "-f", "-p", "8080", "-h", "/etc"],
                    # kubelet's probes reach the pod over its eth0
                    "readinessProbe": {
                        "httpGet": {"path": "/hostname", "port": 8080},
                        "periodSeconds": 2,
                    },
                }
            ],
        )
    )
    k8s.wait_ready("net")
    stats = k8s.cluster.crictl_json("statsp", "--label", "io.kubernetes.pod.name=net")
    linux = stats["stats"][0]["linux"]
    network = linux["network"]
    assert network["defaultInterface"]["name"] == "eth0"
    assert int(network["defaultInterface"]["rxBytes"]["value"]) > 0


def test_ephemeral_storage_limit_evicts_the_pod(k8s: Workloads) -> None:
    """kubelet enforces limits.ephemeral-storage from the summary: the bytes a container
    writes into its writable layer inside the VM count."""
    k8s.apply(
        k8s.pod(
            "filler",
            [
                {
                    "name": "main",
                    "command": [
                        "sh",
                        "-c",
                        "sleep 5; dd if=/dev/zero of=/fill bs=1M count=24; sleep 3600",
                    ],
                    "resources": {"limits": {"ephemeral-storage": "8Mi"}},
                }
            ],
            restartPolicy="Never",
        )
    )
    pod = k8s.wait_phase("filler", "Failed", 180)
    assert pod["status"].get("reason") == "Evicted", pod["status"]
    assert "ephemeral" in pod["status"].get("message", "").lower()


def test_a_full_writable_layer_is_that_containers_alone(k8s: Workloads) -> None:
    """A container that fills its writable layer gets ENOSPC by itself: exec into it and
    into its neighbour, and the neighbour's exec readiness probe, keep working (they
    once shared one guest tmpfs with the agent's run dir, and every exec of the pod
    failed with "No space left on device")."""
    probe = {"exec": {"command": ["true"]}, "periodSeconds": 5, "timeoutSeconds": 20}
    k8s.apply(
        k8s.pod(
            "full",
            [
                {
                    "name": "filler",
                    "command": [
                        "sh",
                        "-c",
                        "dd if=/dev/zero of=/fill bs=1M 2>/dev/null; echo filled; sleep 3600",
                    ],
                },
                {"name": "neighbour", "command": ["sleep", "3600"], "readinessProbe": probe},
            ],
        )
    )
    k8s.wait("the filler's layer to fill", lambda: "filled" in k8s.logs("full", "-c", "filler"))
    out = k8s.exec("full", "sh", "-c", "(echo more > /more) 2>&1; echo rc=$?", container="filler")
    assert "No space left on device" in out.stdout, out.stdout
    out = k8s.exec("full", "sh", "-c", "echo ok > /mine && cat /mine", container="neighbour")
    assert out.stdout.strip() == "ok"
    time.sleep(12)  # two probe periods after the layer filled
    statuses = {c["name"]: c for c in k8s.get("pod", "full")["status"]["containerStatuses"]}
    assert statuses["neighbour"]["ready"] is True, statuses["neighbour"]
    assert statuses["filler"]["restartCount"] == 0, statuses["filler"]
