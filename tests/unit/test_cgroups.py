"""Placement of a VM under its pod's cgroup parent (cgroupfs and systemd drivers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.cgroups import (
    CgroupError,
    hierarchies,
    memory_limit,
    place,
    pod_memory_budget,
    pod_tree_path,
    raise_memory_limit,
    relative_path,
    systemd_slice_path,
)


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
        (root / "pods").mkdir()  # the parent's first level exists, as kubelet's would
    cgroup = place(4242, parent="/pods/p1", driver="cgroupfs", sandbox_id="s1", roots=roots)
    leaves = [p for p in cgroup.paths if p.name == "clearcri-s1"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in leaves) == [
        "cpu/pods/p1/clearcri-s1",
        "memory/pods/p1/clearcri-s1",
    ]
    assert all((p / "cgroup.procs").read_text() == "4242\n" for p in leaves)
    for p in leaves:
        (p / "cgroup.procs").unlink()  # a real cgroup dir has no files to remove
    cgroup.remove()
    # the levels of the parent that place() made go with the VM; the existing one stays
    assert not any(p.exists() for p in cgroup.paths)
    assert not (tmp_path / "cpu" / "pods" / "p1").exists()
    assert (tmp_path / "cpu" / "pods").is_dir()


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


def test_pod_memory_limit_from_v1_v2_and_systemd(tmp_path: Path) -> None:
    v1 = tmp_path / "memory"
    (v1 / "kubepods" / "burstable" / "podabc").mkdir(parents=True)
    (v1 / "kubepods" / "burstable" / "podabc" / "memory.limit_in_bytes").write_text("268435456\n")
    assert memory_limit("/kubepods/burstable/podabc", "cgroupfs", [v1]) == 268435456
    (v1 / "kubepods" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit("/kubepods", "cgroupfs", [v1]) is None  # unlimited
    v2 = tmp_path / "unified"
    slice_dir = v2 / "kubepods.slice" / "kubepods-pod1.slice"
    slice_dir.mkdir(parents=True)
    (slice_dir / "memory.max").write_text("max\n")
    assert memory_limit("kubepods-pod1.slice", "systemd", [v2]) is None
    (slice_dir / "memory.max").write_text("536870912\n")
    assert memory_limit("kubepods-pod1.slice", "systemd", [v2]) == 536870912
    assert memory_limit("/nowhere", "cgroupfs", [v1, v2]) is None
    assert memory_limit("", "cgroupfs", [v1]) is None


def test_pod_memory_budget_is_the_tighter_of_cgroup_and_cri(tmp_path: Path) -> None:
    v1 = tmp_path / "memory"
    (v1 / "pod").mkdir(parents=True)
    (v1 / "pod" / "memory.limit_in_bytes").write_text("300000000\n")
    assert pod_memory_budget("/pod", "cgroupfs", 256 << 20, 64 << 20, [v1]) == 300000000
    assert pod_memory_budget("/pod", "cgroupfs", 128 << 20, 0, [v1]) == 128 << 20
    # no cgroup to read (crictl): the containers' limits plus the overhead
    assert pod_memory_budget("", "cgroupfs", 256 << 20, 64 << 20, [v1]) == 320 << 20
    # no limits anywhere: no budget
    assert pod_memory_budget("/elsewhere", "cgroupfs", 0, 64 << 20, [v1]) == 0
    # a parent that leaves the tree is ignored, CRI's figure stands
    assert pod_memory_budget("/../x", "cgroupfs", 256 << 20, 0, [v1]) == 256 << 20


def test_raise_memory_limit_only_raises(tmp_path: Path) -> None:
    v1 = tmp_path / "memory"
    pod = v1 / "kubepods" / "podabc"
    pod.mkdir(parents=True)
    (pod / "memory.limit_in_bytes").write_text("67108864\n")
    (pod / "memory.memsw.limit_in_bytes").write_text("67108864\n")
    v2 = tmp_path / "unified"
    (v2 / "kubepods" / "podabc").mkdir(parents=True)
    (v2 / "kubepods" / "podabc" / "memory.max").write_text("max\n")
    assert raise_memory_limit("/kubepods/podabc", "cgroupfs", 136 << 20, [v1, v2])
    assert (pod / "memory.limit_in_bytes").read_text() == f"{136 << 20}\n"
    assert (pod / "memory.memsw.limit_in_bytes").read_text() == f"{136 << 20}\n"
    assert (v2 / "kubepods" / "podabc" / "memory.max").read_text() == "max\n"
    # already enough: nothing written
    assert not raise_memory_limit("/kubepods/podabc", "cgroupfs", 100 << 20, [v1, v2])
    assert (pod / "memory.limit_in_bytes").read_text() == f"{136 << 20}\n"


def test_pod_tree_path_parses_parents_as_the_vm_cgroup_does() -> None:
    assert pod_tree_path("/kubepods/burstable/podx", "cgroupfs", "id") == (
        "/kubepods/burstable/podx"
    )
    assert pod_tree_path("kubepods-besteffort-pod12.slice", "systemd", "id") == (
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice"
    )
    assert pod_tree_path("", "systemd", "abc") == "/clearcri/abc"
    assert pod_tree_path("-.slice", "systemd", "abc") == "/clearcri/abc"
    # one parser: what a pod VM's cgroup refuses, a host pod's refuses too
    with pytest.raises(CgroupError):
        pod_tree_path("../../etc", "cgroupfs", "abc")
    with pytest.raises(CgroupError):
        pod_tree_path("kubepods/x", "systemd", "abc")
