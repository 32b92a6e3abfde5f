"""Finding the built guest assets and checking them against their manifest
(sandbox/guest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestbuild.apt import DebPackage
from guestbuild.builder import combined_version
from sandbox import guest
from sandbox.guest import GuestAssetsMissing
from tests.guest_assets import build_inputs, fake_build


def test_assets_share_only_with_own_kernel(tmp_path: Path) -> None:
    own = build_inputs(
        kernel_flavor="clearcri",
        kernel_package=None,
        kernel_source=DebPackage("linux-source-6.1", "6.1.192-3", "s1"),
    )
    fake_build(tmp_path, own)
    assets = guest.locate_guest(tmp_path)
    assert assets.share and assets.kernel_version == "6.1.192-clearcri"
    fake_build(tmp_path, build_inputs())
    assert not guest.locate_guest(tmp_path).share


def test_locate_guest(tmp_path: Path) -> None:
    with pytest.raises(GuestAssetsMissing, match="clearcri guest build"):
        guest.locate_guest(tmp_path)
    inputs = build_inputs()
    fake_build(tmp_path, inputs, complete=False)
    with pytest.raises(GuestAssetsMissing):
        guest.locate_guest(tmp_path)
    fake_build(tmp_path, inputs)
    assets = guest.locate_guest(tmp_path)
    assert assets.kernel == tmp_path / "vmlinux"
    assert assets.os_image == tmp_path / "os.img"
    assert assets.kernel_version == "6.1.0-56-cloud-amd64"
    assert assets.version == combined_version("6.1.0-56-cloud-amd64", inputs.component_hashes())
    (tmp_path / "floor-initrd.img").unlink()
    with pytest.raises(GuestAssetsMissing, match="clearcri guest build"):
        guest.locate_guest(tmp_path)
