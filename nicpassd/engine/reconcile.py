"""The reconciler: desired state (state.json) vs what the kernel shows → a plan → applied, verified.

A run, always under the engine's mutation lock (never concurrent with an API change):

1. re-read what changed (``Engine.refresh_changed``);
2. follow moved cards: a persisted device whose serial number or permanent MAC shows up at
   another address is re-keyed there (one store commit, logged); VF desires follow their PF;
3. make a ``Plan``: explicit, printable ``Step``s (``vfs``: set a PF's VF count; ``bind``: move a
   function to its desired driver) and ``Finding``s for desires that are *not* applied, with the
   reason — the device is not the one persisted (``IdentityChanged``), protected by the guard
   (``Protected``), leased (``Busy``), changed with ``--runtime``, absent, or held after a failure;
4. apply the steps one by one through the engine's own kernel-rule code (``_apply_vf_count``:
   skip if equal, autoprobe off for vfio-pci VFs, 0 then N, wait for ``virtfnN``, verify;
   ``_bind_batch``: driver_override, unbind, drivers_probe, verify), each journaled and each
   re-checked against the guard (``refuse_if_protected``) just before it runs;
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Container

from nicpassd import early_binding
from nicpassd.engine.guard import ProtectedSet, refuse_if_protected
from nicpassd.engine.journal import Entry
from nicpassd.engine.store import DeviceDesire, identity_of
from nicpassd.errors import NicpassError
from nicpassd.host.events import UEvent
from nicpassd.host.model import HostSnapshot, PciFunction

if TYPE_CHECKING:
    from nicpassd.engine.engine import Engine

log = logging.getLogger(__name__)

VFIO = "vfio-pci"
PASSTHROUGH_DRIVERS = ("vfio-pci", "pci-stub")
MAX_PASSES = 4
FIGHT_LIMIT = 5
FIGHT_WINDOW = 60.0
# How long an automatic run leaves a device to udev's rules before applying its desire anyway
UDEV_WAIT = 60.0
RELEVANT = {"pci": ("add", "remove", "bind", "unbind", "change", "move"), "net": ("add", "remove", "move"),
            "": ("overflow",)}  # uevents were lost: anything may have happened


# -------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Step:
    address: str
    action: str  # follow, vfs, bind
    text: str
    count: int = 0
    driver: str = ""
    target: str = ""  # follow: the new address
    pf: str = ""  # bind of a VF: its PF (the VFs of one PF are bound in one batch)
    # vfs: single VFs persisted on a passthrough driver, (VF index, driver): created with the
    # PF's autoprobe off and bound explicitly (kernel rules §5), never raced by their host driver
    vf_drivers: tuple[tuple[int, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.address}  {self.action:<6} {self.text}"


@dataclass(frozen=True)
class Finding:
    """A desire that is not applied, and why. ``error`` is an error name of the contract where one
    fits (IdentityChanged, Protected, Busy, NotSupported, InvalidArgument, NotFound, KernelError),
    else ``skipped``."""

    address: str
    action: str
    error: str
    message: str

    @property
    def result(self) -> str:
        return f"{self.error}: {self.message}"

    def __str__(self) -> str:
        return f"{self.address}  {self.action:<6} not applied: {self.result}"


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"reconcile plan: {len(self.steps)} step(s)"]
        lines += [f"  {step}" for step in self.steps]
        lines += [f"  {finding}" for finding in self.findings]
        return "\n".join(lines)

    def batches(self) -> list[list[Step]]:
        """Steps in order, the consecutive binds of one PF's VFs to one driver grouped."""
        batches: list[list[Step]] = []
        for step in self.steps:
            last = batches[-1] if batches else None
            if (last is not None and step.action == "bind" and step.pf and last[0].action == "bind"
                    and last[0].pf == step.pf and last[0].driver == step.driver):
                last.append(step)
            else:
                batches.append([step])
        return batches


@dataclass(frozen=True)
class Outcome:
    address: str
    action: str
    result: str  # "ok", or "<ErrorName>: sentence"


