"""The engine: inventory, guarded and verified operations, leases. No D-Bus in here.

Every mutation takes the one mutation lock, passes the guard, and talks to the kernel through the
host model following the kernel rules: skip if equal, 0 then N, verify by reading back, restore
the previous state when anything fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nicpassd.engine.config import Config
from nicpassd.engine.guard import ProtectedSet, compute_protected
from nicpassd.engine.leases import Lease, LeaseTable
from nicpassd.engine.journal import Journal, journaled, journaled_step
from nicpassd.engine.reconcile import Reconciler
from nicpassd.engine.store import DeviceDesire, RuntimeHolds, StateStore, identity_of
from nicpassd.engine.views import DeviceView, build_views, label, resolve_device
from nicpassd.errors import Busy, InvalidArgument, KernelError, NicpassError, NotFound, NotSupported, Protected, Timeout
from nicpassd.host.events import UEvent
from nicpassd.host.host import Host
from nicpassd.host.inventory import Inventory
from nicpassd.host.writer import describe_oserror
from nicpassd.host.model import HostSnapshot, PciFunction

log = logging.getLogger(__name__)

VFIO = "vfio-pci"
PASSTHROUGH_DRIVERS = ("vfio-pci", "pci-stub")


@dataclass
class InventoryDelta:
    added: list[DeviceView] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[DeviceView, dict[str, object]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclass(frozen=True)
class Finding:
    id: str
    level: str  # ok, warn, fail
    message: str
    remedy: str = ""


class Engine:
    def __init__(self, host: Host, config: Config, store: StateStore, leases: LeaseTable) -> None:
        self.host = host
        self.config = config
        self.store = store
        self.leases = leases
        self.snapshot = HostSnapshot()
        self.protected = ProtectedSet()
        self.views: dict[str, DeviceView] = {}
        self.inventory_listeners: list[Callable[[InventoryDelta], None]] = []
        self.lease_listeners: list[Callable[[Lease, str], None]] = []
        self._lock = asyncio.Lock()
        self._refresh_pending = False
        # Persistence, boot/hotplug reconcile, undo journal (reconcile.py, journal.py, store.py).
        self.inventory = Inventory(host.paths, host.snapshot)  # incremental re-reads on uevents
        self.journal = Journal(host.paths.runtime_dir)
        self.journal_depth = 0
        self.holds = RuntimeHolds(host.paths.runtime_dir)  # devices changed with --runtime
        self.reconciler = Reconciler(self)  # .auto = True in the daemon
        self._pci_root = os.fspath(host.paths.pci_devices)
        from nicpassd.engine.leasing import LeaseKeeper  # imports this module

        self.leasing = LeaseKeeper(self)

    # ------------------------------------------------------------ inventory
    def refresh(self) -> InventoryDelta:
        """Re-read the kernel's view, recompute the guard and the views, announce differences."""
        self._refresh_pending = False
        self.snapshot = self.inventory.full()
        return self._publish()

    def refresh_changed(self) -> InventoryDelta:
        """``refresh``, re-reading only what uevents (or ``inventory.mark``) said changed."""
        self._refresh_pending = False
        self.snapshot = self.inventory.update()
        return self._publish()

    def _publish(self) -> InventoryDelta:
        """Recompute the guard and the views of ``self.snapshot``; announce the differences."""
        self.protected = compute_protected(self.snapshot, self.config.guard)
        views = build_views(self.snapshot, self.protected, self.store, self.leases.holder(),
                            notes=self.reconciler.notes)
        delta = InventoryDelta()
        for address, view in views.items():
            old = self.views.get(address)
            if old is None:
                delta.added.append(view)
            elif old != view:
                delta.changed.append((view, old.changed_fields(view)))
        delta.removed = [address for address in self.views if address not in views]
        self.views = views
        if delta:
            for listener in list(self.inventory_listeners):
                listener(delta)
        return delta

    def on_uevent(self, event: UEvent) -> None:
        """Coalesce a burst of events into one refresh on the next loop iteration (re-reading only
        what the events name), then one reconcile run if any event was relevant to it."""
        self.inventory.note(event)
        self.reconciler.note(event)
        if self._refresh_pending:
            return
        self._refresh_pending = True
        asyncio.get_running_loop().call_soon(self._after_events)

    def _after_events(self) -> None:
        if self.reconciler.auto and self._lock.locked():
            # A change is being applied: its own events would cost a refresh per trickle of them.
            # The reconcile run queued behind it takes them all in at once, under the lock.
            self.reconciler.poke()
            return
        if self._refresh_pending:
            self.refresh_changed()
        self.reconciler.events_settled()

    async def reconcile(self) -> list[tuple[str, str, str]]:
        """Bring every device to its persisted desired state now: (address, action, result)."""
        outcomes = await self.reconciler.run(explicit=True)
        return [(o.address, o.action, o.result) for o in outcomes]

    def _commit(self, address: str, persist: bool, **changes: object) -> None:
        """After an API change: persist it, or hold the device as changed at runtime."""
        if persist:
            self._persist(address, **changes)
            self.holds.release(address)
            self.reconciler.forget_failures(address)
        else:
            self.holds.hold(address, "runtime")

    def resolve(self, device: str) -> str:
        return resolve_device(self.snapshot, device)

    def _present(self, address: str) -> PciFunction:
        """The function in the fresh snapshot; it may have gone since the request was resolved."""
        function = self.snapshot.functions.get(address)
        if function is None:
            raise NotFound(f"{address} is no longer present", "list the devices with `nicpassctl list`")
        return function

    def _function(self, address: str) -> PciFunction:
        function = self.host.function(address)
        if function is None:
            raise KernelError(f"{address} disappeared from the kernel while being changed")
        return function

    def _label(self, address: str) -> str:
        function = self.snapshot.functions.get(address)
        return label(function) if function else address

    def _refuse_if_leased(self, addresses: list[str], action: str, *, allow_vm: str = "") -> None:
        holder = self.leases.holder()
        for address in addresses:
            vm = holder.get(address, "")
            if vm and vm != allow_vm:
                raise Busy(f"cannot {action} {self._label(address)}: it is leased to VM {vm}",
                           "stop that VM first (its lease ends when it stops)")

    # -------------------------------------------------------------- VF count
    async def set_vf_count(self, device: str, count: int, *, persist: bool = True, driver: str = "",
                           force: bool = False, caller: str = "") -> None:
        address = self.resolve(device)
        function = self.snapshot.functions[address]
        if not function.sriov_capable:
            raise NotSupported(f"{self._label(address)} is not an SR-IOV physical function",
                               "create VFs on a PF (a device with TotalVfs > 0)")
        if count < 0 or count > function.total_vfs:
            raise InvalidArgument(f"{self._label(address)} supports at most {function.total_vfs} VFs; {count} requested",
                                  f"ask for 0 to {function.total_vfs}")
        if driver not in ("", VFIO):
            raise InvalidArgument(f"VF driver {driver!r} is not supported; use \"vfio-pci\" or leave it empty")
        async with self._lock:
            self.refresh()
            self.guard_check(address, f"change the VF count of {self._label(address)}", force=force, caller=caller)
            self._refuse_if_leased([address, *self._present(address).virtfns], "change the VFs of")
            await self._apply_vf_count(address, count, driver)
            log.info("%s now has %d VFs%s%s", self._label(address), count, f" on {driver}" if driver else "",
                     "" if persist else " (runtime only)", extra={"device": address, "action": "vfs"})
            self._commit(address, persist, num_vfs=count, vf_driver=driver if count else "")
            self.refresh()
        self.reconciler.poke()

    @journaled_step("vf-count")
    async def _apply_vf_count(self, address: str, count: int, driver: str,
                              vf_drivers: dict[int, str] | None = None) -> dict[str, str]:
        """Set the VF count (kernel rules §1, §2, §5). ``vf_drivers`` {VF index: passthrough
        driver}: single VFs of this PF persisted on vfio-pci/pci-stub while the rest stay on the
        host driver. Their PF's autoprobe is off while the VFs are created (so no host driver
        races nicpassd for them), their driver_override is written, the previous autoprobe is
        put back (verified) and every other new VF gets a drivers_probe for its host driver.
        Returns {VF address: driver} of those VFs; the caller binds them (verified)."""
        before = self._function(address)
        previous_drivers = [self._function(vf).driver for vf in before.virtfns]
        want_autoprobe = driver != VFIO
        claims: dict[str, str] = {}
        wants_claims = bool(vf_drivers) and driver != VFIO and count and before.num_vfs != count
        try:
            if before.num_vfs != count:
                if driver == VFIO:
                    await self._load_module_once("vfio-pci")
                if wants_claims:
                    want_autoprobe = False
                    for module in sorted(set(vf_drivers.values())):
                        await self._load_module_once(module)
                if count and before.autoprobe != want_autoprobe:
                    await self.host.set_autoprobe(address, want_autoprobe)
                if before.num_vfs:
                    await self.host.set_num_vfs(address, 0)
                if count:
                    await self.host.set_num_vfs(address, count)
                    await self._verify_vf_count(address, count)
            if wants_claims:
                claims = await self._claim_new_vfs(address, before.autoprobe, vf_drivers)
            if driver == VFIO:
                await self._bind_many_verified(list(self._function(address).virtfns), VFIO)
            elif count and before.num_vfs != count:
                # New VFs for the host driver: the early-binding udev rule may have put a persisted
                # vfio-pci override on them as they appeared (a --runtime change of a persisted PF).
                claimed = [vf for vf in self._function(address).virtfns if vf not in claims
                           and self._binding_of(vf).driver_override in PASSTHROUGH_DRIVERS]
                if claimed:
                    await self._bind_many_verified(claimed, "")
        except NicpassError as exc:
            note = await self._restore_vfs(address, before, previous_drivers)
            if note:
                exc.message += f"; {note}"
            raise
        return claims

    async def _claim_new_vfs(self, address: str, autoprobe: bool, vf_drivers: dict[int, str]) -> dict[str, str]:
        """VFs just created with autoprobe off: driver_override on the ones persisted for a
        passthrough driver, autoprobe back to ``autoprobe`` (read back), then drivers_probe for
        the others so that they get their host driver (a VF with no override cannot probe while
        autoprobe is off, kernel rules §5). Returns {VF: driver} of the claimed ones."""
        virtfns = self._function(address).virtfns
        claims = {virtfns[index]: wanted for index, wanted in sorted(vf_drivers.items()) if 0 <= index < len(virtfns)}
        overrides = [(vf, Path(f"{self._pci_root}/{vf}/driver_override"), wanted + "\n") for vf, wanted in claims.items()]
        failed = await self._write_batch(overrides) if overrides else {}
        for vf, (path, data, error) in failed.items():
            log.warning("%s: writing %s to driver_override failed: %s", vf, data.strip(), describe_oserror(error))
        if self._function(address).autoprobe != autoprobe:
            await self.host.set_autoprobe(address, autoprobe)
            if self._function(address).autoprobe != autoprobe:
                raise KernelError(f"sriov_drivers_autoprobe of {self._label(address)} did not go back to "
                                  f"{int(autoprobe)}", "check the kernel log (journalctl -k)")
        others = [vf for vf in virtfns if vf not in claims and not self._driver_of(vf)]
        if others and autoprobe:
            # Best effort, like the kernel's own autoprobe: the VF driver may still be loading
            # (udev loads it on the VFs' "add"), and then it attaches them itself.
            await self._write_batch([(vf, self.host.paths.drivers_probe, vf) for vf in others])
        return claims

    async def _verify_vf_count(self, address: str, count: int) -> None:
        """A successful write does not mean N VFs (kernel rules §2): read back, wait for links."""
        def settled() -> PciFunction | None:
            function = self.host.function(address)
            return function if function and len(function.virtfns) >= function.num_vfs else None

        function = await self._poll(settled, self.config.daemon.write_timeout)
        enabled = function.num_vfs if function else 0
        if enabled != count:
            raise KernelError(f"the kernel enabled only {enabled} of {count} VFs on {self._label(address)}",
                              "check the kernel log (journalctl -k) for the driver's reason")

    async def _restore_vfs(self, address: str, before: PciFunction, drivers: list[str]) -> str:
        """Best effort back to ``before``; returns what could not be restored ("" = all)."""
        try:
            now = self._function(address)
            if now.num_vfs != before.num_vfs:
                if now.num_vfs:
                    await self.host.set_num_vfs(address, 0)
                if now.autoprobe != before.autoprobe:
                    await self.host.set_autoprobe(address, before.autoprobe)
                if before.num_vfs:
                    await self.host.set_num_vfs(address, before.num_vfs)
            elif now.autoprobe != before.autoprobe:
                await self.host.set_autoprobe(address, before.autoprobe)
            for vf, driver in zip(self._function(address).virtfns, drivers):
                current = self._function(vf).driver
                if current != driver:
                    await self._bind_verified(vf, driver, restore_on_failure=False)
        except NicpassError as exc:
            log.error("restoring %s failed: %s", address, exc)
            return f"restoring the previous state also failed: {exc.message}"
        log.info("restored %s to %d VFs after a failed change", address, before.num_vfs)
        return f"{self._label(address)} was restored to {before.num_vfs} VFs"

    # ---------------------------------------------------------------- binding
    async def bind(self, device: str, driver: str, *, persist: bool = True, force: bool = False,
                   group: bool = False, caller: str = "") -> None:
        """Bind (``driver`` "" = back to the host driver). ``group`` does the same to every
        non-bridge IOMMU group mate, none of which may be protected (``force`` does not extend to
        mates); ``force`` overrides a guard entry that is not on the management path."""
        address = self.resolve(device)
        if driver not in ("", VFIO, "pci-stub") and driver not in self.snapshot.loaded_drivers:
            raise InvalidArgument(f"driver {driver!r} is not a loaded PCI driver",
                                  "use \"vfio-pci\", or \"\" for the device's host driver")
        async with self._lock:
            self.refresh()
            self._present(address)  # NotFound if it went away since it was resolved
            target = driver or "its host driver"
            action = f"bind {self._label(address)} to {target}"
            self.guard_check(address, action, force=force, caller=caller)
            targets = [address, *(self.group_mates(address, action) if group else ())]
            self._refuse_if_leased(targets, "rebind")
            if driver not in PASSTHROUGH_DRIVERS:
                self._refuse_if_mate_leased(address, target)
            for each in targets:
                present = self._present(each)
                if present.num_vfs and driver in PASSTHROUGH_DRIVERS:
                    raise InvalidArgument(f"{self._label(each)} has {present.num_vfs} VFs; unbinding its PF driver would orphan them",
                                          f"remove them first with `nicpassctl vfs {each} 0`")
            done: list[tuple[str, PciFunction]] = []
            try:
                for each in targets:
                    before = self._function(each)
                    await self._bind_verified(each, driver)
                    done.append((each, before))
            except NicpassError as exc:
                for each, before in reversed(done):
                    exc.message += f"; {each}: {await self._restore_binding(each, before)}"
                raise
            for mate in targets[1:]:
                log.info("%s bound to %s with the IOMMU group of %s", self._label(mate), target, address)
                if persist:
                    self._persist(mate, driver=driver if driver in PASSTHROUGH_DRIVERS else "")
            log.info("%s bound to %s%s", self._label(address), driver or "its host driver",
                     "" if persist else " (runtime only)", extra={"device": address, "action": "bind"})
            if persist:
                if driver in PASSTHROUGH_DRIVERS:
                    self._persist(address, driver=driver)
                else:
                    self._persist(address, driver="")
            for each in targets:  # a persisted change ends a runtime one; a runtime one holds the device
                if persist:
                    self.holds.release(each)
                    self.reconciler.forget_failures(each)
                else:
                    self.holds.hold(each, "runtime")
            self.refresh()
        self.reconciler.poke()

    async def unbind(self, device: str, *, persist: bool = True) -> None:
        """Give the device back to its host driver; forget the persisted binding too."""
        await self.bind(device, "", persist=persist)

    async def forget(self, device: str, *, restore: bool = False) -> None:
        address = self.resolve(device)
        if restore:
            await self.bind(address, "", persist=False)
        async with self._lock:
            self.store.remove(address)
            self.holds.release(address)
            self.reconciler.forget_failures(address)
            self.refresh()

    @journaled_step("bind")
    async def _bind_verified(self, address: str, driver: str, *, restore_on_failure: bool = True) -> None:
        """driver_override, unbind, drivers_probe, then verify (kernel rules §8).

        ``driver`` "" means the host driver: clear the override and let the kernel pick.
        """
        before = self._function(address)
        if before.driver and self._satisfies(before.driver, driver) and before.driver_override == (
                driver if driver in PASSTHROUGH_DRIVERS else ""):
            return
        if driver == VFIO:
            await self.host.load_module("vfio-pci")
        override = driver if driver in PASSTHROUGH_DRIVERS else ""
        try:
            await self.host.set_driver_override(address, override)
            if before.driver and not self._satisfies(before.driver, driver):
                await self.host.unbind(address, before.driver)
            after = self._function(address)
            if not after.driver:
                await self.host.probe(address)
            try:
                await self._verify_driver(address, driver)
            except KernelError:
                if not await self._another_driver_appeared(address, before.driver, driver):
                    raise
                await self._rebind_once(address, driver, override)
        except NicpassError as exc:
            if restore_on_failure:
                exc.message += f"; {await self._restore_binding(address, before)}"
            raise

    async def _another_driver_appeared(self, address: str, before: str, driver: str) -> bool:
        """After a failed verify: is the function on a driver it was not on before and that was
        not asked for (the kernel's own probe finished meanwhile, e.g. of a VF just created)?
        Waits for the driver link to settle first."""
        seen = self._driver_of(address)
        for _ in range(10):
            await asyncio.sleep(0.05)
            now = self._driver_of(address)
            if now == seen:
                break
            seen = now
        return bool(seen) and seen != before and not self._satisfies(seen, driver)

    async def _rebind_once(self, address: str, driver: str, override: str) -> None:
        """The bind sequence once more, from the driver that appeared (the override stays)."""
        current = self._driver_of(address)
        log.info("%s was bound to %s by the kernel meanwhile; binding it to %s again", address, current,
                 driver or "its host driver", extra={"device": address, "action": "bind"})
        await self.host.set_driver_override(address, override)
        if current and not self._satisfies(current, driver):
            await self.host.unbind(address, current)
        if not self._driver_of(address):
            await self.host.probe(address)
        await self._verify_driver(address, driver)

    async def _bind_many_verified(self, addresses: list[str], driver: str) -> None:
        """``_bind_verified`` for many functions (a PF's VFs): raises the first failure, after
        restoring every function that failed."""
        errors = await self._bind_batch(addresses, driver)
        if errors:
            address, error = next(iter(errors.items()))
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            error.message += more
            raise error

    async def _bind_batch(self, addresses: list[str], driver: str) -> dict[str, NicpassError]:
        """The bind sequence of kernel rules §8 for many functions at once: all driver_overrides,
        then the unbinds, then the drivers_probes — each phase one worker thread with the write
        timeout — then one verification pass. Returns the failures ({} = all bound), each
        restored to its previous driver. One journal entry covers the batch."""
        if len(addresses) == 1:
            try:
                await self._bind_verified(addresses[0], driver)
                return {}
            except NicpassError as exc:
                return {addresses[0]: exc}
        befores = {address: self._binding_of(address) for address in addresses}
        async with journaled(self, "bind", addresses, target={"driver": driver}, before=befores):
            return await self._bind_batch_journaled(befores, driver)

    async def _bind_batch_journaled(self, befores: dict[str, PciFunction], driver: str) -> dict[str, NicpassError]:
        override = driver if driver in PASSTHROUGH_DRIVERS else ""
        todo = [address for address, before in befores.items()
                if not (before.driver and self._satisfies(before.driver, driver) and before.driver_override == override)]
        errors: dict[str, NicpassError] = {}
        if not todo:
            return errors
        if driver == VFIO:
            await self._load_module_once("vfio-pci")
        root, drivers, probe = self._pci_root, os.fspath(self.host.paths.pci_drivers), self.host.paths.drivers_probe
        writes = [(a, Path(f"{root}/{a}/driver_override"), override + "\n") for a in todo]
        writes += [(a, Path(f"{drivers}/{befores[a].driver}/unbind"), a) for a in todo
                   if befores[a].driver and not self._satisfies(befores[a].driver, driver)]
        writes += [(a, probe, a) for a in todo]
        try:
            failed = await self._write_batch(writes)
        except NicpassError as exc:  # Timeout: every function of the batch is in doubt
            failed = {}
            for address in todo:
                errors[address] = type(exc)(exc.message, exc.remedy)
        for address, (path, data, error) in failed.items():
            errors[address] = KernelError(f"the kernel refused writing {data.strip() or 'an empty line'!r} "
                                          f"to {path.name} of {address}: {describe_oserror(error)}")
        pending = [a for a in todo if a not in errors]

        def all_bound() -> bool:
            pending[:] = [a for a in pending if not self._satisfies(self._driver_of(a), driver)]
            return not pending

        deadline = time.monotonic() + self.config.daemon.bind_verify_timeout
        interval = 0.002
        while not all_bound() and time.monotonic() < deadline:
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.1)
        for address in list(pending):
            if await self._another_driver_appeared(address, befores[address].driver, driver):
                try:
                    await self._rebind_once(address, driver, override)
                except NicpassError as exc:
                    errors[address] = exc
                pending.remove(address)
        wanted = driver or "its host driver"
        for address in pending:
            found = self._driver_of(address) or "no driver"
            errors[address] = KernelError(f"{address} did not bind to {wanted}: the kernel shows {found} after "
                                          "drivers_probe", "check the kernel log (journalctl -k) for the probe failure")
        for address, error in errors.items():
            error.message += f"; {await self._restore_binding(address, befores[address])}"
        return errors

    async def _load_module_once(self, name: str) -> None:
        """modprobe only when the driver is not registered yet (each modprobe is a process)."""
        if not (self.host.paths.pci_drivers / name).is_dir():
            await self.host.load_module(name)

    async def _write_batch(self, writes: list[tuple[str, object, str]]) -> dict[str, tuple[object, str, OSError]]:
        """Many sysfs writes ``(address, path, data)`` in order, in one worker thread (one thread
        start instead of one per write). A function whose write fails gets no further write.
        Each write still has the write timeout: ``Timeout`` when the thread makes no progress for
        that long (a hung write is left pending, as ``run_blocking`` does). Returns the failures."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        done_count = [0]
        writer = self.host.writer

        def settle(result, error) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)

        # A simulated kernel runs Python in this thread: it hands the batch's uevents over when the
        # batch returns rather than waking the loop (and taking the GIL) after every write.
        operation = getattr(writer, "operation", contextlib.nullcontext)

        def work() -> None:
            failed: dict[str, tuple[object, str, OSError]] = {}
            try:
                with operation():
                    for address, path, data in writes:
                        if address not in failed:
                            try:
                                writer.write(path, data)
                            except OSError as exc:
                                failed[address] = (path, data, exc)
                        done_count[0] += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            else:
                result, error = failed, None
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                log.warning("a batch of kernel writes finished after the daemon stopped waiting for it")

        threading.Thread(target=work, name=f"kernel-write: {len(writes)} writes", daemon=True).start()
        seen = -1
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.host.write_timeout)
            except TimeoutError:
                if done_count[0] == seen:
                    address, path, data = writes[min(seen, len(writes) - 1)]
                    log.error("writing %r to %s of %s did not complete within %.1f s; left pending",
                              data.strip(), getattr(path, "name", path), address, self.host.write_timeout)
                    raise Timeout(f"writing {data.strip() or 'an empty line'!r} to {getattr(path, 'name', path)} of "
                                  f"{address} did not complete within {self.host.write_timeout:g} s "
                                  "(the driver may be stuck)",
                                  "check the kernel log (journalctl -k) and retry once the device recovers") from None
                seen = done_count[0]

    def _binding_of(self, address: str) -> PciFunction:
        """Only what binding and restoring a binding need (driver, driver_override), read cheaply."""
        try:
            fd = os.open(f"{self._pci_root}/{address}/driver_override", os.O_RDONLY | os.O_CLOEXEC)
            try:
                override = os.read(fd, 4096).decode().strip()
            finally:
                os.close(fd)
        except OSError:
            raise KernelError(f"{address} disappeared from the kernel while being changed") from None
        return PciFunction(address, "", "", "", "", "", driver=self._driver_of(address),
                           driver_override="" if override == "(null)" else override)

    def _driver_of(self, address: str) -> str:
        """Just the driver link: the cheap read of a verification loop."""
        try:
            return os.path.basename(os.readlink(f"{self._pci_root}/{address}/driver"))
        except OSError:
            return ""

    @staticmethod
    def _satisfies(current: str, wanted: str) -> bool:
        if wanted:
            return current == wanted
        return bool(current) and current not in PASSTHROUGH_DRIVERS

    async def _verify_driver(self, address: str, driver: str) -> None:
        def bound() -> PciFunction | None:
            function = self.host.function(address)
            return function if function and self._satisfies(function.driver, driver) else None

        if await self._poll(bound, self.config.daemon.bind_verify_timeout) is None:
            now = self.host.function(address)
            found = now.driver if now and now.driver else "no driver"
            wanted = driver or "its host driver"
            raise KernelError(f"{address} did not bind to {wanted}: the kernel shows {found} after drivers_probe",
                              "check the kernel log (journalctl -k) for the probe failure")

    async def _restore_binding(self, address: str, before: PciFunction) -> str:
        try:
            now = self._function(address)
            await self.host.set_driver_override(address, before.driver_override)
            if not before.driver and now.driver and now.driver not in PASSTHROUGH_DRIVERS:
                # "No driver" is no state to go back to over a host driver the kernel bound by
                # itself (its own probe of a new VF finished meanwhile): leave it there.
                return f"left on {now.driver}, which the kernel bound meanwhile"
            if now.driver and now.driver != before.driver:
                await self.host.unbind(address, now.driver)
            if before.driver and not self._function(address).driver:
                await self.host.probe(address)
            restored = self._function(address).driver
        except NicpassError as exc:
            return f"restoring the previous driver also failed: {exc.message}"
        if restored != before.driver:
            return f"the previous driver {before.driver or 'none'} could not be restored (now {restored or 'none'})"
        return f"restored {before.driver or 'no driver'}"

    # ------------------------------------------------------------------ guard
    def guard_check(self, address: str, action: str, *, force: bool = False, caller: str = "") -> None:
        """The one guard check of every mutation (and of persisted desires applied at boot or
        hotplug, which pass no ``force``). Uses the protected set of the last ``refresh()``:
        callers refresh under the mutation lock first. Raises ``Protected``; a ``force`` that
        overrides an entry is logged at warning level with the caller."""
        overridden = self.protected.check(address, action, force=force)
        if overridden is not None:
            log.warning("guard overridden with force by %s: %s although it is protected (%s)",
                        caller or "an unknown caller", action, "; ".join(overridden.reasons))

    def group_mates(self, address: str, action: str) -> list[str]:
        """The non-bridge IOMMU group mates to take along with ``address`` (option ``group``).
        Refused (``Protected``) if any is protected, with or without force: nicpassd never takes
        a device the host needs along with a group, and never binds mates unasked."""
        mates = []
        for mate in self.snapshot.group_members(address):
            function = self.snapshot.functions.get(mate)
            if mate == address or function is None or function.is_bridge:
                continue
            entry = self.protected.entries.get(mate)
            if entry is not None:
                group = self.snapshot.functions[address].iommu_group
                raise Protected(f"refusing to {action} with its IOMMU group {group}: member {self._label(mate)} is "
                                f"protected ({'; '.join(entry.reasons)})",
                                "move the card to a slot with its own IOMMU group")
            mates.append(mate)
        return mates

    def _refuse_if_mate_leased(self, address: str, target: str) -> None:
        """A host driver on a group mate of a device in a VM would take DMA ownership of its group."""
        holder = self.leases.holder()
        for mate in self.snapshot.group_members(address):
            if mate != address and holder.get(mate):
                group = self.snapshot.functions[address].iommu_group
                raise Busy(f"cannot bind {self._label(address)} to {target}: it shares IOMMU group {group} with "
                           f"{self._label(mate)}, leased to VM {holder[mate]}", "stop that VM first")

    # ------------------------------------------------------------ persistence
    def _persist(self, address: str, **changes: object) -> None:
        function = self.host.function(address) or self.snapshot.functions[address]
        current = self.store.get(address)
        base = current.model_dump() if current else {"address": address}
        base.update(changes)
        base["identity"] = identity_of(function, self.snapshot)
        desire = DeviceDesire.model_validate(base)
        if not desire.driver and not desire.num_vfs and not desire.vf_driver:
            self.store.remove(address)
        else:
            self.store.put(desire)

    # ----------------------------------------------------------------- leases
    # Prepare/Activate/Release and the reclaiming of stale leases live in leasing.py.
    async def prepare(self, vm_name: str, vm_uuid: str, devices: list[str], **options) -> Lease | None:
        return await self.leasing.prepare(vm_name, vm_uuid, devices, **options)

    async def activate(self, vm_uuid: str, *, pid: int = 0) -> Lease:
        return await self.leasing.activate(vm_uuid, pid=pid)

    async def release(self, vm_uuid: str) -> list[Lease]:
        return await self.leasing.release(vm_uuid)

    def _announce_lease(self, lease: Lease, state: str) -> None:
        for listener in list(self.lease_listeners):
            listener(lease, state)

    # ---------------------------------------------------------- check/explain
    def explain(self, device: str) -> dict[str, object]:
        address = self.resolve(device)
        view = self.views[address]
        members = [(mate, self.snapshot.functions[mate].driver if mate in self.snapshot.functions else "")
                   for mate in self.snapshot.group_members(address)]
        blockers = [f"{mate} on {drv}" for mate, drv in members
                    if mate != address and drv and drv not in PASSTHROUGH_DRIVERS
                    and not (mate in self.snapshot.functions and self.snapshot.functions[mate].is_bridge)]
        viable = not blockers and view.iommu_group >= 0
        if view.protected:
            verdict = f"{self._label(address)} is protected: {'; '.join(view.protection_reasons)}"
        elif view.leased_to:
            verdict = f"{self._label(address)} is leased to VM {view.leased_to}"
        elif view.iommu_group < 0:
            verdict = f"{self._label(address)} has no IOMMU group: the IOMMU is off or the device is not behind it"
        elif not viable:
            verdict = f"{self._label(address)} can be bound, but its IOMMU group is not viable: {', '.join(blockers)}"
        else:
            verdict = f"{self._label(address)} may be passed through"
        return {
            "address": address, "allowed": not view.protected and not view.leased_to and viable,
            "verdict": verdict, "protected": view.protected, "reasons": list(view.protection_reasons),
            "iommu_group": view.iommu_group, "group_members": members, "group_viable": viable,
            "leased_to": view.leased_to, "persisted": view.persisted, "desired_driver": view.desired_driver,
            "driver": view.driver, "interfaces": list(view.interfaces), "drift": view.drift,
            "overridable": bool(view.protected and self.protected.entries[address].overridable),
        }

    def check(self) -> list[Finding]:
        snapshot, findings = self.snapshot, []
        if snapshot.iommu_present:
            findings.append(Finding("iommu", "ok", "an IOMMU is active"))
        else:
            findings.append(Finding("iommu", "fail", "no IOMMU is active (/sys/class/iommu is empty)",
                                    "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (Intel)"))
        words = snapshot.cmdline.split()
        risky = {
            "pcie_acs_override": "pcie_acs_override fakes IOMMU isolation (out-of-tree patch)",
            "vfio_iommu_type1.allow_unsafe_interrupts": "allow_unsafe_interrupts lets a VM inject interrupts",
            "vfio.enable_unsafe_noiommu_mode": "vfio no-IOMMU mode gives VMs unrestricted DMA",
            "vfio-pci.ids": "vfio-pci.ids= captures every device of those IDs, possibly the management NIC",
        }
        for word in words:
            key = word.split("=", 1)[0].replace("-", "_")  # the kernel treats - and _ alike
            key = next((name for name in risky if name.replace("-", "_") == key), "")
            if key:
                findings.append(Finding(f"cmdline-{key}", "warn", f"kernel command line has {word}: {risky[key]}",
                                        f"remove {key} from the kernel command line"))
        default_routes = [route for route in snapshot.routes if route.is_default]
        if not default_routes and not self.config.guard.management_interfaces:
            findings.append(Finding("management", "warn", "no default route and no configured management interface: "
                                    "the guard cannot tell which NIC keeps the host reachable",
                                    "set guard.management_interfaces in /etc/nicpassd/nicpassd.toml"))
        else:
            protected = ", ".join(sorted(self.protected.entries)) or "none"
            findings.append(Finding("management", "ok", f"management path protected: {protected}"))
        for number, note in enumerate(self.protected.notes):
            findings.append(Finding(f"guard-{number}", "warn", note, "fix the [guard] section of /etc/nicpassd/nicpassd.toml"))
        for address, view in sorted(self.views.items()):
            if view.drift:
                level = "fail" if view.drift.startswith("identity") else "warn"
                findings.append(Finding(f"drift-{address}", level, f"{address}: {view.drift}",
                                        f"re-apply with nicpassctl, or drop it with `nicpassctl forget {address}`"))
        for address, desire in sorted(self.store.state.devices.items()):
            if address not in snapshot.functions:
                findings.append(Finding(f"missing-{address}", "warn", f"persisted device {address} is not present",
                                        f"`nicpassctl forget {address}` if the card was removed for good"))
        return findings

    # ------------------------------------------------------------------ misc
    @staticmethod
    async def _poll(probe: Callable[[], PciFunction | None], timeout: float,
                    interval: float = 0.005) -> PciFunction | None:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result is not None or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.1)

