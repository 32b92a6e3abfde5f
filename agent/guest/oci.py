"""OCI runtime configuration for crun, built from a ContainerSpec (pure functions)."""

from __future__ import annotations

from pathlib import Path

from agent.protocol import DEFAULT_CAPABILITIES, ContainerSpec, ExecSpec, Resources

#: Bit of CAP_SYS_RESOURCE in /proc/<pid>/status's capability masks.
CAP_SYS_RESOURCE = 24


def _own_oom_limits(proc: Path = Path("/proc/self")) -> tuple[int, bool]:
    """This process's oom_score_adj, and whether it may set a lower one."""
    own = int((proc / "oom_score_adj").read_text())
    for line in (proc / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return own, bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return own, False


def allowed_oom_score_adj(requested: int, proc: Path = Path("/proc/self")) -> int:
    """The score a container may get from this process: ``requested``, or this
    process's own where lowering it needs CAP_SYS_RESOURCE, which it lacks (a host
    pod's agent under a daemon without it; crun would fail the whole container with
    EPERM). kubelet asks -997 for node-critical pods such as a DaemonSet's."""
    try:
        own, may_lower = _own_oom_limits(proc)
    except (OSError, ValueError):
        return requested
    return requested if may_lower or requested >= own else own


TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


DEFAULT_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

DEFAULT_READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

#: Syscalls the "runtime/default" profile refuses with EPERM. Everything else is allowed:
#: the VM is the isolation boundary, this profile removes the kernel-wide knobs and the
#: attack surface a normal workload has no use for.
DEFAULT_SECCOMP_DENY = (
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
)

_EPERM = 1

#: Capability names by number (linux/capability.h).
CAPABILITY_NUMBERS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip


#: Linux's resource numbers (asm-generic/resource.h), for a process set up without crun.
RLIMIT_NUMBERS = {
    name: number
    for number, name in enumerate(
        (
            "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE",
            "RLIMIT_RSS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS",
            "RLIMIT_LOCKS", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE",
            "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
        )
    )
}  # fmt: skip


def rlimit_number(name: str) -> int | None:
    """Linux's number of the resource ``name`` ("RLIMIT_NOFILE"), None if unknown."""
    return RLIMIT_NUMBERS.get(name)


def capabilities_in(mask: int) -> list[str]:
    """The names of the capabilities set in ``mask`` (e.g. a CapBnd value)."""
    return [name for bit, name in enumerate(CAPABILITY_NUMBERS) if mask >> bit & 1]


# Device nodes every container may use (major, minor, type), as runc's default list.
_DEFAULT_DEVICES = (
    ("c", 1, 3),  # null
    ("c", 1, 5),  # zero
    ("c", 1, 7),  # full
    ("c", 1, 8),  # random
    ("c", 1, 9),  # urandom
    ("c", 5, 0),  # tty
    ("c", 5, 1),  # console
    ("c", 5, 2),  # ptmx
    ("c", 136, None),  # pts/*
)


def default_seccomp_profile() -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {
                "names": list(DEFAULT_SECCOMP_DENY),
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": _EPERM,
            }
        ],
    }


def _with_default_env(env: list[str], tty: bool) -> list[str]:
    names = {item.split("=", 1)[0] for item in env}
    result = list(env)
    if "PATH" not in names:
        result.insert(0, DEFAULT_PATH)
    if tty and "TERM" not in names:
        result.append("TERM=xterm")
    return result


def _capabilities(names: list[str] | None) -> dict[str, list[str]]:
    caps = list(DEFAULT_CAPABILITIES if names is None else names)
    return {
        "bounding": caps,
        "effective": caps,
        "permitted": caps,
        "inheritable": [],
        "ambient": [],
    }


def _user(uid: int, gid: int, additional_gids: list[int]) -> dict[str, Any]:
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional_gids:
        user["additionalGids"] = list(additional_gids)
    return user


def process_config(spec: ContainerSpec) -> dict[str, Any]:
    process: dict[str, Any] = {
        "terminal": spec.tty,
        "user": _user(spec.uid, spec.gid, spec.additional_gids),
        "args": list(spec.args),
        "env": _with_default_env(spec.env, spec.tty),
        "cwd": spec.cwd or "/",
        "capabilities": _capabilities(spec.capabilities),
        "noNewPrivileges": spec.no_new_privs,
    }
    if spec.rlimits:
        process["rlimits"] = [
            {"type": r.type, "soft": r.soft, "hard": r.hard} for r in spec.rlimits
        ]
    if spec.oom_score_adj is not None:
        process["oomScoreAdj"] = allowed_oom_score_adj(spec.oom_score_adj)
    return process


