"""What the e2e scenarios do with kubectl: pods from manifests, waits, exec, logs."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tests.e2e.cluster import Cluster, ClusterError


class Workloads:
    """Pods of one test, in a namespace of its own."""

    def __init__(self, cluster: Cluster, namespace: str, image: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.image = image

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.namespace, *args, **kwargs)

    def create_namespace(self) -> None:
        self.cluster.kubectl("create", "namespace", self.namespace)
        self.wait(
            "service account default",
            lambda: self.kubectl("get", "sa", "default", check=False).returncode == 0,
            60,
        )

    def delete_namespace(self) -> None:
        self.cluster.kubectl(
            "delete",
            "namespace",
            self.namespace,
            "--wait=true",
            "--timeout=180s",
            check=False,
            timeout=200,
        )

    def apply(self, *objects: dict[str, Any]) -> None:
        items = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        self.kubectl("apply", "-f", "-", input=json.dumps(items))

    def pod(
        self,
        name: str,
        containers: list[dict[str, Any]],
        **spec: Any,
    ) -> dict[str, Any]:
        """A pod manifest; containers get the suite's image unless they name one."""
        for container in containers:
            container.setdefault("image", self.image)
            container.setdefault("imagePullPolicy", "IfNotPresent")
        for container in spec.get("initContainers", []):
            container.setdefault("image", self.image)
            container.setdefault("imagePullPolicy", "IfNotPresent")
        spec.setdefault("terminationGracePeriodSeconds", 5)
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"containers": containers, **spec},
        }

    def get(self, kind: str, name: str) -> Any:
        return self.cluster.kubectl_json("-n", self.namespace, "get", kind, name)

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 120) -> None:
        """Until ``check`` is true. A check that raises ClusterError is asked again: what
        it reads may not be reported yet (a pod's container statuses right after the pod
        is created), or the API may be briefly unavailable."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except ClusterError as exc:
                last = f" (last: {exc})"
            time.sleep(1)
        raise ClusterError(f"{what}: not reached within {timeout:.0f} s{last}\n{self.describe()}")

    def describe(self) -> str:
        result = self.kubectl("describe", "pods", check=False)
        return result.stdout[-6000:]

    def wait_ready(self, name: str, timeout: float = 180) -> dict[str, Any]:
        self.kubectl(
            "wait",
            f"pod/{name}",
            "--for=condition=Ready",
            f"--timeout={timeout:.0f}s",
            check=False,
            timeout=timeout + 20,
        )
        pod = self.get("pod", name)
        ready = [c for c in pod["status"].get("conditions", []) if c["type"] == "Ready"]
        if not ready or ready[0]["status"] != "True":
            raise ClusterError(f"pod {name} is not Ready:\n{self.describe()}")
        return dict(pod)

    def wait_phase(self, name: str, phase: str, timeout: float = 180) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def reached() -> bool:
            found.update(self.get("pod", name))
            return bool(found.get("status", {}).get("phase") == phase)

        self.wait(f"pod {name} phase {phase}", reached, timeout)
        return found

    def container_status(self, pod: str, container: str) -> dict[str, Any]:
        status = self.get("pod", pod)["status"]
        for entry in status.get("containerStatuses", []) + status.get("initContainerStatuses", []):
            if entry["name"] == container:
                return dict(entry)
        raise ClusterError(f"pod {pod} has no status for container {container}")

    def exec(
        self,
        pod: str,
        *command: str,
        container: str = "",
        stdin: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["exec"]
        if stdin is not None:
            args.append("-i")
        args.append(pod)
        if container:
            args += ["-c", container]
        return self.kubectl(*args, "--", *command, input=stdin, check=check)

    def logs(self, pod: str, *args: str) -> str:
        """The container's log ("" while it has none: not started yet)."""
        return self.kubectl("logs", pod, *args, check=False).stdout
