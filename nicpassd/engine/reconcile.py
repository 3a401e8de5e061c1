"""The reconciler: desired state (state.json) vs what the kernel shows → a plan → applied, verified.

A run, always under the mutation lock (never concurrent with an API change):

1. re-read what changed (``HostView.refresh_changed``);
2. follow moved cards: a persisted device whose serial number or permanent MAC shows up at
   another address is re-keyed there (one store commit, logged); VF desires follow their PF;
3. make a ``Plan`` (``plan.py``): steps, and for desires that are not applied the reason;
4. apply the steps one by one through the operations layer (``Operations.set_vf_count``: skip if
   equal, autoprobe off for vfio-pci VFs, 0 then N, wait for ``virtfnN``, verify;
   ``Operations.bind_each``: driver_override, unbind, drivers_probe, verify), each journaled and
   each re-checked against the guard just before it runs;
5. repeat from 1 until nothing is left to do (VFs created in one pass are bound in the next);
   an automatic run stops after one pass that changed something and leaves the rest to the run
   its own uevents queued (so a burst of work is never re-read twice).

A persisted desire that became dangerous is never applied: it is reported (log, the device's
``Drift``, ``Check``) and kept. Runs are idempotent: on a converged host the plan is empty and
nothing is written.

Runs happen at daemon start, on relevant uevents (coalesced: one run per burst, whatever its
size), after API changes, and on demand (``Reconcile()``). Automatic runs do not retry a device
whose step failed until it is re-plugged or a run is asked for explicitly, and stop re-applying a
device something else keeps changing back (``FIGHT_LIMIT`` times in ``FIGHT_WINDOW`` seconds).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from nicpassd.host import early_binding
from nicpassd.engine.hostview import HostView
from nicpassd.engine.operations import Operations
from nicpassd.engine.plan import Plan, Step, find_moves, make_plan, vf_claims
from nicpassd.engine.results import SKIPPED, Action, StepOutcome
from nicpassd.engine.store import DeviceDesire, RuntimeHolds, identity_of
from nicpassd.errors import NicpassError, NotFound
from nicpassd.host.events import UEvent
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS, VFIO
from nicpassd.host.vf_netlink import VfChange

log = logging.getLogger(__name__)

MAX_PASSES = 4
FIGHT_LIMIT = 5
FIGHT_WINDOW = 60.0
# How long an automatic run leaves a device to udev's rules before applying its desire anyway
UDEV_WAIT = 60.0
RELEVANT = {"pci": ("add", "remove", "bind", "unbind", "change", "move"), "net": ("add", "remove", "move"),
            "": ("overflow",)}  # uevents were lost: anything may have happened


def _count_only(desires: dict[str, DeviceDesire], desire: DeviceDesire) -> bool:
    """A PF on its host driver whose VFs need nothing but their count and one driver for all: what
    ``nicpassd.host.early_vfs`` creates before the daemon has started (the list's ``vf_counts``).
    VF settings and single VFs on another driver are written while the VFs have no driver yet,
    which only the engine does."""
    return (bool(desire.num_vfs) and not desire.driver and desire.vf_driver in ("", VFIO) and not desire.vf_settings
            and not desire.stable_macs and not vf_claims(desires, desire.address, desire.num_vfs or 0))


class Reconciler:
    def __init__(self, view: HostView, ops: Operations, holds: RuntimeHolds) -> None:
        self.view = view
        self.ops = ops
        self.holds = holds
        self.auto = False  # react to uevents and API changes (the daemon turns it on)
        self.failed: dict[str, str] = {}  # automatic runs leave these alone (until re-plugged)
        self.applied: dict[str, collections.deque[float]] = {}
        self.last_plan = Plan()
        self.last_outcomes: list[StepOutcome] = []
        # Told the outcomes of every run as it ends (monitoring, benchmarks).
        self.run_listeners: list[Callable[[list[StepOutcome], bool], None]] = []
        self.runs = 0
        self._wanted = False
        self._task: asyncio.Task | None = None
        self._logged: dict[str, str] = {}
        self._udev_waiting: dict[str, float] = {}  # address -> when a run first found it unprocessed
        self._udev_timer: asyncio.TimerHandle | None = None
        self._udev_gave_up: set[str] = set()
        # An automatic run holds the lock and has read nothing yet (the yield that lets a change's
        # answer out first): a reader may read in what is marked (Engine.read_in_marked).
        self.not_read_yet = False

    # ------------------------------------------------------------------ triggers
    def note(self, event: UEvent) -> None:
        """Called by the engine for every uevent, before the coalesced refresh."""
        if event.subsystem == "route" and self._holds_vf_settings(event.sys_name):
            self._wanted = True  # `ip link set PF vf N ...` by someone else: the kernel's RTM_NEWLINK
            return
        if event.action not in RELEVANT.get(event.subsystem, ()):
            return
        if event.subsystem == "pci":
            if event.action == "add":
                self.failed.pop(event.sys_name, None)
                self.applied.pop(event.sys_name, None)
            elif event.action == "remove":
                self.holds.release(event.sys_name)  # a runtime change ends with its device
        self._wanted = True

    def _holds_vf_settings(self, interface: str) -> bool:
        """Is ``interface`` a PF with VF settings persisted (a link change of it may be theirs)?"""
        link = self.view.snapshot.links.get(interface) if interface else None
        desire = self.view.store.get(link.device) if link is not None and link.device else None
        return desire is not None and bool(desire.vf_settings)

    def events_settled(self) -> None:
        """Called after the refresh that took a burst of uevents in."""
        if self._wanted:
            self.poke()

    def poke(self) -> None:
        """Ask for an automatic run (coalesced: at most one runs, at most one more is queued)."""
        if not self.auto:
            return
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._auto())

    def forget_failures(self, *addresses: str) -> None:
        for address in addresses:
            self.failed.pop(address, None)
            self.applied.pop(address, None)

    async def _auto(self) -> None:
        while self._wanted:
            self._wanted = False
            try:
                await self.run(explicit=False)
            except Exception:  # noqa: BLE001 - a bug must not kill the event path
                log.exception("automatic reconcile failed")

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def idle(self) -> None:
        """Wait until no automatic run is pending (tests, benchmarks)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    # --------------------------------------------------------------------- runs
    @property
    def notes(self) -> dict[str, str]:
        """address -> why its desire is not applied (the views' Drift)."""
        return self.view.notes

    def plan(self, *, explicit: bool, also_blocked: dict[str, str] | None = None) -> Plan:
        view = self.view
        blocked = {} if explicit else {address: f"not retried automatically after a failure ({message}); "
                                                "run `nicpassctl reconcile` to retry"
                                       for address, message in self.failed.items()}
        if not explicit:
            now = time.monotonic()
            for address, stamps in self.applied.items():
                while stamps and now - stamps[0] > FIGHT_WINDOW:
                    stamps.popleft()
                if len(stamps) >= FIGHT_LIMIT:
                    blocked[address] = (f"re-applied {len(stamps)} times in {FIGHT_WINDOW:g} s: something else keeps "
                                        "changing it; run `nicpassctl reconcile` to apply it again")
            blocked.update(self._waiting_for_udev())
        blocked.update(also_blocked or {})
        return make_plan(view.snapshot, view.store.state.devices, view.protected, view.leases.holder(),
                         self.holds.holds, blocked)

    def _waiting_for_udev(self) -> dict[str, str]:
        """Persisted devices udev is still processing (coldplug at boot, hotplug): an automatic
        run leaves them to its rules first — the early-binding helper moves a persisted device
        itself, and two writers racing on one device's driver help nobody — and applies their
        desire when udev announces them processed ("add"), or after UDEV_WAIT seconds."""
        view = self.view
        present = [address for address in view.store.state.devices if address in view.snapshot.functions]
        pending = view.host.udev_pending(present)
        now = time.monotonic()
        self._udev_waiting = {address: self._udev_waiting.get(address, now) for address in pending}
        self._udev_gave_up &= pending
        waiting: dict[str, str] = {}
        for address, since in self._udev_waiting.items():
            if now - since < UDEV_WAIT:
                waiting[address] = "waiting for udev to finish processing it (its rules, early binding among them, run first)"
            elif address not in self._udev_gave_up:
                self._udev_gave_up.add(address)
                log.warning("udev has not processed %s after %.0f s; applying its persisted state anyway", address,
                            now - since, extra={"device": address, "action": "reconcile"})
        if waiting and (self._udev_timer is None or self._udev_timer.when() <= asyncio.get_running_loop().time()):
            delay = UDEV_WAIT - (now - min(self._udev_waiting[address] for address in waiting)) + 0.1
            self._udev_timer = asyncio.get_running_loop().call_later(delay, self.poke)
        return waiting

    def preview(self) -> list[tuple[str, str, str]]:
        """What an explicit run would do now, as ``Reconcile`` rows, without writing anything:
        each step "planned: ...", each desire it would not apply with its reason. Only the first
        pass: what a step makes possible (the binds of the VFs it creates) is planned once it is
        done. The caller holds the mutation lock."""
        view = self.view
        view.refresh_changed()
        moves, findings = find_moves(view.snapshot, view.store.state.devices)
        rows = [(old, Action.FOLLOW.value, f"planned: persisted at {old}, now at {new}") for old, new in moves.items()]
        plan = self.plan(explicit=True)
        rows += [(step.address, step.action.value, f"planned: {step.text}") for step in plan.steps]
        return rows + [outcome.row for outcome in (*findings, *plan.refusals)]

    async def run(self, *, explicit: bool = True) -> list[StepOutcome]:
        """One reconcile run under the mutation lock; returns what was done and not done."""
        view = self.view
        started = time.perf_counter()
        async with self.ops.lock:
            if explicit:
                self.failed.clear()
                self.applied.clear()
            else:
                # An API change pokes this run and releases the lock before it returns; its D-Bus
                # answer goes out from the done-callback of the method's task, queued behind this
                # task's wake-up. One yield puts the re-read of what the change did after the answer.
                self.not_read_yet = True
                try:
                    await asyncio.sleep(0)
                finally:
                    self.not_read_yet = False
            outcomes: list[StepOutcome] = []
            failed_now: dict[str, str] = {}
            plan = Plan()
            fresh = False
            for _ in range(MAX_PASSES):
                view.refresh_changed()
                fresh = True
                moved = await self._follow(outcomes)
                plan = self.plan(explicit=explicit, also_blocked=failed_now)
                if not plan.steps and not moved:
                    break
                if plan.steps:
                    log.info("%s", plan)
                    fresh = False
                for batch in plan.batches():
                    outcomes.extend(await self._apply(batch, failed_now, explicit=explicit))
                if not explicit and not fresh:
                    # Every step was verified as it was applied. What it changed (1,000 new VFs at
                    # boot) is read in, and planned again, by the run its own uevents queued.
                    self._wanted = True
                    break
            if explicit and (not fresh or view.dirty):
                view.refresh_changed()
            self.last_plan = plan
            self._report(plan.refusals)
            await self._publish_early_binding()
            outcomes.extend(refusal for refusal in plan.refusals if refusal.address not in failed_now)
            self.last_outcomes = outcomes
            self.runs += 1
        for listener in list(self.run_listeners):
            listener(outcomes, explicit)
        steps = [o for o in outcomes if o.action is not Action.CHECK]
        if steps:
            log.info("reconcile (%s) took %.1f ms: %d step(s), %d failed", "explicit" if explicit else "automatic",
                     (time.perf_counter() - started) * 1000, len(steps), len([o for o in steps if not o.succeeded]))
        return outcomes

    def _report(self, refusals: list[StepOutcome]) -> None:
        """Desires not applied: logged once per reason, shown as the device's Drift."""
        notes: dict[str, str] = {}
        for refusal in refusals:
            if refusal.error in ("IdentityChanged", "NotFound"):
                if refusal.error == "IdentityChanged" and refusal.action is Action.FOLLOW:
                    notes[refusal.address] = f"not applied: {refusal.message}"
                continue  # the views say it already ("identity changed ..."), Check lists absent ones
            notes[refusal.address] = f"not applied: {refusal.summary}"
        for refusal in refusals:
            if self._logged.get(refusal.address) != refusal.summary:
                level = logging.INFO if refusal.error in (SKIPPED, "NotFound") else logging.WARNING
                log.log(level, "persisted state of %s not applied: %s", refusal.address, refusal.summary,
                        extra={"device": refusal.address, "action": "reconcile"})
        self._logged = {refusal.address: refusal.summary for refusal in refusals}
        if notes != self.view.notes:
            self.view.notes = notes
            self.view.refresh_changed()  # republish the views (Drift) with the new notes

    async def _publish_early_binding(self) -> None:
        """The list the udev helper applies at boot and hotplug (nicpassd/host/early_binding.py): the
        passthrough desires that pass the guard now and whose device (when present) still has the
        identity it was persisted with. A desire that became dangerous is not bound early either."""
        view = self.view
        snapshot, protected = view.snapshot, view.protected
        devices: dict[str, dict[str, str]] = {}
        vf_drivers: dict[str, dict[str, str]] = {}
        vf_counts: dict[str, dict[str, str]] = {}
        for address, desire in view.store.state.devices.items():
            if address in protected:
                continue
            function = snapshot.functions.get(address)
            if function is not None and desire.identity.mismatch(identity_of(function, snapshot)):
                continue
            identity = desire.identity
            if desire.driver in PASSTHROUGH_DRIVERS:
                devices[address] = early_binding.identity_entry(
                    desire.driver, identity.vendor_id, identity.device_id, identity.subsystem_vendor_id,
                    identity.subsystem_device_id, identity.serial)
            if desire.vf_driver in PASSTHROUGH_DRIVERS and desire.num_vfs:
                vf_drivers[address] = early_binding.identity_entry(
                    desire.vf_driver, identity.vendor_id, identity.device_id, identity.subsystem_vendor_id,
                    identity.subsystem_device_id, identity.serial)
            if _count_only(view.store.state.devices, desire):
                vf_counts[address] = early_binding.vf_count_entry(
                    desire.num_vfs, desire.vf_driver, identity.vendor_id, identity.device_id,
                    identity.subsystem_vendor_id, identity.subsystem_device_id, identity.serial)
        try:
            if await asyncio.to_thread(early_binding.write_list, view.host.paths.root, devices, vf_drivers, vf_counts):
                log.info("early-binding list updated: %d function(s), VFs of %d PF(s), VF counts of %d PF(s)",
                         len(devices), len(vf_drivers), len(vf_counts))
        except OSError as exc:
            log.error("cannot write the early-binding list: %s", exc)

    async def _follow(self, outcomes: list[StepOutcome]) -> bool:
        view = self.view
        desires = view.store.state.devices
        moves, findings = find_moves(view.snapshot, desires)
        if not moves:
            return False
        changes: dict[str, DeviceDesire | None] = {}
        for old, new in moves.items():
            desire = desires[old]
            function = view.snapshot.functions[new]
            now = identity_of(function, view.snapshot)
            recorded = desire.identity
            merged = now.model_copy(update={
                name: getattr(recorded, name) for name in ("serial", "permanent_mac", "subsystem_vendor_id",
                                                           "subsystem_device_id")
                if not getattr(now, name)})
            if recorded.physfn:
                merged = merged.model_copy(update={"vf_index": recorded.vf_index})
            changes.setdefault(old, None)
            changes[new] = desire.model_copy(update={"address": new, "identity": merged})
            for address, other in desires.items():  # VFs follow their PF
                if other.identity.physfn == old and address not in moves:
                    current = changes.get(address) or other
                    changes[address] = current.model_copy(
                        update={"identity": current.identity.model_copy(update={"physfn": new})})
        await view.store.commit(changes)
        for old, new in moves.items():
            log.warning("followed %s: the device persisted at %s is now at %s", view.label(new),
                        old, new, extra={"device": new, "action": "follow"})
            outcomes.append(StepOutcome.ok(old, Action.FOLLOW, f"now at {new}"))
        await self.holds.release_async(*moves)
        return True

    async def _apply(self, batch: list[Step], failed_now: dict[str, str], *,
                     explicit: bool) -> list[StepOutcome]:
        view, ops = self.view, self.ops
        first = batch[0]
        addresses = [step.address for step in batch]
        errors: dict[str, NicpassError] = {}
        extra: list[StepOutcome] = []
        try:
            for step in batch:  # the guard, asked again just before the write
                what = {Action.VFS: f"change the VF count of {view.label(step.address)}",
                        Action.VF: f"change the settings of VF {step.count} ({step.address})"}.get(
                            step.action, f"bind {view.label(step.address)} to {step.driver}")
                view.guard_check(step.address, what)  # no force: persisted desires never override
            if first.action is Action.VF:  # the settings of one PF's VFs: one journal entry
                changes = {}
                for step in batch:
                    current = view.snapshot.vf_settings_of(step.address)
                    if current is None:
                        errors[step.address] = NotFound(f"{step.address} reports no VF settings any more")
                    else:
                        changes[step.count] = (VfChange(**dict(step.settings)), current)
                by_index = {step.count: step.address for step in batch}
                results = await ops.set_vf_settings_each(first.pf, changes)
                errors.update({by_index[index]: result for index, result in results.items()
                               if isinstance(result, NicpassError)})
            elif first.action is Action.VFS:
                view.refuse_if_vf_leased(first.address, "change the VFs of")
                claims = await ops.set_vf_count(first.address, first.count, first.driver,  # journaled
                                                dict(first.vf_drivers),
                                                {index: VfChange(**dict(wanted)) for index, wanted in first.vf_settings})
                extra.extend(await self._bind_claims(claims, failed_now, explicit=explicit))
            else:
                errors = await ops.bind_each(addresses, first.driver)  # journaled
        except NicpassError as exc:
            errors = {address: errors.get(address, exc) for address in addresses}
        finally:
            touched = set(addresses) | {step.pf for step in batch if step.pf}
            for address in addresses:
                function = view.host.function(address)
                if function is not None:
                    touched.update(function.virtfns)
            view.mark(touched)
        outcomes = [self._record(step, errors.get(step.address), failed_now, explicit=explicit) for step in batch]
        return outcomes + extra

    def _record(self, step: Step, error: NicpassError | None, failed_now: dict[str, str], *,
                explicit: bool) -> StepOutcome:
        """Log one applied step and remember how it went (fight detection, automatic retries)."""
        address, text = step.address, step.text
        extra = {"device": address, "action": "reconcile"}
        if error is None:
            log.info("reconciled %s: %s", address, text, extra=extra)
            self.applied.setdefault(address, collections.deque()).append(time.monotonic())
            return StepOutcome.ok(address, step.action)
        outcome = StepOutcome.failed(address, step.action, error)
        if self.view.host.function(address) is None:
            # unplugged while it was being changed: nothing failed that could be retried
            log.info("%s went away while being reconciled (%s): %s", address, text, outcome.summary, extra=extra)
            failed_now[address] = f"gone: {outcome.summary}"
        else:
            log.error("reconcile of %s (%s) failed: %s", address, text, outcome.summary, extra=extra)
            failed_now[address] = f"failed: {outcome.summary}"
            if not explicit:
                self.failed[address] = outcome.summary
        return outcome

    async def _bind_claims(self, claims: dict[str, str], failed_now: dict[str, str], *,
                           explicit: bool) -> list[StepOutcome]:
        """The verified binds of the VFs a ``vfs`` step created for a passthrough driver."""
        errors = await self.ops.bind_claims(  # journaled
            claims, lambda vf, driver: self.view.guard_check(vf, f"bind {vf} to {driver}"))
        return [self._record(Step(vf, Action.BIND, f"no driver → {claims[vf]}", driver=claims[vf]), error,
                             failed_now, explicit=explicit) for vf, error in errors.items()]
