"""Tunnels (nicpassd/host/tunnels.py, guard underlays): a management network carried by WireGuard,
VXLAN or GRE depends on the NIC that carries the tunnel — the route to its remote endpoint, or its
lower device — and that NIC is protected with the tunnel in the chain; deleting the tunnel takes
the protection away within one event; [guard] tunnels = false switches it off."""

from __future__ import annotations

import socket
import struct

from nicpassd.engine.config import Config, DaemonSettings, GuardSettings
from nicpassd.host import netlink, tunnels

NIC, OTHER = "0000:af:00.0", "0000:b0:00.0"

HOST = """
[[functions]]
address = "0000:af:00.0"
vendor = "8086"
device = "10d3"
driver = "e1000e"
netdev = "enp175s0f0"
iommu_group = 40

[[functions]]
address = "0000:b0:00.0"
vendor = "8086"
device = "10d3"
driver = "e1000e"
netdev = "enp176s0f0"
iommu_group = 41

[[links]]
name = "wg0"
kind = "wireguard"
remotes = ["203.0.113.5"]

[[links]]
name = "vx0"
kind = "vxlan"
remotes = ["198.51.100.20"]
dev = "enp176s0f0"

[[addresses]]
dev = "enp175s0f0"
address = "192.0.2.10/24"

[[addresses]]
dev = "enp176s0f0"
address = "198.51.100.10/24"

[[routes]]
dev = "enp175s0f0"
dst = "192.0.2.0/24"

[[routes]]
dev = "enp176s0f0"
dst = "198.51.100.0/24"

[[routes]]
dev = "enp175s0f0"
dst = "203.0.113.5/32"
gateway = "192.0.2.1"

[[routes]]
dev = "wg0"
dst = "default"
"""



async def test_a_management_route_over_wireguard_protects_its_underlay_until_it_is_deleted(make_sim):
    sim = make_sim(HOST)
    assert sim.engine.protected.reasons(NIC)[0] == ("IPv4 default route 0.0.0.0/0: wg0 → enp175s0f0 (wireguard "
                                                    "underlay to 203.0.113.5)")
    assert OTHER not in sim.engine.protected
    sim.kernel.delete_link("wg0")
    await sim.engine.quiesce()
    assert NIC not in sim.engine.protected


async def test_a_vxlan_protects_its_lower_device(make_sim):
    sim = make_sim(HOST.replace('dev = "wg0"\ndst = "default"', 'dev = "vx0"\ndst = "default"'))
    assert sim.engine.protected.reasons(OTHER) == ("IPv4 default route 0.0.0.0/0: vx0 → enp176s0f0 (vxlan vx0's "
                                                   "lower device)",)


async def test_tunnels_can_be_switched_off(make_sim):
    sim = make_sim(HOST, config=Config(guard=GuardSettings(tunnels=False), daemon=DaemonSettings(bind_verify_timeout=0.5)))
    assert NIC not in sim.engine.protected


def test_link_info_of_the_kernels_tunnel_kinds_is_parsed():
    def link(name: str, kind: str, data: bytes) -> bytes:
        info = netlink.encode_attribute(tunnels.IFLA_INFO_KIND, kind.encode() + b"\0")
        info += netlink.encode_attribute(tunnels.IFLA_INFO_DATA, data)
        payload = netlink.IFINFOMSG.pack(0, 0, 5, 0, 0)
        payload += netlink.encode_attribute(tunnels.IFLA_IFNAME, name.encode() + b"\0")
        payload += netlink.encode_attribute(tunnels.IFLA_LINKINFO, info)
        return netlink.encode(tunnels.RTM_NEWLINK, netlink.NLM_F_MULTI, payload)

    ip = lambda text: socket.inet_aton(text)  # noqa: E731
    data = link("vx0", "vxlan", netlink.encode_attribute(2, ip("198.51.100.20")) + netlink.encode_attribute(4, ip(
        "192.0.2.10")) + netlink.encode_attribute(3, struct.pack("=I", 7)))
    data += link("gre1", "gre", netlink.encode_attribute(7, ip("203.0.113.9")) + netlink.encode_attribute(6, ip(
        "0.0.0.0")))
    data += link("br0", "bridge", b"")
    parsed = tunnels.parse_links(data, {7: "eno1"}.get)
    assert parsed == {
        "vx0": tunnels.Tunnel("vx0", "vxlan", ("198.51.100.20",), "192.0.2.10", "eno1"),
        "gre1": tunnels.Tunnel("gre1", "gre", ("203.0.113.9",), "", ""),
    }


CHILD = """
import json, subprocess
from nicpassd.host.tunnels import read_tunnels
from nicpassd.paths import HostPaths
for command in ("ip link add d0 type veth peer name p0", "ip link set d0 up", "ip link set p0 up",
                "ip addr add 192.0.2.10/24 dev d0",
                "ip link add vx0 type vxlan id 42 remote 198.51.100.20 local 192.0.2.10 dev d0 dstport 4789"):
    subprocess.run(command.split(), check=True)
subprocess.run("ip link add gn0 type geneve id 5 remote 203.0.113.3".split())  # where the kernel has geneve
print(json.dumps({name: [t.kind, list(t.remotes), t.local, t.dev] for name, t in read_tunnels(HostPaths()).items()}))
"""


def test_a_real_kernels_vxlan_and_geneve_link_info(netns):
    import json
    import subprocess

    import pytest
    from support.netns import run_python

    probe = subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "add", "t0", "type", "vxlan", "id", "1",
                            "dstport", "4789"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this kernel has no vxlan: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "del", "t0"], check=True)
    result = run_python(netns, CHILD)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["vx0"] == ["vxlan", ["198.51.100.20"], "192.0.2.10", "d0"]
    if "gn0" in got:
        assert got["gn0"] == ["geneve", ["203.0.113.3"], "", ""]