def _label(function: PciFunction) -> str:
    return f"{function.address} ({', '.join(function.interfaces)})" if function.interfaces else function.address


def satisfied(function: PciFunction, driver: str) -> bool:
    """Is ``function`` on ``driver`` the way a verified bind leaves it (override included)?"""
    if driver in PASSTHROUGH_DRIVERS:
        return function.driver == driver and function.driver_override == driver
    return function.driver == driver


def desired_driver(snapshot: HostSnapshot, desires: dict[str, DeviceDesire], address: str) -> tuple[str, str]:
    """(driver, address of the desire it comes from): its own, or for a VF its PF's ``vf_driver``."""
    own = desires.get(address)
    if own is not None and own.driver:
        return own.driver, address
    function = snapshot.functions.get(address)
    if function is not None and function.physfn:
        parent = desires.get(function.physfn)
        if parent is not None and parent.vf_driver:
            return parent.vf_driver, function.physfn
    return "", ""


def _vf_claims(desires: dict[str, DeviceDesire], pf: str, count: int) -> tuple[tuple[int, str], ...]:
    """(index, driver) of the VF desires of ``pf`` on a passthrough driver among its first ``count``."""
    return tuple(sorted((desire.identity.vf_index, desire.driver) for desire in desires.values()
                        if desire.identity.physfn == pf and desire.driver in PASSTHROUGH_DRIVERS
                        and 0 <= desire.identity.vf_index < count))


def make_plan(snapshot: HostSnapshot, desires: dict[str, DeviceDesire], protected: ProtectedSet,
              leased: dict[str, str], holds: Container[str], blocked: dict[str, str]) -> Plan:
    """Pure: what to do to bring the kernel to ``desires``, and what not to do, and why."""
    plan = Plan()
    refused: set[str] = set()  # desires not applied: the VFs inheriting from them are not either
    recreating: set[str] = set()  # PFs whose VFs a step re-creates: their binds wait a pass

    def guard_problem(address: str, action: str) -> str:
        try:
            refuse_if_protected(protected, address, action)
        except NicpassError as exc:
            return exc.message
        return ""

    def refuse(address: str, action: str, error: str, message: str) -> None:
        plan.findings.append(Finding(address, action, error, message))
        refused.add(address)

    for address, desire in desires.items():
        function = snapshot.functions.get(address)
        if function is None:
            if not desire.identity.physfn:  # a VF desire waits for its PF to create the VF
                refuse(address, "check", "NotFound", f"persisted device {address} is not present")
            continue
        label = _label(function)
        changed = desire.identity.mismatch(identity_of(function, snapshot))
        if changed:
            refuse(address, "check", "IdentityChanged",
                   f"{label} is not the device that was persisted ({changed}); its desired state is kept, "
                   f"not applied: `nicpassctl forget {address}` if the card was replaced on purpose")
            continue
        if address in holds:
            refuse(address, "check", "skipped", f"{label} was changed with --runtime; left as it is until it is "
                                                "re-plugged or the host reboots")
            continue
        if address in blocked:
            refuse(address, "check", "skipped", blocked[address])
            continue
        if desire.num_vfs is None or desire.num_vfs == function.num_vfs:
            continue
        action = f"change the VF count of {label}"
        problem = guard_problem(address, action)
        if problem:
            refuse(address, "vfs", "Protected", problem)
        elif not function.sriov_capable:
            refuse(address, "vfs", "NotSupported", f"{label} is not an SR-IOV physical function")
        elif desire.num_vfs > function.total_vfs:
            refuse(address, "vfs", "InvalidArgument",
                   f"{label} supports at most {function.total_vfs} VFs; {desire.num_vfs} are persisted")
        elif any(member in leased for member in (address, *function.virtfns)):
            vm = next(leased[m] for m in (address, *function.virtfns) if m in leased)
            refuse(address, "vfs", "Busy", f"cannot {action}: a VF is leased to VM {vm}")
        else:
            where = f" on {desire.vf_driver}" if desire.vf_driver and desire.num_vfs else ""
            vf_drivers = () if desire.vf_driver in PASSTHROUGH_DRIVERS else _vf_claims(desires, address, desire.num_vfs)
            if vf_drivers:
                where += " (" + ", ".join(f"VF {index} on {driver}" for index, driver in vf_drivers) + ")"
            plan.steps.append(Step(address, "vfs", f"{function.num_vfs} → {desire.num_vfs} VFs{where}",
                                   count=desire.num_vfs, driver=desire.vf_driver, vf_drivers=vf_drivers))
            recreating.add(address)

    for address, function in snapshot.functions.items():
        wanted, source = desired_driver(snapshot, desires, address)
        if not wanted or source in refused or function.physfn in recreating or satisfied(function, wanted):
            continue
        label = _label(function)
        if address in holds:
            refuse(address, "bind", "skipped", f"{label} was changed with --runtime; left as it is")
            continue
        if address in blocked:
            refuse(address, "bind", "skipped", blocked[address])
            continue
        if address in leased:
            refuse(address, "bind", "Busy", f"{label} is leased to VM {leased[address]}")
            continue
        problem = guard_problem(address, f"bind {label} to {wanted}")
        if problem:
            refuse(address, "bind", "Protected", problem)
        elif function.num_vfs and wanted in PASSTHROUGH_DRIVERS:
            refuse(address, "bind", "InvalidArgument",
                   f"{label} has {function.num_vfs} VFs; unbinding its PF driver would orphan them")
        else:
            plan.steps.append(Step(address, "bind", f"{function.driver or 'no driver'} → {wanted}",
                                   driver=wanted, pf=function.physfn))
    return plan


