"""Pod networking: one network namespace per pod, CNI plugins, and a tap device that
carries the pod's address into the VM.

What one pod gets, in order:

1. a network namespace, bind-mounted at ``<netns_dir>/clearcri-<sandbox id>`` so it
   outlives the daemon;
2. CNI ADD of the node's network (the first config file in the configured directories)
   with the Kubernetes CNI_ARGS and runtimeConfig; plugins make ``eth0`` (a veth) in
   the namespace and give it the pod's IPs;
3. ``tap0`` in the same namespace, joined to ``eth0`` with an ingress qdisc and a u32
   match-all ``mirred`` redirect on each side, so every frame crosses unchanged;
4. the tap's file descriptor handed to QEMU (``-netdev tap,fd=N``); the guest NIC takes
   the veth's MAC, and the agent gives it the IPs, routes and MTU
   (``configure_network``).

``eth0`` keeps its addresses: nothing in the namespace ever sees a frame (ingress goes
straight to the tap), and CNI CHECK still finds what ADD made. DEL needs the config
and the result of ADD; both are kept in the sandbox's state, so DEL works after a
daemon restart even when the node's config has changed since.

Blocking work (netns creation, the tap, netlink) runs in a dedicated short-lived
thread that enters the pod's namespace; the event loop never blocks and never changes
namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.protocol import CodedError, ErrorCode
from sandbox.api import (
    DnsConfig,
    NetworkStatus,
    PodNetworkSpec,
)

log = logging.getLogger(__name__)

#: Name of the CNI interface in the pod's namespace (CNI_IFNAME).
POD_IFNAME = "eth0"
#: Name of the tap device next to it.
TAP_IFNAME = "tap0"
#: Guest PCI address of the NIC on pcie.0 (0x03 OS image, 0x04 agent port, 0x08+ slots).
NIC_PCI_ADDR = "0x05"
NETDEV_ID = "net0"

#: Config file extensions, as libcni reads them.
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
#: CNI spec versions whose results this module understands.
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703
MS_BIND = 4096
MNT_DETACH = 2
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
ETH_P_ALL = 0x0003
TC_INGRESS_PARENT = 0xFFFF0000

T = TypeVar("T")


class NetworkError(CodedError):
    """Pod networking failed; the message says what and what to do."""

    code = ErrorCode.FAILED_PRECONDITION


class CniConfigError(NetworkError):
    """No usable CNI network configuration (missing, unreadable or invalid)."""


class CniPluginError(NetworkError):
    """A CNI plugin returned an error (or could not be run)."""

    def __init__(self, message: str, *, code: int = 0, details: str = "") -> None:
        super().__init__(message)
        #: the plugin's CNI error code (0: none given)
        self.cni_code = code
        self.details = details


# ------------------------------------------------------------------------- settings


@dataclass
class NetworkConfig:
    """Node-wide CNI settings (the daemon's `[cni]` table)."""

    enabled: bool = True
    #: Directories searched for config files; the first directory holding one wins,
    #: and in it the first file by name (``.conf``, ``.conflist``, ``.json``).
    conf_dirs: list[Path] = field(default_factory=lambda: [Path("/etc/cni/net.d")])
    #: Plugin binaries are searched in this order (CNI_PATH).
    bin_dirs: list[Path] = field(
        default_factory=lambda: [Path("/opt/cni/bin"), Path("/usr/lib/cni")]
    )
    #: Where each pod's network namespace is bind-mounted.
    netns_dir: Path = Path("/run/netns")
    plugin_timeout_s: float = 60.0
    #: DEL attempts (with a short pause between) before a teardown reports failure.
    del_attempts: int = 2


# ------------------------------------------------------------------------ pod input


# ------------------------------------------------------------------------ CNI result


@dataclass(frozen=True)
class IpConfig:
    address: str  # CIDR: "10.88.0.5/16"
    gateway: str = ""
    interface: int | None = None

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]

    @property
    def version(self) -> int:
        return ipaddress.ip_interface(self.address).version


@dataclass(frozen=True)
class RouteConfig:
    dst: str
    gw: str = ""

    @property
    def version(self) -> int:
        return ipaddress.ip_network(self.dst, strict=False).version


@dataclass(frozen=True)
class InterfaceConfig:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int = 0


