"""The guard's sources on a real kernel: a management route in a policy-routing table, an ECMP
default route over two NICs, a VRF, a WireGuard tunnel over the igb, and an SSH session from a
network namespace arriving over a test NIC — each refused for passthrough with its reason, and
released when the dependency goes.

The igb and the e1000e are wired to the same QEMU hub, so one can be the other's peer."""

from __future__ import annotations

import time

import pytest

from .conftest import E1000E, IGB

pytestmark = pytest.mark.e2e
CONFIG = "/etc/nicpassd/nicpassd.toml"


def netdev(g, address: str) -> str:
    return g.fn(address)["net"][0]


def fresh(g) -> None:
    """No leftover of an earlier scenario on the test NICs (each scenario cleans up after itself;
    one that failed half-way must not fail the next)."""
    g.sh("ip rule del priority 1000 2>/dev/null || true; ip route flush table 100 2>/dev/null || true;"
         " ip link del mgmt-vrf 2>/dev/null || true; ip link del wg-mgmt 2>/dev/null || true;"
         f" for d in {' '.join(netdev(g, a) for a in (IGB, E1000E) if g.fn(a)['net'])}; do ip addr flush dev $d; done")


def refused_with(g, address: str, reason: str, timeout: float = 20) -> list[str]:
    """Wait until binding ``address`` is refused (exit 3) with ``reason`` among its reasons."""
    deadline = time.monotonic() + timeout
    while True:
        guard = {entry["address"]: entry for entry in g.ctl_json("guard")}
        reasons = guard.get(address, {}).get("reasons", [])
        if any(reason in r for r in reasons) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert any(reason in r for r in reasons), (address, reasons)
    result = g.ctl("bind", address, "--driver", "vfio-pci", "--runtime")
    assert result.returncode == 3, (result.returncode, result.stderr)
    return reasons