def resources_config(resources: Resources) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if resources.cpu_shares is not None:
        cpu["shares"] = resources.cpu_shares
    if resources.cpu_quota is not None:
        cpu["quota"] = resources.cpu_quota
    if resources.cpu_period is not None:
        cpu["period"] = resources.cpu_period
    if resources.cpuset_cpus:
        cpu["cpus"] = resources.cpuset_cpus
    if resources.cpuset_mems:
        cpu["mems"] = resources.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    if resources.memory_limit is not None and resources.memory_limit > 0:
        out["memory"] = {"limit": resources.memory_limit, "swap": resources.memory_limit}
    if resources.pids_limit is not None and resources.pids_limit > 0:
        out["pids"] = {"limit": resources.pids_limit}
    return out


def _default_mounts(
    with_cgroup: bool, *, shm_dir: str = "/dev/shm", privileged: bool = False
) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        # The pod shares one IPC namespace, so it shares one /dev/shm too: the VM's, or
        # on the host the pod's own tmpfs (the host's with host IPC).
        {
            "destination": "/dev/shm",
            "type": "bind",
            "source": shm_dir,
            "options": ["rbind", "nosuid", "nodev", "noexec"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"],
        },
    ]
    if with_cgroup:
        mounts.append(
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "rw" if privileged else "ro"],
            }
        )
    return mounts


def _id_mappings(mappings: list[list[int]]) -> list[dict[str, int]]:
    out = []
    for mapping in mappings:
        if len(mapping) != 3 or min(mapping) < 0 or mapping[2] == 0:
            raise ValueError(f"an id mapping is [container id, host id, length], not {mapping}")
        out.append({"containerID": mapping[0], "hostID": mapping[1], "size": mapping[2]})
    if not out:
        raise ValueError("a user namespace needs both uid and gid mappings")
    return out


def build_oci_config(
    spec: ContainerSpec,
    *,
    rootfs: str,
    cgroup_path: str | None,
    pid_namespace_path: str | None = None,
    etc_dir: str | None = None,
    cgroup_namespace: bool = True,
    shm_dir: str = "/dev/shm",
    host_devices: list[dict[str, Any]] | None = None,
    pod_namespaces: dict[str, str] | None = None,
    user_namespace_path: str | None = None,
) -> dict[str, Any]:
    """The config.json for one container.

    ``cgroup_path`` is the cgroup path (e.g. "/clearcri/<id>") or None when crun runs
    without cgroups (then no resources and no cgroup mount); ``cgroup_namespace`` gives
    the container its own cgroup namespace (cgroup v2). ``pid_namespace_path`` joins
    an existing pid namespace (pod-wide sharing); a spec with ``pid_namespace`` "host"
    gets none. ``pod_namespaces`` (OCI type -> path) are the pod's own IPC, network
    and UTS namespaces, joined by path (crun applies IPC and network sysctls only to a
    namespace named in the spec). ``user_namespace_path`` joins the pod's user namespace
    (mode POD); without it a spec with id mappings gets a user namespace of its own.
    ``etc_dir`` holds the pod's hosts, resolv.conf and hostname files.
    A privileged spec gets every device (``host_devices`` are created in its /dev),
    writable /sys and no masked or read-only paths.
    """
    privileged = spec.privileged
    mounts = _default_mounts(cgroup_path is not None, shm_dir=shm_dir, privileged=privileged)
    destinations = {m.destination for m in spec.mounts}
    if etc_dir is not None and spec.pod_etc_files:
        for name in ("hosts", "resolv.conf", "hostname"):
            target = f"/etc/{name}"
            if target not in destinations:
                mounts.append(
                    {
                        "destination": target,
                        "type": "bind",
                        "source": f"{etc_dir}/{name}",
                        "options": ["rbind", "rprivate", "ro" if name == "hostname" else "rw"],
                    }
                )
    for mount in spec.mounts:
        mounts = [m for m in mounts if m["destination"] != mount.destination]
        options = list(mount.options)
        if mount.type == "bind" and not any(o in ("bind", "rbind") for o in options):
            options.insert(0, "rbind")
        mounts.append(
            {
                "destination": mount.destination,
                "type": mount.type,
                "source": mount.source or mount.type,
                "options": options,
            }
        )

    # Network, IPC and UTS belong to the VM (on the host: to the agent, which runs in
    # the pod's or the host's) and are shared by the whole pod; the pod's own are named.
    namespaces: list[dict[str, str]] = [{"type": "mount"}]
    for kind, path in (pod_namespaces or {}).items():
        namespaces.append({"type": kind, "path": path})
    if spec.pid_namespace == "host":
        pass
    elif pid_namespace_path:
        namespaces.append({"type": "pid", "path": pid_namespace_path})
    else:
        namespaces.append({"type": "pid"})
    if cgroup_path is not None and cgroup_namespace:
        namespaces.append({"type": "cgroup"})
    if user_namespace_path:
        # the pod's user namespace (its mappings were written when it was made)
        namespaces.append({"type": "user", "path": user_namespace_path})
    elif spec.uid_mappings or spec.gid_mappings:
        namespaces.append({"type": "user"})

    masked = DEFAULT_MASKED_PATHS if spec.masked_paths is None else spec.masked_paths
    readonly = DEFAULT_READONLY_PATHS if spec.readonly_paths is None else spec.readonly_paths
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "maskedPaths": [] if privileged else list(masked),
        "readonlyPaths": [] if privileged else list(readonly),
    }
    if privileged and host_devices:
        linux["devices"] = host_devices
    if (spec.uid_mappings or spec.gid_mappings) and not user_namespace_path:
        linux["uidMappings"] = _id_mappings(spec.uid_mappings)
        linux["gidMappings"] = _id_mappings(spec.gid_mappings)
    if spec.sysctls:
        linux["sysctl"] = dict(spec.sysctls)
    # A mount that propagates needs the container's root to let it (as kubelet's
    # HostToContainer / Bidirectional mounts do under other runtimes).
    all_options = {o for m in spec.mounts for o in m.options}
    if "rshared" in all_options:
        linux["rootfsPropagation"] = "rshared"
    elif "rslave" in all_options:
        linux["rootfsPropagation"] = "rslave"
    if cgroup_path is not None:
        linux["cgroupsPath"] = cgroup_path
        resources: dict[str, Any] = (
            resources_config(spec.resources) if spec.resources is not None else {}
        )
        devices: list[dict[str, Any]] = [{"allow": privileged, "access": "rwm"}]
        for kind, major, minor in () if privileged else _DEFAULT_DEVICES:
            rule: dict[str, Any] = {"allow": True, "type": kind, "major": major, "access": "rwm"}
            if minor is not None:
                rule["minor"] = minor
            devices.append(rule)
        resources["devices"] = devices
        linux["resources"] = resources
    if spec.seccomp is not None:
        if spec.seccomp == "runtime/default":
            linux["seccomp"] = default_seccomp_profile()
        elif isinstance(spec.seccomp, dict):
            linux["seccomp"] = spec.seccomp
        elif spec.seccomp != "unconfined":
            raise ValueError(f"unsupported seccomp profile {spec.seccomp!r}")
    # plain Linux: the container is laid out at random even when the agent starts crun
    # at fixed addresses (settings.unrandomized_helpers)
    linux["personality"] = {"domain": "LINUX"}

    return {
        "ociVersion": "1.0.2",
        "process": process_config(spec),
        "root": {"path": rootfs, "readonly": spec.readonly_rootfs},
        "mounts": mounts,
        "linux": linux,
        "annotations": dict(spec.annotations),
    }


