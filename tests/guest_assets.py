"""Guest directories as a build leaves them, without building: build inputs of fake
packages and a guest directory holding small files under a matching manifest."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from guestbuild.apt import DebPackage
from guestbuild.builder import BuildInputs, manifest_for
from sandbox.guest import COMPONENTS, MANIFEST_NAME, OUTPUT_FILES


def build_inputs(**changes: object) -> BuildInputs:
    base = BuildInputs(
        kernel_package=DebPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "k1"),
        busybox_package=DebPackage("busybox-static", "1:1.35", "b1"),
        os_packages=(DebPackage("python3", "3.11", "p1"), DebPackage("crun", "1.8", "c1")),
        init_script=b"#!/bin/sh\n",
        agent_hash="a1",
        kernel_flavor="debian",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def fake_build(guest_dir: Path, inputs: BuildInputs, complete: bool = True) -> None:
    hashes = inputs.component_hashes()
    components = {}
    for name in COMPONENTS:
        path = guest_dir / OUTPUT_FILES[name]
        path.write_bytes(name.encode() * 10)
        components[name] = {"input": hashes[name], "file": path.name, "size": len(name) * 10}
    manifest = manifest_for(inputs, components, hashes, complete=complete)
    (guest_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
