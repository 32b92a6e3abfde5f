"""Placement of a VM under its pod's cgroup parent (cgroupfs and systemd drivers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.cgroups import CgroupError, hierarchies, place, relative_path, systemd_slice_path


def test_systemd_slice_expansion() -> None:
    assert systemd_slice_path("kubepods.slice") == "kubepods.slice"
    assert (
        systemd_slice_path("kubepods-besteffort-pod12.slice")
        == "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice"
    )
    for bad in ("kubepods", "-a.slice", "a--b.slice", "a/b.slice", ".slice"):
        with pytest.raises(CgroupError):
            systemd_slice_path(bad)


def test_relative_paths() -> None:
    assert relative_path("/kubepods/burstable/pod1", "cgroupfs", "ab" * 40) == (
        "kubepods/burstable/pod1/clearcri-" + "ab" * 16
    )
    assert relative_path("kubepods-pod1.slice", "systemd", "cd" * 40).endswith(
        "kubepods-pod1.slice/clearcri-" + "cd" * 16 + ".scope"
    )
    with pytest.raises(CgroupError, match="leaves"):
        relative_path("../../etc", "cgroupfs", "x")
    with pytest.raises(CgroupError, match="driver"):
        relative_path("a", "other", "x")


def test_place_writes_pid_in_every_hierarchy_and_removes(tmp_path: Path) -> None:
    roots = [tmp_path / "cpu", tmp_path / "memory"]
    for root in roots:
        root.mkdir()
    cgroup = place(4242, parent="/pods/p1", driver="cgroupfs", sandbox_id="s1", roots=roots)
    assert [p.relative_to(tmp_path).as_posix() for p in cgroup.paths] == [
        "cpu/pods/p1/clearcri-s1",
        "memory/pods/p1/clearcri-s1",
    ]
    assert all((p / "cgroup.procs").read_text() == "4242\n" for p in cgroup.paths)
    for p in cgroup.paths:
        (p / "cgroup.procs").unlink()  # a real cgroup dir has no files to remove
    cgroup.remove()
    assert not any(p.exists() for p in cgroup.paths)


def test_failed_placement_removes_what_it_made(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not a directory")
    good = tmp_path / "good"
    good.mkdir()
    with pytest.raises(CgroupError, match="cannot create"):
        place(1, parent="p", driver="cgroupfs", sandbox_id="s", roots=[bad, good])
    assert not (good / "p" / "clearcri-s").exists()


def test_new_cpuset_cgroups_inherit_cpus_and_mems(tmp_path: Path) -> None:
    root = tmp_path / "cpuset"
    root.mkdir()
    (root / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset.mems").write_text("0\n")
    real_mkdir = Path.mkdir

    def mkdir_with_files(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self)
        (self / "cpuset.cpus").write_text("")  # as the kernel creates them: empty
        (self / "cpuset.mems").write_text("")

    Path.mkdir = mkdir_with_files  # type: ignore[method-assign]
    try:
        cgroup = place(7, parent="pods", driver="cgroupfs", sandbox_id="s", roots=[root])
    finally:
        Path.mkdir = real_mkdir  # type: ignore[method-assign]
    for path in (root / "pods", *cgroup.paths):
        assert (path / "cpuset.cpus").read_text() == "0-1\n"
        assert (path / "cpuset.mems").read_text() == "0\n"


def test_hierarchies_reads_cgroup_mounts(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "proc /proc proc rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert hierarchies(mounts) == [Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/unified")]
