"""The node as the control plane sees it: registered on clearcri, with its handlers."""

from __future__ import annotations

from tests.e2e.cluster import Cluster


def test_node_reports_clearcri_runtime_and_handlers(cluster: Cluster) -> None:
    node = cluster.kubectl_json("get", "node", cluster.config.node_name)
    info = node["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("clearcri://")
    assert info["kubeletVersion"] == "v1.34.4"
    handlers = {h["name"] for h in node["status"].get("runtimeHandlers", [])}
    assert {"clearcri", "host"} <= handlers
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == cluster.node_ip
