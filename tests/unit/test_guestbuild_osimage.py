"""The guest OS image's tree: merged /usr, libraries every program finds
(guestbuild/osimage.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guestbuild import osimage
from guestbuild.elf import elf_dynamic_info


def test_resolve_in_root_follows_guest_symlinks(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "libc.so.6").write_bytes(b"")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "usr" / "lib64").mkdir()
    (tmp_path / "usr" / "lib64" / "ld.so").symlink_to("/lib/x86_64-linux-gnu/libc.so.6")
    target = tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "libc.so.6"
    assert osimage.resolve_in_root(tmp_path, "/lib/x86_64-linux-gnu/libc.so.6") == target
    assert osimage.resolve_in_root(tmp_path, "/usr/lib64/ld.so") == target
    assert osimage.resolve_in_root(tmp_path, "/lib/nope.so") is None
    (tmp_path / "loop").symlink_to("loop")
    assert osimage.resolve_in_root(tmp_path, "/loop") is None


def test_merge_usr(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").write_bytes(b"bb")
    (tmp_path / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib" / "x86_64-linux-gnu" / "libc.so.6").write_bytes(b"c")
    (tmp_path / "usr" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "libz.so.1").write_bytes(b"z")
    osimage.merge_usr(tmp_path)
    assert (tmp_path / "bin").is_symlink() and (tmp_path / "usr" / "bin" / "busybox").exists()
    assert sorted(p.name for p in (tmp_path / "lib" / "x86_64-linux-gnu").iterdir()) == [
        "libc.so.6",
        "libz.so.1",
    ]


HOST_ELF = Path("/bin/ls")


@pytest.mark.skipif(not HOST_ELF.is_file(), reason="no dynamically linked host binary")
def test_missing_libraries_on_a_real_elf(tmp_path: Path) -> None:
    info = elf_dynamic_info(HOST_ELF.read_bytes())
    assert info is not None and "libc.so.6" in info.needed and info.interpreter
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    shutil.copyfile(HOST_ELF, tmp_path / "usr" / "bin" / "ls")
    problems = osimage.missing_libraries(tmp_path)
    assert "/usr/bin/ls: needs libc.so.6" in problems
    assert f"/usr/bin/ls: needs interpreter {info.interpreter}" in problems
    libdir = tmp_path / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    for lib in info.needed:
        (libdir / lib).write_bytes(b"")
    interp = tmp_path / info.interpreter.lstrip("/")
    interp.parent.mkdir(parents=True, exist_ok=True)
    interp.write_bytes(b"")
    assert osimage.missing_libraries(tmp_path) == []
