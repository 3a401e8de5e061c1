"""Routing the guard reads over rtnetlink (nicpassd/host/routing.py): a default route in a
policy-routing table reached by an ``ip rule``, every next hop of an ECMP route, a nexthop
object, a VRF's table — on the simulated host (its netlink dumps) and, for real, in a throwaway
network namespace. /proc/net/route shows none of these beyond the main table's first hop."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

from support.netns import run_python

from nicpassd.host import routing, sysfs
from nicpassd.host.model import Route as HostRoute
from nicpassd.sim.topology import Hop, Nexthop, Route, Rule

REPO = Path(__file__).resolve().parents[2]
ENO1, NIC, PF2 = "0000:01:00.0", "0000:af:00.0", "0000:3b:00.1"
UPLINK = "198.51.100.1"



def reasons(sim, address: str) -> tuple[str, ...]:
    return sim.engine.protected.reasons(address)


async def test_a_default_route_in_a_policy_routing_table_is_followed(sim):
    sim.kernel.set_routes([*sim.kernel.topology.routes,
                           Route(dev="enp175s0f0", dst="default", gateway=UPLINK, table=100)],
                          rules=[Rule(priority=1000, table=100, source="198.51.100.0/24")])
    await sim.engine.quiesce()
    assert reasons(sim, NIC)[0] == ("IPv4 default route 0.0.0.0/0 via 198.51.100.1 in table 100 (ip rule 1000: "
                                    "from 198.51.100.0/24): enp175s0f0")
    assert HostRoute(4, "0.0.0.0/0", "enp175s0f0", UPLINK, 100) not in sysfs.read_proc_routes(sim.paths)
    sim.kernel.set_routes(list(sim.kernel.topology.routes), rules=[])  # the rule goes: table 100 is unused
    await sim.engine.quiesce()
    assert NIC not in sim.engine.protected


async def test_every_next_hop_of_an_ecmp_default_route_is_protected(sim):
    ecmp = Route(dst="default", nexthops=(Hop(dev="br0", gateway="192.0.2.1"),
                                          Hop(dev="enp175s0f0", gateway=UPLINK)))
    sim.kernel.set_routes([ecmp])
    await sim.engine.quiesce()
    assert reasons(sim, NIC)[0] == "IPv4 default route 0.0.0.0/0 via 198.51.100.1: enp175s0f0"
    assert "IPv4 default route 0.0.0.0/0 via 192.0.2.1: br0 → bond0 → eno1" in reasons(sim, ENO1)
    proc = sysfs.read_proc_routes(sim.paths)
    assert [r.dev for r in proc if r.is_default] == ["br0"]  # procfs shows only the first hop
    sim.kernel.set_routes([Route(dev="br0", dst="default", gateway="192.0.2.1")])
    await sim.engine.quiesce()
    assert NIC not in sim.engine.protected  # the second hop went: the protection follows


async def test_a_route_through_a_nexthop_object_or_group_is_followed(sim):
    sim.kernel.set_routes([Route(dst="default", nexthop=3)],
                          nexthops=[Nexthop(id=1, dev="enp175s0f0", gateway=UPLINK),
                                    Nexthop(id=2, dev="br0", gateway="192.0.2.1"), Nexthop(id=3, group=(1, 2))])
    await sim.engine.quiesce()
    assert reasons(sim, NIC)[0] == "IPv4 default route 0.0.0.0/0 via 198.51.100.1: enp175s0f0"
    assert ENO1 in sim.engine.protected


VRF_HOST = """
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
name = "mgmt"
kind = "vrf"
table = 10
lowers = ["enp175s0f0"]

[[rules]]
priority = 1000
l3mdev = true

[[routes]]
dev = "enp175s0f0"
dst = "default"
gateway = "198.51.100.1"
table = 10

