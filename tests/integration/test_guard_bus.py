"""The guard through the real bus and nicpassctl: the management NIC, its bond slave and its IOMMU
group mate are refused (exit 3) with the chain of reasons; moving the default route through the
simulated netlink changes GetProtected and `nicpassctl guard` after one event, without a restart;
`force` is asked of polkit in addition and never opens the management path."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from dbus_fast import Message, MessageType, Variant

from nicpassd.sim.topology import Route
from nicpassd.transport.service import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from support.unprivileged import NOBODY, busctl_async

ENO1, ENO2 = "0000:01:00.0", "0000:01:00.1"
NIC, USB = "0000:af:00.0", "0000:af:00.1"
SATA = "0000:00:17.0"


async def nicpassctl(service, *args: str) -> tuple[int, str, str]:
    """The real CLI in its own process; the daemon keeps serving on this test's loop meanwhile."""
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=service.address)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nicpassctl", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def get_protected(client) -> dict[str, list[str]]:
    reply = await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE,
                                      member="GetProtected"))
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return {address: reasons for address, reasons in reply.body[0]}


def driver_of(service, address: str) -> str:
    link = service.paths.pci_device(address) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


async def test_management_nic_bond_slave_and_group_mate_exit_3_with_the_chain(service, client):
    cases = {
        "eno1": ["IPv4 default route 0.0.0.0/0 via 192.0.2.1: br0 → bond0 → eno1",
                 "IPv6 default route ::/0 via fe80::1: br0 → bond0 → eno1"],
        "eno2": ["IPv4 default route 0.0.0.0/0 via 192.0.2.1: br0 → bond0 → eno2"],
        "01:00.1": ["shares IOMMU group 14 with protected 0000:01:00.0"],  # the group mate, by address
    }
    for device, reasons in cases.items():
        code, out, err = await nicpassctl(service, "bind", device, "--driver", "vfio-pci")
        assert code == 3, (device, code, err)
        assert all(reason in err for reason in reasons), (device, err)
        assert out == "" and len(err.strip().splitlines()) == 1
        code, _out, err = await nicpassctl(service, "bind", device, "--force")
        assert code == 3 and "even with force" in err, (device, err)
    assert driver_of(service, ENO1) == "igb" and driver_of(service, ENO2) == "igb"
    code, out, _err = await nicpassctl(service, "guard")
    assert code == 0 and "br0 → bond0 → eno1" in out and "storage of the root file system" in out


async def test_moving_the_default_route_changes_the_guard_after_one_event(service, client):
    before = await get_protected(client)
    assert {ENO1, ENO2, SATA} <= set(before) and NIC not in before
    changed: list[str] = []
    client.add_message_handler(lambda m: changed.append(m.path) if m.member == "PropertiesChanged" else None)
    await client.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                              interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                              body=[f"type='signal',sender='{BUS_NAME}',member='PropertiesChanged'"]))
    events = []
    service.kernel.subscribe(events.append)
    service.kernel.set_routes([Route(dev="enp175s0f0", dst="default", gateway="192.0.2.1"),
                               Route(dev="enp175s0f0", dst="default", gateway="fe80::1", family=6)])
    assert len(events) == 1  # one netlink-like event ...
    for _ in range(3):  # ... reaches the engine on the next loop iterations: no restart, no polling
        await asyncio.sleep(0)
    after = await get_protected(client)
    assert after[NIC] == ["IPv4 default route 0.0.0.0/0 via 192.0.2.1: enp175s0f0",
                          "IPv6 default route ::/0 via fe80::1: enp175s0f0"]
    assert after[USB] == ["shares IOMMU group 40 with protected 0000:af:00.0"]
    assert ENO1 not in after and ENO2 not in after and SATA in after
    for _ in range(50):
        if "/org/nicpass/NicPass1/devices/0000_af_00_0" in changed:
            break
        await asyncio.sleep(0.01)
    assert "/org/nicpass/NicPass1/devices/0000_af_00_0" in changed  # Protected went true
    code, out, _err = await nicpassctl(service, "--json", "guard")
    assert code == 0
    assert {entry["address"] for entry in json.loads(out)} == set(after)
    code, _out, err = await nicpassctl(service, "bind", "enp175s0f0")
    assert code == 3 and "enp175s0f0" in err
    code, out, err = await nicpassctl(service, "bind", "eno2", "--runtime")  # free now
    assert code == 0, err
    assert driver_of(service, ENO2) == "vfio-pci"


