"""Host-path helpers of host pods: propagation checks against mountinfo, and the
agent's mount-table parsing."""

from __future__ import annotations

from pathlib import Path

from agent.mountapi import unescape_mount_field
from sandbox.mounts import propagation_problem

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


def test_pod_usage_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    from sandbox.usage import read_cgroup_usage

    v2 = tmp_path / "v2" / "kubepods" / "pod1"
    v2.mkdir(parents=True)
    (v2 / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (v2 / "memory.current").write_text("10485760\n")
    (v2 / "memory.stat").write_text("anon 4194304\nfile 6291456\ninactive_file 2097152\n")
    usage = read_cgroup_usage("v2", "/kubepods/pod1", tmp_path / "v2")
    assert usage is not None
    assert (usage.cpu_ns, usage.usage_bytes) == (1_500_000, 10485760)
    assert (usage.working_set_bytes, usage.rss_bytes) == (10485760 - 2097152, 4194304)

    v1 = tmp_path / "v1"
    (v1 / "cpuacct" / "pod1").mkdir(parents=True)
    (v1 / "memory" / "pod1").mkdir(parents=True)
    (v1 / "cpuacct" / "pod1" / "cpuacct.usage").write_text("123456789\n")
    (v1 / "memory" / "pod1" / "memory.usage_in_bytes").write_text("8388608\n")
    (v1 / "memory" / "pod1" / "memory.stat").write_text(
        "cache 100\nrss 200\ntotal_rss 3145728\ntotal_inactive_file 1048576\n"
    )
    usage = read_cgroup_usage("v1", "/pod1", v1)
    assert usage is not None
    assert (usage.cpu_ns, usage.usage_bytes, usage.working_set_bytes, usage.rss_bytes) == (
        123456789,
        8388608,
        8388608 - 1048576,
        3145728,
    )
    # no cgroups, or a pod whose cgroup is gone
    assert read_cgroup_usage("disabled", "", v1) is None
    assert read_cgroup_usage("v1", "/gone", v1) is None
