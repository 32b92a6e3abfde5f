"""Fixtures of the real-node e2e suite: one registry, one cluster for the whole run.

The suite runs only when asked (``make e2e``, or ``CLEARCRI_E2E=1``): it needs the
Kubernetes binaries from scripts/build-kubernetes.sh and takes minutes.
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
from tests.e2e.cluster import Cluster, ClusterConfig
from tests.e2e.workloads import Workloads
from tests.registry import RegistryServer, busybox_layer, push_image

E2E_IMAGE_PATH = "e2e/busybox"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CLEARCRI_E2E") == "1":
        return
    skip = pytest.mark.skip(reason="the real-node suite runs with `make e2e` (CLEARCRI_E2E=1)")
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e_registry() -> Iterator[RegistryServer]:
    work = Path(tempfile.mkdtemp(prefix="clearcri-e2e-registry-"))
    server = RegistryServer(work)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_image(e2e_registry: RegistryServer) -> str:
    """A busybox image (with ``tar`` for kubectl cp) in the suite's registry."""
    asyncio.run(push_image(e2e_registry.host, E2E_IMAGE_PATH, ["1"], [busybox_layer()]))
    return f"{e2e_registry.host}/{E2E_IMAGE_PATH}:1"


@pytest.fixture(scope="session")
def cluster(e2e_registry: RegistryServer, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    kept = os.environ.get("CLEARCRI_E2E_WORK")
    work = Path(kept or tempfile.mkdtemp(prefix="clearcri-e2e-"))
    node = Cluster(ClusterConfig(work=work))
    node.start()
    try:
        yield node
    finally:
        node.stop()
        if kept or request.session.testsfailed:
            print(f"\nthe e2e work directory (logs, etcd data) is kept: {work}")
        else:
            remove_tree(work)


@pytest.fixture
def k8s(cluster: Cluster, e2e_image: str, request: pytest.FixtureRequest) -> Iterator[Workloads]:
    """A namespace of the test's own, deleted afterwards."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    workloads = Workloads(cluster, name, e2e_image)
    workloads.create_namespace()
    try:
        yield workloads
    finally:
        workloads.delete_namespace()
