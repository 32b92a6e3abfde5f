"""The VMM build (guestbuild/vmm.py): where Debian's QEMU source comes from, what the
build is keyed by, and its cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestbuild import vmm
from guestbuild.common import GuestBuildError


def test_source_version_comes_from_the_source_field() -> None:
    show = "Package: qemu-system-x86\nSource: qemu (1:7.2+dfsg-7+deb12u18)\n"
    show += "Version: 1:7.2+dfsg-7+deb12u18+b3\n"
    # a binNMU's binary version is not the source's
    assert vmm.parse_source_field(show) == "1:7.2+dfsg-7+deb12u18"
    assert vmm.parse_source_field("Source: qemu\nVersion: 1:7.2-1\n") == "1:7.2-1"
    assert vmm.parse_source_field("Package: qemu-system-x86\nVersion: 1:8.0-1\n") == "1:8.0-1"
    assert vmm.parse_source_field("") is None


def test_the_hosts_sources_become_deb_src_entries() -> None:
    one_line = (
        "# a comment\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/d.gpg] http://deb.debian.org/debian "
        "bookworm main contrib\n"
        "deb-src http://deb.debian.org/debian bookworm main\n"
        "deb http://security.debian.org/debian-security bookworm-security main # tail\n"
    )
    deb822 = (
        "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb-src\nURIs: http://x\nSuites: y\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://z\nSuites: w\nComponents: main\n"
    )
    stanzas = vmm.source_list([one_line], [deb822]).strip().split("\n\n")
    assert stanzas == [
        "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/d.gpg",
        "Types: deb-src\nURIs: http://security.debian.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main",
        "Types: deb-src\nURIs: http://deb.debian.org/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg",
        "Types: deb-src\nURIs: http://z\nSuites: w\nComponents: main",
    ]
    assert vmm.source_list(["deb-src http://x y main\n"], []) == ""


def test_the_build_is_keyed_by_source_devices_options_and_compiler() -> None:
    base = vmm.input_hash("1:7.2-1", "gcc 12")
    assert vmm.input_hash("1:7.2-1", "gcc 12") == base
    assert vmm.input_hash("1:7.2-2", "gcc 12") != base
    assert vmm.input_hash("1:7.2-1", "gcc 13") != base
    config = vmm.devices_config()
    # the devices sandbox/vm.py puts in a pod VM, and not what it never uses
    for device in ("Q35", "VIRTIO_PMEM", "VIRTIO_SERIAL", "VIRTIO_NET", "VIRTIO_9P"):
        assert f"CONFIG_{device}=y\n" in config
    assert "VGA" not in config and "USB" not in config
    assert "--without-default-devices" in vmm.CONFIGURE_ARGS
    assert "--static" in vmm.CONFIGURE_ARGS
    assert vmm.safe_version("1:7.2+dfsg-7") == "7.2+dfsg-7"


def test_a_cached_build_is_reused_and_nothing_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = vmm.VmmBuilder("1:7.2-1", cache_dir=tmp_path)
    builder.cached.write_bytes(b"\x7fELF")

    def no_tools() -> list[str]:
        raise AssertionError("a cached build checks no tools")

    monkeypatch.setattr(vmm, "missing_build_tools", no_tools)
    assert builder.build() == builder.cached


def test_missing_build_tools_name_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vmm, "missing_build_tools", lambda: ["meson"])
    with pytest.raises(GuestBuildError, match=r"apt-get install .*meson.*libseccomp-dev"):
        vmm.VmmBuilder("1:7.2-1", cache_dir=tmp_path).build()


def test_a_source_that_cannot_be_fetched_says_what_the_host_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb http://127.0.0.1:9/debian bookworm main\n")
    real = vmm.host_source_list
    monkeypatch.setattr(vmm, "host_source_list", lambda: real(etc))
    monkeypatch.setattr(vmm, "missing_build_tools", lambda: [])
    builder = vmm.VmmBuilder("1:7.2-1", cache_dir=tmp_path / "cache")
    with pytest.raises(GuestBuildError, match="must serve Debian's sources too"):
        builder.build()
    # nothing of the attempt is left but the cache directory itself
    assert list((tmp_path / "cache").iterdir()) == []


def _change(old: str, new: str) -> str:
    return (
        "What this change does, and why.\n\n"
        "--- a/src/file.c\n+++ b/src/file.c\n@@ -1 +1 @@\n"
        f"-{old}\n+{new}\n"
    )


def test_the_build_is_keyed_by_our_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm, "PATCHES_DIR", tmp_path)
    without = vmm.input_hash("1:7.2-1", "gcc 12")
    (tmp_path / "one.patch").write_text(_change("a", "b"))
    with_one = vmm.input_hash("1:7.2-1", "gcc 12")
    (tmp_path / "one.patch").write_text(_change("a", "c"))
    assert len({without, with_one, vmm.input_hash("1:7.2-1", "gcc 12")}) == 3


def _tree_and_changes(root: Path, monkeypatch: pytest.MonkeyPatch, **changes: str) -> Path:
    """A Debian tree of one file (``int x = 1;``) under ``root``, and ``changes`` (file
    name without ``.patch``: text) as our changes to it."""
    patches = root / "patches"
    patches.mkdir()
    for name, text in changes.items():
        (patches / f"{name}.patch").write_text(text)
    monkeypatch.setattr(vmm, "PATCHES_DIR", patches)
    pristine = root / "qemu"
    (pristine / "src").mkdir(parents=True)
    (pristine / "src" / "file.c").write_text("int x = 1;\n")
    return pristine


def test_our_changes_go_to_a_copy_and_debians_tree_stays_as_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pristine = _tree_and_changes(
        tmp_path,
        monkeypatch,
        first=_change("int x = 1;", "int x = 2;"),
        second=_change("int x = 2;", "int x = 3;"),
    )
    devices = pristine / "configs" / "devices" / "x86_64-softmmu"
    devices.mkdir(parents=True)
    (devices / f"{vmm.DEVICES_NAME}.mak").write_text("CONFIG_OLD=y\n")
    tree = tmp_path / "copy"
    vmm.VmmBuilder("1:7.2-1", cache_dir=tmp_path)._patched_copy(pristine, tree)
    # both changes, in name order
    assert (tree / "src" / "file.c").read_text() == "int x = 3;\n"
    assert (tree / "configs/devices/x86_64-softmmu/clearcri.mak").read_text() == (
        vmm.devices_config()
    )
    assert (pristine / "src" / "file.c").read_text() == "int x = 1;\n"
    assert (devices / f"{vmm.DEVICES_NAME}.mak").read_text() == "CONFIG_OLD=y\n"


def test_a_change_that_does_not_apply_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pristine = _tree_and_changes(tmp_path, monkeypatch, stale=_change("int y = 1;", "int y = 2;"))
    with pytest.raises(GuestBuildError, match="patch"):
        vmm.VmmBuilder("1:7.2-1", cache_dir=tmp_path)._patched_copy(pristine, tmp_path / "c")


def test_each_change_of_ours_says_what_it_does() -> None:
    changes = vmm.patches()
    assert changes, "guestbuild/vmm_patches/ has our QEMU changes"
    for change in changes:
        text = change.read_text()
        preamble = text.split("\ndiff ", 1)[0].split("\n--- ", 1)[0]
        assert len(preamble.split()) > 20, f"{change.name} explains itself before the diff"