def find_moves(snapshot: HostSnapshot, desires: dict[str, DeviceDesire]) -> tuple[dict[str, str], list[Finding]]:
    """Persisted devices found at another address: {old address: new address}, and ambiguities.

    A PF or plain function moves when its serial number (same function number) or permanent MAC
    is seen at exactly one other address that no other desire claims. A VF desire moves to the
    address of ``virtfnN`` of its PF (its index is its identity)."""
    moves: dict[str, str] = {}
    findings: list[Finding] = []
    identities = {}

    def identity(address: str):
        if address not in identities:
            identities[address] = identity_of(snapshot.functions[address], snapshot)
        return identities[address]

    def at_home(address: str) -> bool:
        return address in snapshot.functions and not desires[address].identity.mismatch(identity(address))

    for address, desire in desires.items():
        recorded = desire.identity
        if recorded.physfn or at_home(address) or not (recorded.serial or recorded.permanent_mac):
            continue
        candidates = [other for other, function in snapshot.functions.items()
                      if other != address and not function.physfn
                      and recorded.same_card(address, identity(other), other)
                      and not (other in desires and at_home(other))]
        if len(candidates) == 1:
            moves[address] = candidates[0]
        elif len(candidates) > 1:
            findings.append(Finding(address, "follow", "IdentityChanged",
                                    f"the card persisted at {address} matches {', '.join(candidates)}; not followed"))
    targets = collections.Counter(moves.values())
    for old, new in list(moves.items()):
        clash = targets[new] > 1 or (new in desires and new not in moves)
        if clash:
            del moves[old]
            findings.append(Finding(old, "follow", "IdentityChanged",
                                    f"the card persisted at {old} is now at {new}, which holds another persisted "
                                    "desire; not followed"))
    for address, desire in desires.items():
        recorded = desire.identity
        if not recorded.physfn or recorded.vf_index < 0:
            continue
        parent = snapshot.functions.get(moves.get(recorded.physfn, recorded.physfn))
        if parent is None or recorded.vf_index >= len(parent.virtfns):
            continue
        new = parent.virtfns[recorded.vf_index]
        if new != address and new not in desires:
            moves[address] = new
    return moves, findings


