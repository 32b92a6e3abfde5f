"""The VMM jail (sandbox/jail.py, sandbox/jail_exec.py), run for real with a shell in
place of QEMU; and the range of VMM ids."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.jail import SHARE_CAPABILITIES, SYSTEM_PATHS, Jail, JailError, VmmIds, jail_for
from sandbox.vm import MachineSpec

VMM_ID = 0x7000_F001
PR_GET_MEMORY_MERGE = 68


def _jail(tmp_path: Path, **kwargs: object) -> Jail:
    (tmp_path / "root").mkdir(exist_ok=True)
    (tmp_path / "vmm").mkdir(exist_ok=True)
    os.chown(tmp_path / "vmm", VMM_ID, VMM_ID)  # as prepare_vmm_dir does
    (tmp_path / "kernel").write_text("kernel\n")
    fields: dict[str, object] = {
        "uid": VMM_ID,
        "gid": VMM_ID,
        "root": tmp_path / "root",
        "workdir": tmp_path / "vmm",
        "readonly": (tmp_path / "kernel",),
        "writable": (tmp_path / "vmm",),
    }
    fields.update(kwargs)
    return Jail(**fields)  # type: ignore[arg-type]


def _run(jail: Jail, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        jail.command(["sh", "-c", script]), capture_output=True, text=True, timeout=30
    )


def test_the_jail_holds_only_what_it_names(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host file")
    kernel = tmp_path / "kernel"
    done = _run(
        _jail(tmp_path),
        f"id -u; id -g; pwd; cat {kernel}; ls /; cat {secret}; echo x > {kernel}; "
        "echo made > here; ls /dev; ls /proc/1; mkdir /new; ls /sys/kernel/mm/*",
    )
    out = done.stdout.split()
    assert out[:4] == [str(VMM_ID), str(VMM_ID), str(tmp_path / "vmm"), "kernel"]
    top = set(out[4 : out.index("null")])
    # /sys holds the one settings file QEMU reads (the host's huge page size)
    assert top == {"bin", "dev", "lib", "lib64", "proc", "sbin", "tmp", "usr", "etc", "sys"} - {
        name
        for name, host in (("lib64", "/lib64"), ("sys", SYSTEM_PATHS[-1]))
        if not Path(host).exists()
    }
    assert set(out[out.index("null") : out.index("null") + 4]) == {
        "null",
        "random",
        "urandom",
        "zero",
    }
    if Path(SYSTEM_PATHS[-1]).exists():
        assert out[out.index("null") + 4 :] == ["hpage_pmd_size"]
    assert "secret: No such file" in done.stderr
    assert "kernel: Read-only file system" in done.stderr
    assert "/proc/1" in done.stderr, "another user's process is invisible"
    assert "/new" in done.stderr
    assert (tmp_path / "vmm" / "here").read_text() == "made\n"
    assert (tmp_path / "vmm" / "here").stat().st_uid == VMM_ID
    assert kernel.read_text() == "kernel\n"


@pytest.mark.parametrize("caps", [(), SHARE_CAPABILITIES])
def test_only_the_named_capabilities_survive(tmp_path: Path, caps: tuple[int, ...]) -> None:
    proc = subprocess.Popen(_jail(tmp_path, capabilities=caps).command(["sleep", "30"]))
    try:
        deadline = time.monotonic() + 10
        while True:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            if "\nName:\tsleep" in "\n" + status or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        mask = sum(1 << cap for cap in caps)
        for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
            assert int(fields[field], 16) == mask, field
        assert fields["NoNewPrivs"].strip() == "1"
        assert fields["Groups"].strip() == ""
    finally:
        proc.kill()
        proc.wait()


def test_a_jail_that_cannot_be_built_says_why(tmp_path: Path) -> None:
    done = _run(_jail(tmp_path, readonly=(tmp_path / "missing",)), "echo ran")
    assert done.returncode == 126
    assert "ran" not in done.stdout
    assert "clearcri jail:" in done.stderr and "missing" in done.stderr


def test_vmm_ids_are_distinct_and_come_back() -> None:
    ids = VmmIds(first=1000, count=3)
    ids.claim(1001)  # a VM an earlier daemon made
    assert [ids.allocate(), ids.allocate()] == [1000, 1002]
    with pytest.raises(JailError, match="all 3"):
        ids.allocate()
    ids.release(1000)
    ids.release(None)
    assert ids.allocate() == 1000
    with pytest.raises(JailError):
        VmmIds(first=0, count=10)
    with pytest.raises(JailError):
        VmmIds(first=2**32 - 5, count=10)


def _merge_any_supported() -> bool:
    """Whether this kernel has PR_SET_MEMORY_MERGE (Linux 6.4)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)) >= 0


@pytest.mark.parametrize("huge_pages", [False, True])
def test_huge_pages_can_be_turned_off_for_the_vmm(tmp_path: Path, huge_pages: bool) -> None:
    """Without huge_pages (every VMM under TCG) no memory of the VMM gets transparent
    huge pages, even where QEMU asks for them (MADV_HUGEPAGE)."""
    done = _run(_jail(tmp_path, huge_pages=huge_pages), "grep THP_enabled /proc/self/status")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["THP_enabled:", "1" if huge_pages else "0"]


def test_vmms_under_tcg_get_no_huge_pages(tmp_path: Path) -> None:
    kernel, initrd, os_image = (tmp_path / n for n in ("vmlinux", "initrd.img", "os.img"))
    for path in (kernel, initrd, os_image):
        path.write_text("")
    machine = MachineSpec("p", kernel, initrd, os_image, run_dir=tmp_path, vmm_id=VMM_ID)
    assert not jail_for(replace(machine, accel="tcg")).huge_pages
    assert jail_for(replace(machine, accel="kvm")).huge_pages


@pytest.mark.parametrize("merge", [False, True])
def test_merge_makes_all_of_the_vmms_memory_mergeable(tmp_path: Path, merge: bool) -> None:
    """With merge_memory (``[vm] mem_merge``) KSM may merge all of the VMM's memory, not
    only the guest RAM QEMU marks; a kernel without PR_SET_MEMORY_MERGE runs it all the
    same."""
    done = _run(_jail(tmp_path, merge_memory=merge), "cat /proc/self/ksm_stat")
    assert done.returncode == 0, done.stderr
    if _merge_any_supported():
        assert ("ksm_merge_any: yes" in done.stdout) is merge, done.stdout


def test_a_vmm_outside_usr_is_bound_into_the_jail(tmp_path: Path) -> None:
    """The guest directory's own QEMU build lives outside /usr: the jail shows it,
    read-only, at the same path (the program runs; nothing else of its directory)."""
    vmm_dir = tmp_path / "guest"
    vmm_dir.mkdir()
    program = vmm_dir / "qemu-system-x86_64"
    program.write_text('#!/bin/sh\necho running; echo x > "$0"; ls "$(dirname "$0")"\n')
    program.chmod(0o755)
    (vmm_dir / "os.img").write_text("not bound\n")
    jail = _jail(tmp_path)
    assert f"readonly={program}" in jail.command([str(program)])
    assert not any("readonly=/usr/bin/sh" in arg for arg in jail.command(["/usr/bin/sh"]))
    done = subprocess.run(jail.command([str(program)]), capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["running", program.name]
    assert "Read-only file system" in done.stderr
