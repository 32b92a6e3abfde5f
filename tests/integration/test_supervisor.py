"""A node without systemd, for real: `clearcri node install` into a temporary prefix
leaves the daemon under `clearcri supervise` (its own cgroup, restarts), a pod VM runs,
`node upgrade` replaces supervisor and daemon while the pod's QEMU keeps running and is
re-adopted, `node uninstall` leaves no process, pidfile or cgroup behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from deploy.node_install import SUPERVISOR_PIDFILE, InstallManifest
from deploy.supervisor import (
    cgroup_name,
    daemon_pid,
    interpreter,
    supervisor_pid,
    wait_gone,
)
from sandbox.cgroups import cgroups_of, hierarchies
from sandbox.procfs import pid_alive
from tests.integration.conftest import qemu_processes
from tests.integration.installed import (
    CANNOT_BUILD_WHEELS,
    can_build_wheels,
    cri_version,
    daemon_config,
    frozen_source,
    install_args,
    node,
    pod_state,
    remove_pods,
    run_pod,
    socket_of,
    temporary_prefix,
    vm_pids,
    wait_serving,
)

pytestmark = [
    pytest.mark.skipif(not can_build_wheels(), reason=CANNOT_BUILD_WHEELS),
    pytest.mark.vm,
]


def wait_for(what: Callable[[], object], timeout: float = 60.0, why: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out: {why}"
        time.sleep(0.1)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def clean_up(prefix: Path) -> None:
    """Whatever a failed test left of the install under ``prefix``: pod VMs (through the
    daemon while it answers, else by their PIDs), supervisor, daemon, cgroup."""
    socket = socket_of(prefix)
    if vm_pids(prefix):
        with contextlib.suppress(grpc.RpcError, AssertionError, OSError):
            wait_serving(socket, timeout=30)
            asyncio.run(remove_pods(socket))
    pidfile = prefix / SUPERVISOR_PIDFILE
    sup = supervisor_pid(pidfile)
    if sup is not None:
        daemon = daemon_pid(sup)
        os.kill(sup, signal.SIGTERM)
        if not wait_gone([sup], 60):
            _kill(sup)
        if daemon is not None and not wait_gone([daemon], 10):
            _kill(daemon)
    for pid in vm_pids(prefix).values():
        _kill(pid)
    for pid, cmd, cwd in qemu_processes():
        if str(prefix).encode() in cmd or cwd.startswith(f"{prefix}/"):
            _kill(pid)
    name = cgroup_name(prefix)
    for root in hierarchies():
        path = root / name
        if path.is_dir():
            with contextlib.suppress(OSError):
                for pid_text in (path / "cgroup.procs").read_text().split():
                    _kill(int(pid_text))
            deadline = time.monotonic() + 10
            while path.is_dir():
                try:
                    path.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return frozen_source(tmp_path_factory.mktemp("source"))


@pytest.fixture
def prefix() -> Iterator[Path]:
    with temporary_prefix() as path:
        try:
            yield path
        finally:
            clean_up(path)


def in_own_cgroup(pid: int, name: str) -> bool:
    """Whether ``pid`` is in ``/<name>`` of every mounted hierarchy."""
    roots = hierarchies()
    return bool(roots) and all(
        str(pid) in (root / name / "cgroup.procs").read_text().split() for root in roots
    )


def test_supervised_daemon_without_systemd(prefix: Path, source: Path, tmp_path: Path) -> None:
    from cri_api.v1 import api_pb2

    config = tmp_path / "config.toml"
    config.write_text(daemon_config())
    pidfile = prefix / SUPERVISOR_PIDFILE
    socket = socket_of(prefix)
    releases = prefix / "opt/clearcri/releases"
    name = cgroup_name(prefix)

    out = node("install", *install_args(prefix, source, "--config-from", str(config), start=True))
    assert "started the daemon under `clearcri supervise`" in out
    manifest = InstallManifest.load(prefix)
    assert manifest is not None and manifest.supervisor_enabled
    sup = supervisor_pid(pidfile)
    assert sup is not None
    assert interpreter(sup).startswith(f"{releases / manifest.release}/")

    # Its own cgroup in every hierarchy, not the one of the process that installed it.
    assert in_own_cgroup(sup, name)
    assert set(cgroups_of(sup)).isdisjoint(set(cgroups_of(os.getpid())) - {"/"})
    assert f"/{name}" in cgroups_of(sup)

    assert wait_serving(socket)
    daemon = daemon_pid(sup)
    assert daemon is not None and in_own_cgroup(daemon, name)
    assert interpreter(daemon).startswith(f"{releases / manifest.release}/")

    # Installed again: the supervisor that runs is kept, not a second one started.
    again = node("install", *install_args(prefix, source, "--config-from", str(config), start=True))
    assert f"the daemon runs under its supervisor (pid {sup})" in again
    assert supervisor_pid(pidfile) == sup and daemon_pid(sup) == daemon

    # The daemon is killed: the supervisor starts another.
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: daemon_pid(sup) not in (None, daemon), 30, "a new daemon")
    restarted = daemon_pid(sup)
    assert restarted is not None and not pid_alive(daemon)
    assert wait_serving(socket)

    pod_id = asyncio.run(run_pod(socket, "supervised"))
    vm_pid = vm_pids(prefix)[pod_id]
    assert pid_alive(vm_pid)

    # A new release: the supervisor of the old one stops (its daemon gets SIGTERM alone),
    # one of the new release starts a daemon of the new release, which re-adopts the pod.
    with (source / "cri/__init__.py").open("a") as f:
        f.write("# next release\n")
    out = node("upgrade", *install_args(prefix, source, start=True))
    second = InstallManifest.load(prefix)
    assert second is not None and second.release != manifest.release
    assert f"stopping the supervisor (pid {sup}) of the previous release" in out
    assert not pid_alive(sup) and not pid_alive(restarted)
    new_sup = supervisor_pid(pidfile)
    assert new_sup is not None and new_sup != sup
    assert interpreter(new_sup).startswith(f"{releases / second.release}/")
    assert in_own_cgroup(new_sup, name)
    assert wait_serving(socket)
    new_daemon = daemon_pid(new_sup)
    assert new_daemon is not None
    assert interpreter(new_daemon).startswith(f"{releases / second.release}/")
    assert asyncio.run(pod_state(socket, pod_id)) == api_pb2.SANDBOX_READY
    assert vm_pids(prefix)[pod_id] == vm_pid and pid_alive(vm_pid)

    asyncio.run(remove_pods(socket))
    assert not pid_alive(vm_pid)

    out = node("uninstall", "--prefix", str(prefix))
    assert f"stopped the supervisor (pid {new_sup})" in out
    assert not pid_alive(new_sup) and not pid_alive(new_daemon)
    assert not pidfile.exists() and supervisor_pid(pidfile) is None
    assert not any((root / name).exists() for root in hierarchies())
    with pytest.raises(grpc.RpcError):
        cri_version(socket, timeout=1)
    assert not (prefix / "opt").exists()
    log = (prefix / "var/log/clearcri/daemon.log").read_text()
    assert "was killed by SIGKILL" in log and "stopping (SIGTERM)" in log
