"""Pod networking without namespaces: CNI config and results, plugin calls (with fake
plugins), runtimeConfig, /etc files, the guest's rtnetlink messages, saved state."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from agent.guest import network as guest_net
from agent.protocol import NetInterface
from sandbox.api import Bandwidth, DnsConfig, PodNetworkSpec, PortMapping, SandboxSpec
from sandbox.network import (
    CniConfigError,
    CniConfList,
    CniInvocation,
    CniPluginError,
    CniRunner,
    NetworkConfig,
    NetworkError,
    NetworkManager,
    NetworkResult,
    TapDevice,
    cni_args,
    find_conf_file,
    hosts_text,
    load_conf_list,
    plugin_stdin,
    resolv_conf_text,
    runtime_config,
    version_at_least,
)

RESULT_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 2},
        {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2},
        {"address": "10.9.9.9/32", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}, {"dst": "10.50.0.0/16", "gw": "10.1.0.9"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["svc"], "options": ["ndots:5"]},
}


# ------------------------------------------------------------------------ results


def test_result_1_0_pod_ips_routes_and_dns() -> None:
    result = NetworkResult.from_cni(RESULT_1_0)
    assert result.pod_ips == ["10.1.0.5", "fd00::5"]  # IPv4 first; the bridge's IP is not ours
    assert (result.ipv4, result.ipv6) == ("10.1.0.5", "fd00::5")
    assert [(r.dst, r.gw) for r in result.guest_routes()] == [
        ("0.0.0.0/0", "10.1.0.1"),
        ("::/0", "fd00::1"),
        ("10.50.0.0/16", "10.1.0.9"),
    ]
    assert result.dns.nameservers == ("10.96.0.10",)
    assert result.interfaces[2].sandbox == "/run/netns/x"


def test_result_0_3_and_legacy_0_2() -> None:
    old = {
        "cniVersion": "0.3.1",
        "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"version": "4", "address": "10.2.0.7/16", "gateway": "10.2.0.1", "interface": 0}],
    }
    assert NetworkResult.from_cni(old).pod_ips == ["10.2.0.7"]
    legacy = {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.3.0.4/24", "gateway": "10.3.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
        "ip6": {"ip": "fd01::4/64"},
    }
    result = NetworkResult.from_cni(legacy)
    assert result.pod_ips == ["10.3.0.4", "fd01::4"]
    assert [(r.dst, r.gw) for r in result.guest_routes()] == [("0.0.0.0/0", "10.3.0.1")]


def test_malformed_result_is_a_plugin_error() -> None:
    with pytest.raises(CniPluginError, match="malformed"):
        NetworkResult.from_cni({"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}]})
    with pytest.raises(CniPluginError, match="malformed"):
        NetworkResult.from_cni({"cniVersion": "1.0.0", "ips": [{"gateway": "10.0.0.1"}]})


def test_result_state_round_trip() -> None:
    result = NetworkResult.from_cni(RESULT_1_0)
    result.mac, result.mtu = "aa:aa:aa:aa:aa:03", 1450
    again = NetworkResult.from_state(json.loads(json.dumps(result.to_state())))
    assert again.pod_ips == result.pod_ips
    assert (again.mac, again.mtu) == ("aa:aa:aa:aa:aa:03", 1450)
    assert again.raw == RESULT_1_0


# ------------------------------------------------------------------------- config


def test_first_conf_file_wins_and_single_conf_is_wrapped(tmp_path: Path) -> None:
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (empty / "README").write_text("not a config")
    (full / "20-b.conflist").write_text("{}")
    single = {"cniVersion": "0.4.0", "name": "solo", "type": "bridge", "bridge": "x"}
    (full / "10-a.conf").write_text(json.dumps(single))
    assert find_conf_file([empty, full]) == full / "10-a.conf"
    conflist = load_conf_list([tmp_path / "missing", empty, full])
    assert conflist.name == "solo"
    assert conflist.cni_version == "0.4.0"
    assert conflist.plugins == [single]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read CNI config"),
        (json.dumps({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}), "no name"),
        (json.dumps({"cniVersion": "9.9.9", "name": "n", "plugins": [{"type": "x"}]}), "9.9.9"),
        (json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": []}), "no plugins"),
        (json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{}]}), "has no type"),
        (json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../x"}]}), "bad"),
    ],
)
def test_broken_config_names_the_problem(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "10-x.conflist").write_text(content)
    with pytest.raises(CniConfigError, match=message) as info:
        load_conf_list([tmp_path])
    assert str(tmp_path / "10-x.conflist") in str(info.value)


def test_missing_config_and_status(tmp_path: Path) -> None:
    manager = NetworkManager(NetworkConfig(conf_dirs=[tmp_path], bin_dirs=[tmp_path]))
    status = manager.status()
    assert not status.ready
    assert status.reason == "NetworkPluginNotReady"
    assert "no CNI network config found" in status.message
    conf = {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "nosuchplugin"}]}
    (tmp_path / "10-n.conflist").write_text(json.dumps(conf))
    status = manager.status()
    assert not status.ready and "'nosuchplugin' not found" in status.message
    plugin = tmp_path / "nosuchplugin"
    plugin.write_text("#!/bin/sh\n")
    plugin.chmod(0o755)
    assert manager.status().ready
    assert NetworkManager(NetworkConfig(enabled=False)).status().ready


def test_pod_cidr_is_kept_and_validated() -> None:
    manager = NetworkManager()
    manager.update_pod_cidr("10.244.1.0/24, fd00:10:244:1::/64")
    assert manager.pod_cidrs == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert manager.pod_cidr == "10.244.1.0/24,fd00:10:244:1::/64"
    with pytest.raises(NetworkError, match="bad pod CIDR"):
        manager.update_pod_cidr("10.0.0.0/99")
    assert manager.pod_cidrs == ["10.244.1.0/24", "fd00:10:244:1::/64"]


def test_versions() -> None:
    assert version_at_least("1.0.0", "0.4.0")
    assert version_at_least("0.4.0", "0.4.0")
    assert not version_at_least("0.3.1", "0.4.0")
    assert not version_at_least("1.0.0", "1.1.0")


# -------------------------------------------------------------- runtime config, args


def _spec() -> PodNetworkSpec:
    return PodNetworkSpec(
        name="web",
        namespace="prod",
        uid="uid-1",
        port_mappings=[
            PortMapping("TCP", 80, 8080, "127.0.0.1"),
            PortMapping("udp", 53, 0),  # no hostPort: not forwarded
        ],
        dns=DnsConfig(["10.96.0.10"], ["prod.svc.cluster.local", "svc.cluster.local"], ["ndots:5"]),
        bandwidth=Bandwidth(ingress_rate=1_000_000),
    )


def test_runtime_config_and_capability_filter() -> None:
    config = runtime_config(_spec())
    assert config["portMappings"] == [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]
    assert config["dns"]["servers"] == ["10.96.0.10"]
    assert config["bandwidth"] == {"ingressRate": 1_000_000, "ingressBurst": 1_000_000}
    assert runtime_config(PodNetworkSpec()) == {}
    conflist = CniConfList.parse(
        {
            "cniVersion": "1.0.0",
            "name": "net",
            "plugins": [
                {"type": "bridge"},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
    )
    inv = CniInvocation("id1", "/run/netns/x", "eth0", cni_args(_spec(), "id1"), config)
    bridge = json.loads(plugin_stdin(conflist, conflist.plugins[0], inv, None))
    portmap = json.loads(plugin_stdin(conflist, conflist.plugins[1], inv, {"cniVersion": "1.0.0"}))
    assert "runtimeConfig" not in bridge and "prevResult" not in bridge
    assert bridge["name"] == "net" and bridge["cniVersion"] == "1.0.0"
    assert portmap["runtimeConfig"] == {"portMappings": config["portMappings"]}
    assert portmap["prevResult"] == {"cniVersion": "1.0.0"}


def test_cni_args() -> None:
    assert cni_args(_spec(), "abc") == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=uid-1"
    )
    with pytest.raises(NetworkError, match="CNI_ARGS"):
        cni_args(PodNetworkSpec(name="a;b"), "abc")


def test_resolv_conf_and_hosts_text() -> None:
    assert resolv_conf_text(_spec().dns or DnsConfig()) == (
        "nameserver 10.96.0.10\nsearch prod.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
    )
    assert resolv_conf_text(DnsConfig()) == ""
    hosts = hosts_text("web-0", ["10.1.0.5", "fd00::5"])
    assert "127.0.0.1\tlocalhost\n" in hosts
    assert hosts.endswith("10.1.0.5\tweb-0\nfd00::5\tweb-0\n")


def test_sandbox_spec_with_network_survives_state_json() -> None:
    spec = SandboxSpec("pod1", network=_spec())
    again = SandboxSpec(**json.loads(json.dumps(asdict(spec))))
    assert again == spec
    assert isinstance(again.network, PodNetworkSpec)
    assert again.network.port_mappings[0] == PortMapping("TCP", 80, 8080, "127.0.0.1")


def test_tap_qemu_args() -> None:
    tap = TapDevice(fd=7, mac="02:00:00:00:00:01", mtu=1500)
    args = tap.qemu_args()
    assert args[1] == "tap,id=net0,fd=7,vhost=off"
    assert "mac=02:00:00:00:00:01" in args[3] and "addr=0x05" in args[3]
    assert tap.pass_fds == (7,)


# ------------------------------------------------------------------- fake plugins

FAKE_PLUGIN = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    conf = json.load(sys.stdin)
    me = os.path.basename(sys.argv[0])
    with open(os.path.join(os.path.dirname(sys.argv[0]), "..", "calls.jsonl"), "a") as log:
        env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
        log.write(json.dumps({{"plugin": me, "conf": conf, "env": env}}) + "\\n")
    command = os.environ["CNI_COMMAND"]
    if conf.get("fail") == command:
        print(json.dumps({{"cniVersion": "1.0.0", "code": 11, "msg": "told to fail",
                          "details": "by the test"}}))
        sys.exit(1)
    if command == "ADD":
        result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"],
            "interfaces": [{{"name": "eth0", "sandbox": os.environ["CNI_NETNS"]}}],
            "ips": [{{"address": "10.5.0.2/24", "gateway": "10.5.0.1", "interface": 0}}]}}
        result.setdefault("seen", []).append(me)
        print(json.dumps(result))
    """
)


