"""Shared fixtures for tests that boot real pod VMs (TCG where KVM cannot run guests)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cri.images.rootfs import build_rootfs_image, make_busybox_tree
from sandbox.api import RootfsImage, SandboxSpec
from sandbox.guest import DEFAULT_GUEST_DIR, GuestAssets, locate_guest
from sandbox.lifecycle import PodSandbox
from sandbox.mounts import remove_tree
from sandbox.node import SandboxConfig, SandboxHost
from sandbox.vmpod import create_vm_pod

GUEST_DIR = Path(os.environ.get("CLEARCRI_GUEST_DIR", str(DEFAULT_GUEST_DIR)))
# VM templates are shared by every test of a run (built once per machine shape).
TEMPLATE_DIR = Path(f"/dev/shm/clearcri-test-templates-{os.getpid()}")


@pytest.fixture(scope="session", autouse=True)
def _template_dir() -> Iterator[Path]:
    # a test run that was killed leaves its templates behind: drop those
    for stale in TEMPLATE_DIR.parent.glob("clearcri-test-templates-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    TEMPLATE_DIR.mkdir(exist_ok=True)
    yield TEMPLATE_DIR
    shutil.rmtree(TEMPLATE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    # The guest is built by `make test` before pytest runs; a missing guest is a failure.
    return locate_guest(GUEST_DIR)


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> RootfsImage:
    work = tmp_path_factory.mktemp("busybox")
    tree = make_busybox_tree(work / "tree")
    return build_rootfs_image(tree, work / "busybox.erofs", image_id="busybox")


@pytest.fixture
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Sockets need short paths: keep the run root directly under /tmp.
    path = Path(f"/tmp/cc-test-{os.getpid()}-{os.urandom(3).hex()}")
    path.mkdir()
    yield path
    remove_tree(path)  # detaches any share binds a failed test left first


@pytest.fixture
def sandbox_host(guest_assets: GuestAssets, run_root: Path) -> SandboxHost:
    config = SandboxConfig(
        run_root=run_root / "sandboxes",
        guest_dir=GUEST_DIR,
        accel="auto",
        template_dir=TEMPLATE_DIR,
    )
    return SandboxHost(config, guest_assets)


@pytest.fixture
async def pod(sandbox_host: SandboxHost) -> AsyncIterator[PodSandbox]:
    sandbox = create_vm_pod(sandbox_host, SandboxSpec("pod-" + os.urandom(4).hex()))
    try:
        await sandbox.start()
        yield sandbox
    finally:
        await sandbox.destroy()


def qemu_processes() -> list[tuple[int, bytes, str]]:
    """(pid, command line, working directory) of every running qemu."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd") if b"qemu-system" in cmd else ""
        except OSError:
            continue
        if b"qemu-system" in cmd:
            found.append((int(entry.name), cmd, cwd))
    return found
