"""Guest side of pod networking (the ``configure_network`` op).

The host hands QEMU a tap joined to the pod's CNI veth; here the virtio-net NIC takes
that veth's MAC and the pod's MTU, addresses and routes, so the guest *is* the pod on
the CNI network.

The NIC is configured with rtnetlink messages written here directly: under TCG every
process start costs the guest ~0.1 s, and a NIC with two addresses and two routes would
need eight ``ip`` runs on the pod's start-up path. Nothing is imported at agent start;
the server imports this module on first use.
"""

from __future__ import annotations

# _socket, not socket: the socket module pulls in enum and selectors, which cost the
# guest noticeable time under TCG.
import _socket as socket
import errno
import os
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
RTATTR = struct.Struct("=HH")


class NetworkConfigError(Exception):
    """The NIC could not be configured; the message names the step."""


# ------------------------------------------------------------------------ addresses


def parse_cidr(cidr: str) -> tuple[int, bytes, int]:
    """("10.0.0.5/24") -> (AF_INET, packed address, prefix length)."""
    address, _, length = cidr.partition("/")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        packed = socket.inet_pton(family, address)
    except OSError as exc:
        raise NetworkConfigError(f"bad address {cidr!r}") from exc
    bits = len(packed) * 8
    prefix = int(length) if length else bits
    if not 0 <= prefix <= bits:
        raise NetworkConfigError(f"bad prefix length in {cidr!r}")
    return family, packed, prefix


def in_subnet(address: str, cidr: str) -> bool:
    """True if ``address`` lies in the network of ``cidr``."""
    try:
        family, net, prefix = parse_cidr(cidr)
        other_family, packed, _ = parse_cidr(address)
    except NetworkConfigError:
        return False
    if family != other_family:
        return False
    shift = len(net) * 8 - prefix
    return int.from_bytes(net, "big") >> shift == int.from_bytes(packed, "big") >> shift


def mac_bytes(mac: str) -> bytes:
    try:
        raw = bytes(int(part, 16) for part in mac.split(":"))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise NetworkConfigError(f"bad MAC address {mac!r}")
    return raw


# ------------------------------------------------------------------------- netlink


def rtattr(kind: int, data: bytes) -> bytes:
    length = RTATTR.size + len(data)
    return RTATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def nlmsg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST, seq, 0) + body


def link_message(seq: int, index: int, *, mac: bytes = b"", mtu: int = 0, up: bool = True) -> bytes:
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
    if mac:
        body += rtattr(IFLA_ADDRESS, mac)
    if mtu > 0:
        body += rtattr(IFLA_MTU, struct.pack("=I", mtu))
    return nlmsg(RTM_NEWLINK, NLM_F_ACK, seq, body)