[[routes]]
dev = "enp176s0f0"
dst = "default"
gateway = "192.0.2.1"
"""


async def test_a_vrf_carrying_the_management_route_protects_its_member(make_sim):
    sim = make_sim(VRF_HOST)
    assert reasons(sim, NIC) == ("IPv4 default route 0.0.0.0/0 via 198.51.100.1 in table 10 (a VRF table): "
                                 "enp175s0f0",)
    assert sim.engine.snapshot.links["mgmt"].lowers == ("enp175s0f0",)


def test_the_wire_format_round_trips():
    data = (routing.encode_route(4, "0.0.0.0/0", 1000, nexthops=((2, "192.0.2.1"), (3, "198.51.100.1")))
            + routing.encode_route(6, "2001:db8::/64", 254, oif=2)
            + routing.encode_route(4, "10.0.0.0/8", 254, nh_id=7) + routing.done())
    rules = routing.encode_rule(4, 1000, 1000, source="10.1.0.0/16") + routing.encode_rule(4, 1001, 0, l3mdev=True)
    nexthops = routing.encode_nexthop(7, oif=3, gateway="198.51.100.9")
    names = {2: "eth0", 3: "eth1"}
    routes, parsed_rules = routing.routing_from_dumps(data, rules, nexthops, names.get)
    assert routes == (HostRoute(4, "0.0.0.0/0", "eth0", "192.0.2.1", 1000),
                      HostRoute(4, "0.0.0.0/0", "eth1", "198.51.100.1", 1000),
                      HostRoute(6, "2001:db8::/64", "eth0", "", 254),
                      HostRoute(4, "10.0.0.0/8", "eth1", "198.51.100.9", 254))
    assert [(r.priority, r.table, r.selector, r.l3mdev) for r in parsed_rules] == [
        (1000, 1000, "from 10.1.0.0/16", False), (1001, 0, "", True)]


# ------------------------------------------------------------------ a real kernel, in a netns
CHILD = textwrap.dedent("""
    import json, subprocess
    from nicpassd.host import sysfs
    from nicpassd.paths import HostPaths

    def ip(*commands):
        for command in commands:
            subprocess.run(command.split(), check=True)

    for n in range(3):  # veth pairs: dummy links need a module this kernel may not have
        ip(f"ip link add d{n} type veth peer name p{n}", f"ip link set p{n} up", f"ip link set d{n} up")
    ip(
       "ip addr add 192.0.2.10/24 dev d0", "ip addr add 198.51.100.10/24 dev d1", "ip addr add 203.0.113.10/24 dev d2",
       "ip route add default via 198.51.100.1 dev d1 table 100",
       "ip rule add priority 1000 from 198.51.100.0/24 lookup 100",
       "ip route add 10.0.0.0/8 nexthop via 192.0.2.1 dev d0 nexthop via 203.0.113.1 dev d2")
    nexthops = subprocess.run("ip nexthop add id 5 via 203.0.113.1 dev d2".split()).returncode == 0
    if nexthops:
        ip("ip route add 172.16.0.0/12 nhid 5")
    vrf = subprocess.run("ip link add mgmt type vrf table 10".split()).returncode == 0
    if vrf:
        ip("ip link set mgmt up", "ip link set d2 master mgmt", "ip route add default via 203.0.113.1 dev d2 table 10")
    routes, rules = sysfs.read_routing(HostPaths())
    print(json.dumps({"routes": [[r.family, r.prefix, r.dev, r.gateway, r.table] for r in routes],
                      "rules": [[r.priority, r.table, r.selector, r.l3mdev] for r in rules],
                      "proc": [[r.prefix, r.dev, r.table] for r in sysfs.read_proc_routes(HostPaths())],
                      "nexthops": nexthops, "vrf": vrf}))
""")




def test_a_real_kernels_tables_rules_ecmp_nexthops_and_vrfs(netns):
    result = run_python(netns, CHILD)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    routes = got["routes"]
    assert [4, "0.0.0.0/0", "d1", "198.51.100.1", 100] in routes  # reached by the rule
    assert [1000, 100, "from 198.51.100.0/24", False] in got["rules"]
    assert [4, "10.0.0.0/8", "d0", "192.0.2.1", 254] in routes and [4, "10.0.0.0/8", "d2", "203.0.113.1", 254] in routes
    assert [["10.0.0.0/8", "d0", 254]] == [p for p in got["proc"] if p[0] == "10.0.0.0/8"]  # procfs: first hop only
    if got["nexthops"]:  # nexthop objects: kernel 5.3 and later
        assert [4, "172.16.0.0/12", "d2", "203.0.113.1", 254] in routes
    if got["vrf"]:  # the vrf module is there
        assert [4, "0.0.0.0/0", "d2", "203.0.113.1", 10] in routes
        assert any(rule[3] for rule in got["rules"])  # the kernel's l3mdev rule


EVENTS_CHILD = textwrap.dedent("""
    import asyncio, json, subprocess
    from nicpassd.host.netlink import RtnlEvents

    async def main():
        loop = asyncio.get_running_loop()
        events = []
        listener = RtnlEvents(loop, events.append)
        seen = {}
        for name, command in (("rule-add", "ip rule add priority 1000 from 198.51.100.0/24 lookup 100"),
                              ("rule-del", "ip rule del priority 1000")):
            before = len(events)
            subprocess.run(command.split(), check=True)
            deadline = loop.time() + 3
            while len(events) == before and loop.time() < deadline:
                await asyncio.sleep(0.005)
            seen[name] = len(events) - before
        listener.close()
        print(json.dumps(seen))

    asyncio.run(main())
""")


def test_a_rule_change_is_an_event(netns):
    result = run_python(netns, EVENTS_CHILD)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["rule-add"] >= 1 and seen["rule-del"] >= 1, seen