def build_exec_process(container: ContainerSpec, spec: ExecSpec) -> dict[str, Any]:
    """The process.json for ``crun exec``: the container's process with exec overrides."""
    env = _with_default_env(container.env, False)
    overridden = {item.split("=", 1)[0] for item in spec.env}
    env = [item for item in env if item.split("=", 1)[0] not in overridden] + list(spec.env)
    if spec.tty and not any(item.startswith("TERM=") for item in env):
        env.append("TERM=xterm")
    uid = container.uid if spec.uid is None else spec.uid
    gid = container.gid if spec.gid is None else spec.gid
    groups = container.additional_gids if spec.additional_gids is None else spec.additional_gids
    process = process_config(container)
    process.update(
        {
            "terminal": spec.tty,
            "user": _user(uid, gid, groups),
            "args": list(spec.args),
            "env": env,
            "cwd": spec.cwd or container.cwd or "/",
        }
    )
    if spec.tty and spec.cols > 0 and spec.rows > 0:
        # the size the client's terminal had when it asked: the process's first
        # TIOCGWINSZ must not see 0x0 (crun sets it on the new terminal before exec)
        process["consoleSize"] = {"width": spec.cols, "height": spec.rows}
    process.pop("oomScoreAdj", None)
    return process


def validate_spec(spec: ContainerSpec) -> None:
    """Raise ValueError for a spec crun could never run."""
    if not spec.args:
        raise ValueError("args must not be empty")
    if spec.pid_namespace not in ("container", "pod", "host"):
        raise ValueError(
            f"pid_namespace must be 'container', 'pod' or 'host', not {spec.pid_namespace!r}"
        )
    for mount in spec.mounts:
        if not mount.destination.startswith("/"):
            raise ValueError(f"mount destination {mount.destination!r} is not absolute")
    if not spec.cwd.startswith("/"):
        raise ValueError(f"cwd {spec.cwd!r} is not absolute")
    if spec.stdin_once and not spec.stdin:
        raise ValueError("stdin_once needs stdin")


def device_entry(path: str, mode: int, rdev: int, uid: int, gid: int) -> dict[str, Any] | None:
    """The OCI ``linux.devices`` entry for a device node (None for anything else)."""
    import stat

    if stat.S_ISCHR(mode):
        kind = "c"
    elif stat.S_ISBLK(mode):
        kind = "b"
    else:
        return None
    import os

    return {
        "path": path,
        "type": kind,
        "major": os.major(rdev),
        "minor": os.minor(rdev),
        "fileMode": stat.S_IMODE(mode),
        "uid": uid,
        "gid": gid,
    }
