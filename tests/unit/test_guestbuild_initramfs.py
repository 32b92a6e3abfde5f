"""The initramfs cpio writer and reader (guestbuild/initramfs.py)."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from guestbuild.initramfs import CpioEntry, CpioFormatError, Initramfs, iter_newc


def _sample_archive() -> Initramfs:
    ir = Initramfs()
    ir.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    ir.add_file("lib/modules/erofs.ko", b"\x7fELF" + bytes(range(256)) * 3)
    ir.add_symlink("bin/sh", "busybox")
    ir.add_file("bin/busybox", b"BB", 0o755)
    ir.add_char_device("dev/console", 5, 1)
    ir.add_dir("newroot", 0o700)
    return ir


def test_cpio_round_trip() -> None:
    data = _sample_archive().to_bytes()
    entries = {e.path: e for e in iter_newc(data)}
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"busybox"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode)
    assert (console.rdev_major, console.rdev_minor) == (5, 1)
    assert entries["newroot"].is_dir and stat.S_IMODE(entries["newroot"].mode) == 0o700
    # Parents are created implicitly and come before their contents.
    order = [e.path for e in iter_newc(data)]
    assert order.index("lib") < order.index("lib/modules") < order.index("lib/modules/erofs.ko")
    assert all(e.mtime == 0 and e.uid == 0 and e.gid == 0 for e in entries.values())


def test_cpio_is_deterministic_and_aligned() -> None:
    first = _sample_archive().to_bytes()
    second = _sample_archive().to_bytes()
    assert first == second
    assert len(first) % 4 == 0
    assert first.rstrip(b"\0").endswith(b"TRAILER!!!")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_tool_reads_archive() -> None:
    proc = subprocess.run(
        ["cpio", "-t", "--quiet"], input=_sample_archive().to_bytes(), capture_output=True
    )
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.decode().split()
    assert {"init", "bin/sh", "dev/console", "lib/modules/erofs.ko"} <= set(names)


def test_cpio_rejects_bad_paths_and_duplicates() -> None:
    ir = Initramfs()
    with pytest.raises(ValueError):
        ir.add_file("../etc/passwd", b"")
    ir.add_file("a", b"1")
    with pytest.raises(ValueError):
        ir.add_file("/a", b"2")
    ir.add_dir("d")
    ir.add_dir("d/")  # the same directory twice is fine


def test_cpio_parser_rejects_garbage() -> None:
    with pytest.raises(CpioFormatError):
        list(iter_newc(b"not a cpio archive at all, definitely not" * 4))
    data = _sample_archive().to_bytes()
    with pytest.raises(CpioFormatError):
        list(iter_newc(data[: len(data) // 2]))


def test_cpio_entry_kinds() -> None:
    assert CpioEntry("x", stat.S_IFREG | 0o644).is_file
    assert not CpioEntry("x", stat.S_IFDIR | 0o755).is_file
