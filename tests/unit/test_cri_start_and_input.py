"""Daemon start-up recovery never aborts the start; CRI names and DNS settings are
checked before anything is made."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from cri_api.v1 import api_pb2

from cri.runtime import convert, pods
from cri.runtime.convert import check_dns, check_log_path, check_name
from cri.runtime.logs import ContainerLog
from cri.runtime.pods import PodOps
from sandbox.cgroups import parent_problem


class FakeState:
    def __init__(self) -> None:
        self.pods: dict[str, Any] = {}


class FakeHost:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def sandbox_ids(self) -> list[str]:
        return list(self.ids)


class Ops(PodOps):
    """The pod operations alone (the container half is not needed here)."""

    def container_status_message(self, *args: Any) -> Any:
        raise NotImplementedError

    async def recover_containers(self, *args: Any) -> None:
        raise NotImplementedError


def make_ops(ids: list[str]) -> tuple[PodOps, list[str]]:
    ops = object.__new__(Ops)
    ops.state = FakeState()  # type: ignore[assignment]
    ops.provider = FakeHost(ids)  # type: ignore[assignment]
    spawned: list[str] = []

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        spawned.append(name)
        coro.close()

    ops.spawn = spawn  # type: ignore[method-assign,assignment]
    return ops, spawned


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_daemon() -> None:
    """A leftover sandbox whose clean-up fails (a CNI DEL that raises) once made every
    start of `clearcri serve` exit with a traceback."""
    ops, spawned = make_ops(["a" * 64, "b" * 64])
    removed: list[str] = []

    async def destroy(pod_id: str) -> None:
        if pod_id.startswith("a"):
            raise RuntimeError("CNI DEL failed: embedded null byte")
        removed.append(pod_id)

    ops._destroy_leftover = destroy  # type: ignore[method-assign]
    asyncio.run(ops.recover())
    assert removed == ["b" * 64]
    assert spawned == ["retry-leftover-sandboxes"]


def test_leftovers_are_retried_until_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pods, "LEFTOVER_RETRY_S", 0)
    ops, _ = make_ops(["a" * 64])
    attempts: list[str] = []

    async def destroy(pod_id: str) -> None:
        attempts.append(pod_id)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        ops.provider.ids.remove(pod_id)  # type: ignore[attr-defined]

    ops._destroy_leftover = destroy  # type: ignore[method-assign]
    asyncio.run(asyncio.wait_for(ops._retry_leftovers(["a" * 64]), 5))
    assert len(attempts) == 3


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "empty"),
        ("a\0b", "control character"),
        ("a\nb", "control character"),
        ("x" * 254, "longer than 253 bytes"),
        ("é" * 127, "longer than 253 bytes"),
        ("a;b", "';'"),
        ("K=V", "'='"),
        ("a/b", "'/'"),
    ],
)
def test_names_that_cannot_travel_are_refused(value: str, problem: str) -> None:
    found = check_name("pod name", value)
    assert found is not None and problem in found


@pytest.mark.parametrize("value", ["web-0", "PodSandbox-for-test.1", "x" * 253, "ünïcode"])
def test_ordinary_names_pass(value: str) -> None:
    assert check_name("pod name", value) is None


@pytest.mark.parametrize(
    ("dns", "problem"),
    [
        (api_pb2.DNSConfig(servers=["10.0.0.10\nnameserver 6.6.6.6"]), "not an IP address"),
        (api_pb2.DNSConfig(servers=["dns.example"]), "not an IP address"),
        (api_pb2.DNSConfig(searches=["svc.cluster.local\noptions x"]), "blank or a control"),
        (api_pb2.DNSConfig(searches=["a b"]), "blank or a control"),
        (api_pb2.DNSConfig(options=["ndots:5\nnameserver 1.1.1.1"]), "blank or a control"),
        (api_pb2.DNSConfig(options=[""]), "empty"),
    ],
)
def test_dns_that_would_inject_resolv_conf_lines_is_refused(
    dns: api_pb2.DNSConfig, problem: str
) -> None:
    found = check_dns(dns)
    assert found is not None and problem in found


def test_ordinary_dns_passes() -> None:
    dns = api_pb2.DNSConfig(
        servers=["10.96.0.10", "fd00::10"],
        searches=["default.svc.cluster.local", "svc.cluster.local"],
        options=["ndots:5", "edns0"],
    )
    assert check_dns(dns) is None


@pytest.mark.parametrize(
    ("log_path", "problem"),
    [
        ("/tmp/x.log", "absolute"),
        ("../../../../tmp/x.log", "leaves"),
        ("c/../../x.log", "leaves"),
        ("c/0.log\0", "NUL"),
    ],
)
def test_log_paths_outside_the_log_directory_are_refused(log_path: str, problem: str) -> None:
    found = check_log_path(log_path)
    assert found is not None and problem in found


def test_kubelets_log_paths_pass() -> None:
    assert check_log_path("main/0.log") is None
    assert check_log_path("") is None


def test_a_log_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "pod" / "main").mkdir(parents=True)
    (tmp_path / "pod" / "main" / "0.log").symlink_to(target)
    with pytest.raises(OSError):
        ContainerLog(tmp_path / "pod" / "main" / "0.log")
    assert not target.exists()


@pytest.mark.parametrize(
    ("resources", "problem"),
    [
        ({"cpu_shares": 2**62}, "cpu_shares"),
        ({"cpu_shares": -1}, "cpu_shares"),
        ({"cpu_period": 10}, "cpu_period"),
        ({"cpu_quota": 5}, "cpu_quota"),
        ({"memory_limit_in_bytes": 1}, "below the 6 MiB"),
        ({"memory_limit_in_bytes": -5}, "negative"),
    ],
)
def test_resources_a_container_cannot_start_with_are_refused(
    resources: dict[str, int], problem: str
) -> None:
    res = api_pb2.LinuxContainerResources()
    for field, value in resources.items():
        setattr(res, field, value)
    found = convert.check_resources(res)
    assert found is not None and problem in found


def test_kubelets_resources_pass() -> None:
    res = api_pb2.LinuxContainerResources(
        cpu_shares=1024, cpu_period=100000, cpu_quota=50000, memory_limit_in_bytes=64 << 20
    )
    assert convert.check_resources(res) is None
    assert convert.check_resources(api_pb2.LinuxContainerResources()) is None


def test_cgroup_parents_outside_the_tree_are_refused() -> None:
    problem = parent_problem("../..", "cgroupfs")
    assert problem is not None and "leaves the cgroup tree" in problem
    assert parent_problem("/kubepods/a\nb", "cgroupfs") is not None
    assert parent_problem("kubepods/x", "systemd") is not None
    assert parent_problem("/kubepods/burstable/pod1", "cgroupfs") is None
    assert parent_problem("kubepods-burstable.slice", "systemd") is None
    assert parent_problem("", "cgroupfs") is None
