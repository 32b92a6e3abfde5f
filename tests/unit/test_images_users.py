"""Resolving users and groups against an image's /etc/passwd and /etc/group."""

from __future__ import annotations

import pytest

from cri.images.users import ImageUser, UserNotFound, resolve_user

PASSWD = """root:x:0:0:root:/root:/bin/sh
# a comment
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
app:x:1000:1001:app:/home/app:/bin/sh
broken line
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """root:x:0:
www-data:x:33:
appgrp:x:1001:
wheel:x:10:app,root
docker:x:999:app
nogroup:x:65534:
"""


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", ImageUser(0, 0, (10,), "root", "/root")),
        ("root", ImageUser(0, 0, (10,), "root", "/root")),
        ("app", ImageUser(1000, 1001, (10, 999), "app", "/home/app")),
        ("1000", ImageUser(1000, 1001, (10, 999), "app", "/home/app")),
        ("www-data", ImageUser(33, 33, (), "www-data", "/var/www")),
        ("app:wheel", ImageUser(1000, 10, (999,), "app", "/home/app")),
        ("app:5", ImageUser(1000, 5, (10, 999), "app", "/home/app")),
        ("4242", ImageUser(4242, 0, (), "", "/")),
        ("4242:4343", ImageUser(4242, 4343, (), "", "/")),
        ("4242:nogroup", ImageUser(4242, 65534, (), "", "/")),
    ],
)
def test_resolve(spec: str, expected: ImageUser) -> None:
    assert resolve_user(spec, PASSWD, GROUP) == expected


@pytest.mark.parametrize(("spec", "message"), [("ghost", "ghost"), ("app:ghosts", "ghosts")])
def test_unknown_names_say_what_to_do(spec: str, message: str) -> None:
    with pytest.raises(UserNotFound, match=message):
        resolve_user(spec, PASSWD, GROUP)


def test_image_without_passwd_file() -> None:
    assert resolve_user("", "", "") == ImageUser(0, 0)
    assert resolve_user("65532", "", "") == ImageUser(65532, 0)
    with pytest.raises(UserNotFound):
        resolve_user("nonroot", "", "")