def released(g, address: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while address in {entry["address"] for entry in g.ctl_json("guard")}:
        assert time.monotonic() < deadline, g.ctl_json("guard")
        time.sleep(1)


def test_a_management_route_in_a_policy_routing_table(g):
    fresh(g)
    dev = netdev(g, E1000E)
    g.sh(f"ip addr add 198.51.100.10/24 dev {dev}; ip link set {dev} up;"
         f" ip route add default via 198.51.100.1 dev {dev} table 100;"
         " ip rule add priority 1000 from 198.51.100.10 lookup 100")
    try:
        refused_with(g, E1000E, "in table 100 (ip rule 1000: from 198.51.100.10/32)")
        g.sh("ip rule del priority 1000")
        released(g, E1000E)
    finally:
        g.sh(f"ip rule del priority 1000 2>/dev/null || true; ip route flush table 100 || true;"
             f" ip addr flush dev {dev}")


def test_an_ecmp_default_route_protects_both_nics(g):
    fresh(g)
    dev = netdev(g, E1000E)
    g.sh(f"ip addr add 198.51.100.10/24 dev {dev}; ip link set {dev} up;"
         f" ip route replace default nexthop via 10.0.2.2 dev enp1s0 nexthop via 198.51.100.1 dev {dev}")
    try:
        refused_with(g, E1000E, f"IPv4 default route 0.0.0.0/0 via 198.51.100.1: {dev}")
        guard = {entry["address"]: entry for entry in g.ctl_json("guard")}
        assert any("via 10.0.2.2: enp1s0" in r for r in guard["0000:01:00.0"]["reasons"])
    finally:
        g.sh(f"ip route replace default via 10.0.2.2 dev enp1s0; ip addr flush dev {dev} || true")
    released(g, E1000E)


def test_a_vrf_carrying_a_management_route(g):
    fresh(g)
    dev = netdev(g, E1000E)
    g.sh(f"modprobe vrf; ip link add mgmt-vrf type vrf table 10; ip link set mgmt-vrf up;"
         f" ip link set {dev} master mgmt-vrf; ip link set {dev} up; ip addr add 198.51.100.10/24 dev {dev};"
         f" ip route add default via 198.51.100.1 dev {dev} table 10")
    try:
        refused_with(g, E1000E, "in table 10")
        g.sh("ip link del mgmt-vrf")
        released(g, E1000E)
    finally:
        g.sh(f"ip link del mgmt-vrf 2>/dev/null || true; ip addr flush dev {dev}")


# WireGuard without wireguard-tools: the interface's private key and one peer (any 32 bytes are a
# valid Curve25519 key) with its endpoint, set over generic netlink (WG_CMD_SET_DEVICE).
WG_SET = r'''
import os, socket, struct, sys
def attr(kind, value):
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * ((4 - len(data) % 4) % 4)
def request(sock, family, command, body, flags=0x5):
    payload = struct.pack("=BBH", command, 1, 0) + body
    sock.send(struct.pack("=IHHII", 16 + len(payload), family, flags, 1, 0) + payload)
    return sock.recv(65536)
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16); sock.bind((0, 0))
reply = request(sock, 0x10, 3, attr(2, b"wireguard\0"))
offset, family = 20, None
while offset < len(reply):
    length, kind = struct.unpack_from("=HH", reply, offset)
    if kind == 1:
        family = struct.unpack_from("=H", reply, offset + 4)[0]
    offset += (length + 3) & ~3
endpoint = struct.pack("!HH4s8x", socket.AF_INET, 51820, socket.inet_aton(sys.argv[2]))
endpoint = struct.pack("=H", socket.AF_INET) + endpoint[2:]
peer = attr(1, os.urandom(32)) + attr(4, endpoint)
body = attr(2, sys.argv[1].encode() + b"\0") + attr(3, os.urandom(32)) + attr(8 | 0x8000, attr(0 | 0x8000, peer))
answer = request(sock, family, 1, body)
error = struct.unpack_from("=i", answer, 16)[0] if struct.unpack_from("=H", answer, 4)[0] == 2 else 0
sys.exit(1 if error else 0)
'''


def test_a_wireguard_tunnel_protects_the_igb_it_rides_on(g):
    fresh(g)
    dev = netdev(g, IGB)
    g.vm.write_file("/tmp/wg_set.py", WG_SET)
    g.sh(f"modprobe wireguard; ip addr add 203.0.113.10/24 dev {dev}; ip link set {dev} up;"
         " ip link add wg-mgmt type wireguard && python3 /tmp/wg_set.py wg-mgmt 203.0.113.5 &&"
         " ip addr add 10.99.0.2/24 dev wg-mgmt && ip link set wg-mgmt up")
    g.sh(f"mkdir -p /etc/nicpassd; printf '[guard]\\nmanagement_interfaces = [\"wg-mgmt\"]\\n' > {CONFIG};"
         " systemctl reload nicpassd")
    try:
        refused_with(g, IGB, f"configured management interface: wg-mgmt → {dev} (wireguard underlay to 203.0.113.5)")
        g.sh("ip link del wg-mgmt")
        released(g, IGB)
    finally:
        g.sh(f"ip link del wg-mgmt 2>/dev/null || true; ip addr flush dev {dev}; rm -f {CONFIG};"
             " systemctl reload nicpassd")


SERVER = r'''
import socket, time
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("198.51.100.10", 22)); server.listen()
connection, _ = server.accept()
connection.recv(1)
'''
CLIENT = r'''
import socket, time
client = socket.create_connection(("198.51.100.10", 22), timeout=20)
time.sleep(600)
'''


def test_an_ssh_session_from_a_namespace_protects_the_nic_it_arrives_on(g):
    """A listener on port 22 stands in for sshd; the client is a process in a network namespace
    that owns the igb's interface, so the session crosses the QEMU hub and arrives on the e1000e."""
    fresh(g)
    e1000e, igb = netdev(g, E1000E), netdev(g, IGB)
    g.vm.write_file("/tmp/session_server.py", SERVER)
    g.vm.write_file("/tmp/session_client.py", CLIENT)
    g.sh(f"ip addr add 198.51.100.10/24 dev {e1000e}; ip link set {e1000e} up; ip netns add client;"
         f" ip link set {igb} netns client; ip -n client addr add 198.51.100.7/24 dev {igb};"
         f" ip -n client link set {igb} up; ip -n client link set lo up;"
         " (setsid python3 /tmp/session_server.py >/dev/null 2>&1 &); sleep 1;"
         " (setsid ip netns exec client python3 /tmp/session_client.py >/dev/null 2>&1 &)")
    try:
        refused_with(g, E1000E, f"SSH session from 198.51.100.7: {e1000e}", timeout=40)
        g.sh("pkill -f '[s]ession_client.py'")  # the brackets: not this shell's own command line
        released(g, E1000E)
    finally:
        g.sh(f"pkill -f '[s]ession_client.py' || true; pkill -f '[s]ession_server.py' || true;"
             f" ip -n client link set {igb} netns 1 || true; ip netns del client || true; ip addr flush dev {e1000e};"
             f" ip addr flush dev {igb} 2>/dev/null || true")
