"""A sandbox host over guest assets that are only files (nothing boots): for tests of
how pods are sized, keyed and matched."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sandbox.guest import GuestAssets
from sandbox.node import SandboxConfig, SandboxHost


def fake_assets(guest: Path) -> GuestAssets:
    """Guest assets that are empty files in ``guest`` (made if missing)."""
    guest.mkdir(exist_ok=True)
    for name in ("vmlinux", "initrd.img", "os.img", "floor-initrd.img"):
        (guest / name).write_bytes(b"\0" * 4096)
    return GuestAssets(
        kernel=guest / "vmlinux",
        initrd=guest / "initrd.img",
        os_image=guest / "os.img",
        floor_initrd=guest / "floor-initrd.img",
        kernel_version="6.1",
        version="v",
    )


def fake_host(tmp_path: Path, **config: object) -> SandboxHost:
    """A TCG host without a jail, 4 vCPUs at most, its guest assets empty files below
    ``tmp_path``; ``config`` overrides SandboxConfig fields."""
    guest = tmp_path / "guest"
    assets = fake_assets(guest)
    settings = SandboxConfig(
        run_root=tmp_path / "run",
        guest_dir=guest,
        accel="tcg",
        jail=False,
        template_dir=tmp_path / "templates",
        max_vcpus=4,
    )
    return SandboxHost(replace(settings, **config), assets)  # type: ignore[arg-type]
