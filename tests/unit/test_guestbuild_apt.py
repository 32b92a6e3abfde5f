"""Debian package metadata and the dependency closure (guestbuild/apt.py)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from guestbuild import apt
from guestbuild.apt import DebPackage
from guestbuild.common import GuestBuildError


def test_parse_depends() -> None:
    field = "libc6 (>= 2.34), media-types | mime-support, python3:any (>= 3.9), libx [amd64]"
    assert apt.parse_depends(field) == (
        ("libc6",),
        ("media-types", "mime-support"),
        ("python3",),
        ("libx",),
    )


def test_parse_apt_show() -> None:
    text = (
        "Package: crun\nVersion: 1.8\nDepends: libc6 (>= 2.34),\n libcap2\n"
        "Pre-Depends: libseccomp2\nSHA256: aa\n\n"
        "Package: libc6\nVersion: 2.36\nSHA256: bb\n"
    )
    pkgs = apt.parse_apt_show(text)
    assert pkgs["crun"].depends == (("libseccomp2",), ("libc6",), ("libcap2",))
    assert pkgs["libc6"] == DebPackage("libc6", "2.36", "bb", ())


def test_resolve_closure_prunes_and_takes_first_real_alternative() -> None:
    repo = {
        "app": DebPackage("app", "1", "h1", (("libc",), ("debconf",), ("virt-x", "real-x"))),
        "libc": DebPackage("libc", "1", "h2", (("gcc-base",),)),
        "gcc-base": DebPackage("gcc-base", "1", "h3"),
        "real-x": DebPackage("real-x", "1", "h4", (("libc",), ("perl-base",))),
        "debconf": DebPackage("debconf", "1", "h5", (("perl-base",),)),
        "perl-base": DebPackage("perl-base", "1", "h6"),
    }
    calls: list[list[str]] = []

    def show(names: Iterable[str]) -> dict[str, DebPackage]:
        wanted = list(names)
        calls.append(wanted)
        return {n: repo[n] for n in wanted if n in repo}

    def pruned(name: str) -> bool:
        return name in ("debconf", "gcc-base") or name.startswith("perl")

    closure = apt.resolve_closure(["app"], show, pruned)
    assert [p.name for p in closure] == ["app", "libc", "real-x"]
    assert len(calls) <= 3  # one apt query per dependency level
    with pytest.raises(GuestBuildError, match="not available"):
        apt.resolve_closure(["missing"], show, pruned)