@dataclass(frozen=True)
class DnsResult:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass
class NetworkResult:
    """The final CNI result of a pod, plus what the tap setup learned (MAC, MTU)."""

    cni_version: str
    interfaces: list[InterfaceConfig]
    ips: list[IpConfig]
    routes: list[RouteConfig]
    dns: DnsResult
    raw: dict[str, Any]
    #: MAC and MTU of the pod's eth0, which the guest NIC takes over.
    mac: str = ""
    mtu: int = 0

    @classmethod
    def from_cni(cls, data: Mapping[str, Any], cni_version: str = "") -> NetworkResult:
        """Parse a plugin's result (spec 0.1.0 to 1.1.0)."""
        if not isinstance(data, Mapping):
            raise CniPluginError("the CNI result is not a JSON object")
        version = str(data.get("cniVersion") or cni_version)
        interfaces: list[InterfaceConfig] = []
        ips: list[IpConfig] = []
        routes: list[RouteConfig] = []
        try:
            if "ip4" in data or "ip6" in data:  # 0.1.0 / 0.2.0
                for key in ("ip4", "ip6"):
                    block = data.get(key)
                    if not isinstance(block, Mapping):
                        continue
                    ips.append(IpConfig(str(block["ip"]), str(block.get("gateway") or "")))
                    routes += [
                        RouteConfig(str(r["dst"]), str(r.get("gw") or ""))
                        for r in block.get("routes") or []
                    ]
            else:
                for item in data.get("interfaces") or []:
                    interfaces.append(
                        InterfaceConfig(
                            str(item.get("name", "")),
                            str(item.get("mac") or ""),
                            str(item.get("sandbox") or ""),
                            int(item.get("mtu") or 0),
                        )
                    )
                for item in data.get("ips") or []:
                    index = item.get("interface")
                    ips.append(
                        IpConfig(
                            str(item["address"]),
                            str(item.get("gateway") or ""),
                            int(index) if index is not None else None,
                        )
                    )
                routes = [
                    RouteConfig(str(r["dst"]), str(r.get("gw") or ""))
                    for r in data.get("routes") or []
                ]
            for ip in ips:
                ipaddress.ip_interface(ip.address)
            for route in routes:
                ipaddress.ip_network(route.dst, strict=False)
        except (KeyError, TypeError, ValueError) as exc:
            raise CniPluginError(f"the CNI result is malformed: {exc!r}") from exc
        dns_data = data.get("dns") or {}
        dns = DnsResult(
            tuple(str(s) for s in dns_data.get("nameservers") or ()),
            str(dns_data.get("domain") or ""),
            tuple(str(s) for s in dns_data.get("search") or ()),
            tuple(str(s) for s in dns_data.get("options") or ()),
        )
        return cls(version, interfaces, ips, routes, dns, dict(data))

    def pod_interface_ips(self, ifname: str = POD_IFNAME) -> list[IpConfig]:
        """IPs of the pod's interface (IPs that name no interface count as its own)."""
        out = []
        for ip in self.ips:
            if ip.interface is None or not (0 <= ip.interface < len(self.interfaces)):
                out.append(ip)
                continue
            iface = self.interfaces[ip.interface]
            if iface.name == ifname and iface.sandbox:
                out.append(ip)
        return out

    @property
    def pod_ips(self) -> list[str]:
        """IPv4 first, then IPv6 (the first is the pod's primary IP)."""
        ips = self.pod_interface_ips()
        return [ip.ip for ip in ips if ip.version == 4] + [ip.ip for ip in ips if ip.version == 6]

    @property
    def ipv4(self) -> str:
        return next((ip.ip for ip in self.pod_interface_ips() if ip.version == 4), "")

    @property
    def ipv6(self) -> str:
        return next((ip.ip for ip in self.pod_interface_ips() if ip.version == 6), "")

    def guest_routes(self) -> list[RouteConfig]:
        """Routes with the gateway filled in as the plugins do it: a route without
        ``gw`` goes via the gateway of the first pod IP of its family, if any."""
        gateways: dict[int, str] = {}
        for ip in self.pod_interface_ips():
            if ip.gateway and ip.version not in gateways:
                gateways[ip.version] = ip.gateway
        return [RouteConfig(r.dst, r.gw or gateways.get(r.version, "")) for r in self.routes]

    def to_state(self) -> dict[str, Any]:
        return {"cni_version": self.cni_version, "raw": self.raw, "mac": self.mac, "mtu": self.mtu}

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> NetworkResult:
        result = cls.from_cni(data["raw"], str(data.get("cni_version", "")))
        result.mac = str(data.get("mac", ""))
        result.mtu = int(data.get("mtu", 0))
        return result


# ---------------------------------------------------------------------- pod /etc files


def resolv_conf_text(dns: DnsConfig) -> str:
    """resolv.conf for a pod from its CRI DNSConfig (empty config: empty text)."""
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n" if lines else ""