async def test_force_asks_polkit_in_addition_and_only_opens_derived_entries(service, client, polkit):
    service.kernel.set_routes([Route(dev="enp175s0f0", dst="default", gateway="192.0.2.1")])
    for _ in range(3):
        await asyncio.sleep(0)

    async def bind(device: str, **options) -> Message:
        return await client.call(Message(
            destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member="Bind", signature="ssa{sv}",
            body=[device, "vfio-pci", {name: Variant("b", value) for name, value in options.items()}]))

    reply = await bind(USB)
    assert reply.error_name == "org.nicpass.NicPass1.Error.Protected" and "override with force" in reply.body[0]
    reply = await bind(NIC, force=True)
    assert reply.error_name == "org.nicpass.NicPass1.Error.Protected" and "even with force" in reply.body[0]
    assert driver_of(service, NIC) == "e1000e"

    # Another user: polkit is asked for force in addition to manage; refused force, nothing changes.
    polkit.set_allowed_uids([NOBODY])
    polkit.clear()
    result = await bind_as_nobody(service, USB, force=True, persist=False)
    assert result.returncode == 0, result.stderr
    assert driver_of(service, USB) == "vfio-pci"
    assert [(action, uid, authorized) for action, uid, _flags, authorized in polkit.checks()] == [
        ("org.nicpass.NicPass1.manage", NOBODY, True), ("org.nicpass.NicPass1.force", NOBODY, True)]
    reply = await client.call(Message(  # root, never asked about: the USB controller back
        destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member="Bind", signature="ssa{sv}",
        body=[USB, "", {"force": Variant("b", True), "persist": Variant("b", False)}]))
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    polkit.set_allowed_uids([])  # no one may force: AccessDenied, nothing changes
    result = await bind_as_nobody(service, USB, force=True, persist=False)
    assert result.returncode != 0 and "Access denied" in result.stderr, result.stderr
    assert driver_of(service, USB) != "vfio-pci"


async def bind_as_nobody(service, device: str, **options: bool):
    flags = [word for name, value in options.items() for word in (name, "b", "true" if value else "false")]
    return await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Bind", "ssa{sv}",
                              device, "vfio-pci", str(len(options)), *flags, nobody=True)


async def test_manage_granted_force_denied_is_access_denied_naming_force_and_changes_nothing(
        service, client, polkit):
    # A polkit rules file that grants `manage` and not `force` to a user: the force flag alone is refused.
    service.kernel.set_routes([Route(dev="enp175s0f0", dst="default", gateway="192.0.2.1")])
    for _ in range(3):
        await asyncio.sleep(0)
    polkit.set_allowed_uids([NOBODY])
    polkit.set_action_uids("org.nicpass.NicPass1.force", [])
    polkit.clear()

    result = await bind_as_nobody(service, USB, force=True, persist=False)
    assert result.returncode != 0 and "Access denied" in result.stderr, result.stderr
    assert driver_of(service, USB) != "vfio-pci"
    assert [(action, authorized) for action, _uid, _flags, authorized in polkit.checks()] == [
        ("org.nicpass.NicPass1.manage", True), ("org.nicpass.NicPass1.force", False)]

    # Without force the same caller may still manage an unprotected device.
    free_pf = "0000:3b:00.1"
    result = await bind_as_nobody(service, free_pf, persist=False)
    assert result.returncode == 0, result.stderr
    assert driver_of(service, free_pf) == "vfio-pci"
