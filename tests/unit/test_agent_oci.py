"""OCI config generation for crun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.guest import oci
from agent.guest.settings import Settings
from agent.protocol import (
    DEFAULT_CAPABILITIES,
    ContainerSpec,
    ExecSpec,
    Mount,
    Resources,
    Rlimit,
)
from tests.unit.test_agent_protocol import full_spec


def test_full_spec_config() -> None:
    config = oci.build_oci_config(
        full_spec(),
        rootfs="/run/clearcri/containers/c1/rootfs",
        cgroup_path="/clearcri/c1",
        pid_namespace_path="/proc/42/ns/pid_for_children",
        etc_dir="/run/clearcri/etc",
    )
    process = config["process"]
    assert process["args"] == ["/bin/sh", "-c", "echo hi"]
    assert process["env"] == ["A=1", "PATH=/bin", "TERM=xterm"]
    assert process["cwd"] == "/work"
    assert process["terminal"] is True
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]}
    assert process["capabilities"]["bounding"] == ["CAP_CHOWN"]
    assert process["capabilities"]["ambient"] == []
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]
    assert process["noNewPrivileges"] is True
    assert process["oomScoreAdj"] == 500
    assert config["root"] == {"path": "/run/clearcri/containers/c1/rootfs", "readonly": True}
    assert config["annotations"] == {"io.kubernetes.pod.name": "p"}

    linux = config["linux"]
    assert linux["namespaces"] == [
        {"type": "mount"},
        {"type": "pid", "path": "/proc/42/ns/pid_for_children"},
        {"type": "cgroup"},
    ]
    assert {ns["type"] for ns in linux["namespaces"]}.isdisjoint({"network", "ipc", "uts"})
    assert linux["maskedPaths"] == ["/proc/kcore"]
    assert linux["readonlyPaths"] == ["/proc/sys"]
    assert linux["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert linux["cgroupsPath"] == "/clearcri/c1"
    resources = linux["resources"]
    assert resources["cpu"] == {
        "shares": 512,
        "quota": 50000,
        "period": 100000,
        "cpus": "0",
        "mems": "0",
    }
    assert resources["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert resources["pids"] == {"limit": 100}
    assert resources["devices"][0] == {"allow": False, "access": "rwm"}
    seccomp = linux["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "kexec_load" in seccomp["syscalls"][0]["names"]

    mounts = {m["destination"]: m for m in config["mounts"]}
    assert mounts["/data"] == {
        "destination": "/data",
        "type": "bind",
        "source": "/run/vol",
        "options": ["rbind", "ro"],
    }
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup"
    assert "/etc/resolv.conf" not in mounts  # pod_etc_files=False


def test_defaults() -> None:
    config = oci.build_oci_config(
        ContainerSpec(args=["true"]),
        rootfs="/r",
        cgroup_path=None,
        etc_dir="/run/clearcri/etc",
    )
    process = config["process"]
    assert process["env"] == [oci.DEFAULT_PATH]
    assert process["capabilities"]["bounding"] == list(DEFAULT_CAPABILITIES)
    assert "rlimits" not in process and "oomScoreAdj" not in process
    linux = config["linux"]
    assert linux["namespaces"] == [{"type": "mount"}, {"type": "pid"}]
    assert linux["maskedPaths"] == list(oci.DEFAULT_MASKED_PATHS)
    assert linux["readonlyPaths"] == list(oci.DEFAULT_READONLY_PATHS)
    assert "cgroupsPath" not in linux and "resources" not in linux
    assert "seccomp" not in linux
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert "/sys/fs/cgroup" not in mounts
    assert mounts["/etc/resolv.conf"]["source"] == "/run/clearcri/etc/resolv.conf"
    assert mounts["/etc/hostname"]["options"][-1] == "ro"


def test_explicit_empty_lists_mean_none() -> None:
    spec = ContainerSpec(args=["x"], capabilities=[], masked_paths=[], readonly_paths=[])
    config = oci.build_oci_config(spec, rootfs="/r", cgroup_path=None)
    assert config["process"]["capabilities"]["effective"] == []
    assert config["linux"]["maskedPaths"] == []
    assert config["linux"]["readonlyPaths"] == []


def test_custom_seccomp_and_mount_override() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}
    spec = ContainerSpec(
        args=["x"],
        seccomp=profile,
        mounts=[Mount(destination="/dev/shm", type="tmpfs", source="shm", options=["size=1m"])],
    )
    config = oci.build_oci_config(spec, rootfs="/r", cgroup_path=None)
    assert config["linux"]["seccomp"] == profile
    shm = [m for m in config["mounts"] if m["destination"] == "/dev/shm"]
    assert shm == [
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["size=1m"]}
    ]
    with pytest.raises(ValueError):
        oci.build_oci_config(
            ContainerSpec(args=["x"], seccomp="nope"), rootfs="/r", cgroup_path=None
        )


def test_resources_skip_unset_values() -> None:
    assert oci.resources_config(Resources()) == {}
    assert oci.resources_config(Resources(memory_limit=0, pids_limit=-1)) == {}


def test_exec_process_inherits_and_overrides() -> None:
    container = ContainerSpec(
        args=["sleep"],
        env=["A=1", "B=2"],
        cwd="/app",
        uid=7,
        gid=8,
        rlimits=[Rlimit(type="RLIMIT_NOFILE", soft=1, hard=2)],
        no_new_privs=True,
        oom_score_adj=100,
    )
    process = oci.build_exec_process(container, ExecSpec(args=["ls"], env=["B=3"], tty=True))
    assert process["args"] == ["ls"]
    assert process["env"] == [oci.DEFAULT_PATH, "A=1", "B=3", "TERM=xterm"]
    assert process["cwd"] == "/app"
    assert process["user"] == {"uid": 7, "gid": 8}
    assert process["terminal"] is True
    assert process["noNewPrivileges"] is True
    assert "oomScoreAdj" not in process
    process = oci.build_exec_process(container, ExecSpec(args=["id"], uid=0, gid=0, cwd="/"))
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["cwd"] == "/"
    assert "consoleSize" not in process


def test_exec_process_starts_with_the_clients_terminal_size() -> None:
    container = ContainerSpec(args=["sleep"])
    spec = ExecSpec(args=["sh"], tty=True, cols=120, rows=40)
    process = oci.build_exec_process(container, spec)
    assert process["consoleSize"] == {"width": 120, "height": 40}
    spec = ExecSpec(args=["sh"], tty=False, cols=120, rows=40)
    assert "consoleSize" not in oci.build_exec_process(container, spec)


@pytest.mark.parametrize(
    "spec",
    [
        ContainerSpec(args=[]),
        ContainerSpec(args=["x"], pid_namespace="node"),
        ContainerSpec(args=["x"], cwd="relative"),
        ContainerSpec(args=["x"], mounts=[Mount(destination="rel")]),
        ContainerSpec(args=["x"], stdin_once=True),
    ],
)
def test_validate_rejects(spec: ContainerSpec) -> None:
    with pytest.raises(ValueError):
        oci.validate_spec(spec)


def test_pod_namespaces_are_joined_by_path() -> None:
    """The pod's own IPC/network/UTS namespaces are named (crun applies IPC and net
    sysctls only to a namespace in the spec); none means the container just inherits."""
    paths = {"ipc": "/proc/7/ns/ipc", "network": "/proc/7/ns/net"}
    config = oci.build_oci_config(
        ContainerSpec(args=["true"], sysctls={"kernel.shm_rmid_forced": "1"}),
        rootfs="/r",
        cgroup_path=None,
        pod_namespaces=paths,
    )
    namespaces = config["linux"]["namespaces"]
    assert {"type": "ipc", "path": "/proc/7/ns/ipc"} in namespaces
    assert {"type": "network", "path": "/proc/7/ns/net"} in namespaces
    assert not any(ns["type"] == "uts" for ns in namespaces)
    assert config["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}


def test_settings_pod_namespaces() -> None:
    assert Settings().pod_namespaces == ("ipc", "net", "uts")
    assert Settings.from_argv(["--pod-namespaces=uts,ipc"]).pod_namespaces == ("ipc", "uts")
    assert Settings.from_argv(["--pod-namespaces="]).pod_namespaces == ()
    assert Settings.from_argv(["--pod-namespaces=net"]).pod_namespace_paths() == {
        "network": f"/proc/{os.getpid()}/ns/net"
    }
    with pytest.raises(ValueError, match="pod namespaces"):
        Settings.from_argv(["--pod-namespaces=pid"])


def _proc(tmp_path: Path, own: int, cap_eff: int) -> Path:
    (tmp_path / "oom_score_adj").write_text(f"{own}\n")
    (tmp_path / "status").write_text(f"Name:\tx\nCapEff:\t{cap_eff:016x}\n")
    return tmp_path


def test_oom_score_adj_is_kept_at_the_agents_own_without_cap_sys_resource(tmp_path: Path) -> None:
    from agent.guest.oci import CAP_SYS_RESOURCE, allowed_oom_score_adj

    without = _proc(tmp_path, 0, (1 << 40) - 1 - (1 << CAP_SYS_RESOURCE))
    # kubelet's -997 for node-critical pods would be EPERM for crun: kept at 0
    assert allowed_oom_score_adj(-997, without) == 0
    assert allowed_oom_score_adj(1000, without) == 1000
    assert allowed_oom_score_adj(0, without) == 0
    with_cap = _proc(tmp_path, 0, (1 << 40) - 1)
    assert allowed_oom_score_adj(-997, with_cap) == -997
    # unreadable: as asked
    assert allowed_oom_score_adj(-997, tmp_path / "absent") == -997
