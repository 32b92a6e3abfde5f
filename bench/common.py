"""What the benchmarks share: reading /proc, the sandbox configuration of a run, the
busybox image their containers run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cri.images.rootfs import build_rootfs_image, make_busybox_tree
from sandbox.api import RootfsImage
from sandbox.node import SandboxConfig


def read_kib(path: Path, key: str) -> int:
    """The value in kB of line ``key:`` in a /proc file such as meminfo or smaps_rollup."""
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in {path}")


def mem_available_kib() -> int:
    return read_kib(Path("/proc/meminfo"), "MemAvailable")


def bench_config(
    guest_dir: Path, work_dir: Path, *, templates: bool, qemu: str = ""
) -> SandboxConfig:
    """Sandboxes under ``work_dir``, VM templates in a tmpfs directory of this run;
    ``qemu`` is the VMM (``[vm] qemu``; "": the guest directory's)."""
    return SandboxConfig(
        run_root=work_dir / "run",
        guest_dir=guest_dir,
        accel="auto",
        qemu=qemu,
        templates=templates,
        template_dir=Path(f"/dev/shm/clearcri-bench-templates-{os.getpid()}"),
    )


def drop_templates(config: SandboxConfig) -> None:
    if config.template_dir is not None:
        shutil.rmtree(config.template_dir, ignore_errors=True)


def busybox_image(work_dir: Path) -> RootfsImage:
    """The busybox rootfs image of a run, built in ``work_dir`` the first time."""
    erofs = work_dir / "busybox.erofs"
    if erofs.exists():
        return RootfsImage("busybox", erofs)
    return build_rootfs_image(make_busybox_tree(work_dir / "busybox"), erofs, image_id="busybox")
