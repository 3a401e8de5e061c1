"""rtnetlink for the guard: the wire format, the address sources, and the production listener and
readers for real, inside a throwaway network namespace (never this machine's own network)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from support.netns import run_python

from nicpassd.host import netlink
from nicpassd.host.model import IfAddress
from nicpassd.paths import HostPaths

REPO = Path(__file__).resolve().parents[2]


def test_a_dump_round_trips_through_the_parser(tmp_path):
    addresses = [(IfAddress(4, "192.0.2.10/24", "br0"), 7), (IfAddress(4, "10.0.0.1/8", "eno1"), 2),
                 (IfAddress(6, "2001:db8::10/64", "br0"), 7)]
    dump = tmp_path / "dump"
    dump.write_bytes(netlink.encode_dump(addresses))
    source = netlink.SimulatedAddressSource(dump)
    assert source.addresses(4) == [IfAddress(4, "192.0.2.10/24", "br0"), IfAddress(4, "10.0.0.1/8", "eno1")]
    assert source.addresses(6) == [IfAddress(6, "2001:db8::10/64", "if7")]  # IPv6 carries no label
    assert netlink.SimulatedAddressSource(tmp_path / "missing").addresses(4) == []


def test_alias_labels_failed_addresses_and_truncated_data():
    message = netlink.encode_address(IfAddress(4, "192.0.2.11/24", "eth0:1"), 3)
    (_kind, _flags, payload), = netlink.messages(message)
    assert netlink.parse_address(payload, str) == IfAddress(4, "192.0.2.11/24", "eth0")
    failed = bytearray(payload)
    failed[2] = netlink.IFA_F_DADFAILED  # ifa_flags
    assert netlink.parse_address(bytes(failed), str) is None
    assert list(netlink.messages(message[:-3])) == []  # a cut message is not parsed
    assert netlink.describe(netlink.RTM_NEWADDR, payload) == "eth0"


def test_the_address_source_follows_the_root(tmp_path, ksim):
    assert isinstance(netlink.address_source_for(ksim.paths), netlink.SimulatedAddressSource)
    assert isinstance(netlink.address_source_for(HostPaths(Path("/"))), netlink.NetlinkAddressSource)
    assert isinstance(netlink.address_source_for(HostPaths(tmp_path)), netlink.NoAddressSource)


def test_this_hosts_addresses_can_be_dumped_read_only():
    # One RTM_GETADDR dump of this machine's own addresses (a read; nothing is changed).
    addresses = netlink.NetlinkAddressSource().addresses(4)
    assert any(address.dev == "lo" and address.address == "127.0.0.1/8" for address in addresses)


# ------------------------------------------------------------------ a real kernel, in a netns
CHILD = textwrap.dedent("""
    import asyncio, json, subprocess
    from nicpassd.host import sysfs
    from nicpassd.host.netlink import RtnlEvents
    from nicpassd.paths import HostPaths

    STEPS = [
        ("link", "ip link add v0 type veth peer name v1"),
        ("up", "ip link set v1 up"),
        ("up", "ip link set v0 up"),
        ("address", "ip addr add 192.0.2.10/24 dev v0"),
        ("address6", "ip -6 addr add 2001:db8::10/64 dev v0 nodad"),
        ("route", "ip route add default via 192.0.2.1 dev v0"),
        ("route6", "ip -6 route add default via 2001:db8::1 dev v0"),
    ]

    async def main():
        loop = asyncio.get_running_loop()
        events = []
        listener = RtnlEvents(loop, events.append)
        seen = {}
        for name, command in STEPS:
            before = len(events)
            subprocess.run(command.split(), check=True)
            deadline = loop.time() + 3
            while len(events) == before and loop.time() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)
            seen[name] = seen.get(name, []) + [[e.action, e.subsystem, e.sys_name] for e in events[before:]]
        before = len(events)
        subprocess.run("ip link set v1 down".split(), check=True)  # v0 loses its carrier
        deadline = loop.time() + 3
        while len(events) == before and loop.time() < deadline:
            await asyncio.sleep(0.005)
        seen["carrier"] = [[e.action, e.subsystem, e.sys_name] for e in events[before:]]
        listener.close()
        paths = HostPaths()
        snapshot = {
            "events": seen,
            "addresses": [[a.family, a.address, a.dev, a.scope] for a in sysfs.read_addresses(paths)],
            "routes": [[r.family, r.prefix, r.dev, r.gateway] for r in sysfs.read_routes(paths)],
            "links": {name: [link.kind, link.carrier] for name, link in sysfs.read_links(paths).items()},
        }
        print(json.dumps(snapshot))

    asyncio.run(main())
""")




def test_listener_and_readers_see_a_real_kernel_in_a_network_namespace(netns):
    result = run_python(netns, CHILD)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    events = got["events"]
    for step in ("link", "up", "address", "address6", "route", "route6", "carrier"):
        assert events[step], f"no netlink event after {step}: {events}"
        assert all(event[:2] == ["change", "route"] for event in events[step])
    assert ["change", "route", "v0"] in events["address"] and ["change", "route", "v0"] in events["route"]
    assert ["change", "route", "v0"] in events["carrier"]
    addresses = {(family, address, dev) for family, address, dev, _scope in got["addresses"]}
    assert {(4, "192.0.2.10/24", "v0"), (6, "2001:db8::10/64", "v0")} <= addresses  # netlink + if_inet6
    link_local = [a for a in got["addresses"] if a[0] == 6 and a[1].startswith("fe80:")]
    assert all(scope == 253 for *_rest, scope in link_local)
    assert [4, "0.0.0.0/0", "v0", "192.0.2.1"] in got["routes"]
    assert [6, "::/0", "v0", "2001:db8::1"] in got["routes"]
    assert got["links"]["v0"] == ["virtual", False]  # its peer is down now: no carrier