# ---------------------------------------------------------------------------- the reconciler
class Reconciler:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.auto = False  # react to uevents and API changes (the daemon turns it on)
        self.notes: dict[str, str] = {}  # address -> why its desire is not applied (views' Drift)
        self.failed: dict[str, str] = {}  # automatic runs leave these alone (until re-plugged)
        self.applied: dict[str, collections.deque[float]] = {}
        self.last_plan = Plan()
        self.last_outcomes: list[Outcome] = []
        self.runs = 0
        self._wanted = False
        self._task: asyncio.Task | None = None
        self._logged: dict[str, str] = {}
        self._udev_waiting: dict[str, float] = {}  # address -> when a run first found it unprocessed
        self._udev_timer: asyncio.TimerHandle | None = None
        self._udev_gave_up: set[str] = set()

    # ------------------------------------------------------------------ triggers
    def note(self, event: UEvent) -> None:
        """Called by the engine for every uevent, before the coalesced refresh."""
        if event.action not in RELEVANT.get(event.subsystem, ()):
            return
        if event.subsystem == "pci":
            if event.action == "add":
                self.failed.pop(event.sys_name, None)
                self.applied.pop(event.sys_name, None)
            elif event.action == "remove":
                self.engine.holds.release(event.sys_name)  # a runtime change ends with its device
        self._wanted = True

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

    async def idle(self) -> None:
        """Wait until no automatic run is pending (tests, benchmarks)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    # --------------------------------------------------------------------- runs
    def plan(self, *, explicit: bool, also_blocked: dict[str, str] | None = None) -> Plan:
        engine = self.engine
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
        return make_plan(engine.snapshot, engine.store.state.devices, engine.protected, engine.leases.holder(),
                         engine.holds.holds, blocked)

    def _waiting_for_udev(self) -> dict[str, str]:
        """Persisted devices udev is still processing (coldplug at boot, hotplug): an automatic
        run leaves them to its rules first — the early-binding helper moves a persisted device
        itself, and two writers racing on one device's driver help nobody — and applies their
        desire when udev announces them processed ("add"), or after UDEV_WAIT seconds."""
        engine = self.engine
        present = [address for address in engine.store.state.devices if address in engine.snapshot.functions]
        pending = engine.host.udev_pending(present)
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

    async def run(self, *, explicit: bool = True) -> list[Outcome]:
        """One reconcile run under the mutation lock; returns what was done and not done."""
        engine = self.engine
        started = time.perf_counter()
        async with engine._lock:
            if explicit:
                self.failed.clear()
                self.applied.clear()
            outcomes: list[Outcome] = []
            failed_now: dict[str, str] = {}
            plan = Plan()
            fresh = False
            for _ in range(MAX_PASSES):
                engine.refresh_changed()
                fresh = True
                moved = self._follow(outcomes)
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
            if explicit and (not fresh or engine.inventory.dirty):
                engine.refresh_changed()
            self.last_plan = plan
            self._report(plan.findings)
            self._publish_early_binding()
            outcomes.extend(Outcome(f.address, f.action, f.result) for f in plan.findings
                            if f.address not in failed_now)
            self.last_outcomes = outcomes
            self.runs += 1
        steps = [o for o in outcomes if o.action in ("vfs", "bind", "follow")]
        if steps:
            log.info("reconcile (%s) took %.1f ms: %d step(s), %d failed", "explicit" if explicit else "automatic",
                     (time.perf_counter() - started) * 1000, len(steps), len([o for o in steps if o.result != "ok"]))
        return outcomes

    def _report(self, findings: list[Finding]) -> None:
        """Desires not applied: logged once per reason, shown as the device's Drift."""
        notes: dict[str, str] = {}
        for finding in findings:
            if finding.error in ("IdentityChanged", "NotFound"):
                if finding.error == "IdentityChanged" and finding.action == "follow":
                    notes[finding.address] = f"not applied: {finding.message}"
                continue  # the views say it already ("identity changed ..."), Check lists absent ones
            notes[finding.address] = f"not applied: {finding.result}"
        for finding in findings:
            if self._logged.get(finding.address) != finding.result:
                level = logging.INFO if finding.error in ("skipped", "NotFound") else logging.WARNING
                log.log(level, "persisted state of %s not applied: %s", finding.address, finding.result,
                        extra={"device": finding.address, "action": "reconcile"})
        self._logged = {finding.address: finding.result for finding in findings}
        if notes != self.notes:
            self.notes = notes
            self.engine.refresh_changed()  # republish the views (Drift) with the new notes

    def _publish_early_binding(self) -> None:
        """The list the udev helper applies at boot and hotplug (nicpassd/early_binding.py): the
        passthrough desires that pass the guard now and whose device (when present) still has the
        identity it was persisted with. A desire that became dangerous is not bound early either."""
        engine = self.engine
        snapshot, protected = engine.snapshot, engine.protected
        devices: dict[str, dict[str, str]] = {}
        vf_drivers: dict[str, dict[str, str]] = {}
        for address, desire in engine.store.state.devices.items():
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
        try:
            if early_binding.write_list(engine.host.paths.root, devices, vf_drivers):
                log.info("early-binding list updated: %d function(s), VFs of %d PF(s)", len(devices), len(vf_drivers))
        except OSError as exc:
            log.error("cannot write the early-binding list: %s", exc)

    def _follow(self, outcomes: list[Outcome]) -> bool:
        engine = self.engine
        desires = engine.store.state.devices
        moves, findings = find_moves(engine.snapshot, desires)
        if not moves:
            return False
        changes: dict[str, DeviceDesire | None] = {}
        for old, new in moves.items():
            desire = desires[old]
            function = engine.snapshot.functions[new]
            now = identity_of(function, engine.snapshot)
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
        engine.store.apply(changes)
        for old, new in moves.items():
            log.warning("followed %s: the device persisted at %s is now at %s", _label(engine.snapshot.functions[new]),
                        old, new, extra={"device": new, "action": "follow"})
            outcomes.append(Outcome(old, "follow", f"ok: now at {new}"))
        engine.holds.release(*moves)
        return True

    async def _apply(self, batch: list[Step], failed_now: dict[str, str], *, explicit: bool) -> list[Outcome]:
        engine = self.engine
        first = batch[0]
        addresses = [step.address for step in batch]
        results: dict[str, str] = {}
        extra: list[Outcome] = []
        try:
            for step in batch:  # the guard, asked again just before the write
                function = engine.snapshot.functions.get(step.address)
                what = (f"change the VF count of {_label(function) if function else step.address}"
                        if step.action == "vfs" else f"bind {_label(function) if function else step.address} "
                                                     f"to {step.driver}")
                engine.guard_check(step.address, what)  # no force: persisted desires never override
            if first.action == "vfs":
                engine._refuse_if_leased([first.address, *engine._present(first.address).virtfns], "change the VFs of")
                claims = await engine._apply_vf_count(first.address, first.count, first.driver,  # journaled
                                                      dict(first.vf_drivers))
                results[first.address] = "ok"
                extra.extend(await self._bind_claims(claims, failed_now, explicit=explicit))
            else:
                errors = await engine._bind_batch(addresses, first.driver)  # journaled
                for address in addresses:
                    error = errors.get(address)
                    results[address] = "ok" if error is None else f"{error.name}: {error.message}"
        except NicpassError as exc:
            for address in addresses:
                results.setdefault(address, f"{exc.name}: {exc.message}")
        finally:
            touched = set(addresses)
            for address in addresses:
                function = engine.host.function(address)
                if function is not None:
                    touched.update(function.virtfns)
            engine.inventory.mark(touched)
        outcomes = [self._record(step.address, step.action, step.text, results[step.address], failed_now,
                                 explicit=explicit) for step in batch]
        return outcomes + extra

    def _record(self, address: str, action: str, text: str, result: str, failed_now: dict[str, str], *,
                explicit: bool) -> Outcome:
        """Log one applied step and remember how it went (fight detection, automatic retries)."""
        extra = {"device": address, "action": "reconcile"}
        if result == "ok":
            log.info("reconciled %s: %s", address, text, extra=extra)
            self.applied.setdefault(address, collections.deque()).append(time.monotonic())
        elif self.engine.host.function(address) is None:
            # unplugged while it was being changed: nothing failed that could be retried
            log.info("%s went away while being reconciled (%s): %s", address, text, result, extra=extra)
            failed_now[address] = f"gone: {result}"
        else:
            log.error("reconcile of %s (%s) failed: %s", address, text, result, extra=extra)
            failed_now[address] = f"failed: {result}"
            if not explicit:
                self.failed[address] = result
        return Outcome(address, action, result)

    async def _bind_claims(self, claims: dict[str, str], failed_now: dict[str, str], *,
                           explicit: bool) -> list[Outcome]:
        """The verified binds of the VFs a ``vfs`` step created for a passthrough driver."""
        engine = self.engine
        by_driver: dict[str, list[str]] = {}
        for vf, driver in claims.items():
            by_driver.setdefault(driver, []).append(vf)
        outcomes = []
        for driver, vfs in by_driver.items():
            try:
                for vf in vfs:
                    engine.guard_check(vf, f"bind {vf} to {driver}")
                errors = await engine._bind_batch(vfs, driver)  # journaled
            except NicpassError as exc:
                errors = {vf: exc for vf in vfs}
            for vf in vfs:
                error = errors.get(vf)
                result = "ok" if error is None else f"{error.name}: {error.message}"
                outcomes.append(self._record(vf, "bind", f"no driver → {driver}", result, failed_now,
                                             explicit=explicit))
        return outcomes


