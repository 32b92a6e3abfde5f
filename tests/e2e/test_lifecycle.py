"""Container lifecycle as kubelet drives it: restarts with back-off, init containers
and sidecars, host pods, and restarts of the runtime and of kubelet that restart no pod."""

from __future__ import annotations

from typing import Any

from tests.e2e.workloads import Workloads


def test_crashloop_backs_off_and_keeps_the_previous_log(k8s: Workloads) -> None:
    k8s.apply(k8s.pod("crash", [{"name": "main", "command": ["sh", "-c", "echo run $$; exit 3"]}]))
    k8s.wait(
        "two restarts",
        lambda: k8s.container_status("crash", "main").get("restartCount", 0) >= 2,
        240,
    )
    status = k8s.container_status("crash", "main")
    assert status["lastState"]["terminated"]["exitCode"] == 3
    k8s.wait(
        "CrashLoopBackOff",
        lambda: (
            k8s.container_status("crash", "main")["state"].get("waiting", {}).get("reason")
            == "CrashLoopBackOff"
        ),
        120,
    )
    # while it backs off, --previous is the attempt that last exited (kubelet keeps the
    # newest dead container of a pod and its log, and removes older ones)
    k8s.wait("the previous attempt's log", lambda: "run" in k8s.logs("crash", "--previous"), 60)


def test_init_containers_run_first_and_sidecars_keep_running(k8s: Workloads) -> None:
    k8s.apply(
        k8s.pod(
            "staged",
            [{"name": "main", "command": ["sh", "-c", "echo main started; sleep 3600"]}],
            initContainers=[
                {"name": "setup", "command": ["sh", "-c", "echo setup done"]},
                {
                    "name": "sidecar",
                    "restartPolicy": "Always",
                    "command": ["sh", "-c", "echo sidecar up; sleep 3600"],
                },
            ],
        )
    )
    k8s.wait_ready("staged")
    status = k8s.get("pod", "staged")["status"]
    inits = {s["name"]: s for s in status["initContainerStatuses"]}
    assert inits["setup"]["state"]["terminated"]["exitCode"] == 0
    assert "running" in inits["sidecar"]["state"]
    main = {s["name"]: s for s in status["containerStatuses"]}["main"]
    finished = inits["setup"]["state"]["terminated"]["finishedAt"]
    assert main["state"]["running"]["startedAt"] >= finished
    assert "setup done" in k8s.logs("staged", "-c", "setup")
    assert "sidecar up" in k8s.logs("staged", "-c", "sidecar")


def _sandbox(k8s: Workloads, pod: str) -> dict[str, Any]:
    pods = k8s.cluster.crictl_json(
        "pods", "--namespace", k8s.namespace, "--name", pod, "--state", "ready"
    )
    assert len(pods["items"]) == 1, pods
    return dict(pods["items"][0])


def test_privileged_and_host_network_pods_run_on_the_host_handler(k8s: Workloads) -> None:
    k8s.apply(
        k8s.pod(
            "priv",
            [
                {
                    "name": "main",
                    "command": ["sleep", "3600"],
                    "securityContext": {"privileged": True},
                }
            ],
        ),
        k8s.pod("hostnet", [{"name": "main", "command": ["sleep", "3600"]}], hostNetwork=True),
        k8s.pod("vm", [{"name": "main", "command": ["sleep", "3600"]}]),
    )
    for name in ("priv", "hostnet", "vm"):
        k8s.wait_ready(name)
    assert _sandbox(k8s, "priv")["runtimeHandler"] == "host"
    assert _sandbox(k8s, "hostnet")["runtimeHandler"] == "host"
    assert _sandbox(k8s, "vm")["runtimeHandler"] in ("", "clearcri")
    # the host-network pod sees the node's interfaces (its bridge address among them)
    assert k8s.cluster.node_ip in k8s.exec("hostnet", "ip", "addr").stdout
    # the VM pod sees a kernel of its own
    assert k8s.cluster.node_ip not in k8s.exec("vm", "ip", "addr").stdout


def test_runtime_and_kubelet_restarts_restart_no_pod(k8s: Workloads) -> None:
    k8s.apply(k8s.pod("steady", [{"name": "main", "command": ["sleep", "3600"]}]))
    before = k8s.wait_ready("steady")
    container_id = before["status"]["containerStatuses"][0]["containerID"]
    k8s.cluster.restart_runtime()
    k8s.cluster.restart_kubelet()
    k8s.wait_ready("steady")
    after = k8s.get("pod", "steady")["status"]
    status = after["containerStatuses"][0]
    assert status["containerID"] == container_id
    assert status["restartCount"] == 0
    assert after["podIP"] == before["status"]["podIP"]
    # a restarted kubelet serves exec once its pod manager has the pod again
    k8s.wait(
        "exec after the restarts",
        lambda: k8s.exec("steady", "echo", "alive", check=False).stdout.strip() == "alive",
        60,
    )