def hosts_text(hostname: str, ips: Iterable[str]) -> str:
    """/etc/hosts for a pod: localhost entries and the pod's IPs under its hostname."""
    lines = [
        "# Kubernetes-managed hosts file (clearcri).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    if hostname:
        lines += [f"{ip}\t{hostname}" for ip in ips]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ CNI config


@dataclass
class CniConfList:
    """One network configuration list (a ``.conf`` file becomes a list of one)."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: str = ""
    disable_check: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any, source: str = "", *, single: bool | None = None) -> CniConfList:
        """Validate a conflist (or, with ``single`` or no "plugins" key, a single conf)."""
        where = source or "CNI config"
        if not isinstance(data, dict):
            raise CniConfigError(f"{where}: not a JSON object")
        if single is None:
            single = "plugins" not in data
        if single:
            plugin = dict(data)
            data = {
                "cniVersion": plugin.get("cniVersion", ""),
                "name": plugin.get("name", ""),
                "plugins": [plugin],
            }
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise CniConfigError(f"{where}: the network has no name")
        version = data.get("cniVersion")
        if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
            raise CniConfigError(
                f"{where}: cniVersion {version!r} is not supported "
                f"(use one of {', '.join(SUPPORTED_VERSIONS)})"
            )
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise CniConfigError(f"{where}: the network lists no plugins")
        for index, plugin in enumerate(plugins):
            if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
                raise CniConfigError(f"{where}: plugin {index} has no type")
            if "/" in plugin["type"] or not plugin["type"]:
                raise CniConfigError(f"{where}: plugin {index} has a bad type {plugin['type']!r}")
        return cls(
            name=name,
            cni_version=version,
            plugins=[dict(p) for p in plugins],
            source=source,
            disable_check=bool(data.get("disableCheck", False)),
            raw=dict(data),
        )

    def to_state(self) -> dict[str, Any]:
        return {"source": self.source, "conflist": self.raw}

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> CniConfList:
        return cls.parse(data["conflist"], str(data.get("source", "")), single=False)


def version_at_least(version: str, minimum: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(part) for part in v.split(".") if part.isdigit())

    return key(version) >= key(minimum)


def find_conf_file(conf_dirs: Sequence[Path]) -> Path | None:
    """The file that configures the node's network: the first (by name) in the first
    directory that has any."""
    for directory in conf_dirs:
        try:
            names = sorted(
                entry.name
                for entry in directory.iterdir()
                if entry.suffix in CONF_EXTENSIONS and entry.is_file()
            )
        except OSError:
            continue
        if names:
            return directory / names[0]
    return None


def load_conf_list(conf_dirs: Sequence[Path]) -> CniConfList:
    path = find_conf_file(conf_dirs)
    if path is None:
        dirs = ", ".join(str(d) for d in conf_dirs) or "(no directories configured)"
        raise CniConfigError(
            f"no CNI network config found in {dirs}: install a network add-on or put a "
            ".conflist there"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CniConfigError(f"cannot read CNI config {path}: {exc}") from exc
    return CniConfList.parse(data, str(path), single=None if path.suffix != ".conflist" else False)


def find_plugin(plugin_type: str, bin_dirs: Sequence[Path]) -> Path:
    for directory in bin_dirs:
        candidate = directory / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    dirs = ", ".join(str(d) for d in bin_dirs)
    raise CniConfigError(f"CNI plugin {plugin_type!r} not found in {dirs}")


# ----------------------------------------------------------------------- invocation


@dataclass(frozen=True)
class CniInvocation:
    """What stays the same for every plugin call of one pod."""

    container_id: str
    netns: str
    ifname: str
    cni_args: str
    runtime_config: dict[str, Any]


def cni_args(spec: PodNetworkSpec, sandbox_id: str) -> str:
    """CNI_ARGS as kubelet's runtimes set them."""
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", spec.namespace),
        ("K8S_POD_NAME", spec.name),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
        ("K8S_POD_UID", spec.uid),
    ]
    for key, value in pairs:
        if ";" in value or "=" in value:
            raise NetworkError(f"{key} {value!r} cannot be passed in CNI_ARGS")
    return ";".join(f"{k}={v}" for k, v in pairs)


def runtime_config(spec: PodNetworkSpec) -> dict[str, Any]:
    """runtimeConfig entries (each goes only to plugins with that capability)."""
    out: dict[str, Any] = {}
    mappings = [
        {
            "hostPort": m.host_port,
            "containerPort": m.container_port,
            "protocol": m.protocol.lower(),
            "hostIP": m.host_ip,
        }
        for m in spec.port_mappings
        if m.host_port > 0
    ]
    if mappings:
        out["portMappings"] = mappings
    if spec.dns is not None and (spec.dns.servers or spec.dns.searches or spec.dns.options):
        out["dns"] = {
            "servers": list(spec.dns.servers),
            "searches": list(spec.dns.searches),
            "options": list(spec.dns.options),
        }
    bw = spec.bandwidth
    if bw is not None and (bw.ingress_rate or bw.egress_rate):
        limits: dict[str, int] = {}
        if bw.ingress_rate:
            limits["ingressRate"] = bw.ingress_rate
            limits["ingressBurst"] = bw.ingress_burst or bw.ingress_rate
        if bw.egress_rate:
            limits["egressRate"] = bw.egress_rate
            limits["egressBurst"] = bw.egress_burst or bw.egress_rate
        out["bandwidth"] = limits
    return out


