"""The engine: the API's operations on devices, and the parts of the engine wired together.

No D-Bus in here (the transport maps it). The rooms of the engine:

- ``hostview.HostView``: what is known of the host (snapshot, protected set, device views) and
  the questions every change asks of it (resolve, guard, leases);
- ``operations.Operations``: the verified kernel changes and the one mutation lock;
- ``reconcile.Reconciler`` (with ``plan.py``): persisted desired state applied at boot, on hotplug,
  after API calls; ``recovery.recover``: the undo journal at start;
- ``leasing.LeaseKeeper``: VM leases (Prepare, Activate, Release, reclaiming);
- ``guard_memory.GuardMemory`` (in the view) and ``sentinel.Sentinel``: the management path
  remembered, and every out-of-band change of it (or of a leased device) found, reported, healed;
- ``checks``: ``explain`` and ``check``; ``results``: the typed answers.

``Engine`` owns them and holds the API's own operations: every mutation takes the mutation lock,
refreshes, passes the guard, changes the kernel through ``Operations`` (skip if equal, 0 then N,
verify by reading back, restore the previous state when anything fails) and then persists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Callable, Iterable

from nicpassd.engine import adopt, checks, vf_settings
from nicpassd.engine.plan import vf_claims
from nicpassd.engine.config import Config
from nicpassd.engine.hostview import HostView, InventoryDelta
from nicpassd.engine.journal import Journal
from nicpassd.engine.leases import Lease, LeaseTable
from nicpassd.engine.leasing import LeaseKeeper
from nicpassd.engine.operations import Operations, satisfies
from nicpassd.engine.reconcile import Reconciler
from nicpassd.engine.results import Explanation, Finding, StepOutcome
from nicpassd.engine.sentinel import Sentinel
from nicpassd.engine.store import DeviceDesire, RuntimeHolds, StateStore, VfDesire, identity_of
from nicpassd.engine.views import full_address
from nicpassd.errors import InvalidArgument, NicpassError, NotFound, NotPersisted, NotSupported
from nicpassd.host import kernelio
from nicpassd.host.events import UEvent
from nicpassd.host.host import Host
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS, VFIO
from nicpassd.host.model import PciFunction, VfSettings
from nicpassd.host.vf_netlink import VfChange
from nicpassd.stopwatch import lap

__all__ = ["Engine", "InventoryDelta"]

log = logging.getLogger(__name__)
# An event-driven refresh that took longer than this (a real kernel, a slow CPU, a large host)
# makes the next one of the same burst wait as long as it took: the loop spends at most about
# half its time re-reading on events, and a burst (7 VFs binding: a dozen events) is read in a
# few passes, not one per event. The first event after a quiet spell is read at once.
FREE_REFRESH = 0.010
# A routing or link change of a management interface is read this much later: a driver's remove
# announces the interface's removal (and its routes') at its start, and a refresh then (routing
# dumps, sock_diag: 35-85 ms in the e2e guest) would hold the loop when the unbind's own uevent
# comes, 50-90 ms later there, and the heal of the management NIC behind it. The refresh waits;
# a pci event of a protected function cuts the wait short.
MANAGEMENT_SETTLE = 0.1
# How stale an answer to a read about protection may be (what changes without an event: TCP
# sessions). Mutations always read what they decide on.
CATCH_UP_WINDOW = 0.1


def on_host_driver(function: PciFunction) -> bool:
    """Where a bind to "" (its host driver) would leave it already: nothing for such a bind to do."""
    return satisfies(function.driver, "") and not function.driver_override


class Engine:
    def __init__(self, host: Host, config: Config, store: StateStore, leases: LeaseTable) -> None:
        self.host = host
        self.view = HostView(host, config, store, leases)
        self.journal = Journal(host.paths.runtime_dir)
        self.ops = Operations(host, config, self.journal, self.view.label)
        self.holds = RuntimeHolds(host.paths.runtime_dir)  # devices changed with --runtime
        for address in self.journal.suspects:  # an unreadable undo journal: leave what it names alone
            self.holds.hold(address, f"the undo journal was unreadable (kept as {self.journal.broken_as}); it "
                                     "may be half-way through a change")
        # Which configuration is in force (Check says so): read when, and why the last reload
        # was refused ("" when it was not).
        self.config_read_at = time.strftime("%Y-%m-%d %H:%M:%S")
        self.config_rejected = ""
        self.reconciler = Reconciler(self.view, self.ops, self.holds)  # .auto = True in the daemon
        self.leasing = LeaseKeeper(self.view, self.ops, lambda: self.config)
        self.sentinel = Sentinel(self.view, self.ops, lambda: self.config, self.leasing.announce)
        self._next_event_refresh = 0.0  # loop time before which an event-driven refresh waits
        self._spaced: asyncio.TimerHandle | None = None  # that refresh, when it waits
        self._caught_up = float("-inf")  # loop time of the last catch_up refresh

    # ------------------------------------------------------------ state
    @property
    def store(self) -> StateStore:
        return self.view.store

    @store.setter
    def store(self, store: StateStore) -> None:
        """Another desired state (a reload of state.json): the views and plans read it from now."""
        self.view.store = store

    @property
    def leases(self) -> LeaseTable:
        return self.view.leases

    @classmethod
    def open(cls, host: Host, config: Config) -> "Engine":
        """An engine over the host's own files: the desired state (StateStoreError when it cannot
        be read) and the lease table, where the host's paths put them."""
        return cls(host, config, StateStore(host.paths.state_dir), LeaseTable(host.paths.runtime_dir))

    @property
    def config(self) -> Config:
        return self.view.config

    @config.setter
    def config(self, config: Config) -> None:
        self.view.config = config
        self.ops.config = config
        self.host.write_timeout = config.daemon.write_timeout

    async def reconfigure(self, config: Config) -> None:
        """A reloaded configuration, applied under the mutation lock (no change is half under the
        old one): timeouts, guard, release policy; then the guard and views are recomputed and
        the reconciler looks again (a desire the new guard allows or refuses)."""
        async with self.ops.lock:
            self.config = config
            self.config_read_at = time.strftime("%Y-%m-%d %H:%M:%S")
            self.config_rejected = ""
            self.view.refresh()
        self.reconciler.poke()

    def reject_config(self, reason: str) -> None:
        """A reload refused: the previous configuration stays in force, and Check fails until a
        reload succeeds."""
        self.config_rejected = reason

    # ---------------------------------------------------------------- inventory
    @property
    def snapshot(self):
        return self.view.snapshot

    @property
    def protected(self):
        return self.view.protected

    @property
    def views(self):
        """The device views, with what a change marked read in first (``read_in_marked``)."""
        self.read_in_marked()
        return self.view.views

    @property
    def inventory_listeners(self) -> list[Callable[[InventoryDelta], None]]:
        return self.view.listeners

    @property
    def lease_listeners(self) -> list[Callable[[Lease, str], None]]:
        return self.leasing.listeners

    def refresh(self) -> InventoryDelta:
        return self.view.refresh()

    def refresh_changed(self) -> InventoryDelta:
        return self.view.refresh_changed()

    def on_uevent(self, event: UEvent) -> None:
        """Coalesce a burst of events into one refresh on the next loop iteration (re-reading only
        what the events name), then one reconcile run if any event was relevant to it."""
        self.view.note(event)
        self.reconciler.note(event)
        self.sentinel.on_event(event)
        loop = asyncio.get_running_loop()
        if self._urgent(event) and self._spaced is not None:
            # A protected or leased function changed driver: the sentinel must see it now, not
            # after the spacing of a burst (a heal's latency is the management network's outage).
            self._spaced.cancel()
            self._spaced = None
            loop.call_soon(self._after_events)
            return
        if self.view.refresh_pending:
            return
        self.view.refresh_pending = True
        wait = self._next_event_refresh - loop.time()
        if event.subsystem == "route" and self._management_interface(event.sys_name):
            wait = max(wait, MANAGEMENT_SETTLE)
        if wait > 0 and not self._urgent(event):
            self._spaced = loop.call_later(wait, self._after_events)
        else:
            loop.call_soon(self._after_events)

    def on_kernel_event(self, event: UEvent) -> None:
        """A kernel uevent as the kernel sent it, before udev's rules ran (and before the same
        event comes again through ``on_uevent``): only the sentinel looks at it, so that a heal
        does not wait for udev."""
        self.sentinel.on_event(event)

    async def quiesce(self) -> None:
        """Wait until every event delivered so far is handled: its refresh done (also one spaced
        after a slow refresh, which waits in real time), and the heals and reconcile runs it
        caused finished (tests, benchmarks, shutdown)."""
        loop = asyncio.get_running_loop()
        while True:
            for _ in range(3):  # queued deliveries and call_soon refreshes run first
                await asyncio.sleep(0)
            if self._spaced is not None:
                await asyncio.sleep(max(0.0, self._spaced.when() - loop.time()))
                continue
            await self.sentinel.idle()
            await self.reconciler.idle()
            if self._spaced is None and not self.sentinel.busy and not self.reconciler.busy:
                return

    def _management_interface(self, name: str) -> bool:
        functions = self.view.snapshot.functions
        return bool(name) and any(name in functions[address].interfaces for address in self.view.protected.entries
                                  if address in functions)

    def _urgent(self, event: UEvent) -> bool:
        return event.subsystem == "pci" and (event.sys_name in self.view.protected.entries
                                             or event.sys_name in self.view.leases.holder())

    def _after_events(self) -> None:
        self._spaced = None
        if self.reconciler.auto and (self.ops.lock.locked() or self.sentinel.busy):
            # A change is being applied, or a heal is about to be: its own events would cost a
            # refresh per trickle of them, and a heal must not wait for one. The reconcile run
            # queued behind it takes them all in at once, under the lock.
            self.reconciler.poke()
            return
        if self.view.refresh_pending:
            loop = asyncio.get_running_loop()
            started = loop.time()
            self.view.refresh_changed()
            spent = loop.time() - started
            self._next_event_refresh = loop.time() + spent if spent > FREE_REFRESH else 0.0
        self.reconciler.events_settled()

    def resolve(self, device: str) -> str:
        return self.view.resolve(device)

    def catch_up(self) -> None:
        """Before answering a question about protection (guard, explain, check): take in what
        changed without an event of its own (a new TCP session), unless a change is being
        applied (then what is known is what that change decided on). Once per CATCH_UP_WINDOW
        unless events are pending: a flood of questions must not become a flood of refreshes
        (each is a sock_diag dump and the guard recomputed) that the writers queue behind."""
        if self.ops.lock.locked():
            return
        now = asyncio.get_running_loop().time()
        if self.view.dirty or now - self._caught_up >= CATCH_UP_WINDOW:
            self.view.refresh_changed()
            self._caught_up = now

    def read_in_marked(self) -> None:
        """Before answering a reader from the kept views: what a change marked (it answers before
        the re-read of what it did, which the reconcile run it pokes does) or events named is
        read in first, unless a change is being applied (an automatic run that has read nothing
        yet applies nothing: it finds the reader's re-read done)."""
        if self.view.dirty and (not self.ops.lock.locked() or self.reconciler.not_read_yet):
            self.view.refresh_changed()

    # -------------------------------------------------------------------- API
    async def reconcile(self) -> list[StepOutcome]:
        """Bring every device to its persisted desired state now: what was done and not done."""
        return await self.reconciler.run(explicit=True)

    async def plan_reconcile(self) -> list[tuple[str, str, str]]:
        """What ``reconcile`` would do now, and what it would not apply and why; writes nothing."""
        async with self.ops.lock:
            return self.reconciler.preview()

    async def plan_import(self) -> list[adopt.Adoption]:
        """What other tools (driverctl, vfio-pci.ids=, networkd, udev rules) make of the NICs at
        boot, as nicpassd desires, guard-checked; writes nothing."""
        async with self.ops.lock:
            self.view.refresh_changed()
            return adopt.plan(self.view)

    async def adopt(self, *, caller: str = "") -> list[adopt.Adoption]:
        """``plan_import``, and each adoptable row persisted through the mutation it stands for
        (guard-checked, journaled; the kernel changes only where it differs). Each row succeeds
        or fails on its own: the rows with what was done ("adopted: ...", "failed: ...")."""
        done = []
        for row in await self.plan_import():
            self.read_in_marked()  # what the rows before did
            row = adopt.restate(self.view, row)
            if not row.adoptable:
                done.append(row)
                continue
            try:
                if row.action == adopt.VFS:
                    await self.set_vf_count(row.device, int(row.target), caller=caller)
                elif row.action == adopt.VF:
                    await self.set_vf_settings(f"{row.device}:{row.index}", row.values, caller=caller)
                else:
                    await self.bind(row.device, row.target, caller=caller)
            except NicpassError as exc:
                done.append(replace(row, status=f"failed: {exc.name}: {exc}"))
                continue
            done.append(replace(row, status="adopted" + row.status.removeprefix(adopt.ADOPT)))
            log.info("imported from %s: %s %s %s", row.source, row.action, row.device, row.target,
                     extra={"device": row.device, "action": "import"})
        return done

    async def set_vf_count(self, device: str, count: int, *, persist: bool = True, driver: str = "",
                           force: bool = False, caller: str = "", stable_macs: bool | None = None) -> None:
        """``stable_macs``: from now on (True) or no longer (False) give each VF without a persisted
        MAC one derived from the PF's permanent MAC and the VF index (None: as persisted)."""
        view = self.view
        address = view.resolve(device)
        function = view.snapshot.functions[address]
        if function.physfn:
            raise NotSupported(f"{view.label(address)} is a VF of {view.label(function.physfn)}; a VF has no VFs",
                               f"change the VF count of its PF: nicpassctl vfs {function.physfn} N")
        if not function.sriov_capable:
            raise NotSupported(f"{view.label(address)} is not an SR-IOV physical function",
                               "create VFs on a PF (a device with TotalVfs > 0)")
        if count < 0 or count > function.total_vfs:
            raise InvalidArgument(f"{view.label(address)} supports at most {function.total_vfs} VFs; {count} requested",
                                  f"ask for 0 to {function.total_vfs}")
        if driver not in ("", VFIO):
            raise InvalidArgument(f"VF driver {driver!r} is not supported; use \"vfio-pci\" or leave it empty")
        if stable_macs is not None and not persist:
            raise InvalidArgument("stable MACs are a persisted setting of the PF; they cannot be --runtime")
        if stable_macs and not (function.permanent_mac or self._recorded_mac(address)):
            raise NotSupported(f"{view.label(address)} shows no permanent MAC to derive its VFs' MACs from",
                               "give it back to its host driver first")
        async with self.ops.lock:
            lap("lock")
            view.refresh_for([address])
            lap("refresh")
            self._guard(address, f"change the VF count of {view.label(address)}", force=force, caller=caller)
            view.refuse_if_vf_leased(address, "change the VFs of")
            before = self.host.present(address)
            before_drivers = [self.host.driver_of(vf) for vf in before.virtfns]
            lap("guard")
            extra = {} if stable_macs is None else {"stable_macs": stable_macs}
            # VFs persisted one by one on a passthrough driver come back on it when the count
            # creates them again: in this call, as the reconciler would do it at boot, so that
            # the answer (and `nicpassctl vfs`, which lists each VF's driver) is already true.
            claimed = {} if driver == VFIO else dict(vf_claims(self.store.state.devices, address, count))
            claims = await self.ops.set_vf_count(address, count, driver, claimed,
                                                 self._new_vf_settings(address, count, extra))
            await self._bind_claimed(claims)
            try:
                await self._commit([address], persist, num_vfs=count, vf_driver=driver if count else "", **extra)
            except NotPersisted as exc:
                raise exc.with_note(await self.ops.restore_vfs(address, before, before_drivers)) from None
            lap("state")
            log.info("%s now has %d VFs%s%s", view.label(address), count, f" on {driver}" if driver else "",
                     "" if persist else " (runtime only)", extra={"device": address, "action": "vfs"})
            view.mark([address, *before.virtfns, *self.host.present(address).virtfns])  # read after the answer
        self.reconciler.poke()

    async def _bind_claimed(self, claims: dict[str, str]) -> None:
        """The verified binds of the VFs a count change created for their persisted passthrough
        driver. A failure leaves the count as it is: the reconcile run poked after says why."""
        for vf, error in (await self.ops.bind_claims(claims)).items():
            if error is not None:
                log.warning("%s (persisted on %s) was created but not bound: %s", vf, claims[vf], error,
                            extra={"device": vf, "action": "vfs"})

    async def bind(self, device: str, driver: str, *, persist: bool = True, force: bool = False,
                   group: bool = False, caller: str = "") -> None:
        """Bind (``driver`` "" = back to the host driver). ``group`` does the same to every
        non-bridge IOMMU group mate, none of which may be protected (``force`` does not extend to
        mates); ``force`` overrides a guard entry that is not on the management path."""
        view = self.view
        address = view.resolve(device)
        self._check_driver(address, driver)
        async with self.ops.lock:
            lap("lock")
            view.refresh_for([address])
            lap("refresh")
            targets = self._admit_bind(address, driver, group=group, force=force, caller=caller)
            target = driver or "its host driver"
            befores = {each: self.host.binding(each) for each in targets}
            lap("guard")
            saving = self._commit_meanwhile(targets, persist, driver=driver if driver in PASSTHROUGH_DRIVERS else "")
            try:
                await self._bind_together(targets, driver)
            except BaseException:
                await saving.abandon()
                raise
            try:
                await saving.settle()
            except NotPersisted as exc:
                notes = [f"{each}: {await self.ops.restore_binding(each, before)}" for each, before in befores.items()]
                raise exc.with_note("; ".join(notes)) from None
            lap("state")
            for mate in targets[1:]:
                log.info("%s bound to %s with the IOMMU group of %s", view.label(mate), target, address)
            log.info("%s bound to %s%s", view.label(address), target, "" if persist else " (runtime only)",
                     extra={"device": address, "action": "bind"})
            view.mark(targets)  # read in by the run poked below, once the answer is out
        self.reconciler.poke()

    def _admit_bind(self, address: str, driver: str, *, group: bool, force: bool, caller: str) -> list[str]:
        """What a bind of ``address`` must pass before anything is written (the guard, leases, VFs
        a PF driver would orphan); returns the functions it binds (the group mates with ``group``)."""
        view = self.view
        view.present(address)  # NotFound if it went away since it was resolved
        target = driver or "its host driver"
        action = f"bind {view.label(address)} to {target}"
        if driver or group:
            self._guard(address, action, force=force, caller=caller)
        # else: giving a device back to its host driver takes nothing from the host, whether it
        # is on it already or someone else took it (that is how an admin returns it).
        targets = [address, *(view.group_mates(address, action) if group else ())]
        view.refuse_if_leased(targets, "rebind")
        if driver not in PASSTHROUGH_DRIVERS:
            view.refuse_if_mate_leased(address, target)
        for each in targets:
            present = view.present(each)
            if present.num_vfs and driver in PASSTHROUGH_DRIVERS:
                raise InvalidArgument(f"{view.label(each)} has {present.num_vfs} VFs; unbinding its PF driver "
                                      "would orphan them", f"remove them first with `nicpassctl vfs {each} 0`")
        return targets

    async def bind_each(self, devices: list[str], driver: str, *, persist: bool = True, force: bool = False,
                        caller: str = "") -> dict[str, NicpassError | None]:
        """``bind`` of each device, with the outcome of each (None = bound) as separate binds would
        have it, but as one batch the way a careful shell loop does it: one pass of
        driver_overrides, unbinds and probes, verified together, one state write, one refresh."""
        view = self.view
        outcomes: dict[str, NicpassError | None] = {}
        addresses: dict[str, str] = {}
        for device in devices:
            try:
                addresses[device] = view.resolve(device)
                self._check_driver(addresses[device], driver)
            except NicpassError as exc:
                outcomes[device] = exc
                addresses.pop(device, None)
        lap("resolve")
        async with self.ops.lock:
            lap("lock")
            wanted = list(dict.fromkeys(addresses.values()))
            view.refresh_for(wanted)
            lap("refresh")
            admitted: list[str] = []
            refused: dict[str, NicpassError] = {}
            for address in wanted:
                try:
                    self._admit_bind(address, driver, group=False, force=force, caller=caller)
                    admitted.append(address)
                except NicpassError as exc:
                    refused[address] = exc
            befores = {address: self.host.binding(address) for address in admitted}
            lap("guard")
            saving = self._commit_meanwhile(admitted, persist, driver=driver if driver in PASSTHROUGH_DRIVERS else "")
            try:
                failed: dict[str, NicpassError] = await self.ops.bind_each(admitted, driver) if admitted else {}
            except BaseException:
                await saving.abandon()
                raise
            bound = [address for address in admitted if address not in failed]
            try:
                await saving.settle(failed)
            except NotPersisted as exc:
                for address in bound:
                    failed[address] = exc.with_note(await self.ops.restore_binding(address, befores[address]))
                bound = []
            lap("state")
            target = driver or "its host driver"
            for address in bound:
                log.info("%s bound to %s%s", view.label(address), target, "" if persist else " (runtime only)",
                         extra={"device": address, "action": "bind"})
            view.mark(wanted)  # read in by the run poked below, once the answer is out
        self.reconciler.poke()
        for device, address in addresses.items():
            outcomes[device] = refused.get(address) or failed.get(address)
        return {device: outcomes[device] for device in devices}

    def _check_driver(self, address: str, driver: str) -> None:
        """A bind names a passthrough driver, the device's own host driver, or "" for it. Any other
        driver would be made to probe the device through driver_override whatever its ID table
        says (docs/kernel-rules.md §7): refused before anything is written."""
        if driver in ("", *PASSTHROUGH_DRIVERS):
            return
        function = self.view.present(address)
        remembered = self.view.memory.entries.get(address)
        own = {function.driver} - {"", *PASSTHROUGH_DRIVERS}
        if remembered is not None and remembered.driver:
            own.add(remembered.driver)
        if driver not in own:
            raise InvalidArgument(
                f"{driver!r} is not a driver of {self.view.label(address)}"
                f"{' (its host driver is ' + ', '.join(sorted(own)) + ')' if own else ''}",
                "use \"vfio-pci\" or \"pci-stub\" for passthrough, or \"\" to give it back to its host driver")

    async def _bind_together(self, targets: list[str], driver: str) -> None:
        """Bind each target (verified); on a failure, every one already moved goes back."""
        done: list[tuple[str, PciFunction]] = []
        try:
            for each in targets:
                before = self.host.present(each)
                await self.ops.bind(each, driver)
                done.append((each, before))
        except NicpassError as exc:
            if not done:
                raise
            notes = [f"{each}: {await self.ops.restore_binding(each, before)}" for each, before in reversed(done)]
            raise exc.with_note("; ".join(notes)) from exc

    async def set_vf_settings(self, device: str, values: dict[str, object], *, persist: bool = True,
                              force: bool = False, caller: str = "") -> VfSettings:
        """A VF's settings (``device``: the VF, or "PF:index"), written through its PF's driver,
        read back, persisted in the PF's desire keyed by the VF index (or held at runtime).
        Returns what the kernel shows after."""
        change = vf_settings.parse_change(values)  # nothing is read or written for bad input
        view = self.view
        pf, index = self._vf_of(device)
        async with self.ops.lock:
            view.refresh_for([pf])
            function = view.present(pf)
            if index >= function.num_vfs:
                raise NotFound(f"{view.label(pf)} has {function.num_vfs} VFs; there is no VF {index}",
                               f"create it first: nicpassctl vfs {pf} {index + 1}")
            vf = function.virtfns[index]
            what = f"change the settings of VF {index} ({vf}) of {view.label(pf)}"
            self._guard(vf, what, force=force, caller=caller)
            view.refuse_if_leased([vf], f"change the settings of VF {index} of {view.label(pf)}:")
            current = view.snapshot.vf_settings_of(vf)
            if current is None:
                current = self.host.read_vf_setting(function.interfaces[0], index) if function.interfaces else None
            if current is None:
                raise NotSupported(f"{view.label(pf)} reports no settings for its VFs (driver: "
                                   f"{function.driver or 'none'})", "VF settings need the PF on its host driver")
            after = await self.ops.set_vf_settings(pf, index, change, current)
            if persist:
                desire = self.store.get(pf)
                kept = dict(desire.vf_settings) if desire else {}
                merged = {**(kept[str(index)].model_dump(exclude_none=True) if str(index) in kept else {}),
                          **change.asked()}
                kept[str(index)] = VfDesire(**merged)
                try:
                    await self._saved(self.store.commit({pf: self._desire(pf, vf_settings=kept)}))
                    await self._saved(self.holds.release_async(vf))
                except NotPersisted as exc:
                    await self.ops.set_vf_settings(pf, index, vf_settings.undo_of(current, change), after)
                    raise exc.with_note("the previous VF settings were put back") from None
            else:
                await self._saved(self.holds.hold_async(vf, op="runtime"))
            view.mark([pf])
        self.reconciler.poke()
        return after

    def _absent_desire(self, device: str) -> str:
        """The address of a persisted desire whose device is gone, named by its PCI address or by
        the identity it was recorded with: the PF's permanent MAC, or the card's PCIe serial (a
        card moved to another slot, or taken out, is known by those, not by an address)."""
        wanted = device.strip().lower()
        address = full_address(wanted)
        if self.store.get(address) is not None and address not in self.view.snapshot.functions:
            return address
        if not (kernelio.MAC.fullmatch(wanted) or kernelio.SERIAL.fullmatch(wanted)):
            return ""
        matches = sorted(key for key, desire in self.store.state.devices.items()
                         if wanted in (desire.identity.permanent_mac.lower(), desire.identity.serial.lower()))
        if len(matches) > 1:
            raise InvalidArgument(f"{len(matches)} persisted devices were recorded with {device}: "
                                  f"{', '.join(matches)}", "forget them one by one, by address")
        if matches and matches[0] in self.view.snapshot.functions:
            raise InvalidArgument(f"{device} is the recorded identity of {self.view.label(matches[0])}, which is "
                                  "present", f"forget it by its address: nicpassctl forget {matches[0]}")
        if not matches:
            raise NotFound(f"no persisted device was recorded with {device}",
                           "`nicpassctl check` lists the persisted devices that are not present, with their MAC "
                           "and serial")
        return matches[0]

    def _new_vf_settings(self, address: str, count: int, changes: dict[str, object]) -> dict[int, VfChange]:
        """The persisted settings (stable MACs included) of the VFs a count change creates: written
        before they probe."""
        desire = self._desire(address, num_vfs=count, **changes)
        if desire is None or not (desire.vf_settings or desire.stable_macs):
            return {}
        pf_mac = desire.identity.permanent_mac or self._recorded_mac(address)
        return {index: VfChange(**wanted) for index, wanted in vf_settings.desired_settings(desire, pf_mac, count).items()
                if index < count and wanted}

    def _recorded_mac(self, address: str) -> str:
        desire = self.store.get(address)
        return desire.identity.permanent_mac if desire is not None else ""

    def _vf_of(self, device: str) -> tuple[str, int]:
        """(PF address, VF index) of a VF argument or of "PF:index"."""
        view = self.view
        head, sep, tail = device.rpartition(":")
        if sep and tail.isdigit() and head and not kernelio.PCI_ADDRESS.fullmatch(device):
            pf = view.resolve(head)
            if view.snapshot.functions[pf].physfn:
                raise InvalidArgument(f"{view.label(pf)} is a VF; PF:index names a VF by its PF",
                                      f"name the VF itself ({pf}) or its PF {view.snapshot.functions[pf].physfn}")
            return pf, int(tail)
        address = view.resolve(device)
        function = view.snapshot.functions[address]
        parent = view.snapshot.functions.get(function.physfn) if function.physfn else None
        if parent is None or address not in parent.virtfns:
            raise InvalidArgument(f"{view.label(address)} is not a VF; VF settings are set on a VF",
                                  f"name a VF, or one as PF:index (e.g. {address}:0)")
        return parent.address, parent.virtfns.index(address)

    async def unbind(self, device: str, *, persist: bool = True) -> None:
        """Give the device back to its host driver; forget the persisted binding too."""
        await self.bind(device, "", persist=persist)

    async def forget(self, device: str, *, restore: bool = False) -> None:
        try:
            address = self.view.resolve(device)
        except (NotFound, InvalidArgument):
            # A card taken out for good, or a VF not created: its persisted state can still go
            # (what `check` says to do about a persisted device that is not present), also by
            # the identity it was recorded with.
            address = self._absent_desire(device)
            if not address:
                raise
            async with self.ops.lock:
                await self._saved(self.store.commit({address: None}))
                if address in self.holds:
                    await self._saved(self.holds.release_async(address))
                self.reconciler.forget_failures(address)
                log.info("forgot the persisted state of %s (not present)", address,
                         extra={"device": address, "action": "forget"})
                self.view.publish()
            return
        async with self.ops.lock:  # forgotten first: a state that cannot be saved changes nothing
            view = self.view
            view.refresh_for([address])
            present = view.present(address)
            if restore and not on_host_driver(present):
                # What would refuse the restore refuses the whole call, before anything is forgotten.
                view.refuse_if_leased([address], "rebind")
                view.refuse_if_mate_leased(address, "its host driver")
            if self.store.get(address) is not None:
                await self._saved(self.store.commit({address: None}))
            if address in self.holds:
                await self._saved(self.holds.release_async(address))
            self.reconciler.forget_failures(address)
            view.refresh_for([address])
        if restore:
            await self.bind(address, "", persist=False)

    async def release_protection(self, device: str, *, caller: str = "") -> None:
        """An admin's word that a remembered management device (guard_memory.py) is no longer
        needed for management: the guard forgets it. A device on the live management path cannot
        be released (it is protected by what the kernel shows, not by memory)."""
        view = self.view
        address = view.memory_address(device)
        async with self.ops.lock:
            view.refresh()
            if address not in view.memory.held:
                if address in view.protected and view.protected.entries[address].management:
                    raise InvalidArgument(f"{view.label(address)} is on the host's management path now "
                                          f"({'; '.join(view.protected.reasons(address))}); there is nothing "
                                          "remembered to release", "move the management network off it first")
                raise NotFound(f"{view.label(address)} is not remembered as a management device",
                               "see `nicpassctl guard` for what is protected and why")
            view.memory.release(address)
            log.warning("%s released from the guard's memory by %s; it was: %s", view.label(address),
                        caller or "an unknown caller", "; ".join(view.protected.reasons(address)),
                        extra={"device": address, "action": "guard-release"})
            view.refresh()

    def _guard(self, address: str, action: str, *, force: bool, caller: str) -> None:
        overridden = self.view.guard_check(address, action, force=force)
        if overridden is not None:
            log.warning("guard overridden with force by %s: %s although it is protected (%s)",
                        caller or "an unknown caller", action, "; ".join(overridden.reasons))

    async def _commit(self, addresses: list[str], persist: bool, **changes: object) -> None:
        """After an API change: persist it (a persisted change ends a runtime one), or hold the
        devices as changed at runtime (the reconciler leaves them alone). ``NotPersisted`` when
        the file cannot be written: the caller puts the kernel back as it was."""
        if not persist:
            await self._saved(self.holds.hold_async(*addresses, op="runtime"))
            return
        await self._saved(self.store.commit({address: self._desire(address, **changes) for address in addresses}))
        await self._saved(self.holds.release_async(*addresses))
        self.reconciler.forget_failures(*addresses)

    def _commit_meanwhile(self, addresses: list[str], persist: bool, **changes: object) -> "CommitMeanwhile":
        """``_commit`` started now, while the kernel carries the change out: the state file's two
        fsyncs (a quarter of a second on a slow disk) overlap the kernel writes instead of
        following them. ``settle`` waits for it and writes the previous desire back for the
        devices the kernel failed. A crash meanwhile leaves the new desire on disk and the device
        restored by the journal: the boot reconcile then applies the desire, so the device ends
        in its desired state, as the undo journal promises."""
        return CommitMeanwhile(self, addresses, persist, changes)

    async def _saved(self, write) -> None:
        try:
            await write
        except OSError as exc:
            raise NotPersisted.of(exc) from None

    def _desire(self, address: str, **changes: object) -> DeviceDesire | None:
        # The snapshot read when the change began: identity does not change with a binding (and a
        # host driver's netdev still shows the permanent MAC there), and it costs no kernel read.
        function = self.view.snapshot.functions.get(address) or self.host.present(address)
        current = self.store.get(address)
        base = current.model_dump() if current else {"address": address}
        base.update(changes)
        base["identity"] = identity_of(function, self.view.snapshot)
        desire = DeviceDesire.model_validate(base)
        # Zero VFs and no driver is nothing left to persist: the device is forgotten.
        return None if not (desire.driver or desire.num_vfs or desire.vf_driver or desire.vf_settings) else desire

    # ----------------------------------------------------------------- leases
    async def prepare(self, vm_name: str, vm_uuid: str, devices: list[str], **options) -> Lease | None:
        return await self.leasing.prepare(vm_name, vm_uuid, devices, **options)

    async def activate(self, vm_uuid: str, *, pid: int = 0, missing_ok: bool = False) -> Lease | None:
        return await self.leasing.activate(vm_uuid, pid=pid, missing_ok=missing_ok)

    async def release(self, vm_uuid: str) -> list[Lease]:
        return await self.leasing.release(vm_uuid)

    # ---------------------------------------------------------- check/explain
    def explain(self, device: str) -> Explanation:
        explanation = checks.explain(self.view, device)
        last = self.sentinel.last.get(explanation.address)
        return replace(explanation, last_violation=last.summary) if last else explanation

    def check_devices(self, devices: list[str]) -> list[tuple[str, Finding]]:
        """Each function's readiness for passthrough (every network function when ``devices`` is empty)."""
        return checks.check_devices(self.view, devices)

    def check(self) -> list[Finding]:
        path = self.host.paths.config_file
        return checks.check(self.view, self.config) + checks.config_findings(
            path, present=path.exists(), rejected=self.config_rejected, read_at=self.config_read_at)


