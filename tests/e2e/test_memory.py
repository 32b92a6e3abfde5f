"""Memory limits under a real kubelet: the VM and its QEMU fit the pod cgroup kubelet
makes, a container within its limit is never killed (with the chart's RuntimeClass
overhead), and nothing ever OOM-kills a whole VM on the host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.cluster import REPO, Cluster
from tests.e2e.workloads import Workloads

MIB = 1 << 20
# Holds N MiB in one awk string (busybox has no memory hog; a shell variable filled
# through `tr` takes minutes under TCG), then sleeps.
HOLD = (
    'awk \'BEGIN {{ s = sprintf("%{size}s", ""); print "holding {mib}"; fflush(); '
    'system("sleep 3600") }}\''
)


def chart_overhead() -> dict[str, str]:
    values = yaml.safe_load((REPO / "charts" / "clearcri" / "values.yaml").read_text())
    return dict(values["runtimeClass"]["overhead"])


def pod_memory_cgroup(cluster: Cluster, uid: str) -> Path:
    root = Path("/sys/fs/cgroup/memory") / cluster.cgroup_root.strip("/") / "kubepods"
    for candidate in (root / f"pod{uid}", *root.glob(f"*/pod{uid}")):
        if candidate.is_dir():
            return candidate
    raise AssertionError(f"no memory cgroup for pod {uid} under {root}")


def host_oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def _holder(k8s: Workloads, name: str, mib: int, limit: str, **spec: Any) -> dict[str, Any]:
    return k8s.pod(
        name,
        [
            {
                "name": "main",
                "command": ["sh", "-c", HOLD.format(mib=mib, size=mib * MIB)],
                "resources": {"limits": {"memory": limit, "cpu": "1"}},
            }
        ],
        **spec,
    )


def _oom_killed(status: dict[str, Any]) -> bool:
    for state in (status.get("state", {}), status.get("lastState", {})):
        if state.get("terminated", {}).get("reason") == "OOMKilled":
            return True
    return False


def _terminated(status: dict[str, Any]) -> bool:
    return "terminated" in status.get("state", {}) or "terminated" in status.get("lastState", {})


def test_a_container_within_its_limit_runs_with_the_chart_overhead(
    k8s: Workloads,
) -> None:
    overhead = chart_overhead()
    k8s.cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "node.k8s.io/v1",
                "kind": "RuntimeClass",
                "metadata": {"name": "e2e-clearcri"},
                "handler": "clearcri",
                "overhead": {"podFixed": overhead},
            }
        ),
    )
    k8s.apply(_holder(k8s, "within", 150, "256Mi", runtimeClassName="e2e-clearcri"))
    k8s.wait("holding", lambda: "holding 150" in k8s.logs("within"), 240)
    pod = k8s.get("pod", "within")
    ip = pod["status"]["podIP"]
    cgroup = pod_memory_cgroup(k8s.cluster, pod["metadata"]["uid"])
    limit = int((cgroup / "memory.limit_in_bytes").read_text())
    assert limit == 256 * MIB + int(overhead["memory"].removesuffix("Mi")) * MIB
    k8s.exec("within", "true")  # still serving: its agent and the container alive
    status = k8s.container_status("within", "main")
    assert "running" in status["state"], status
    assert status["restartCount"] == 0
    assert k8s.get("pod", "within")["status"]["podIP"] == ip  # no new sandbox
    assert host_oom_kills(cgroup) == 0


def test_no_overhead_never_costs_the_whole_vm(k8s: Workloads) -> None:
    """Without a RuntimeClass overhead the pod cgroup is just the containers' limits: the
    VM is sized to fit it, so the host never OOM-kills it; what does not fit in the
    smaller guest is OOM-killed inside it and reported."""
    k8s.apply(_holder(k8s, "tight", 150, "256Mi"))
    k8s.wait(
        "holding or OOMKilled",
        lambda: (
            "holding 150" in k8s.logs("tight") or _terminated(k8s.container_status("tight", "main"))
        ),
        240,
    )
    pod = k8s.get("pod", "tight")
    cgroup = pod_memory_cgroup(k8s.cluster, pod["metadata"]["uid"])
    assert int((cgroup / "memory.limit_in_bytes").read_text()) == 256 * MIB
    ip = pod["status"]["podIP"]
    status = k8s.container_status("tight", "main")
    if _terminated(status):
        # the smaller guest refused the memory (allocation failed) or its OOM killer
        # acted: either way inside the guest, reported on the container
        last = status.get("lastState", {}).get("terminated") or status["state"]["terminated"]
        assert last["reason"] in ("OOMKilled", "Error"), status
    assert host_oom_kills(cgroup) == 0
    pod = k8s.get("pod", "tight")
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"] == ip  # the same VM: no new sandbox


def test_a_container_over_its_limit_is_oomkilled_in_the_guest(k8s: Workloads) -> None:
    k8s.apply(_holder(k8s, "over", 400, "192Mi"))
    k8s.wait("terminated", lambda: _terminated(k8s.container_status("over", "main")), 240)
    status = k8s.container_status("over", "main")
    assert _oom_killed(status), status
    pod = k8s.get("pod", "over")
    assert host_oom_kills(pod_memory_cgroup(k8s.cluster, pod["metadata"]["uid"])) == 0


def test_a_small_pod_runs_in_the_smallest_vm(k8s: Workloads) -> None:
    """A 64Mi pod without a RuntimeClass overhead (a budget no VM fits in) runs: it gets
    the VM an overhead would have paid for, its cgroup room for that VM, and its
    container keeps its 64Mi limit in the guest (it was refused with INVALID_ARGUMENT
    before)."""
    # awk's sprintf briefly holds the string twice: 16 MiB peaks near 40 in the container
    k8s.apply(_holder(k8s, "small", 16, "64Mi"), _holder(k8s, "small-over", 100, "64Mi"))
    k8s.wait("holding 16", lambda: "holding 16" in k8s.logs("small"), 240)
    pod = k8s.get("pod", "small")
    cgroup = pod_memory_cgroup(k8s.cluster, pod["metadata"]["uid"])
    assert int((cgroup / "memory.limit_in_bytes").read_text()) > 64 * MIB
    k8s.wait(
        "the 100 MiB holder terminated",
        lambda: _terminated(k8s.container_status("small-over", "main")),
        240,
    )
    status = k8s.container_status("small-over", "main")
    last = status.get("lastState", {}).get("terminated") or status["state"]["terminated"]
    assert last["reason"] in ("OOMKilled", "Error"), status
    over = k8s.get("pod", "small-over")
    for uid in (pod["metadata"]["uid"], over["metadata"]["uid"]):
        assert host_oom_kills(pod_memory_cgroup(k8s.cluster, uid)) == 0
    assert k8s.get("pod", "small")["status"]["containerStatuses"][0]["restartCount"] == 0
