"""The admin's own session (nicpassd/host/sessions.py, guard._sessions): an established SSH or
web-console connection protects the interface it arrives on, through the route back to its peer;
it stops protecting when the session closes; other ports and loopback peers do not count; the
switch and the ports are configurable. sock_diag read for real in a network namespace."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

from support.netns import run_python

from nicpassd.engine.config import Config, DaemonSettings, GuardSettings
from nicpassd.host import sessions
from nicpassd.host.model import Session as HostSession
from nicpassd.sim.topology import Route, Rule, Session

REPO = Path(__file__).resolve().parents[2]
ENO1, NIC = "0000:01:00.0", "0000:af:00.0"



def with_uplink(sim, **rules) -> None:
    """A second network on the plain NIC: 198.51.100.0/24 on enp175s0f0, the default stays on br0."""
    sim.kernel.set_routes([*sim.kernel.topology.routes, Route(dev="enp175s0f0", dst="198.51.100.0/24")], **rules)


async def test_an_ssh_session_protects_the_interface_it_arrives_on_until_it_closes(sim):
    with_uplink(sim)
    sim.kernel.set_sessions([Session(local="198.51.100.10", port=22, peer="198.51.100.7")])
    await sim.engine.quiesce()
    assert sim.engine.protected.reasons(NIC)[0] == "SSH session from 198.51.100.7: enp175s0f0"
    assert not sim.engine.protected.entries[NIC].overridable
    sim.kernel.set_sessions([])  # the admin logs out
    await sim.engine.quiesce()
    assert NIC not in sim.engine.protected


async def test_a_session_over_the_default_route_names_the_whole_chain(sim):
    sim.kernel.set_sessions([Session(local="192.0.2.10", port=8006, peer="203.0.113.9")])
    await sim.engine.quiesce()
    assert "Proxmox web UI session from 203.0.113.9: br0 → bond0 → eno1" in sim.engine.protected.reasons(ENO1)


async def test_other_ports_and_loopback_peers_do_not_count(sim):
    with_uplink(sim)
    sim.kernel.set_sessions([Session(local="198.51.100.10", port=3306, peer="198.51.100.7"),
                             Session(local="127.0.0.1", port=22, peer="127.0.0.1")])
    await sim.engine.quiesce()
    assert NIC not in sim.engine.protected


async def test_the_answer_follows_policy_routing(sim):
    """A rule sends replies from 192.0.2.10 by table 100, whose default route leaves by the NIC."""
    with_uplink(sim)
    sim.kernel.set_routes([*sim.kernel.topology.routes,
                           Route(dev="enp175s0f0", dst="default", gateway="198.51.100.1", table=100)],
                          rules=[Rule(priority=100, table=100, source="192.0.2.10/32")])
    sim.kernel.set_sessions([Session(local="192.0.2.10", port=22, peer="203.0.113.9")])
    await sim.engine.quiesce()
    assert any(r.startswith("SSH session from 203.0.113.9: enp175s0f0") for r in sim.engine.protected.reasons(NIC))


async def test_sessions_can_be_switched_off_or_given_other_ports(make_sim):
    off = make_sim(config=Config(guard=GuardSettings(sessions=False), daemon=DaemonSettings(bind_verify_timeout=0.5)))
    with_uplink(off)
    off.kernel.set_sessions([Session(local="198.51.100.10", port=22, peer="198.51.100.7")])
    await off.engine.quiesce()
    assert NIC not in off.engine.protected
    other = make_sim(config=Config(guard=GuardSettings(session_ports=(2222,)),
                                   daemon=DaemonSettings(bind_verify_timeout=0.5)))
    with_uplink(other)
    other.kernel.set_sessions([Session(local="198.51.100.10", port=2222, peer="198.51.100.7")])
    await other.engine.quiesce()
    assert other.engine.protected.reasons(NIC) == ("TCP port 2222 session from 198.51.100.7: enp175s0f0",)


def test_the_wire_format_round_trips_and_maps_ipv4_clients_of_ipv6_listeners():
    items = [HostSession("192.0.2.10", 22, "198.51.100.7", 51234), HostSession("2001:db8::10", 22, "2001:db8::7", 4)]
    assert sessions.parse(sessions.encode_dump(items)) == items
    mapped = sessions.parse(sessions.encode_dump([HostSession("::ffff:192.0.2.10", 22, "::ffff:198.51.100.7", 5)]))
    assert mapped == [HostSession("192.0.2.10", 22, "198.51.100.7", 5)]


CHILD = textwrap.dedent("""
    import json, socket, asyncio
    from nicpassd.host import sessions
    from nicpassd.paths import HostPaths

    async def main():
        loop = asyncio.get_running_loop()
        events = []
        watcher = sessions.SessionEvents(loop, events.append)
        server = socket.socket(); server.bind(("127.0.0.1", 2222)); server.listen()
        client = socket.create_connection(("127.0.0.1", 2222)); conn, _ = server.accept()
        open_sessions = sessions.read_sessions(HostPaths())
        client.close(); conn.close()
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.01)
        watcher.close()
        print(json.dumps({"sessions": [[s.local, s.local_port, s.peer, s.peer_port] for s in open_sessions],
                          "closed_events": len(events)}))

    asyncio.run(main())
""")




def test_a_real_kernel_lists_a_session_and_announces_its_close(netns):
    result = run_python(netns, CHILD)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    ports = {(local_port, peer_port) for _local, local_port, _peer, peer_port in got["sessions"]}
    assert any(local_port == 2222 for local_port, _ in ports), got  # the server's side of the session
    assert got["closed_events"] >= 1
