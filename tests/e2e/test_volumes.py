"""Volumes as kubelet makes them (emptyDir, ConfigMap, projected service-account token,
hostPath, termination-log files), seen live in the pod VM through its share."""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.workloads import Workloads


def test_emptydir_between_init_and_main_and_termination_message(k8s: Workloads) -> None:
    k8s.apply(
        k8s.pod(
            "shared-dir",
            [
                {
                    "name": "main",
                    "command": ["sh", "-c", "cat /data/msg; sleep 3600"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                },
                {
                    "name": "peer",
                    "command": ["sh", "-c", "sleep 3600"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                },
            ],
            initContainers=[
                {
                    "name": "init",
                    "command": ["sh", "-c", "echo from-init > /data/msg"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            volumes=[{"name": "data", "emptyDir": {}}],
        )
    )
    k8s.wait_ready("shared-dir")
    k8s.wait("main's log", lambda: "from-init" in k8s.logs("shared-dir", "-c", "main"), 60)
    k8s.exec("shared-dir", "sh", "-c", "echo from-main > /data/main", container="main")
    peer = k8s.exec("shared-dir", "cat", "/data/main", container="peer")
    assert peer.stdout == "from-main\n"

    k8s.apply(
        k8s.pod(
            "last-words",
            [{"name": "main", "command": ["sh", "-c", "echo goodbye > /dev/termination-log"]}],
            restartPolicy="Never",
        )
    )
    k8s.wait_phase("last-words", "Succeeded")
    terminated = k8s.container_status("last-words", "main")["state"]["terminated"]
    assert terminated.get("message") == "goodbye\n", terminated


def test_configmap_updates_and_token_reach_the_running_container(k8s: Workloads) -> None:
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": k8s.namespace},
        "data": {"mode": "v1"},
    }
    k8s.apply(configmap)
    k8s.apply(
        k8s.pod(
            "reader",
            [
                {
                    "name": "main",
                    "command": ["sleep", "3600"],
                    "volumeMounts": [{"name": "settings", "mountPath": "/etc/settings"}],
                }
            ],
            volumes=[{"name": "settings", "configMap": {"name": "settings"}}],
            automountServiceAccountToken=True,
        )
    )
    k8s.wait_ready("reader")
    assert k8s.exec("reader", "cat", "/etc/settings/mode").stdout == "v1"
    token = k8s.exec("reader", "cat", "/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert token.stdout.count(".") == 2  # a JWT, read through the share
    refused = k8s.exec("reader", "sh", "-c", "echo x > /etc/settings/mode", check=False)
    assert refused.returncode != 0
    configmap["data"] = {"mode": "v2"}
    k8s.apply(configmap)
    started = time.monotonic()
    # kubelet rewrites the volume on its next sync (up to a minute and its cache TTL);
    # once the host has v2 the container reads it at once
    k8s.wait(
        "the new ConfigMap value in the container",
        lambda: k8s.exec("reader", "cat", "/etc/settings/mode").stdout == "v2",
        180,
    )
    assert time.monotonic() - started < 180


def test_hostpath_is_written_both_ways(k8s: Workloads, tmp_path: Path) -> None:
    host_dir = tmp_path / "hostpath"
    host_dir.mkdir()
    host_dir.chmod(0o777)
    (host_dir / "from-host").write_text("host\n")
    k8s.apply(
        k8s.pod(
            "host-dir",
            [
                {
                    "name": "main",
                    "command": ["sleep", "3600"],
                    "volumeMounts": [{"name": "h", "mountPath": "/h"}],
                }
            ],
            volumes=[{"name": "h", "hostPath": {"path": str(host_dir), "type": "Directory"}}],
        )
    )
    k8s.wait_ready("host-dir")
    assert k8s.exec("host-dir", "cat", "/h/from-host").stdout == "host\n"
    k8s.exec("host-dir", "sh", "-c", "echo pod > /h/from-pod")
    assert (host_dir / "from-pod").read_text() == "pod\n"
    (host_dir / "from-host").write_text("changed\n")
    assert k8s.exec("host-dir", "cat", "/h/from-host").stdout == "changed\n"
    k8s.kubectl("delete", "pod", "host-dir", "--wait=true", timeout=200)
    assert (host_dir / "from-pod").read_text() == "pod\n"