def address_message(seq: int, index: int, cidr: str) -> bytes:
    family, packed, prefix = parse_cidr(cidr)
    # The address comes from the CNI's IPAM: no duplicate detection delay.
    flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
    body = IFADDRMSG.pack(family, prefix, flags, RT_SCOPE_UNIVERSE, index)
    body += rtattr(IFA_LOCAL, packed) + rtattr(IFA_ADDRESS, packed)
    return nlmsg(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def route_message(seq: int, index: int, dst: str, gateway: str = "") -> bytes:
    family, packed, prefix = parse_cidr(dst)
    scope = RT_SCOPE_UNIVERSE if gateway or family == socket.AF_INET6 else RT_SCOPE_LINK
    body = RTMSG.pack(family, prefix, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
    if prefix:
        body += rtattr(RTA_DST, packed)
    if gateway:
        gw_family, gw, _ = parse_cidr(gateway)
        if gw_family != family:
            raise NetworkConfigError(f"gateway {gateway} is not in the family of {dst}")
        body += rtattr(RTA_GATEWAY, gw)
    body += rtattr(RTA_OIF, struct.pack("=i", index))
    return nlmsg(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq, body)


def parse_ack(data: bytes, seq: int) -> int | None:
    """The errno (0: success) carried by the ack of ``seq`` in ``data``, if there."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            break
        if kind == NLMSG_ERROR and msg_seq == seq:
            error: int = struct.unpack_from("=i", data, offset + NLMSGHDR.size)[0]
            return -error
        offset += (length + 3) & ~3
    return None


class Netlink:
    """A rtnetlink socket in the current network namespace; one request at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.settimeout(10.0)
        self.seq = int(time.monotonic()) & 0xFFFF

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, message: bytes, what: str, *, exist_ok: bool = False) -> None:
        _length, _kind, _flags, seq, _pid = NLMSGHDR.unpack_from(message)
        self.sock.send(message)
        while True:
            error = parse_ack(self.sock.recv(65536), seq)
            if error is None:
                continue
            if error == 0 or (exist_ok and error == errno.EEXIST):
                return
            raise NetworkConfigError(f"{what}: {os.strerror(error)}")

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------ the NICs


def _norm_mac(mac: str) -> str:
    return mac.strip().lower()


def interface_macs(sys_net: str = "/sys/class/net") -> dict[str, str]:
    """{MAC: interface name} of every interface with a MAC."""
    out: dict[str, str] = {}
    try:
        names = os.listdir(sys_net)
    except OSError:
        return out
    for name in names:
        try:
            with open(f"{sys_net}/{name}/address") as f:
                mac = _norm_mac(f.read())
        except OSError:
            continue
        if mac and mac != "00:00:00:00:00:00":
            out.setdefault(mac, name)
    return out


def find_interface(
    macs: Sequence[str], *, sys_net: str = "/sys/class/net", timeout: float = 5.0
) -> str:
    """The name of the NIC with one of ``macs``, waiting up to ``timeout`` for it."""
    wanted = [_norm_mac(m) for m in macs if m]
    deadline = time.monotonic() + timeout
    while True:
        present = interface_macs(sys_net)
        for mac in wanted:
            if mac in present:
                return present[mac]
        if time.monotonic() >= deadline:
            raise NetworkConfigError(
                f"no network interface with MAC {' or '.join(wanted)} "
                f"(present: {', '.join(sorted(present.values())) or 'none'})"
            )
        time.sleep(0.05)


def interface_index(name: str, sys_net: str = "/sys/class/net") -> int:
    try:
        with open(f"{sys_net}/{name}/ifindex") as f:
            return int(f.read())
    except (OSError, ValueError) as exc:
        raise NetworkConfigError(f"interface {name} has no index: {exc}") from exc


def configure_interface(
    spec: dict[str, Any],
    netlink: Netlink,
    *,
    sys_net: str = "/sys/class/net",
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Configure one NIC from a NetInterface dict; returns {"name", "mac", "ms"} (the
    milliseconds of each step). Running it again with the same spec changes nothing
    (safe after a host reconnect)."""
    started = time.monotonic()
    steps: dict[str, float] = {}

    def step(name: str) -> None:
        steps[name] = round((time.monotonic() - started) * 1000 - sum(steps.values()), 2)

    mac = _norm_mac(str(spec["mac"]))
    name = find_interface([str(spec.get("match_mac") or ""), mac], sys_net=sys_net, timeout=timeout)
    index = interface_index(name, sys_net)
    addresses = [str(a) for a in spec.get("addresses") or []]
    routes = list(spec.get("routes") or [])
    mtu = int(spec.get("mtu") or 0)
    new_mac = mac_bytes(mac) if interface_macs(sys_net).get(mac) != name else b""
    step("find")
    netlink.request(
        link_message(netlink.next_seq(), index, mac=new_mac, mtu=mtu),
        f"set {name} mac {mac} mtu {mtu} up",
    )
    step("link")
    for address in addresses:
        netlink.request(
            address_message(netlink.next_seq(), index, address),
            f"add {address} to {name}",
            exist_ok=True,
        )
    step("addresses")
    for route in routes:
        dst = str(route["dst"])
        gateway = str(route.get("gateway") or "")
        if gateway and not any(in_subnet(gateway, a) for a in addresses):
            # A gateway outside every pod subnet (e.g. with a /32 pod address) is
            # reached on the link itself.
            host = f"{gateway}/{128 if ':' in gateway else 32}"
            netlink.request(
                route_message(netlink.next_seq(), index, host), f"route {host} dev {name}"
            )
        netlink.request(
            route_message(netlink.next_seq(), index, dst, gateway),
            f"route {dst} via {gateway or '(link)'} dev {name}",
        )
    step("routes")
    return {"name": name, "mac": mac, "ms": steps}


def configure(
    interfaces: list[dict[str, Any]],
    *,
    sys_net: str = "/sys/class/net",
    timeout: float = 5.0,
) -> list[dict[str, Any]]:
    """Configure every NIC in ``interfaces`` (NetInterface dicts)."""
    netlink = Netlink()
    try:
        return [
            configure_interface(spec, netlink, sys_net=sys_net, timeout=timeout)
            for spec in interfaces
        ]
    finally:
        netlink.close()
