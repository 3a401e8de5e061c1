"""Automatic reconcile runs leave a persisted device to udev until udev has processed it.

At boot nicpassd may start while udev's coldplug is still running: the early-binding helper (and
naming, module loading) run in udev's rules. A run that found a device udev has not finished (no
entry in /run/udev/data) leaves it alone and applies its desire when udev announces it, or after
UDEV_WAIT; explicit runs and hosts without udevd are not held up.
"""

from __future__ import annotations

import asyncio
import logging

from nicpassd.engine import reconcile
from nicpassd.engine.store import DeviceDesire, identity_of
from nicpassd.host.events import UEvent

NIC = "0000:af:00.0"
WAITING = "waiting for udev"


def udev_running(sim, *, processed_all_but: str) -> None:
    """A host whose udevd runs and has processed every PCI function but one."""
    sim.paths.udev_control.parent.mkdir(parents=True, exist_ok=True)
    sim.paths.udev_control.touch()
    sim.paths.udev_data.mkdir(parents=True, exist_ok=True)
    for entry in sim.paths.pci_devices.iterdir():
        if entry.name != processed_all_but:
            (sim.paths.udev_data / f"+pci:{entry.name}").touch()


def persist_on_vfio(sim, address: str) -> None:
    snapshot = sim.engine.snapshot
    sim.engine.store.put(DeviceDesire(address=address, identity=identity_of(snapshot.functions[address], snapshot),
                                      driver="vfio-pci"))



async def test_a_device_udev_has_not_processed_waits_for_its_add(sim):
    udev_running(sim, processed_all_but=NIC)
    persist_on_vfio(sim, NIC)
    sim.engine.reconciler.auto = True
    outcomes = await sim.engine.reconciler.run(explicit=False)  # the boot run
    assert sim.driver(NIC) == "e1000e"
    assert [o.summary for o in outcomes if o.address == NIC and WAITING in o.summary]
    assert WAITING in sim.engine.reconciler.notes[NIC]

    (sim.paths.udev_data / f"+pci:{NIC}").touch()  # udev ran its rules, and says so
    sim.engine.on_uevent(UEvent("add", "pci", NIC))
    await sim.engine.quiesce()
    assert (sim.driver(NIC), sim.override(NIC)) == ("vfio-pci", "vfio-pci")
    assert NIC not in sim.engine.reconciler.notes


async def test_after_udev_wait_the_desire_is_applied_anyway(sim, monkeypatch, caplog):
    monkeypatch.setattr(reconcile, "UDEV_WAIT", 0.2)
    udev_running(sim, processed_all_but=NIC)
    persist_on_vfio(sim, NIC)
    sim.engine.reconciler.auto = True
    await sim.engine.reconciler.run(explicit=False)
    assert sim.driver(NIC) == "e1000e"
    with caplog.at_level(logging.WARNING, logger="nicpassd.engine.reconcile"):
        for _ in range(50):  # the reconciler's own timer pokes it: no uevent, no API call
            await asyncio.sleep(0.05)
            if sim.driver(NIC) == "vfio-pci":
                break
        await sim.engine.quiesce()
    assert sim.driver(NIC) == "vfio-pci"
    assert f"udev has not processed {NIC}" in caplog.text


async def test_an_explicit_reconcile_does_not_wait_for_udev(sim):
    udev_running(sim, processed_all_but=NIC)
    persist_on_vfio(sim, NIC)
    await sim.engine.reconcile()
    assert sim.driver(NIC) == "vfio-pci"


async def test_without_udevd_nothing_waits(sim):
    sim.paths.udev_data.mkdir(parents=True, exist_ok=True)  # a database, but no udevd running
    assert sim.engine.host.udev_pending([NIC]) == set()
    persist_on_vfio(sim, NIC)
    await sim.engine.reconciler.run(explicit=False)
    assert sim.driver(NIC) == "vfio-pci"
