"""Polkit is asked for the action each method needs, not for one blanket right: with a rules file
that grants `lease` and not `manage` (a libvirt group, say), the same caller may Prepare and Release
leases but not Bind or SetVfCount; with `lease` refused, Prepare is AccessDenied and leases nothing.

The caller is user nobody (busctl through setpriv): polkit authorizes root for every action, so
nicpassd does not ask it about root (tests/integration/test_dbus_service.py). busctl prints any
AccessDenied as "Access denied": which action was refused is in the polkit mock's record."""

from __future__ import annotations

import os

from support.unprivileged import NOBODY, busctl_async

from nicpassd.transport.service import BUS_NAME, MANAGER_IFACE, MANAGER_PATH

PF = "0000:3b:00.0"
VF = "0000:3b:02.0"
VM = "6f1c2d3e-0000-4000-8000-0000000000b1"
MANAGE, LEASE = "org.nicpass.NicPass1.manage", "org.nicpass.NicPass1.lease"


async def call(service, member: str, signature: str, *args: str):
    """The call as nobody: (succeeded, busctl's output or its error text)."""
    result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member,
                                signature, *args, nobody=True)
    return result.returncode == 0, (result.stdout if result.returncode == 0 else result.stderr)


def driver_of(service, address: str) -> str:
    link = service.paths.pci_device(address) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def vf_count(service, pf: str) -> int:
    return int((service.paths.pci_device(pf) / "sriov_numvfs").read_text())


async def test_lease_granted_manage_denied(service, polkit):
    await service.engine.set_vf_count(PF, 2, persist=False)
    polkit.set_allowed_uids([NOBODY])
    polkit.set_action_uids(MANAGE, [])
    polkit.clear()
    try:
        ok, text = await call(service, "SetVfCount", "sua{sv}", PF, "4", "0")
        assert not ok and "Access denied" in text, text
        assert vf_count(service, PF) == 2
        ok, text = await call(service, "Bind", "ssa{sv}", VF, "vfio-pci", "1", "persist", "b", "false")
        assert not ok and "Access denied" in text, text
        assert driver_of(service, VF) != "vfio-pci"

        ok, text = await call(service, "Prepare", "ssasa{sv}", "web", VM, "1", VF, "0")
        assert ok, text
        assert driver_of(service, VF) == "vfio-pci"
        ok, text = await call(service, "Release", "sa{sv}", VM, "0")
        assert ok, text
        decided = [(action, uid, authorized) for action, uid, _flags, authorized in polkit.checks()]
        assert decided == [(MANAGE, NOBODY, False), (MANAGE, NOBODY, False), (LEASE, NOBODY, True),
                           (LEASE, NOBODY, True)]
    finally:
        service.engine.leasing.close()


async def test_lease_denied_prepare_leases_nothing(service, polkit):
    await service.engine.set_vf_count(PF, 2, persist=False)
    polkit.set_allowed_uids([NOBODY])
    polkit.set_action_uids(LEASE, [])
    polkit.clear()
    try:
        before = driver_of(service, VF)
        ok, text = await call(service, "Prepare", "ssasa{sv}", "web", VM, "1", VF, "0")
        assert not ok and "Access denied" in text, text
        assert [(action, uid, authorized) for action, uid, _flags, authorized in polkit.checks()] == [
            (LEASE, NOBODY, False)]
        assert driver_of(service, VF) == before
        ok, text = await call(service, "ListLeases", "")
        assert ok and text.strip() == "aa{sv} 0", text
    finally:
        service.engine.leasing.close()
