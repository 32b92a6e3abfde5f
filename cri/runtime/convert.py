"""Translate CRI requests into what the sandbox and agent understand.

Pure functions: CRI protobufs in, agent records (ContainerSpec, Resources) out. They
hold the CRI semantics (command/args merged with the image, env override, security
context, capabilities, seccomp, resources) so they can be unit-tested without a VM.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from cri_api.v1 import api_pb2

from agent.protocol import DEFAULT_CAPABILITIES, CgroupUpdate, ContainerSpec, Resources
from cri.images.manifest import ImageConfig
from cri.runtime.errors import InvalidArgument

ALL_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _cap_name(name: str) -> str:
    upper = name.strip().upper()
    return upper if upper.startswith("CAP_") or upper == "ALL" else f"CAP_{upper}"


def capabilities(ctx: api_pb2.LinuxContainerSecurityContext) -> list[str]:
    """The container's capability set from the CRI add/drop lists."""
    if ctx.privileged:
        return list(ALL_CAPABILITIES)
    adds = [_cap_name(c) for c in ctx.capabilities.add_capabilities]
    drops = [_cap_name(c) for c in ctx.capabilities.drop_capabilities]
    for cap in adds + drops:
        if cap != "ALL" and cap not in ALL_CAPABILITIES:
            raise InvalidArgument(f"unknown capability {cap!r}")
    caps = list(ALL_CAPABILITIES) if "ALL" in adds else list(DEFAULT_CAPABILITIES)
    for cap in adds:
        if cap != "ALL" and cap not in caps:
            caps.append(cap)
    if "ALL" in drops:
        # "drop ALL, add X" keeps only the explicitly added ones
        return [c for c in adds if c != "ALL"]
    return [c for c in caps if c not in drops]


def merge_command(config: api_pb2.ContainerConfig, image: ImageConfig) -> list[str]:
    """Kubernetes semantics: command replaces the entrypoint (and drops the image's
    cmd); args replace the image's cmd."""
    if config.command:
        args = list(config.command) + list(config.args)
    else:
        args = list(image.entrypoint) + (list(config.args) if config.args else list(image.cmd))
    if not args:
        raise InvalidArgument(
            "the container has no command: set command or args, or use an image with an "
            "entrypoint or cmd"
        )
    return args


def merge_env(config: api_pb2.ContainerConfig, image: ImageConfig) -> list[str]:
    """Image env first, then the container's, later keys replacing earlier ones."""
    merged: dict[str, str] = {}
    for item in image.env:
        key, _, value = item.partition("=")
        merged[key] = value
    for kv in config.envs:
        if not kv.key:
            raise InvalidArgument("an environment variable has an empty name")
        merged[kv.key] = kv.value
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH_ENV.split("=", 1)[1]
    return [f"{k}={v}" for k, v in merged.items()]


def seccomp_profile(ctx: api_pb2.LinuxContainerSecurityContext) -> Any:
    """None (unconfined), "runtime/default", or a loaded OCI seccomp profile."""
    if ctx.HasField("seccomp"):
        profile = ctx.seccomp
        if profile.profile_type == api_pb2.SecurityProfile.RuntimeDefault:
            return "runtime/default"
        if profile.profile_type == api_pb2.SecurityProfile.Unconfined:
            return None
        return _load_seccomp(profile.localhost_ref)
    path = ctx.seccomp_profile_path
    if path in ("", "unconfined"):
        return None
    if path in ("runtime/default", "docker/default"):
        return "runtime/default"
    if path.startswith("localhost/"):
        return _load_seccomp(path.removeprefix("localhost/"))
    raise InvalidArgument(f"unknown seccomp profile {path!r}")


