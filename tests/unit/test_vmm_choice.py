"""Which VMM a node's VMs run (``[vm] qemu``, sandbox/node.py), and that a template
follows the VMM binary it was saved by (sandbox/template.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from sandbox.api import SandboxSpec
from sandbox.template import template_key
from sandbox.vm import QEMU_BINARY, vmm_identity
from tests.unit.fake_guest import fake_host


def test_the_guests_own_vmm_runs_unless_the_config_names_one(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    assert host.assets.vmm is None
    assert host.qemu == QEMU_BINARY, "a guest without its own VMM: the host's QEMU"
    own = tmp_path / "guest" / "qemu-system-x86_64"
    own.write_bytes(b"\x7fELF")
    with_vmm = replace(host.assets, vmm=own)
    assert type(host)(host.config, with_vmm).qemu == str(own)
    named = replace(host.config, qemu="/opt/qemu/bin/qemu-system-x86_64")
    assert type(host)(named, with_vmm).qemu == "/opt/qemu/bin/qemu-system-x86_64"


def test_a_rebuilt_vmm_keys_new_templates(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    machine = host.machine_for(SandboxSpec("p"), tmp_path / "run" / "p")
    vmm = tmp_path / "qemu-system-x86_64"
    vmm.write_bytes(b"first build")
    first = template_key(machine, str(vmm))
    assert template_key(machine, str(vmm)) == first
    vmm.write_bytes(b"the second build")
    assert template_key(machine, str(vmm)) != first, "a template is restored by its own QEMU"
    os.utime(vmm, ns=(1, 1))
    assert vmm_identity(str(vmm)) == f"{vmm}:{len(b'the second build')}:1"
    assert vmm_identity(str(tmp_path / "gone")).endswith(":missing")
    # a name on PATH is the file it names
    assert vmm_identity("sh").startswith("/")
