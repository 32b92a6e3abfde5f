"""Versioning of the guest build: input hashes per component, what a build redoes
(guestbuild/builder.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from guestbuild import builder
from guestbuild.apt import DebPackage
from guestbuild.builder import BuildInputs
from sandbox.guest import COMPONENTS, load_manifest, tree_hash
from tests.guest_assets import build_inputs, fake_build


def _changed(a: BuildInputs, b: BuildInputs) -> set[str]:
    ha, hb = a.component_hashes(), b.component_hashes()
    return {name for name in COMPONENTS if ha[name] != hb[name]}


def test_component_hashes_track_only_their_inputs() -> None:
    base = build_inputs()
    assert base.kernel_version == "6.1.0-56-cloud-amd64"
    assert _changed(base, build_inputs()) == set()
    assert _changed(base, build_inputs(agent_hash="a2")) == {"os_image"}
    assert _changed(base, build_inputs(init_script=b"#!/bin/sh\n# changed\n")) == {"initrd"}
    new_kernel = DebPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-3", "k2")
    assert _changed(base, build_inputs(kernel_package=new_kernel)) == {"kernel", "initrd"}
    new_busybox = DebPackage("busybox-static", "1:1.36", "b2")
    assert _changed(base, build_inputs(busybox_package=new_busybox)) == {"initrd", "floor_initrd"}
    new_python = (DebPackage("python3", "3.11", "p2"), DebPackage("crun", "1.8", "c1"))
    assert _changed(base, build_inputs(os_packages=new_python)) == {"os_image"}
    assert _changed(base, build_inputs(vmm_input="v2")) == {"vmm"}
    # Package order does not matter.
    assert _changed(base, build_inputs(os_packages=tuple(reversed(base.os_packages)))) == set()


def test_own_kernel_hashes_and_version() -> None:
    source = DebPackage("linux-source-6.1", "6.1.192-3", "s1")
    own = build_inputs(
        kernel_flavor="clearcri",
        kernel_package=None,
        kernel_source=source,
        kernel_config=b"CONFIG_NET_9P=y\n",
        compiler="gcc 12.2.0",
    )
    assert own.kernel_version == "6.1.192-clearcri"
    assert own.kernel_modules == () and own.kernel_blk_modules == ()
    # the initramfs carries no modules, so only the kernel follows the kernel's inputs
    assert _changed(own, replace(own, kernel_config=b"CONFIG_NET_9P=n\n")) == {"kernel"}
    assert _changed(own, replace(own, compiler="gcc 13")) == {"kernel"}
    newer = DebPackage("linux-source-6.1", "6.1.193-1", "s2")
    assert _changed(own, replace(own, kernel_source=newer)) == {"kernel"}
    # switching flavors rebuilds the kernel and the initramfs (modules or none)
    assert _changed(build_inputs(), own) == {"kernel", "initrd"}


def test_plan_rebuild(tmp_path: Path) -> None:
    inputs = build_inputs()
    hashes = inputs.component_hashes()
    assert builder.plan_rebuild(None, hashes, tmp_path) == list(COMPONENTS)
    fake_build(tmp_path, inputs)
    manifest = load_manifest(tmp_path)
    assert builder.plan_rebuild(manifest, hashes, tmp_path) == []
    assert builder.plan_rebuild(manifest, hashes, tmp_path, force=True) == list(COMPONENTS)
    changed = build_inputs(agent_hash="a2").component_hashes()
    assert builder.plan_rebuild(manifest, changed, tmp_path) == ["os_image"]
    (tmp_path / "initrd.img").unlink()
    assert builder.plan_rebuild(manifest, hashes, tmp_path) == ["initrd"]
    (tmp_path / "vmlinux").write_bytes(b"truncated")
    assert builder.plan_rebuild(manifest, hashes, tmp_path) == ["kernel", "initrd"]


def test_tree_hash_sees_python_sources_only(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    first = tree_hash(tmp_path)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.py").write_text("junk")
    (tmp_path / "notes.txt").write_text("ignored")
    assert tree_hash(tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert tree_hash(tmp_path) != first