def _load_seccomp(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"seccomp profile {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"seccomp profile {path} is unreadable: {exc}") from exc


def resources(res: api_pb2.LinuxContainerResources | None) -> Resources | None:
    if res is None:
        return None
    out = Resources()
    if res.cpu_shares:
        out.cpu_shares = res.cpu_shares
    if res.cpu_quota > 0:
        out.cpu_quota = res.cpu_quota
    if res.cpu_period > 0:
        out.cpu_period = res.cpu_period
    if res.cpuset_cpus:
        out.cpuset_cpus = res.cpuset_cpus
    if res.cpuset_mems:
        out.cpuset_mems = res.cpuset_mems
    if res.memory_limit_in_bytes > 0:
        out.memory_limit = res.memory_limit_in_bytes
    return out


def cgroup_values(res: api_pb2.LinuxContainerResources) -> CgroupUpdate:
    """cgroup v2 file values for UpdateContainerResources."""
    update = CgroupUpdate()
    if res.cpu_quota > 0 or res.cpu_period > 0:
        quota = str(res.cpu_quota) if res.cpu_quota > 0 else "max"
        update.cpu_max = f"{quota} {res.cpu_period or 100000}"
    if res.cpu_shares:
        # the usual shares (2..262144) to weight (1..10000) mapping
        shares = max(2, min(262144, res.cpu_shares))
        update.cpu_weight = str(1 + ((shares - 2) * 9999) // 262142)
    if res.memory_limit_in_bytes > 0:
        update.memory_max = str(res.memory_limit_in_bytes)
    if res.cpuset_cpus:
        update.cpuset_cpus = res.cpuset_cpus
    if res.cpuset_mems:
        update.cpuset_mems = res.cpuset_mems
    return update


def pid_namespace(pod: api_pb2.PodSandboxConfig, config: api_pb2.ContainerConfig) -> str:
    mode = config.linux.security_context.namespace_options.pid
    if not config.linux.security_context.HasField("namespace_options"):
        mode = pod.linux.security_context.namespace_options.pid
    if mode == api_pb2.NODE:
        return "host"
    return "pod" if mode == api_pb2.POD else "container"


def container_spec(
    *,
    pod: api_pb2.PodSandboxConfig,
    config: api_pb2.ContainerConfig,
    image: ImageConfig,
    uid: int,
    gid: int,
    additional_gids: list[int],
) -> ContainerSpec:
    """The agent's ContainerSpec for a CRI CreateContainer (mounts are added later)."""
    ctx = config.linux.security_context
    args = merge_command(config, image)
    spec = ContainerSpec(
        args=args,
        env=merge_env(config, image),
        cwd=config.working_dir or image.working_dir or "/",
        uid=uid,
        gid=gid,
        additional_gids=additional_gids,
        capabilities=capabilities(ctx),
        no_new_privs=ctx.no_new_privs,
        readonly_rootfs=ctx.readonly_rootfs,
        masked_paths=list(ctx.masked_paths) if ctx.masked_paths else None,
        readonly_paths=list(ctx.readonly_paths) if ctx.readonly_paths else None,
        # privileged containers run unconfined, as with other runtimes
        seccomp=None if ctx.privileged else seccomp_profile(ctx),
        tty=config.tty,
        stdin=config.stdin,
        stdin_once=config.stdin_once,
        resources=resources(config.linux.resources if config.linux.HasField("resources") else None),
        sysctls=dict(pod.linux.sysctls),
        annotations=dict(config.annotations),
        pid_namespace=pid_namespace(pod, config),
        privileged=ctx.privileged,
    )
    pod_ns = pod.linux.security_context.namespace_options
    userns = pod_ns.userns_options
    if pod_ns.HasField("userns_options") and userns.mode == api_pb2.POD:
        spec.uid_mappings = [[m.container_id, m.host_id, m.length] for m in userns.uids]
        spec.gid_mappings = [[m.container_id, m.host_id, m.length] for m in userns.gids]
    if config.linux.resources.oom_score_adj:
        spec.oom_score_adj = config.linux.resources.oom_score_adj
    return spec


MAX_ID = 2**32 - 1

#: ImageSpec.image_ref (field 20 of CRI v1): the image id an image volume resolved to.
#: Newer than the CRI bindings in use, so it is written as a raw field, which protobuf
#: keeps through parsing, copying and serializing.
IMAGE_SPEC_IMAGE_REF = 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def image_spec_with_ref(spec: api_pb2.ImageSpec, image_ref: str) -> api_pb2.ImageSpec:
    """``spec`` with its image_ref set (replacing one it may carry)."""
    raw = image_ref.encode()
    field = _varint(IMAGE_SPEC_IMAGE_REF << 3 | 2) + _varint(len(raw)) + raw
    out = api_pb2.ImageSpec()
    # a repeated occurrence of a singular field: the last one wins
    out.ParseFromString(spec.SerializeToString() + field)
    return out


#: Longest metadata name, namespace or uid (a Kubernetes name is at most 253 bytes).
MAX_NAME_BYTES = 253


def check_name(what: str, value: str) -> str | None:
    """What is wrong with a metadata name, namespace or uid, or None. They travel to
    CNI plugins (CNI_ARGS: ``K=V;K=V``), to file and cgroup names and to logs."""
    if not value:
        return f"{what} is empty"
    if len(value.encode()) > MAX_NAME_BYTES:
        return f"{what} is longer than {MAX_NAME_BYTES} bytes"
    for char in value:
        if ord(char) < 0x20 or ord(char) == 0x7F:
            return f"{what} {value[:40]!r} contains the control character {char!r}"
        if char in ";=/":
            return f"{what} {value[:40]!r} contains {char!r}"
    return None


def check_user_namespace(config: api_pb2.PodSandboxConfig) -> str | None:
    """What is wrong with a pod's user namespace options, or None. Mode NODE (the
    default) runs in the pod's (VM's or host's) user namespace; POD gives the pod one
    with a single uid and a single gid mapping that maps container id 0."""
    ns = config.linux.security_context.namespace_options
    if not ns.HasField("userns_options"):
        return None
    userns = ns.userns_options
    mode = userns.mode
    if mode == api_pb2.NODE:
        if userns.uids or userns.gids:
            return "user namespace mode NODE takes no uid or gid mappings"
        return None
    if mode != api_pb2.POD:
        names = {api_pb2.CONTAINER: "CONTAINER", api_pb2.TARGET: "TARGET"}
        return f"user namespace mode {names.get(mode, mode)} is not supported: use POD or NODE"
    for kind, mappings in (("uid", userns.uids), ("gid", userns.gids)):
        if len(mappings) != 1:
            return f"a pod user namespace takes exactly one {kind} mapping, not {len(mappings)}"
        m = mappings[0]
        if m.container_id != 0:
            return f"the {kind} mapping must map container id 0 (it starts at {m.container_id})"
        if m.length == 0 or m.host_id + m.length - 1 > MAX_ID:
            return f"the {kind} mapping {m.host_id}+{m.length} is empty or out of range"
    return None


def check_log_path(log_path: str) -> str | None:
    """What is wrong with a container's log_path, or None: it names a file below the
    pod's log_directory (kubelet: ``<container>/<restart count>.log``), never elsewhere."""
    if log_path.startswith("/"):
        return f"log_path {log_path[:80]!r} is absolute; it must be relative to log_directory"
    if ".." in log_path.split("/"):
        return f"log_path {log_path[:80]!r} leaves the pod's log_directory"
    if "\0" in log_path or len(log_path) > 4096:
        return "log_path holds a NUL byte or is longer than 4096 bytes"
    return None


#: The smallest memory limit a container can start with (as Docker's minimum).
MIN_MEMORY_LIMIT = 6 << 20
MAX_CPU_SHARES = 262144


def check_resources(res: api_pb2.LinuxContainerResources) -> str | None:
    """What is wrong with a pod's or container's resources, or None."""
    if res.cpu_shares < 0 or res.cpu_shares > MAX_CPU_SHARES:
        return f"cpu_shares {res.cpu_shares} is outside 0..{MAX_CPU_SHARES}"
    if res.cpu_period and not 1000 <= res.cpu_period <= 1_000_000:
        return f"cpu_period {res.cpu_period} µs is outside 1000..1000000 (1 ms to 1 s)"
    if res.cpu_quota > 0 and res.cpu_quota < 1000:
        return f"cpu_quota {res.cpu_quota} µs is below the kernel's 1000 µs minimum"
    if 0 < res.memory_limit_in_bytes < MIN_MEMORY_LIMIT:
        return (
            f"a memory limit of {res.memory_limit_in_bytes} bytes is below the "
            f"{MIN_MEMORY_LIMIT >> 20} MiB a container needs to start"
        )
    if res.memory_limit_in_bytes < 0:
        return f"memory limit {res.memory_limit_in_bytes} is negative"
    return None


def check_dns(dns: api_pb2.DNSConfig) -> str | None:
    """What is wrong with a pod's DNSConfig, or None: each entry becomes a word of the
    guest's /etc/resolv.conf, so a newline or a blank would add lines or words."""
    for server in dns.servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            return f"DNS server {server[:60]!r} is not an IP address"
    for what, values in (("search domain", dns.searches), ("option", dns.options)):
        for value in values:
            if not value or len(value) > MAX_NAME_BYTES:
                return f"DNS {what} {value[:60]!r} is empty or longer than {MAX_NAME_BYTES}"
            if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
                return f"DNS {what} {value[:60]!r} contains a blank or a control character"
    return None


def resolv_conf(dns: api_pb2.DNSConfig) -> str:
    """/etc/resolv.conf text from the pod's DNSConfig ("" when it sets nothing)."""
    lines = [f"nameserver {s}" for s in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n" if lines else ""
