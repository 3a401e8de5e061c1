"""Crash recovery: roll back the changes a crash interrupted, from the undo journal.

Runs once at start, before the boot reconcile (which then brings persisted devices to their
desired state), so a crash leaves every device either as it was before the change or as desired.
"""

from __future__ import annotations

import logging

from nicpassd.engine import vf_settings
from nicpassd.engine.hostview import HostView
from nicpassd.engine.journal import DeviceBefore, Entry
from nicpassd.engine.operations import Operations
from nicpassd.errors import NicpassError
from nicpassd.host.model import PciFunction

log = logging.getLogger(__name__)


def _finished(view: HostView, entry: Entry) -> bool:
    """A prepare whose lease was written had completed (only dropping its entry was left)."""
    if entry.kind != "prepare" or not entry.vm_uuid:
        return False
    holder = view.leases.holder()
    return bool(entry.devices) and all(holder.get(address) == entry.vm_uuid for address in entry.devices)


async def _restore_vf_overrides(ops: Operations, address: str, before: DeviceBefore) -> str:
    """``restore_vfs`` puts each VF back on its driver; a crash between a VF's driver_override
    write and its rebind also leaves an override to take back (the driver never changed)."""
    notes = []
    function = ops.host.function(address)
    if function is None or function.num_vfs != before.function.num_vfs:
        return ""
    for vf, old_driver, old_override in zip(function.virtfns, before.vf_drivers, before.vf_overrides):
        now = ops.binding(vf)
        if (now.driver, now.driver_override) != (old_driver, old_override):
            wanted = PciFunction(vf, "", "", "", "", "", driver=old_driver, driver_override=old_override)
            notes.append(f"{vf}: {await ops.restore_binding(vf, wanted)}")
    return "; " + "; ".join(notes) if notes else ""


async def _restore_vf_settings(ops: Operations, pf: str, settings: dict[int, dict]) -> str:
    """Each VF's settings the interrupted change touched (``settings``: {index: as they were}), back."""
    said = {True: "settings back", False: "settings were as before", None: "gone (or its PF's netdev)"}
    notes = []
    for index, before in sorted(settings.items()):
        notes.append(f"; VF {index} {said[await vf_settings.put_back(ops, pf, index, before)]}")
    return "".join(notes)


async def recover(view: HostView, ops: Operations) -> list[str]:
    """Roll back every journaled change; returns one line per entry."""
    entries = ops.journal.pending()
    if not entries:
        return []
    done = []
    async with ops.lock:
        view.refresh()
        with ops.unjournaled():  # restoring is not itself journaled: the entry stays until done
            for entry in entries:
                if _finished(view, entry):
                    log.info("the interrupted %s had completed", entry.describe())
                    await ops.journal.finish(entry)
                    done.append(f"finished {entry.describe()}")
                    continue
                log.warning("rolling back the interrupted %s", entry.describe())
                for address, before in entry.devices.items():
                    if ops.host.function(address) is None:
                        log.warning("%s is gone: nothing to roll back", address)
                        continue
                    try:
                        if entry.kind == "vf-settings":
                            note = (await _restore_vf_settings(ops, address, before.vf_settings))[2:]
                        elif entry.kind == "vf-count":
                            note = await ops.restore_vfs(address, before.function, before.vf_drivers)
                            note += await _restore_vf_overrides(ops, address, before)
                        else:
                            note = await ops.restore_binding(address, before.function)
                            if before.vf_settings:  # a prepare that wrote the VM's VF settings
                                note += await _restore_vf_settings(ops, ops.host.present(address).physfn,
                                                                   before.vf_settings)
                    except NicpassError as exc:
                        note = f"rolling back failed: {exc}"
                    log.info("%s: %s", address, note, extra={"device": address, "action": "recover"})
                await ops.journal.finish(entry)
                done.append(f"rolled back {entry.describe()}")
        view.refresh()
    return done
