"""Label a node ``clearcri.io/runtime=true`` while clearcri serves its kubelet.

The RuntimeClass ``clearcri`` schedules pods only onto nodes with this label, so the
label must mean "a pod placed here really runs in a clearcri VM": the daemon answers on
its socket **and** the node's kubelet talks to it (kubelet reports the runtime it uses
in ``status.nodeInfo.containerRuntimeVersion`` as ``clearcri://<version>``). A node whose
kubelet still talks to containerd or CRI-O is not labelled, and loses the label if it
had it.

The Helm chart's DaemonSet runs ``python -m deploy.node_label watch`` after the node
install, ``probe`` as its readiness probe and ``unlabel`` in its preStop hook. It needs
``get`` and ``patch`` on nodes, nothing else (the chart's ClusterRole).

The ``kubernetes`` client is imported only when talking to a real API server
(``pip install 'clearcri[kubernetes]'``); everything else takes any object with
``read_node(name)`` and ``patch_node(name, body)``, as ``CoreV1Api`` has.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Protocol

LABEL = "clearcri.io/runtime"
LABEL_VALUE = "true"
RUNTIME_NAME = "clearcri"
DEFAULT_SOCKET = Path("/run/clearcri/clearcri.sock")

log = logging.getLogger("cleardeploy.node_label")


class NodeApi(Protocol):
    """The two calls of ``kubernetes.client.CoreV1Api`` the labeler uses."""

    def read_node(self, name: str) -> Any: ...

    def patch_node(self, name: str, body: Any) -> Any: ...


def _labels(node: Any) -> dict[str, str]:
    labels = getattr(getattr(node, "metadata", None), "labels", None)
    return dict(labels or {})


def kubelet_runtime(node: Any) -> str:
    """``status.nodeInfo.containerRuntimeVersion``: e.g. ``clearcri://0.1.0``."""
    info = getattr(getattr(node, "status", None), "node_info", None)
    return str(getattr(info, "container_runtime_version", "") or "")


def kubelet_uses(node: Any, runtime: str) -> bool:
    return kubelet_runtime(node).startswith(f"{runtime}://")


def label_node(api: NodeApi, name: str, *, require_runtime: str = RUNTIME_NAME) -> bool:
    """Make the label say whether this node runs pods with clearcri; True if labelled.

    With ``require_runtime`` empty, the label is set without looking at kubelet.
    Patches only when the label has to change.
    """
    node = api.read_node(name)
    labelled = _labels(node).get(LABEL) == LABEL_VALUE
    if require_runtime and not kubelet_uses(node, require_runtime):
        runtime = kubelet_runtime(node) or "an unknown runtime"
        log.warning(
            "kubelet on node %s talks to %s, not %s: not labelling it %s=%s; point kubelet's "
            "--container-runtime-endpoint at unix://%s",
            name,
            runtime,
            require_runtime,
            LABEL,
            LABEL_VALUE,
            DEFAULT_SOCKET,
        )
        if labelled:
            _patch(api, name, None)
        return False
    if not labelled:
        _patch(api, name, LABEL_VALUE)
    return True


def unlabel_node(api: NodeApi, name: str) -> bool:
    """Remove the label; True if it was there."""
    if LABEL not in _labels(api.read_node(name)):
        return False
    _patch(api, name, None)
    return True


class NodeLister(NodeApi, Protocol):
    """And listing nodes, for the chart's uninstall hook."""

    def list_node(self, *, label_selector: str) -> Any: ...


def unlabel_all(api: NodeLister) -> list[str]:
    """Remove the label from every node that has it (the chart's pre-delete hook: once
    the release's RBAC is deleted, the DaemonSet pods' preStop hooks no longer may)."""
    names = [node.metadata.name for node in api.list_node(label_selector=LABEL).items]
    for name in names:
        _patch(api, name, None)
    return names


def _patch(api: NodeApi, name: str, value: str | None) -> None:
    # A strategic merge patch: null deletes the key, other labels are left alone.
    api.patch_node(name, {"metadata": {"labels": {LABEL: value}}})
    log.info("node %s: %s", name, f"labelled {LABEL}={value}" if value else f"removed {LABEL}")


def cri_ready(socket: Path, timeout: float = 3.0) -> bool:
    """Whether the daemon answers a CRI Version call on ``socket``."""
    if not socket.is_socket():
        return False
    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            stub: Any = api_pb2_grpc.RuntimeServiceStub  # generated, untyped
            stub(channel).Version(api_pb2.VersionRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return True


def in_cluster_api() -> NodeApi:
    """A CoreV1Api with the pod's service account credentials."""
    try:
        # Imported by name: the client is an optional extra and only partly typed.
        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
    except ImportError as exc:
        raise SystemExit(
            "the kubernetes client is not installed: pip install 'clearcri[kubernetes]'"
        ) from exc
    config.load_incluster_config()
    api: NodeApi = client.CoreV1Api()
    return api


def watch(
    api: NodeApi,
    name: str,
    socket: Path,
    *,
    interval: float,
    require_runtime: str,
    stop: threading.Event,
    ready: Any = cri_ready,
) -> None:
    """Keep the label in step with the daemon until ``stop`` is set."""
    while not stop.is_set():
        try:
            if ready(socket):
                label_node(api, name, require_runtime=require_runtime)
            else:
                log.info("clearcri does not answer on %s yet", socket)
                unlabel_node(api, name)
        except Exception as exc:  # the API server may be briefly unreachable: retry
            log.warning("node %s: cannot update the label: %s", name, exc)
        stop.wait(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.node_label",
        description=f"keep the {LABEL}={LABEL_VALUE} node label in step with clearcri",
    )
    parser.add_argument(
        "command",
        choices=["watch", "label", "unlabel", "unlabel-all", "probe"],
        help="watch: label while ready (loop); label/unlabel once; unlabel-all: every "
        "node; probe: exit 0 when ready",
    )
    parser.add_argument("--node", default=os.environ.get("NODE_NAME", ""), help="node name")
    parser.add_argument("--socket", default=str(DEFAULT_SOCKET), help="the CRI socket")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between checks")
    parser.add_argument(
        "--require-runtime",
        default=RUNTIME_NAME,
        help="label only when kubelet reports this runtime ('' to skip the check)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    socket = Path(args.socket)
    if args.command == "probe":
        return 0 if cri_ready(socket) else 1
    if args.command == "unlabel-all":
        lister: NodeLister = in_cluster_api()  # type: ignore[assignment]
        unlabel_all(lister)
        return 0
    if not args.node:
        parser.error("--node (or NODE_NAME) is required")
    api = in_cluster_api()
    if args.command == "label":
        return 0 if label_node(api, args.node, require_runtime=args.require_runtime) else 1
    if args.command == "unlabel":
        unlabel_node(api, args.node)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    watch(
        api,
        args.node,
        socket,
        interval=args.interval,
        require_runtime=args.require_runtime,
        stop=stop,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