def plugin_stdin(
    conflist: CniConfList,
    plugin: Mapping[str, Any],
    invocation: CniInvocation,
    prev_result: Mapping[str, Any] | None,
) -> bytes:
    """The config one plugin reads: its own entry, the list's name and version, the
    runtimeConfig keys it declared as capabilities, and the previous result."""
    conf = dict(plugin)
    conf["name"] = conflist.name
    conf["cniVersion"] = conflist.cni_version
    capabilities = plugin.get("capabilities") or {}
    wanted = {
        key: value for key, value in invocation.runtime_config.items() if capabilities.get(key)
    }
    if wanted:
        conf["runtimeConfig"] = wanted
    else:
        conf.pop("runtimeConfig", None)
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    else:
        conf.pop("prevResult", None)
    return json.dumps(conf).encode()


def plugin_env(command: str, invocation: CniInvocation, bin_dirs: Sequence[Path]) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CNI_") and key in ("PATH", "LANG", "LC_ALL", "TMPDIR", "HOME")
    }
    path = env.get("PATH", "")
    for extra in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if extra not in path.split(":"):
            path = f"{path}:{extra}" if path else extra
    env.update(
        PATH=path,
        CNI_COMMAND=command,
        CNI_CONTAINERID=invocation.container_id,
        CNI_NETNS=invocation.netns,
        CNI_IFNAME=invocation.ifname,
        CNI_ARGS=invocation.cni_args,
        CNI_PATH=":".join(str(d) for d in bin_dirs),
    )
    return env