@pytest.fixture
def fake_plugins(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("first", "second", "third"):
        path = bin_dir / name
        path.write_text(FAKE_PLUGIN.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _calls(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def test_chain_add_check_del(tmp_path: Path, fake_plugins: Path) -> None:
    conflist = CniConfList.parse(
        {
            "cniVersion": "1.0.0",
            "name": "chain",
            "plugins": [
                {"type": "first"},
                {"type": "second", "capabilities": {"portMappings": True}},
                {"type": "third", "capabilities": {"dns": True}},
            ],
        }
    )
    spec = _spec()
    inv = CniInvocation(
        "pod1", "/run/netns/p1", "eth0", cni_args(spec, "pod1"), runtime_config(spec)
    )
    runner = CniRunner([tmp_path / "nowhere", fake_plugins], timeout=30)
    partial: list[dict[str, Any]] = []
    result = await runner.add(conflist, inv, partial.append)
    assert result.pod_ips == ["10.5.0.2"]
    assert result.raw["seen"] == ["first", "second", "third"]
    assert len(partial) == 3
    calls = _calls(tmp_path)
    assert [c["plugin"] for c in calls] == ["first", "second", "third"]
    env = calls[0]["env"]
    assert env["CNI_COMMAND"] == "ADD"
    assert env["CNI_CONTAINERID"] == "pod1"
    assert env["CNI_NETNS"] == "/run/netns/p1"
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == f"{tmp_path / 'nowhere'}:{fake_plugins}"
    assert "K8S_POD_NAME=web" in env["CNI_ARGS"]
    assert "prevResult" not in calls[0]["conf"]
    assert calls[1]["conf"]["prevResult"]["seen"] == ["first"]
    assert set(calls[1]["conf"]["runtimeConfig"]) == {"portMappings"}
    assert set(calls[2]["conf"]["runtimeConfig"]) == {"dns"}

    (tmp_path / "calls.jsonl").unlink()
    assert await runner.check(conflist, inv, result.raw)
    (tmp_path / "calls.jsonl").unlink()
    await runner.delete(conflist, inv, result.raw)
    calls = _calls(tmp_path)
    assert [c["plugin"] for c in calls] == ["third", "second", "first"]
    assert all(c["env"]["CNI_COMMAND"] == "DEL" for c in calls)
    assert all(c["conf"]["prevResult"]["seen"] == ["first", "second", "third"] for c in calls)


async def test_plugin_error_is_parsed_and_del_continues(tmp_path: Path, fake_plugins: Path) -> None:
    conflist = CniConfList.parse(
        {
            "cniVersion": "1.0.0",
            "name": "chain",
            "plugins": [{"type": "first"}, {"type": "second", "fail": "ADD"}],
        }
    )
    inv = CniInvocation("pod2", "/run/netns/p2", "eth0", "", {})
    runner = CniRunner([fake_plugins], timeout=30)
    with pytest.raises(CniPluginError, match="second ADD failed: told to fail") as info:
        await runner.add(conflist, inv)
    assert info.value.cni_code == 11 and info.value.details == "by the test"
    failing_del = CniConfList.parse(
        {
            "cniVersion": "1.0.0",
            "name": "chain",
            "plugins": [{"type": "first"}, {"type": "second", "fail": "DEL"}],
        }
    )
    (tmp_path / "calls.jsonl").unlink()
    with pytest.raises(CniPluginError, match="second DEL failed"):
        await runner.delete(failing_del, inv, None)
    # the other plugin still got its DEL
    assert [c["plugin"] for c in _calls(tmp_path)] == ["second", "first"]


async def test_check_skipped_before_0_4_and_when_disabled(fake_plugins: Path) -> None:
    runner = CniRunner([fake_plugins])
    inv = CniInvocation("p", "", "eth0", "", {})
    old = CniConfList.parse({"cniVersion": "0.3.1", "name": "n", "plugins": [{"type": "first"}]})
    off = CniConfList.parse(
        {"cniVersion": "1.0.0", "name": "n", "disableCheck": True, "plugins": [{"type": "first"}]}
    )
    assert not await runner.check(old, inv, {})
    assert not await runner.check(off, inv, {})
    assert not await runner.status(off)


# --------------------------------------------------------------- guest rtnetlink


def test_guest_cidr_helpers() -> None:
    assert guest_net.parse_cidr("10.1.2.3/24") == (socket.AF_INET, bytes([10, 1, 2, 3]), 24)
    family, packed, prefix = guest_net.parse_cidr("fd00::1/64")
    assert (family, len(packed), prefix) == (socket.AF_INET6, 16, 64)
    assert guest_net.in_subnet("10.1.2.1", "10.1.2.3/24")
    assert not guest_net.in_subnet("10.1.3.1", "10.1.2.3/24")
    assert not guest_net.in_subnet("fd00::1", "10.1.2.3/24")
    assert guest_net.in_subnet("fd00::1", "fd00::5/64")
    with pytest.raises(guest_net.NetworkConfigError):
        guest_net.parse_cidr("10.1.2.3/40")
    with pytest.raises(guest_net.NetworkConfigError):
        guest_net.mac_bytes("02:00:00")


def _attrs(body: bytes) -> dict[int, bytes]:
    out = {}
    offset = 0
    while offset < len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        out[kind] = body[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def test_guest_netlink_messages() -> None:
    msg = guest_net.route_message(7, 3, "0.0.0.0/0", "10.1.0.1")
    length, kind, flags, seq, _pid = guest_net.NLMSGHDR.unpack_from(msg)
    assert (length, kind, seq) == (len(msg), guest_net.RTM_NEWROUTE, 7)
    assert flags & guest_net.NLM_F_REPLACE and flags & guest_net.NLM_F_ACK
    family, dst_len, *_rest, scope, rtype, _f = guest_net.RTMSG.unpack_from(msg, 16)
    assert (family, dst_len, scope, rtype) == (socket.AF_INET, 0, 0, guest_net.RTN_UNICAST)
    attrs = _attrs(msg[16 + guest_net.RTMSG.size :])
    assert guest_net.RTA_DST not in attrs
    assert attrs[guest_net.RTA_GATEWAY] == bytes([10, 1, 0, 1])
    assert struct.unpack("=i", attrs[guest_net.RTA_OIF]) == (3,)

    device_route = guest_net.route_message(8, 3, "10.50.0.0/16")
    scope = guest_net.RTMSG.unpack_from(device_route, 16)[6]
    assert scope == guest_net.RT_SCOPE_LINK

    addr = guest_net.address_message(9, 3, "fd00::5/64")
    family, prefix, flags, _scope, index = guest_net.IFADDRMSG.unpack_from(addr, 16)
    assert (family, prefix, index) == (socket.AF_INET6, 64, 3)
    assert flags & guest_net.IFA_F_NODAD

    link = guest_net.link_message(10, 3, mac=bytes(6), mtu=1400)
    attrs = _attrs(link[16 + guest_net.IFINFOMSG.size :])
    assert struct.unpack("=I", attrs[guest_net.IFLA_MTU]) == (1400,)
    with pytest.raises(guest_net.NetworkConfigError, match="family"):
        guest_net.route_message(1, 1, "::/0", "10.0.0.1")


def test_guest_ack_parsing() -> None:
    ack = guest_net.NLMSGHDR.pack(36, guest_net.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -17)
    ack += bytes(16)
    assert guest_net.parse_ack(ack, 5) == 17
    assert guest_net.parse_ack(ack, 6) is None


class FakeNetlink:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, message: bytes, what: str, *, exist_ok: bool = False) -> None:
        self.sent.append((guest_net.NLMSGHDR.unpack_from(message)[1], what))


def _fake_sysfs(root: Path, nics: dict[str, tuple[str, int]]) -> str:
    for name, (mac, index) in nics.items():
        (root / name).mkdir(parents=True)
        (root / name / "address").write_text(mac + "\n")
        (root / name / "ifindex").write_text(f"{index}\n")
    return str(root)


def test_guest_configure_finds_the_nic_by_boot_mac(tmp_path: Path) -> None:
    sys_net = _fake_sysfs(
        tmp_path, {"lo": ("00:00:00:00:00:00", 1), "eth0": ("02:11:11:11:11:11", 2)}
    )
    spec = NetInterface(
        mac="AA:BB:CC:00:00:01",
        match_mac="02:11:11:11:11:11",
        mtu=1450,
        addresses=["10.1.0.5/32"],
        routes=[{"dst": "0.0.0.0/0", "gateway": "169.254.1.1"}],  # type: ignore[list-item]
    ).to_dict()
    fake = FakeNetlink()
    done = guest_net.configure_interface(spec, fake, sys_net=sys_net, timeout=0.1)  # type: ignore[arg-type]
    assert (done["name"], done["mac"]) == ("eth0", "aa:bb:cc:00:00:01")
    assert set(done["ms"]) == {"find", "link", "addresses", "routes"}
    assert [w for _k, w in fake.sent] == [
        "set eth0 mac aa:bb:cc:00:00:01 mtu 1450 up",
        "add 10.1.0.5/32 to eth0",
        "route 169.254.1.1/32 dev eth0",  # the gateway is outside the /32: on-link first
        "route 0.0.0.0/0 via 169.254.1.1 dev eth0",
    ]
    with pytest.raises(guest_net.NetworkConfigError, match="no network interface"):
        guest_net.configure_interface(
            {"mac": "02:99:99:99:99:99"},
            fake,  # type: ignore[arg-type]
            sys_net=sys_net,
            timeout=0.1,
        )


def test_guest_module_keeps_agent_start_lean() -> None:
    # The agent imports the module lazily; it must not pull in heavy stdlib modules.
    code = (
        "import sys; before = set(sys.modules); import agent.guest.network; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = os.popen(f"{sys.executable} -S -c '{code}'").read().split()
    for heavy in ("socket", "ipaddress", "enum", "selectors", "asyncio", "typing"):
        assert heavy not in out, out
