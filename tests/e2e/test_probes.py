"""Probes under a real kubelet: an exec probe that times out is a failure (kubelet counts
only DEADLINE_EXCEEDED as one), and the timed-out command does not live on."""

from __future__ import annotations

from tests.e2e.workloads import Workloads


def test_exec_liveness_timeout_restarts_the_container(k8s: Workloads) -> None:
    k8s.apply(
        k8s.pod(
            "live",
            [
                {
                    "name": "main",
                    "command": ["sleep", "3600"],
                    "livenessProbe": {
                        "exec": {"command": ["sleep", "30"]},
                        "timeoutSeconds": 1,
                        "periodSeconds": 3,
                        "failureThreshold": 1,
                        "initialDelaySeconds": 2,
                    },
                }
            ],
        )
    )
    k8s.wait(
        "a restart by the liveness probe",
        lambda: k8s.container_status("live", "main").get("restartCount", 0) >= 1,
        180,
    )
    events = k8s.kubectl("get", "events", "--field-selector", "involvedObject.name=live").stdout
    assert "Liveness probe failed" in events
    assert "timed out" in events


def test_timed_out_probe_commands_are_killed(k8s: Workloads) -> None:
    k8s.apply(
        k8s.pod(
            "ready",
            [
                {
                    "name": "main",
                    "command": ["sleep", "3600"],
                    "readinessProbe": {
                        "exec": {"command": ["sh", "-c", "sleep 77"]},
                        "timeoutSeconds": 1,
                        "periodSeconds": 2,
                    },
                }
            ],
        )
    )
    k8s.wait_phase("ready", "Running")
    k8s.wait(
        "a timed-out readiness probe",
        lambda: (
            "timed out"
            in k8s.kubectl("get", "events", "--field-selector", "involvedObject.name=ready").stdout
        ),
        120,
    )
    pod = k8s.get("pod", "ready")
    ready = [c for c in pod["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "False"
    # every probe's `sleep 77` was killed when its second ran out: none piles up
    processes = k8s.exec("ready", "ps", "-o", "args").stdout
    assert processes.count("sleep 77") <= 1, processes
