"""Operations: the verified kernel changes every part of the engine makes, under one lock.

The API (``Engine``), the reconciler, the lease keeper and recovery change devices only through
this public interface:

- ``lock``: the one mutation lock; every change (and every plan made to change) holds it;
- ``bind`` / ``bind_all`` / ``bind_each``: the bind sequence of docs/kernel-rules.md §8 (driver_override,
  unbind, drivers_probe) verified on the ``driver`` link, restored on failure;
- ``set_vf_count`` (in ``vf_count.py``): 0 then N, autoprobe, VF claims, verified, restored;
- ``restore_binding``: put a function back on what it was on;
- ``journaled``: the undo-journal entry that makes a multi-step change crash-safe.

Nothing here decides *whether* a change is allowed (the guard, leases, validation are the
callers'); everything here makes sure the kernel did what was asked, or is back as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Callable, Iterable

from nicpassd.engine import vf_count, vf_settings
from nicpassd.engine.config import Config
from nicpassd.engine.journal import DeviceBefore, Entry, Journal
from nicpassd.errors import KernelError, NicpassError, NotPersisted
from nicpassd.host.host import Host
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS, VFIO
from nicpassd.host.model import PciFunction, VfSettings
from nicpassd.host.vf_netlink import VfChange
from nicpassd.stopwatch import lap

log = logging.getLogger(__name__)


def satisfies(current: str, wanted: str) -> bool:
    """Is a function on ``current`` where a bind to ``wanted`` ("" = its host driver) leaves it?"""
    if wanted:
        return current == wanted
    return bool(current) and current not in PASSTHROUGH_DRIVERS


class Operations:
    def __init__(self, host: Host, config: Config, journal: Journal, label: Callable[[str], str]) -> None:
        self.host = host
        self.config = config
        self.journal = journal
        self.label = label  # address -> "0000:3b:00.0 (eno1)" for messages
        self.lock = asyncio.Lock()
        self._journal_depth = 0

    # ------------------------------------------------------------------ journal
    @contextlib.asynccontextmanager
    async def journaled(self, kind: str, addresses: Iterable[str], *, target: dict[str, Any] | None = None,
                        vm_uuid: str = "", before: dict[str, PciFunction] | None = None,
                        devices: dict[str, DeviceBefore] | None = None) -> AsyncIterator[Entry | None]:
        """Journal a change of ``addresses`` around the block. Nested changes (the VF binds of a VF
        count change, the restores after a failure) are covered by the outermost entry. ``before``:
        functions without VFs the caller has just read (saves reading them again); ``devices``:
        the state to restore, given whole by the caller."""
        if self._journal_depth:
            yield None
            return
        if devices is None and before is not None and not any(function.virtfns for function in before.values()):
            devices = {address: DeviceBefore(function) for address, function in before.items()}
        elif devices is None:
            devices = self.before_of(addresses)
        try:
            entry = await self.journal.record(kind, devices, target=target, vm_uuid=vm_uuid)
        except OSError as exc:  # before the first kernel write: nothing to undo
            raise NotPersisted.of(exc, "nothing was changed") from None
        lap("journal")
        self._journal_depth = 1
        try:
            yield entry
        finally:
            self._journal_depth = 0
            await self.journal.finish(entry)  # not reached on SIGKILL: that is the point
            lap("journal")

    @contextlib.contextmanager
    def unjournaled(self):
        """Changes that are not journaled themselves (recovery: its entry stays until it is done)."""
        self._journal_depth = 1
        try:
            yield
        finally:
            self._journal_depth = 0

    def before_of(self, addresses: Iterable[str]) -> dict[str, DeviceBefore]:
        """The pre-change state of ``addresses`` as the kernel shows it (a PF's VF drivers by index)."""
        result = {}
        for address in addresses:
            function = self.host.function(address)
            if function is None:
                continue
            drivers, overrides = [], []
            for vf in function.virtfns:
                vf_function = self.host.function(vf)
                drivers.append(vf_function.driver if vf_function is not None else "")
                overrides.append(vf_function.driver_override if vf_function is not None else "")
            result[address] = DeviceBefore(function, drivers, overrides)
        return result

    # -------------------------------------------------------------------- reads
    def binding(self, address: str) -> PciFunction:
        return self.host.binding(address)

    def driver_of(self, address: str) -> str:
        return self.host.driver_of(address)

    # ------------------------------------------------------------------ binding
    async def bind(self, address: str, driver: str, *, restore_on_failure: bool = True) -> None:
        """driver_override, unbind, drivers_probe, then verify (docs/kernel-rules.md §8), journaled.
        ``driver`` "" means the host driver: clear the override and let the kernel pick."""
        # driver and driver_override are all a bind changes and all its journal entry needs: two
        # cheap reads, not the whole function (its config space costs a trap per read under a
        # hypervisor).
        before = self.host.binding(address)
        async with self.journaled("bind", [address], target={"driver": driver}, before={address: before}):
            await self._bind(address, before, driver, restore_on_failure=restore_on_failure)

    async def give_back(self, address: str) -> str:
        """The sentinel's heal: a device taken from the host back on its host driver. Its undo-journal
        entry is written while the kernel writes, not before them: either order of a crash leaves a
        consistent device — healed if the writes came first; taken, with an entry rolling it back to
        taken, if the entry did — and the heal at the next start gives a taken device back. The
        entry's write is not added to the management network's outage. Returns the host
        driver it verified (read again later, it may already be another writer's next step)."""
        before = self.host.binding(address)
        record = asyncio.ensure_future(self.journal.record("bind", {address: DeviceBefore(before)},
                                                           target={"driver": ""}))
        self._journal_depth = 1
        try:
            driver = await self._bind(address, before, "", restore_on_failure=False)
        finally:
            self._journal_depth = 0
            try:
                entry = await record
            except OSError as exc:  # the kernel change is done either way: a heal is its own recovery
                log.warning("the heal of %s was not journaled: %s", address, exc)
            else:
                await self.journal.finish(entry)
        return driver

    async def _bind(self, address: str, before: PciFunction, driver: str, *, restore_on_failure: bool) -> str:
        """The bind sequence, verified; returns the driver the verification saw."""
        override = driver if driver in PASSTHROUGH_DRIVERS else ""
        if before.driver and satisfies(before.driver, driver) and before.driver_override == override:
            return before.driver
        # Off vfio-pci: the device's VFIO group is held from the first write to the last, so that
        # a VM holding the device is refused before anything changes and none opens it meanwhile.
        leaving = [address] if before.driver == VFIO and not satisfies(VFIO, driver) else []
        with self.host.vfio_latched(leaving) as busy:
            if busy:
                raise busy[address]
            return await self._bind_sequence(address, before, driver, override, restore_on_failure=restore_on_failure)

    async def _bind_sequence(self, address: str, before: PciFunction, driver: str, override: str, *,
                             restore_on_failure: bool) -> str:
        if driver == VFIO:
            await self.host.load_driver(VFIO)
            lap("modprobe")
        try:
            # A write takes the device lock: none to driver_override when it is so already.
            await self._write_sequence(address, before.driver, driver, override,
                                       write_override=before.driver_override != override)
            lap("writes")
            try:
                bound = await self._verify_driver(address, driver)
                lap("verify")
            except KernelError:
                if not await self._another_driver_appeared(address, before.driver, driver):
                    raise
                bound = await self._rebind_once(address, driver, override)
            return bound
        except NicpassError as exc:
            if restore_on_failure:
                raise exc.with_note(await self.restore_binding(address, before)) from exc
            raise

    async def bind_claims(self, claims: dict[str, str],
                          admit: Callable[[str, str], None] | None = None) -> dict[str, NicpassError | None]:
        """The verified binds of the VFs a count change created for a passthrough driver ({VF:
        driver}, what ``set_vf_count`` returns), one batch per driver; ``admit(vf, driver)`` may
        refuse one (the guard: a refusal fails its batch). {VF: None when bound, else the error}."""
        by_driver: dict[str, list[str]] = {}
        for vf, driver in claims.items():
            by_driver.setdefault(driver, []).append(vf)
        outcomes: dict[str, NicpassError | None] = {}
        for driver, vfs in by_driver.items():
            try:
                for vf in vfs:
                    if admit is not None:
                        admit(vf, driver)
                errors: dict[str, NicpassError] = await self.bind_each(vfs, driver)
            except NicpassError as exc:
                errors = {vf: exc for vf in vfs}
            outcomes.update({vf: errors.get(vf) for vf in vfs})
        return outcomes

    async def bind_all(self, addresses: list[str], driver: str) -> None:
        """``bind`` for many functions (a PF's VFs): raises the first failure, after restoring
        every function that failed."""
        errors = await self.bind_each(addresses, driver)
        if errors:
            error = next(iter(errors.values()))
            if len(errors) > 1:
                raise error.extended(f" (and {len(errors) - 1} more)") from error
            raise error

    async def bind_each(self, addresses: list[str], driver: str) -> dict[str, NicpassError]:
        """The bind sequence of docs/kernel-rules.md §8 for many functions at once: all driver_overrides,
        then the unbinds, then the drivers_probes — each phase in one worker thread with the write
        timeout — then one verification pass. Returns the failures ({} = all bound), each
        restored to its previous driver. One journal entry covers the batch."""
        if len(addresses) == 1:
            try:
                await self.bind(addresses[0], driver)
                return {}
            except NicpassError as exc:
                return {addresses[0]: exc}
        befores = {address: self.host.binding(address) for address in addresses}
        async with self.journaled("bind", addresses, target={"driver": driver}, before=befores):
            return await self._bind_batch(befores, driver)

    async def _bind_batch(self, befores: dict[str, PciFunction], driver: str) -> dict[str, NicpassError]:
        override = driver if driver in PASSTHROUGH_DRIVERS else ""
        todo = [address for address, before in befores.items()
                if not (before.driver and satisfies(before.driver, driver) and before.driver_override == override)]
        errors: dict[str, NicpassError] = {}
        if not todo:
            return errors
        leaving = [a for a in todo if befores[a].driver == VFIO and not satisfies(VFIO, driver)]
        with self.host.vfio_latched(leaving) as busy:  # see _bind
            todo = [a for a in todo if a not in busy]
            errors = await self._bind_batch_writes(befores, todo, driver, override)
        return {**errors, **busy}

    async def _bind_batch_writes(self, befores: dict[str, PciFunction], todo: list[str], driver: str,
                                 override: str) -> dict[str, NicpassError]:
        errors: dict[str, NicpassError] = {}
        if not todo:
            return errors
        if driver == VFIO:
            await self.host.load_driver(VFIO)
            lap("modprobe")
        host = self.host
        writes = [host.override_write(a, override) for a in todo]
        writes += [host.unbind_write(a, befores[a].driver) for a in todo
                   if befores[a].driver and not satisfies(befores[a].driver, driver)]
        writes += [host.probe_write(a) for a in todo]
        try:
            failed = await host.write_batch(writes)
        except NicpassError as exc:  # Timeout: every function of the batch is in doubt
            failed = {}
            errors = {address: exc.copy() for address in todo}
        lap("writes")
        for address, failure in failed.items():
            errors[address] = KernelError(failure.describe())
        pending = [a for a in todo if a not in errors]

        def all_bound() -> bool:
            pending[:] = [a for a in pending if not satisfies(host.driver_of(a), driver)]
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
        for address in pending:
            errors[address] = self._not_bound(address, driver)
        lap("verify")
        return {address: error.with_note(await self.restore_binding(address, befores[address]))
                for address, error in errors.items()}

    def _not_bound(self, address: str, driver: str) -> KernelError:
        found = self.host.driver_of(address) or "no driver"
        return KernelError(f"{address} did not bind to {driver or 'its host driver'}: the kernel shows {found} after "
                           "drivers_probe", "check the kernel log (journalctl -k) for the probe failure")

    async def _verify_driver(self, address: str, driver: str) -> str:
        """Wait for the ``driver`` link to show ``driver`` (one readlink per look); returns what it showed."""
        deadline = time.monotonic() + self.config.daemon.bind_verify_timeout
        interval = 0.002
        while not satisfies(seen := self.host.driver_of(address), driver):
            if time.monotonic() >= deadline:
                raise self._not_bound(address, driver)
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.1)
        return seen

    async def _another_driver_appeared(self, address: str, before: str, driver: str) -> bool:
        """After a failed verify: is the function on a driver it was not on before and that was
        not asked for (the kernel's own probe finished meanwhile, e.g. of a VF just created)?
        Waits for the driver link to settle first."""
        seen = self.host.driver_of(address)
        for _ in range(10):
            await asyncio.sleep(0.05)
            now = self.host.driver_of(address)
            if now == seen:
                break
            seen = now
        return bool(seen) and seen != before and not satisfies(seen, driver)

    async def _write_sequence(self, address: str, current: str, driver: str, override: str, *,
                              write_override: bool = True) -> None:
        """driver_override, the unbind from ``current`` when it is not ``driver``, and the probe
        (when unbound), in one worker thread as BindEach's batch: each write handed back to the
        event loop on its own cost two turns of it, milliseconds each under a flood of D-Bus
        reads. A refused write stops the sequence there (KernelError naming it)."""
        host, writes = self.host, []
        if write_override:
            writes.append(host.override_write(address, override))
        unbinding = bool(current) and not satisfies(current, driver)
        if unbinding:
            writes.append(host.unbind_write(address, current))
        if unbinding or not current:
            writes.append(host.probe_write(address))  # a no-op should a driver have bound it meanwhile
        failed = await host.write_batch(writes) if writes else {}
        if address in failed:
            raise KernelError(failed[address].describe())

    async def _rebind_once(self, address: str, driver: str, override: str) -> str:
        """The bind sequence once more, from the driver that appeared (the override stays)."""
        current = self.host.driver_of(address)
        log.info("%s was bound to %s by the kernel meanwhile; binding it to %s again", address, current,
                 driver or "its host driver", extra={"device": address, "action": "bind"})
        await self._write_sequence(address, current, driver, override)
        return await self._verify_driver(address, driver)

    async def restore_binding(self, address: str, before: PciFunction) -> str:
        """Best effort back to ``before``'s driver and driver_override; says what it did."""
        try:
            now = self.host.binding(address)
            await self.host.set_driver_override(address, before.driver_override)
            if not before.driver and now.driver and now.driver not in PASSTHROUGH_DRIVERS:
                # "No driver" is no state to go back to over a host driver the kernel bound by
                # itself (its own probe of a new VF finished meanwhile): leave it there.
                return f"left on {now.driver}, which the kernel bound meanwhile"
            if now.driver and now.driver != before.driver:
                await self.host.unbind(address, now.driver)
            if before.driver and not self.host.driver_of(address):
                await self.host.probe(address)
            restored = self.host.driver_of(address)
        except NicpassError as exc:
            return f"restoring the previous driver also failed: {exc.message}"
        if restored != before.driver:
            return f"the previous driver {before.driver or 'none'} could not be restored (now {restored or 'none'})"
        return f"restored {before.driver or 'no driver'}"

    # ------------------------------------------------------------------ VF count
    async def set_vf_count(self, address: str, count: int, driver: str, vf_drivers: dict[int, str] | None = None,
                           vf_settings: dict[int, VfChange] | None = None) -> dict[str, str]:
        """See ``vf_count.apply_vf_count``: returns {VF address: driver} of the VFs it created for
        a passthrough driver, for the caller to bind (verified)."""
        target = {"num_vfs": count, "vf_driver": driver}
        devices = None if self._journal_depth else self.before_of([address])
        async with self.journaled("vf-count", [address], target=target, devices=devices):
            # The PF as the journal holds it is the PF before the change: not read again.
            before = devices[address].function if devices and address in devices else None
            return await vf_count.apply_vf_count(self, address, count, driver, vf_drivers, vf_settings, before=before)

    async def set_vf_settings_each(self, pf: str, changes: dict[int, tuple[VfChange, VfSettings]]
                                   ) -> dict[int, VfSettings | NicpassError]:
        """VF settings through the PF's driver, read back (``nicpassd.engine.vf_settings``): several
        VFs of one PF ({index: (change, current)}), each all or nothing, under one undo-journal
        entry holding what they change as it was. {index: the settings after, or the error}."""
        results: dict[int, VfSettings | NicpassError] = {index: current for index, (_, current) in changes.items()}
        todo = {index: (change, current) for index, (change, current) in changes.items()
                if vf_settings.differences(current, change).asked()}
        if not todo:
            return results
        undo = {index: vf_settings.undo_of(current, vf_settings.differences(current, change)).asked()
                for index, (change, current) in todo.items()}
        devices = {pf: DeviceBefore(self.host.binding(pf), vf_settings=undo)}
        async with self.journaled("vf-settings", [pf], target={"vfs": sorted(todo)}, devices=devices):
            for index, (change, current) in todo.items():
                try:
                    results[index] = await vf_settings.apply(self, pf, index, change, current)
                except NicpassError as exc:
                    results[index] = exc
        return results

    async def set_vf_settings(self, pf: str, index: int, change: VfChange, current: VfSettings) -> VfSettings:
        """``set_vf_settings_each`` of one VF: the settings after (``current`` itself when nothing
        differed), or its error raised."""
        result = (await self.set_vf_settings_each(pf, {index: (change, current)}))[index]
        if isinstance(result, NicpassError):
            raise result
        return result

    async def reprobe(self, address: str) -> None:
        """Unbind a function from its driver and probe it again (a VF's driver takes a new
        administrative MAC when it probes), verified back on the same driver."""
        driver = self.host.driver_of(address)
        if not driver:
            return
        await self.host.unbind(address, driver)
        await self.host.probe(address)
        await self._verify_driver(address, driver)

    async def restore_vfs(self, address: str, before: PciFunction, drivers: list[str]) -> str:
        return await vf_count.restore_vfs(self, address, before, drivers)
