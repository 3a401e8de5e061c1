"""Polkit is asked for the action each method needs, not for one blanket right: with a rules file
that grants `lease` and not `manage` (a libvirt group, say), the same caller may Prepare and Release
leases but not Bind or SetVfCount; with `lease` refused, Prepare is AccessDenied and leases nothing."""

from __future__ import annotations

import os

from dbus_fast import Message, MessageType, Variant

from nicpassd.transport.service import BUS_NAME, MANAGER_IFACE, MANAGER_PATH

PF = "0000:3b:00.0"
VF = "0000:3b:02.0"
VM = "6f1c2d3e-0000-4000-8000-0000000000b1"
MANAGE, LEASE = "org.nicpass.NicPass1.manage", "org.nicpass.NicPass1.lease"
DENIED = "org.freedesktop.DBus.Error.AccessDenied"


async def call(client, member: str, signature: str, body: list) -> Message:
    return await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE,
                                     member=member, signature=signature, body=body))


def driver_of(service, address: str) -> str:
    link = service.paths.pci_device(address) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def vf_count(service, pf: str) -> int:
    return int((service.paths.pci_device(pf) / "sriov_numvfs").read_text())


async def test_lease_granted_manage_denied(service, client, polkit):
    await service.engine.set_vf_count(PF, 2, persist=False)
    polkit.set_action_uids(MANAGE, [])
    polkit.clear()
    try:
        reply = await call(client, "SetVfCount", "sua{sv}", [PF, 4, {}])
        assert reply.error_name == DENIED and MANAGE in reply.body[0], reply.body
        assert vf_count(service, PF) == 2
        reply = await call(client, "Bind", "ssa{sv}", [VF, "vfio-pci", {"persist": Variant("b", False)}])
        assert reply.error_name == DENIED, reply.body
        assert driver_of(service, VF) != "vfio-pci"

        reply = await call(client, "Prepare", "ssasa{sv}", ["web", VM, [VF], {}])
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        assert driver_of(service, VF) == "vfio-pci"
        reply = await call(client, "Release", "sa{sv}", [VM, {}])
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        decided = [(action, authorized) for action, _uid, _flags, authorized in polkit.checks()]
        assert decided == [(MANAGE, False), (MANAGE, False), (LEASE, True), (LEASE, True)]
    finally:
        service.engine.leasing.close()


async def test_lease_denied_prepare_leases_nothing(service, client, polkit):
    await service.engine.set_vf_count(PF, 2, persist=False)
    polkit.set_action_uids(LEASE, [])
    try:
        before = driver_of(service, VF)
        reply = await call(client, "Prepare", "ssasa{sv}", ["web", VM, [VF], {}])
        assert reply.error_name == DENIED and LEASE in reply.body[0], reply.body
        assert driver_of(service, VF) == before
        reply = await call(client, "ListLeases", "", [])
        assert reply.message_type == MessageType.METHOD_RETURN and reply.body[0] == [], reply.body
    finally:
        service.engine.leasing.close()
