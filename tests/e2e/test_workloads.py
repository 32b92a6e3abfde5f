"""Ordinary workloads under a real kubelet: pods, logs, exec, Deployments, Jobs, probes."""

from __future__ import annotations

from tests.e2e.workloads import Workloads


def test_pod_runs_in_a_vm_and_logs_and_exec_work(k8s: Workloads) -> None:
    k8s.apply(
        k8s.pod(
            "hello",
            [{"name": "main", "command": ["sh", "-c", "echo hello from $(hostname); sleep 3600"]}],
        )
    )
    pod = k8s.wait_ready("hello")
    assert pod["status"]["podIP"]
    k8s.wait("log line", lambda: "hello from hello" in k8s.logs("hello"), 30)
    # the container sees the guest kernel, not the host's
    assert k8s.exec("hello", "cat", "/proc/1/comm").stdout.strip() in ("sh", "sleep")
    uname = k8s.exec("hello", "uname", "-r").stdout.strip()
    assert uname
    out = k8s.exec("hello", "sh", "-c", "cat; echo done", stdin="x" * 100_000).stdout
    assert out.endswith("done\n") and out.count("x") == 100_000


def test_deployment_rolls_out(k8s: Workloads) -> None:
    k8s.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": k8s.pod(
                        "x",
                        [
                            {
                                "name": "httpd",
                                "command": ["httpd", "-f", "-p", "8080", "-h", "/etc"],
                                "readinessProbe": {
                                    "httpGet": {"path": "/hostname", "port": 8080},
                                    "periodSeconds": 2,
                                },
                            }
                        ],
                    )["spec"],
                },
            },
        }
    )
    k8s.kubectl("rollout", "status", "deployment/web", "--timeout=240s", timeout=260)
    pods = k8s.cluster.kubectl_json("-n", k8s.namespace, "get", "pods", "-l", "app=web")
    assert len(pods["items"]) == 2
    assert all(p["status"]["phase"] == "Running" for p in pods["items"])


def test_job_completes(k8s: Workloads) -> None:
    k8s.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": k8s.pod(
                        "x",
                        [{"name": "work", "command": ["sh", "-c", "echo job-done"]}],
                        restartPolicy="Never",
                    )["spec"]
                },
            },
        }
    )
    k8s.kubectl("wait", "job/once", "--for=condition=Complete", "--timeout=180s", timeout=200)
    assert "job-done" in k8s.kubectl("logs", "job/once").stdout