# ------------------------------------------------------------------------------ recovery
def _finished(engine: "Engine", entry: Entry) -> bool:
    """A prepare whose lease was written had completed (only dropping its entry was left)."""
    if entry.kind != "prepare" or not entry.vm_uuid:
        return False
    holder = engine.leases.holder()
    return bool(entry.devices) and all(holder.get(address) == entry.vm_uuid for address in entry.devices)


async def _restore_vf_overrides(engine: "Engine", address: str, before) -> str:
    """``_restore_vfs`` puts each VF back on its driver; a crash between a VF's driver_override write
    and its rebind also leaves an override to take back (the driver never changed)."""
    notes = []
    function = engine.host.function(address)
    if function is None or function.num_vfs != before.function.num_vfs:
        return ""
    for vf, old_driver, old_override in zip(function.virtfns, before.vf_drivers, before.vf_overrides):
        now = engine._binding_of(vf)
        if (now.driver, now.driver_override) != (old_driver, old_override):
            wanted = PciFunction(vf, "", "", "", "", "", driver=old_driver, driver_override=old_override)
            notes.append(f"{vf}: {await engine._restore_binding(vf, wanted)}")
    return "; " + "; ".join(notes) if notes else ""


async def recover(engine: "Engine") -> list[str]:
    """Roll back the changes a crash interrupted (the journal's entries); at start, before the
    boot reconcile. Returns one line per entry."""
    entries = engine.journal.pending()
    if not entries:
        return []
    done = []
    async with engine._lock:
        engine.refresh()
        engine.journal_depth = 1  # restoring is not itself journaled: the entry stays until done
        try:
            for entry in entries:
                if _finished(engine, entry):
                    log.info("the interrupted %s had completed", entry.describe())
                    engine.journal.end(entry)
                    done.append(f"finished {entry.describe()}")
                    continue
                log.warning("rolling back the interrupted %s", entry.describe())
                for address, before in entry.devices.items():
                    if engine.host.function(address) is None:
                        log.warning("%s is gone: nothing to roll back", address)
                        continue
                    try:
                        if entry.kind == "vf-count":
                            note = await engine._restore_vfs(address, before.function, before.vf_drivers)
                            note += await _restore_vf_overrides(engine, address, before)
                        else:
                            note = await engine._restore_binding(address, before.function)
                    except NicpassError as exc:
                        note = f"rolling back failed: {exc}"
                    log.info("%s: %s", address, note, extra={"device": address, "action": "recover"})
                engine.journal.end(entry)
                done.append(f"rolled back {entry.describe()}")
        finally:
            engine.journal_depth = 0
        engine.refresh()
    return done
