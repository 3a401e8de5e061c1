"""An out-of-band take of the management NIC through the real bus: the ProtectionViolated signal
(found, then healed), GetViolations, the ViolationCount property, `nicpassctl guard` and `show`
with the last violation, and `nicpassctl guard --release` asking polkit for the force action."""

from __future__ import annotations

import asyncio
import json

import pytest
from dbus_fast import Message, MessageType

from nicpassd.transport.service import BUS_NAME, MANAGER_IFACE, MANAGER_PATH

from support.unprivileged import NOBODY, busctl_async
from test_guard_bus import nicpassctl

pytestmark = pytest.mark.bus
ENO1 = "0000:01:00.0"


async def test_a_take_is_signalled_healed_and_shown(service, client):
    signals = []
    client.add_message_handler(lambda m: signals.append(m.body) if m.member == "ProtectionViolated" else None)
    await client.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                              interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                              body=[f"type='signal',interface='{MANAGER_IFACE}',member='ProtectionViolated'"]))
    service.engine.sentinel.start_healing()
    kernel, paths = service.kernel, service.paths
    kernel.load_module("vfio-pci")  # libvirt's order: modprobe, override, unbind, drivers_probe
    kernel.write(paths.pci_device(ENO1) / "driver_override", "vfio-pci")
    kernel.write(paths.pci_drivers / "igb" / "unbind", ENO1)
    kernel.write(paths.drivers_probe, ENO1)
    for _ in range(200):
        if len(signals) >= 2:
            break
        await asyncio.sleep(0.02)
    assert [(device, details["outcome"].value.split(":")[0]) for device, details in signals] == [
        (ENO1, "detected"), (ENO1, "healed")]
    assert signals[0][1]["culprit"].value == "unknown writer"
    assert signals[0][1]["new_driver"].value == "vfio-pci" and signals[0][1]["old_driver"].value == "igb"

    reply = await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE,
                                      member="GetViolations"))
    assert reply.message_type == MessageType.METHOD_RETURN
    [violation] = reply.body[0]
    assert violation["address"].value == ENO1 and violation["outcome"].value.startswith("healed")
    reply = await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                      interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
                                      body=[MANAGER_IFACE, "ViolationCount"]))
    assert reply.body[0].value == 1

    code, out, _err = await nicpassctl(service, "guard")
    assert code == 0 and "Taken by someone else" in out and "by unknown writer: healed: back on igb" in out
    code, out, _err = await nicpassctl(service, "--json", "show", ENO1)
    assert code == 0 and "healed: back on igb" in json.loads(out)["explain"]["last_violation"]


async def test_releasing_a_remembered_device_asks_for_force(service, polkit):
    service.kernel.write(service.paths.pci_drivers / "igb" / "unbind", ENO1)  # eno1 taken, heal is not on
    await asyncio.sleep(0.1)
    polkit.set_allowed_uids([NOBODY])  # another user, granted manage and not force: refused, kept
    polkit.set_action_uids("org.nicpass.NicPass1.force", [])
    polkit.clear()
    result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ReleaseProtection",
                                "sa{sv}", "eno1", "0", nobody=True)
    assert result.returncode != 0 and "Access denied" in result.stderr, result.stderr
    assert ("org.nicpass.NicPass1.force", NOBODY, False) in {
        (action, uid, authorized) for action, uid, _flags, authorized in polkit.checks()}
    assert ENO1 in service.engine.view.memory.entries
    code, _out, err = await nicpassctl(service, "guard", "--release", "eno1")  # root: polkit says yes unasked
    assert code == 0, err
    assert ENO1 not in service.engine.view.memory.entries
