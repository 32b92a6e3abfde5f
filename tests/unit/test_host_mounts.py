"""Host-path helpers of host pods: propagation checks against mountinfo, and the
agent's mount-table parsing."""

from __future__ import annotations

from pathlib import Path

from agent.guest.hostmounts import unescape_mount_field
from cri.runtime.containers import propagation_problem

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /srv/private rw,relatime - tmpfs none rw
31 22 0:41 / /srv/slave rw,relatime master:7 - tmpfs none rw
32 30 0:42 / /srv/private/shared rw shared:9 - tmpfs none rw
33 22 0:43 / /srv/with\\040space rw - tmpfs none rw
"""


def check(tmp_path: Path, path: str, propagation: str) -> str | None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    return propagation_problem(Path(path), propagation, info)


def test_shared_mount_allows_both(tmp_path: Path) -> None:
    assert check(tmp_path, "/var/lib/x", "rshared") is None  # on / (shared:1)
    assert check(tmp_path, "/srv/private/shared/a", "rshared") is None
    assert check(tmp_path, "/srv/private/shared/a", "rslave") is None


def test_slave_mount_allows_only_host_to_container(tmp_path: Path) -> None:
    assert check(tmp_path, "/srv/slave/a", "rslave") is None
    problem = check(tmp_path, "/srv/slave/a", "rshared")
    assert problem is not None and "mount --make-rshared /srv/slave" in problem


def test_private_mount_refuses_propagation(tmp_path: Path) -> None:
    for propagation in ("rshared", "rslave"):
        problem = check(tmp_path, "/srv/private/a", propagation)
        assert problem is not None and "/srv/private," in problem
    # a longer prefix that is not a path component does not count
    assert check(tmp_path, "/srv/privateer", "rshared") is None
    problem = check(tmp_path, "/srv/with space/f", "rslave")
    assert problem is not None and "/srv/with space" in problem


def test_unescape_mountinfo_fields() -> None:
    assert unescape_mount_field("/a\\040b\\011c\\134d") == "/a b\tc\\d"
    assert unescape_mount_field("/plain") == "/plain"
