"""A template's RAM file has no holes, so clones' faults never add pages to it."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.template import fill_holes


def test_fill_holes_allocates_every_page_of_a_sparse_tmpfs_file() -> None:
    path = Path(f"/dev/shm/clearcri-test-ram-{os.getpid()}")
    try:
        with path.open("wb") as f:
            f.truncate(8 << 20)
            f.seek(4096)
            f.write(b"guest data")
        assert path.stat().st_blocks * 512 < 1 << 20  # sparse: one page written
        fill_holes(path)
        assert path.stat().st_blocks * 512 >= 8 << 20
        data = path.read_bytes()
        assert data[4096:4106] == b"guest data"  # what the guest wrote is kept
        assert data[:4096] == bytes(4096)
    finally:
        path.unlink(missing_ok=True)


def test_abandoned_template_builds_lose_their_vm(tmp_path: Path) -> None:
    """A daemon that died while building a template left its qemu running: the next
    store kills it with the half-built directory (and leaves other processes alone)."""
    import subprocess
    import sys

    from sandbox.procfs import pid_alive
    from sandbox.template import TemplateStore

    gone = subprocess.Popen(["true"])
    gone.wait()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    vm = subprocess.Popen([*sleeper, "clearcri-template-abc,debug-threads=off"])
    bystander = subprocess.Popen(sleeper)
    try:
        abandoned = tmp_path / f".abc.{gone.pid}.1234"
        abandoned.mkdir()
        (abandoned / "qemu.pid").write_text(f"{vm.pid}\n")
        other = tmp_path / f".def.{gone.pid}.5678"
        other.mkdir()
        (other / "qemu.pid").write_text(f"{bystander.pid}\n")
        TemplateStore(tmp_path, "qemu-system-x86_64")
        assert vm.wait(10) == -9
        assert not abandoned.exists() and not other.exists()
        assert pid_alive(bystander.pid)
    finally:
        for proc in (vm, bystander):
            proc.kill()
            proc.wait()
