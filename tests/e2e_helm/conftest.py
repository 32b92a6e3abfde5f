"""Fixtures of the Helm suite: a registry with the node image, a cluster whose first node
runs on containerd, the chart installed with Helm's own library.

The suite runs only when asked (``make e2e-helm``, or ``CLEARCRI_E2E_HELM=1``): it
builds the node image with buildah, needs the Kubernetes binaries of
scripts/build-kubernetes.sh, and takes many minutes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.mounts import remove_tree
from tests.conformance.images import DEFAULT_CACHE, Image, Inputs, pause_layer, push_all
from tests.e2e.cluster import Cluster
from tests.e2e_helm.nodes import E2E_IMAGE_PATH, HelmSuite, NodeImages, first_node
from tests.registry import RegistryServer, busybox_layer, push_image


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CLEARCRI_E2E_HELM") == "1":
        return
    skip = pytest.mark.skip(reason="the Helm suite runs with `make e2e-helm` (CLEARCRI_E2E_HELM=1)")
    for item in items:
        if "tests/e2e_helm/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryServer]:
    work = Path(tempfile.mkdtemp(prefix="clearcri-helm-registry-"))
    server = RegistryServer(work)
    try:
        asyncio.run(push_image(server.host, E2E_IMAGE_PATH, ["1"], [busybox_layer()]))
        inputs = Inputs(DEFAULT_CACHE)
        inputs.prepare()
        # registry.k8s.io is mirrored to this registry: the sandbox images of containerd
        # and of kubelet 1.34
        pause = Image(
            ["pause:3.10", "pause:3.10.1"], [pause_layer(inputs)], {"Entrypoint": ["/pause"]}
        )
        push_all(server.host, [pause])
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def node_images(registry: RegistryServer) -> NodeImages:
    return NodeImages.build(registry.host)


@pytest.fixture(scope="session")
def suite(registry: RegistryServer, node_images: NodeImages) -> Iterator[HelmSuite]:
    kept = os.environ.get("CLEARCRI_E2E_HELM_WORK")
    work = Path(kept or tempfile.mkdtemp(prefix="clearcri-helm-"))
    cluster: Cluster = first_node(work, registry.host)
    cluster.start()
    run = HelmSuite(cluster, registry.host, node_images, work)
    try:
        yield run
    finally:
        run.stop()
        if not kept:
            # the nodes' roots hold installed runtimes and images: ~4 GB a run
            remove_tree(work)