async def exec_plugin(
    path: Path, env: Mapping[str, str], stdin: bytes, *, timeout: float
) -> dict[str, Any] | None:
    """Run one plugin; its JSON output (None if it printed nothing), or CniPluginError."""
    command = env.get("CNI_COMMAND", "?")
    try:
        proc = await asyncio.create_subprocess_exec(
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        raise CniPluginError(f"cannot run CNI plugin {path}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        message = text or err.decode(errors="replace").strip() or f"exit {proc.returncode}"
        code = 0
        details = ""
        with contextlib.suppress(ValueError, AttributeError):
            parsed = json.loads(text)
            message = str(parsed.get("msg") or message)
            code = int(parsed.get("code") or 0)
            details = str(parsed.get("details") or "")
        full = f"CNI plugin {path.name} {command} failed: {message}"
        if details:
            full += f" ({details})"
        raise CniPluginError(full, code=code, details=details)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CniPluginError(
            f"CNI plugin {path.name} {command} printed no JSON: {text[:200]!r}"
        ) from exc
    if not isinstance(value, dict):
        raise CniPluginError(f"CNI plugin {path.name} {command} printed a non-object")
    return value


class CniRunner:
    """Runs a network configuration list through its plugins (ADD, CHECK, DEL, STATUS)."""

    def __init__(self, bin_dirs: Sequence[Path], timeout: float = 60.0) -> None:
        self.bin_dirs = list(bin_dirs)
        self.timeout = timeout

    async def _call(
        self,
        command: str,
        conflist: CniConfList,
        plugin: Mapping[str, Any],
        invocation: CniInvocation,
        prev: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        path = find_plugin(str(plugin["type"]), self.bin_dirs)
        env = plugin_env(command, invocation, self.bin_dirs)
        stdin = plugin_stdin(conflist, plugin, invocation, prev)
        try:
            return await exec_plugin(path, env, stdin, timeout=self.timeout)
        except TimeoutError:
            raise CniPluginError(
                f"CNI plugin {path.name} {command} did not finish in {self.timeout:.0f} s"
            ) from None

    async def add(
        self,
        conflist: CniConfList,
        invocation: CniInvocation,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> NetworkResult:
        """ADD through the chain; each plugin gets the previous one's result. A failure
        leaves cleanup to the caller (DEL with the last result passed to on_result)."""
        prev: dict[str, Any] | None = None
        for plugin in conflist.plugins:
            result = await self._call("ADD", conflist, plugin, invocation, prev)
            if result is None:
                raise CniPluginError(f"CNI plugin {plugin['type']} ADD printed no result")
            prev = result
            if on_result is not None:
                on_result(result)
        assert prev is not None
        return NetworkResult.from_cni(prev, conflist.cni_version)

    async def delete(
        self, conflist: CniConfList, invocation: CniInvocation, prev: Mapping[str, Any] | None
    ) -> None:
        """DEL in reverse order. Every plugin is called even if one fails; the first
        error is raised at the end."""
        if not version_at_least(conflist.cni_version, "0.4.0"):
            prev = None
        first_error: CniPluginError | CniConfigError | None = None
        for plugin in reversed(conflist.plugins):
            try:
                await self._call("DEL", conflist, plugin, invocation, prev)
            except (CniPluginError, CniConfigError) as exc:
                log.warning("CNI DEL container=%s: %s", invocation.container_id, exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    async def check(
        self, conflist: CniConfList, invocation: CniInvocation, prev: Mapping[str, Any]
    ) -> bool:
        """CHECK through the chain; False when the list does not support it."""
        if conflist.disable_check or not version_at_least(conflist.cni_version, "0.4.0"):
            return False
        for plugin in conflist.plugins:
            await self._call("CHECK", conflist, plugin, invocation, prev)
        return True

    async def status(self, conflist: CniConfList) -> bool:
        """STATUS (spec 1.1.0) on every plugin; False when the list predates it."""
        if not version_at_least(conflist.cni_version, "1.1.0"):
            return False
        empty = CniInvocation("", "", "", "", {})
        for plugin in conflist.plugins:
            await self._call("STATUS", conflist, plugin, empty, None)
        return True


# ------------------------------------------------------------- namespaces and threads

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_lib().setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


def run_in_thread(fn: Callable[[], T], netns: Path | None = None) -> T:
    """Run ``fn`` in a fresh thread (in ``netns`` when given) and return its result.

    A thread that changed namespace ends with its work, so no other code ever runs in
    a pod's namespace by accident. Blocking: call through ``asyncio.to_thread``.
    """
    box: list[Any] = []
    failure: list[BaseException] = []

    def main() -> None:
        try:
            if netns is not None:
                _setns(netns)
            box.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=main, name="clearcri-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return box[0]  # type: ignore[no-any-return]


def create_netns(path: Path) -> None:
    """Create a network namespace and bind-mount it at ``path`` (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)

    def unshare_and_bind() -> None:
        lib = _lib()
        _check(lib.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(lib.mount(source, os.fsencode(path), None, MS_BIND, None), f"bind {path}")

    try:
        run_in_thread(unshare_and_bind)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def is_netns_mount(path: Path) -> bool:
    """True if ``path`` is a bind-mounted network namespace."""
    try:
        with open(path, "rb") as ns:
            return fcntl.ioctl(ns.fileno(), NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def remove_netns(path: Path) -> None:
    """Unmount and delete a namespace mount point; missing is fine (blocking)."""
    if not path.exists():
        return
    result = _lib().umount2(os.fsencode(path), MNT_DETACH)
    if result != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -------------------------------------------------------------------------- tap


@dataclass
class TapDevice:
    """A tap fd opened in the pod's namespace, ready to be handed to QEMU."""

    fd: int
    mac: str
    mtu: int
    name: str = TAP_IFNAME

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.fd,)

    def qemu_args(self, pci_addr: str = NIC_PCI_ADDR) -> list[str]:
        return [
            "-netdev",
            f"tap,id={NETDEV_ID},fd={self.fd},vhost=off",
            "-device",
            f"virtio-net-pci,netdev={NETDEV_ID},id=nic0,mac={self.mac},"
            f"bus=pcie.0,addr={pci_addr},romfile=",
        ]

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(value)


class _IPRouteLike(Protocol):  # the part of pyroute2's IPRoute used here
    def link_lookup(self, **kwargs: Any) -> list[int]: ...
    def get_links(self, *args: Any, **kwargs: Any) -> Any: ...
    def link(self, command: str, **kwargs: Any) -> Any: ...
    def tc(self, command: str, *args: Any, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


def join_tap(ipr: _IPRouteLike, veth: str, tap: str) -> tuple[str, int]:
    """Redirect every frame between ``veth`` and ``tap`` both ways; return the veth's
    MAC and MTU. The tap takes the veth's MTU and comes up."""
    veth_index = ipr.link_lookup(ifname=veth)
    tap_index = ipr.link_lookup(ifname=tap)
    if not veth_index:
        raise NetworkError(f"the CNI plugins made no {veth} in the pod's namespace")
    if not tap_index:
        raise NetworkError(f"{tap} vanished from the pod's namespace")
    link = ipr.get_links(veth_index[0])[0]
    mac = str(link.get_attr("IFLA_ADDRESS"))
    mtu = int(link.get_attr("IFLA_MTU"))
    ipr.link("set", index=tap_index[0], mtu=mtu, state="up")
    for src, dst in ((veth_index[0], tap_index[0]), (tap_index[0], veth_index[0])):
        ipr.tc("add", "ingress", src)
        ipr.tc(
            "add-filter",
            "u32",
            src,
            parent=TC_INGRESS_PARENT,
            prio=1,
            protocol=ETH_P_ALL,
            target=0x1,
            keys=["0x0/0x0+0"],
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst},
        )
    return mac, mtu


def random_mac() -> str:
    """A random unicast, locally administered MAC."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def open_tap(netns: Path, tap: str = TAP_IFNAME) -> TapDevice:
    """Create ``tap`` in ``netns`` and return its open fd (blocking). The tap is not
    persistent: it disappears when the last fd (QEMU's) is closed."""

    def work() -> TapDevice:
        fd = _open_tap(tap)
        # The tap is a wire into the VM: the namespace's own stack stays off it.
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6", "1")
        return TapDevice(fd=fd, mac=random_mac(), mtu=0, name=tap)

    return run_in_thread(work, netns)


def join_tap_in(netns: Path, veth: str = POD_IFNAME, tap: str = TAP_IFNAME) -> tuple[str, int]:
    """:func:`join_tap` inside ``netns`` (blocking)."""

    def work() -> tuple[str, int]:
        from pyroute2 import IPRoute

        ipr = IPRoute()
        try:
            return join_tap(ipr, veth, tap)
        finally:
            ipr.close()

    return run_in_thread(work, netns)


# ------------------------------------------------------------------------- managers


class GuestNetworkAgent(Protocol):
    """The agent client call used here (keeps this module free of agent imports)."""

    async def configure_network(self, interfaces: list[dict[str, Any]]) -> Any: ...


class NetworkManager:
    """The node's pod networking: config discovery, readiness, the pod CIDR."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        self.config = config or NetworkConfig()
        self.runner = CniRunner(self.config.bin_dirs, self.config.plugin_timeout_s)
        self.pod_cidrs: list[str] = []

    def load(self) -> CniConfList:
        conflist = load_conf_list(self.config.conf_dirs)
        for plugin in conflist.plugins:
            find_plugin(str(plugin["type"]), self.config.bin_dirs)
        return conflist

    def status(self) -> NetworkStatus:
        """NetworkReady: a readable config whose plugins are all installed."""
        if not self.config.enabled:
            return NetworkStatus(True, "", "pod networking is disabled")
        try:
            conflist = self.load()
        except CniConfigError as exc:
            return NetworkStatus(False, "NetworkPluginNotReady", f"cni config load failed: {exc}")
        return NetworkStatus(True, "", f"network {conflist.name} from {conflist.source}")

    async def network_status(self) -> NetworkStatus:
        """As :meth:`status`, and for spec 1.1.0 configs the plugins' own STATUS."""
        status = self.status()
        if not status.ready or not self.config.enabled:
            return status
        try:
            conflist = self.load()
            await self.runner.status(conflist)
        except NetworkError as exc:
            return NetworkStatus(False, "NetworkPluginNotReady", str(exc))
        return status

    def update_pod_cidr(self, cidr: str) -> None:
        """Keep the node's pod CIDR(s) from UpdateRuntimeConfig ("a,b" for dual stack)."""
        cidrs = [part.strip() for part in cidr.split(",") if part.strip()]
        for part in cidrs:
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError as exc:
                raise NetworkError(f"bad pod CIDR {part!r}: {exc}") from exc
        if cidrs != self.pod_cidrs:
            log.info("pod CIDR set to %s", ",".join(cidrs) or "(none)")
        self.pod_cidrs = cidrs

    @property
    def pod_cidr(self) -> str:
        return ",".join(self.pod_cidrs)

    def for_pod(
        self, sandbox_id: str, spec: PodNetworkSpec, save: Callable[[], None] = lambda: None
    ) -> PodNetwork:
        return PodNetwork(self, sandbox_id, spec, save)

    def netns_path(self, sandbox_id: str) -> Path:
        return self.config.netns_dir / f"clearcri-{sandbox_id}"


class PodNetwork:
    """The network of one pod: its namespace, CNI attachment and tap.

    Start-up overlaps CNI with the VM's boot: :meth:`prepare` makes the namespace and
    the tap (milliseconds) so QEMU can start at once; :meth:`start_attach` runs CNI ADD
    and joins the tap to the veth while the guest boots; :meth:`configure_guest` waits
    for that and gives the guest NIC the veth's MAC, the IPs, routes and MTU.

    Every step is written to the sandbox's state (through ``save``) *before* it is
    taken, so a daemon that dies half-way leaves enough behind for teardown to undo it.
    """

    def __init__(
        self,
        manager: NetworkManager,
        sandbox_id: str,
        spec: PodNetworkSpec,
        save: Callable[[], None],
    ) -> None:
        self.manager = manager
        self.sandbox_id = sandbox_id
        self.spec = spec
        self._save = save
        #: "none" → "attaching" → "attached" → "released"
        self.phase = "none"
        self.netns: Path | None = None
        self.conflist: CniConfList | None = None
        self.invocation: CniInvocation | None = None
        self.result: NetworkResult | None = None
        #: The MAC QEMU gave the NIC before the veth's was known.
        self.boot_mac = ""
        self._partial: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._attach_task: asyncio.Future[NetworkResult] | None = None

    # state ----------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        inv = self.invocation
        return {
            "phase": self.phase,
            "netns": str(self.netns) if self.netns else "",
            "config": self.conflist.to_state() if self.conflist else None,
            "invocation": asdict(inv) if inv else None,
            "result": self.result.to_state() if self.result else None,
            "partial_result": self._partial,
            "boot_mac": self.boot_mac,
            "timings": self.timings,
        }

    def restore(self, data: Mapping[str, Any] | None) -> None:
        """Take over the state a previous daemon saved."""
        if not data:
            return
        self.phase = str(data.get("phase", "none"))
        self.netns = Path(data["netns"]) if data.get("netns") else None
        if data.get("config"):
            self.conflist = CniConfList.from_state(data["config"])
        if data.get("invocation"):
            self.invocation = CniInvocation(**data["invocation"])
        if data.get("result"):
            self.result = NetworkResult.from_state(data["result"])
        self._partial = data.get("partial_result")
        self.boot_mac = str(data.get("boot_mac", ""))
        self.timings = dict(data.get("timings") or {})

    @property
    def attached(self) -> bool:
        """True while something of the pod's network may exist on the host."""
        return self.phase in ("attaching", "attached")

    # setup ----------------------------------------------------------------

    async def prepare(self) -> TapDevice | None:
        """Load the config, make the namespace and the tap; the tap's fd goes to QEMU.
        None when networking is disabled on this node. On failure whatever was made is
        removed and NetworkError is raised."""
        if not self.manager.config.enabled:
            return None
        async with self._lock:
            if self.phase != "none":
                raise NetworkError(f"the network of {self.sandbox_id} is already {self.phase}")
            try:
                return await self._prepare()
            except BaseException as exc:
                await self._rollback()
                if isinstance(exc, NetworkError | asyncio.CancelledError):
                    raise
                raise NetworkError(f"pod network setup failed: {exc}") from exc

    async def _prepare(self) -> TapDevice:
        manager = self.manager
        t0 = time.monotonic()
        netns = manager.netns_path(self.sandbox_id)
        self._begin(manager.load(), netns)
        await asyncio.to_thread(create_netns, netns)
        tap = await asyncio.to_thread(open_tap, netns)
        self.boot_mac = tap.mac
        self.timings = {"prepare": time.monotonic() - t0}
        return tap

    async def adopt(self, netns: Path) -> None:
        """:meth:`prepare` for a VM that was started before its pod (a standby VM,
        sandbox/standby.py): its namespace, with its tap inside, becomes the pod's."""
        if not self.manager.config.enabled:
            raise NetworkError("networking is disabled on this node")
        async with self._lock:
            if self.phase != "none":
                raise NetworkError(f"the network of {self.sandbox_id} is already {self.phase}")
            t0 = time.monotonic()
            self._begin(self.manager.load(), netns)
            self.timings = {"prepare": time.monotonic() - t0}

    def _begin(self, conflist: CniConfList, netns: Path) -> None:
        """Record the CNI invocation for ``netns`` before anything is attached."""
        self.invocation = CniInvocation(
            container_id=self.sandbox_id,
            netns=str(netns),
            ifname=POD_IFNAME,
            cni_args=cni_args(self.spec, self.sandbox_id),
            runtime_config=runtime_config(self.spec),
        )
        self.conflist = conflist
        self.netns = netns
        self.phase = "attaching"
        self._save()

    def start_attach(self) -> None:
        """Start CNI ADD and the tap join in the background (after :meth:`prepare`)."""
        if self._attach_task is None and self.phase == "attaching":
            self._attach_task = asyncio.ensure_future(self._attach())

    async def attach(self) -> NetworkResult:
        """Wait for (or run) CNI ADD and the tap join; NetworkError on failure (the
        caller tears the network down)."""
        if self.phase == "attached" and self.result is not None:
            return self.result
        self.start_attach()
        if self._attach_task is None:
            raise NetworkError(f"the network of {self.sandbox_id} is {self.phase}, not attaching")
        try:
            return await asyncio.shield(self._attach_task)
        except NetworkError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise NetworkError(f"pod network setup failed: {exc}") from exc

    async def _attach(self) -> NetworkResult:
        assert self.conflist is not None and self.invocation is not None
        assert self.netns is not None
        conflist, netns = self.conflist, self.netns
        t0 = time.monotonic()

        def keep_partial(result: dict[str, Any]) -> None:
            self._partial = result

        result = await self.manager.runner.add(conflist, self.invocation, keep_partial)
        t1 = time.monotonic()
        if not result.pod_interface_ips():
            raise NetworkError(f"CNI network {conflist.name} gave the pod no IP address")
        self.result = result
        self._partial = None
        self._save()
        result.mac, result.mtu = await asyncio.to_thread(join_tap_in, netns)
        t2 = time.monotonic()
        self.timings.update(cni_add=t1 - t0, join=t2 - t1)
        self.phase = "attached"
        self._save()
        log.info(
            "sandbox=%s network=%s ips=%s mac=%s cni_add=%.3fs",
            self.sandbox_id,
            conflist.name,
            ",".join(result.pod_ips),
            result.mac,
            t1 - t0,
        )
        return result

    async def setup(self) -> TapDevice | None:
        """:meth:`prepare` and :meth:`attach` in one (no overlap with a boot)."""
        tap = await self.prepare()
        if tap is None:
            return None
        try:
            await self.attach()
        except BaseException:
            tap.close()
            await self._rollback()
            raise
        return tap

    def guest_interfaces(self) -> list[dict[str, Any]]:
        """The ``configure_network`` arguments for the guest NIC."""
        if self.result is None:
            return []
        result = self.result
        return [
            {
                "mac": result.mac,
                "match_mac": self.boot_mac,
                "mtu": result.mtu,
                "addresses": [ip.address for ip in result.pod_interface_ips()],
                "routes": [{"dst": r.dst, "gateway": r.gw} for r in result.guest_routes()],
            }
        ]

    async def configure_guest(self, agent: GuestNetworkAgent) -> None:
        """Wait for the attachment and configure the guest NIC."""
        if self.phase not in ("attaching", "attached"):
            return
        await self.attach()
        t0 = time.monotonic()
        configured = await agent.configure_network(self.guest_interfaces())
        self.timings["guest"] = time.monotonic() - t0
        with contextlib.suppress(LookupError, TypeError, ValueError, AttributeError):
            for step, ms in configured[0].ms.items():
                self.timings[f"guest_{step}"] = float(ms) / 1000
        self._save()

    def etc_files(self, hostname: str, resolv_conf: str, hosts: str) -> tuple[str, str]:
        """resolv.conf and hosts for the guest: the given text, else built from the
        pod's DNS config and IPs."""
        if not resolv_conf and self.spec.dns is not None:
            resolv_conf = resolv_conf_text(self.spec.dns)
        if not hosts and self.result is not None:
            hosts = hosts_text(hostname, self.result.pod_ips)
        return resolv_conf, hosts

    async def check(self) -> bool:
        """CNI CHECK of the attachment; False when the config does not support it."""
        if self.phase != "attached" or self.conflist is None or self.invocation is None:
            raise NetworkError(f"the network of {self.sandbox_id} is not attached")
        assert self.result is not None
        return await self.manager.runner.check(self.conflist, self.invocation, self.result.raw)

    # teardown -------------------------------------------------------------

    async def teardown(self) -> None:
        """CNI DEL (with the config and result of ADD) and namespace removal.
        Idempotent; on failure the state is kept so a later call retries."""
        async with self._lock:
            await self._teardown()

    async def _rollback(self) -> None:
        try:
            await self._teardown()
        except Exception as exc:
            log.error(
                "sandbox=%s network rollback failed: %s (retried on removal)",
                self.sandbox_id,
                exc,
            )

    async def _teardown(self) -> None:
        task, self._attach_task = self._attach_task, None
        if task is not None:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if not self.attached:
            return
        manager = self.manager
        netns = self.netns
        if self.conflist is not None and self.invocation is not None:
            invocation = self.invocation
            if netns is None or not await asyncio.to_thread(is_netns_mount, netns):
                # The namespace is gone (host reboot, manual cleanup): plugins still
                # release addresses and rules.
                invocation = CniInvocation(**{**asdict(invocation), "netns": ""})
            prev = self.result.raw if self.result is not None else self._partial
            attempts = max(1, manager.config.del_attempts)
            for attempt in range(attempts):
                try:
                    await manager.runner.delete(self.conflist, invocation, prev)
                    break
                except (CniPluginError, CniConfigError) as exc:
                    if attempt + 1 == attempts:
                        raise NetworkError(
                            f"CNI DEL of pod {self.sandbox_id} failed: {exc}; "
                            "the network is kept and removal will retry"
                        ) from exc
                    await asyncio.sleep(0.5)
        if netns is not None:
            await asyncio.to_thread(remove_netns, netns)
        self.phase = "released"
        self._partial = None
        self._save()
        log.info("sandbox=%s network released", self.sandbox_id)
