"""Setting a PF's VF count the way the kernel wants it (docs/kernel-rules.md §1, §2, §5), and undoing it.

Called through ``Operations.set_vf_count`` (journaled, under the mutation lock): skip if equal,
0 then N, autoprobe off while VFs persisted on a passthrough driver or with persisted settings are
created (so that no host driver races nicpassd for them, and a VF's driver finds its MAC already
set when it probes), read back, wait for the ``virtfnN`` links, and on any failure back to the
previous count with every VF on its previous driver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol

from nicpassd.engine.config import Config
from nicpassd.errors import KernelError, NicpassError
from nicpassd.host.host import Host
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS, VFIO
from nicpassd.host.model import PciFunction, VfSettings
from nicpassd.host.vf_netlink import VfChange
from nicpassd.stopwatch import lap

log = logging.getLogger(__name__)


class Operations(Protocol):
    """What of ``operations.Operations`` a VF count change uses (it calls this module)."""

    host: Host
    config: Config
    label: Callable[[str], str]

    async def bind(self, address: str, driver: str, *, restore_on_failure: bool = True) -> None: ...

    async def bind_all(self, addresses: list[str], driver: str) -> None: ...

    async def set_vf_settings(self, pf: str, index: int, change: VfChange, current: VfSettings) -> VfSettings: ...


async def apply_vf_count(ops: Operations, address: str, count: int, driver: str,
                         vf_drivers: dict[int, str] | None = None,
                         vf_settings: dict[int, VfChange] | None = None, *,
                         before: PciFunction | None = None) -> dict[str, str]:
    """Set the VF count. ``driver`` vfio-pci: every VF on it. ``vf_drivers`` {VF index:
    passthrough driver}: single VFs of this PF persisted on vfio-pci/pci-stub while the rest stay
    on the host driver; they are created with the PF's autoprobe off, their driver_override is
    written, the previous autoprobe is put back (verified) and every other new VF gets a
    drivers_probe for its host driver. Returns {VF address: driver} of those VFs; the caller
    binds them (verified). ``vf_settings`` {VF index: settings}: written through the PF while
    the new VFs have no driver yet (docs/kernel-rules.md §16: a VF's driver reads its MAC when
    it probes), then the VFs probe. ``before``: the PF as the caller has just read it."""
    host = ops.host
    before = before or host.present(address)
    previous_drivers = [host.driver_of(vf) for vf in before.virtfns]
    vf_drivers = vf_drivers or {}
    want_autoprobe = driver != VFIO
    claims: dict[str, str] = {}
    creating = bool(count) and before.num_vfs != count
    created: PciFunction | None = None  # the PF read back with its new VFs
    wants_claims = bool(vf_drivers or vf_settings) and driver != VFIO and creating
    if before.num_vfs and before.num_vfs != count:
        # Every count change removes the VFs there are first, and removing a VF unbinds it: one on
        # vfio-pci that a VM holds refuses the change before anything is written, and the removal
        # holds the groups of the others (nicpassd.host.vfio_latch).
        removing = [vf for vf, vf_driver in zip(before.virtfns, previous_drivers) if vf_driver == VFIO]
        with host.vfio_latched(removing) as busy:
            if busy:
                raise next(iter(busy.values()))
            try:
                await host.set_num_vfs(address, 0)
            except NicpassError as exc:
                raise exc.with_note(await restore_vfs(ops, address, before, previous_drivers)) from exc
        lap("sriov_numvfs 0")
    try:
        if before.num_vfs != count:
            if driver == VFIO:
                await host.load_driver(VFIO)
            if wants_claims:
                want_autoprobe = False
                for module in sorted(set(vf_drivers.values())):
                    await host.load_driver(module)
            if count and before.autoprobe != want_autoprobe:
                await host.set_autoprobe(address, want_autoprobe)
            lap("modprobe, autoprobe")
            if count:
                await host.set_num_vfs(address, count)
                lap("sriov_numvfs N")
                created = await _verify_vf_count(ops, address, count)
                lap("virtfn links")
        if vf_settings and creating:
            await _settle_new_vfs(ops, address, vf_settings)
            lap("VF settings")
        if wants_claims:
            claims = await _claim_new_vfs(ops, address, before.autoprobe, vf_drivers)
            lap("claims")
        if driver == VFIO:
            await ops.bind_all(list((created or host.present(address)).virtfns), VFIO)
        elif count and before.num_vfs != count:
            # New VFs for the host driver: the early-binding udev rule may have put a persisted
            # vfio-pci override on them as they appeared (a --runtime change of a persisted PF).
            claimed = [vf for vf in host.present(address).virtfns if vf not in claims
                       and host.binding(vf).driver_override in PASSTHROUGH_DRIVERS]
            if claimed:
                await ops.bind_all(claimed, "")
    except NicpassError as exc:
        raise exc.with_note(await restore_vfs(ops, address, before, previous_drivers)) from exc
    return claims


async def _settle_new_vfs(ops: Operations, address: str, vf_settings: dict[int, VfChange]) -> None:
    """The persisted settings of VFs just created, before any driver has them. A refusal does not
    undo the VF count: it is logged, and the reconciler's next pass reports it as a step not
    applied (with the driver's words) and tries again when the PF changes."""
    host = ops.host
    function = host.present(address)
    if not function.interfaces:
        log.warning("the VFs of %s have persisted settings, but it has no netdev to set them through (driver: %s)",
                    ops.label(address), function.driver or "none", extra={"device": address, "action": "vf"})
        return
    current = {vf.index: vf for vf in host.read_vf_settings(function.interfaces[0])}
    for index, change in sorted(vf_settings.items()):
        if index not in current:
            continue
        try:
            await ops.set_vf_settings(address, index, change, current[index])
        except NicpassError as exc:
            log.info("VF %d of %s: its persisted settings were not applied (the reconciler reports it): %s",
                     index, ops.label(address), exc, extra={"device": address, "action": "vf"})


async def _claim_new_vfs(ops: Operations, address: str, autoprobe: bool, vf_drivers: dict[int, str]) -> dict[str, str]:
    """VFs just created with autoprobe off: driver_override on the ones persisted for a
    passthrough driver, autoprobe back to ``autoprobe`` (read back), then drivers_probe for the
    others so that they get their host driver (a VF with no override cannot probe while
    autoprobe is off, docs/kernel-rules.md §5). Returns {VF: driver} of the claimed ones."""
    host = ops.host
    virtfns = host.present(address).virtfns
    claims = {virtfns[index]: wanted for index, wanted in sorted(vf_drivers.items()) if 0 <= index < len(virtfns)}
    failed = await host.write_batch([host.override_write(vf, wanted) for vf, wanted in claims.items()]) if claims else {}
    for vf, failure in failed.items():
        log.warning("%s: %s", vf, failure.describe())
    if host.present(address).autoprobe != autoprobe:
        await host.set_autoprobe(address, autoprobe)
        if host.present(address).autoprobe != autoprobe:
            raise KernelError(f"sriov_drivers_autoprobe of {ops.label(address)} did not go back to "
                              f"{int(autoprobe)}", "check the kernel log (journalctl -k)")
    others = [vf for vf in virtfns if vf not in claims and not host.driver_of(vf)]
    if others and autoprobe:
        # Best effort, like the kernel's own autoprobe: the VF driver may still be loading (udev
        # loads it on the VFs' "add"), and then it attaches them itself.
        await host.write_batch([host.probe_write(vf) for vf in others])
    return claims


async def _verify_vf_count(ops: Operations, address: str, count: int) -> PciFunction:
    """A successful write does not mean N VFs (docs/kernel-rules.md §2): read back, wait for the
    links. Returns the PF as read with them."""
    deadline = time.monotonic() + ops.config.daemon.write_timeout
    interval = 0.005
    while True:
        function = ops.host.function(address)
        if function is not None and len(function.virtfns) >= function.num_vfs:
            break
        if time.monotonic() >= deadline:
            function = None  # never settled: as good as none enabled
            break
        await asyncio.sleep(interval)
        interval = min(interval * 2, 0.1)
    enabled = function.num_vfs if function else 0
    if enabled != count:
        raise KernelError(f"the kernel enabled only {enabled} of {count} VFs on {ops.label(address)}",
                          "check the kernel log (journalctl -k) for the driver's reason")
    return function


async def restore_vfs(ops: Operations, address: str, before: PciFunction, drivers: list[str]) -> str:
    """Best effort back to ``before``; says what it did (or what could not be restored)."""
    host = ops.host
    try:
        now = host.present(address)
        if now.num_vfs != before.num_vfs:
            if now.num_vfs:
                await host.set_num_vfs(address, 0)
            if now.autoprobe != before.autoprobe:
                await host.set_autoprobe(address, before.autoprobe)
            if before.num_vfs:
                await host.set_num_vfs(address, before.num_vfs)
        elif now.autoprobe != before.autoprobe:
            await host.set_autoprobe(address, before.autoprobe)
        for vf, driver in zip(host.present(address).virtfns, drivers):
            if host.driver_of(vf) != driver:
                await ops.bind(vf, driver, restore_on_failure=False)
    except NicpassError as exc:
        log.error("restoring %s failed: %s", address, exc)
        return f"restoring the previous state also failed: {exc.message}"
    log.info("restored %s to %d VFs after a failed change", address, before.num_vfs)
    return f"{ops.label(address)} was restored to {before.num_vfs} VFs"