class CommitMeanwhile:
    """A state write running beside the kernel writes of the same change (``Engine._commit_meanwhile``)."""

    def __init__(self, engine: Engine, addresses: list[str], persist: bool, changes: dict[str, object]) -> None:
        self.engine = engine
        self.previous = {address: engine.store.get(address) for address in addresses}
        self.held = {address: engine.holds.holds[address] for address in addresses if address in engine.holds}
        self.task = asyncio.ensure_future(engine._commit(addresses, persist, **changes)) if addresses else None

    async def settle(self, failed: Iterable[str] = ()) -> None:
        """Wait for the write (``NotPersisted`` when it failed: nothing was written); then put the
        previous desire and holds of ``failed`` back."""
        if self.task is None:
            return
        await self.task
        failed = [address for address in failed if address in self.previous]
        if not failed:
            return
        engine = self.engine
        try:
            await engine.store.commit({address: self.previous[address] for address in failed})
            await engine.holds.release_async(*[address for address in failed if address not in self.held])
            for address in failed:
                if address in self.held:
                    await engine.holds.hold_async(address, op=self.held[address])
        except OSError as exc:
            log.error("the desired state of %s could not be put back after the kernel failed the change (%s): "
                      "the reconciler will try the change again", ", ".join(failed), exc)

    async def abandon(self) -> None:
        """The change failed as a whole: the previous desire of every device back (if the new one
        was written at all)."""
        try:
            await self.settle(self.previous)
        except NotPersisted:
            pass  # nothing was written: nothing to put back
