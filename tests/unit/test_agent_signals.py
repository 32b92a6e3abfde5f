"""Signalling every process of a container without crun: the agent reads the
container's cgroups (v2 directory, or each v1 hierarchy) as ``crun kill --all`` does;
SIGKILL on cgroup v2 is one write to ``cgroup.kill``. Real processes, a fake cgroup
tree (the test cannot make cgroups on this host)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.guest.containers import Container, ContainerManager
from agent.guest.settings import Settings
from agent.protocol import ContainerSpec


def manager(cgroup_mode: str, cgroup_root: Path) -> ContainerManager:
    # no Spawner or Reaper: a reaper thread would take the test's children
    made = object.__new__(ContainerManager)
    made.settings = Settings(cgroup_mode=cgroup_mode, cgroup_root=str(cgroup_root))
    return made


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_v2_signal_reaches_every_process_below_the_container_cgroup(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    cgroup = tmp_path / "pod" / "c1"
    (cgroup / "sub").mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text(f"{sleepers[0].pid}\n{sleepers[1].pid}\n")
    (cgroup / "sub" / "cgroup.procs").write_text(f"{sleepers[2].pid}\n")
    container = Container("c1", ContainerSpec(args=["sleep"]), 1, str(tmp_path / "bundle"))
    container.cgroup_dir = str(cgroup)
    assert manager("v2", tmp_path)._signal_cgroup(container, signal.SIGTERM)
    for proc in sleepers:
        assert proc.wait(10) == -signal.SIGTERM


def test_v2_sigkill_is_one_write_to_cgroup_kill(tmp_path: Path) -> None:
    cgroup = tmp_path / "c1"
    cgroup.mkdir()
    (cgroup / "cgroup.kill").write_text("")
    container = Container("c1", ContainerSpec(args=["sleep"]), 1, str(tmp_path / "bundle"))
    container.cgroup_dir = str(cgroup)
    assert manager("v2", tmp_path)._signal_cgroup(container, signal.SIGKILL)
    assert (cgroup / "cgroup.kill").read_text() == "1"


def test_v1_signal_reads_one_hierarchy(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    for controller in ("memory", "pids"):
        (tmp_path / controller / "pod" / "c1").mkdir(parents=True)
        pids = "".join(f"{p.pid}\n" for p in sleepers)
        (tmp_path / controller / "pod" / "c1" / "cgroup.procs").write_text(pids)
    container = Container("c1", ContainerSpec(args=["sleep"]), 1, str(tmp_path / "bundle"))
    container.cgroup_path = "/pod/c1"
    assert manager("v1", tmp_path)._signal_cgroup(container, signal.SIGKILL)
    for proc in sleepers:
        assert proc.wait(10) == -signal.SIGKILL


def test_no_cgroup_to_read_leaves_it_to_crun(tmp_path: Path) -> None:
    container = Container("c1", ContainerSpec(args=["sleep"]), 1, str(tmp_path / "bundle"))
    container.cgroup_dir = str(tmp_path / "gone")
    assert not manager("v2", tmp_path)._signal_cgroup(container, signal.SIGKILL)
    container.cgroup_dir = None
    assert not manager("v1", tmp_path)._signal_cgroup(container, signal.SIGKILL)
    assert os.path.isdir(tmp_path)
