"""Pods started by a real kubelet: `kubectl apply` of 10 pods to all Ready, on clearcri
and on Debian's containerd + runc, in the same run.

    PYTHONPATH=. python3 tests/bench/bench_kubelet.py [--pods 10] [--rounds 5]

Needs what `make e2e` builds, plus Debian's containerd and runc (`apt-get install
containerd runc`) and gcc (the baseline's pause image is built from
tests/conformance/src).

Each runtime is the node of its own single-node cluster (tests/e2e/cluster.py: etcd,
kube-apiserver, controller manager, scheduler and kubelet v1.34.4), one after the other,
with the same offline registry, images and CNI bridge. A warm-up round first (the image
pull, clearcri's VM template), then ``--rounds`` rounds: apply the pods in one request,
wait until every one is Ready, delete them and wait until they are gone. Prints the
median, min and max seconds per runtime and the clearcri / containerd ratio. Nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sandbox.mounts import remove_tree
from tests.conformance.images import DEFAULT_CACHE, Image, Inputs, pause_layer, push_all
from tests.e2e.cluster import Cluster, ClusterConfig
from tests.registry import RegistryServer, busybox_layer, push_image

PAUSE = "pause:3.10"


def pods_manifest(count: int, image: str, namespace: str) -> str:
    items = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"bench-{i}", "namespace": namespace, "labels": {"bench": "1"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "3600"],
                    }
                ],
            },
        }
        for i in range(count)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def all_ready(cluster: Cluster, namespace: str, count: int) -> bool:
    pods = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", "bench=1")["items"]
    ready = 0
    for pod in pods:
        for condition in pod.get("status", {}).get("conditions", []):
            if condition["type"] == "Ready" and condition["status"] == "True":
                ready += 1
    return ready == count


def one_round(cluster: Cluster, image: str, count: int) -> float:
    namespace = "default"
    manifest = pods_manifest(count, image, namespace)
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=manifest)
    while not all_ready(cluster, namespace, count):
        if time.monotonic() - started > 600:
            raise RuntimeError(f"{count} pods not Ready within 600 s")
        time.sleep(0.2)
    seconds = time.monotonic() - started
    cluster.kubectl(
        "-n",
        namespace,
        "delete",
        "pods",
        "-l",
        "bench=1",
        "--wait=true",
        "--timeout=300s",
        timeout=320,
    )
    return seconds


def measure(
    runtime: str, registry: RegistryServer, image: str, args: argparse.Namespace, work: Path
) -> list[float]:
    cluster = Cluster(
        ClusterConfig(
            work=work / runtime,
            runtime=runtime,
            registry=registry.host,
            mirrored=("registry.k8s.io",),
        )
    )
    cluster.start()
    try:
        print(f"{runtime}: warm-up round {one_round(cluster, image, args.pods):.2f} s", flush=True)
        times = []
        for i in range(args.rounds):
            times.append(one_round(cluster, image, args.pods))
            print(f"{runtime}: round {i + 1}: {times[-1]:.2f} s", flush=True)
        return times
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="clearcri-bench-kubelet-"))
    registry = RegistryServer(work / "registry")
    try:
        asyncio.run(push_image(registry.host, "bench/busybox", ["1"], [busybox_layer()]))
        inputs = Inputs(DEFAULT_CACHE)
        inputs.prepare()
        pause = Image([PAUSE], [pause_layer(inputs)], {"Entrypoint": ["/pause"]})
        push_all(registry.host, [pause])
        image = f"{registry.host}/bench/busybox:1"
        results = {
            runtime: measure(runtime, registry, image, args, work)
            for runtime in ("clearcri", "containerd")
        }
    finally:
        registry.stop()
        remove_tree(work)
    print(f"\n`kubectl apply` of {args.pods} pods to all Ready, {args.rounds} rounds, seconds")
    for runtime, times in results.items():
        print(
            f"  {runtime:<11} median {statistics.median(times):6.2f}  "
            f"min {min(times):6.2f}  max {max(times):6.2f}"
        )
    ratio = statistics.median(results["clearcri"]) / statistics.median(results["containerd"])
    print(f"  clearcri / containerd: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
