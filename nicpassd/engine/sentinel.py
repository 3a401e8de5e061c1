"""The sentinel: the guard on every path into the kernel, not only on nicpassd's own.

nicpassd's API, hooks and reconciler pass the guard; ``virsh attach-device --live``,
``virsh nodedev-detach``, ``driverctl set-override``, ``echo vfio-pci > driver_override`` and
``vfio-pci.ids=`` do not. The sentinel looks at every published inventory (so at the first
uevent of a change: the unbind, or the rtnetlink removal of the interface) and finds:

- a device of the management path or root storage (every function ``GuardMemory`` knows with its
  host driver) no longer on that driver, or with a driver_override: a *violation*, reported at
  ``crit`` with the culprit (the process holding its /dev/vfio group: QEMU's pid and guest name,
  else "unknown writer"), then *healed* when ``[guard] heal`` is on: given back to its host
  driver (override cleared, unbound, reprobed, verified, its netdev awaited) under the mutation
  lock, journaled like every change. A vfio-pci unbind blocks while a process holds the device
  (the kernel asks QEMU to release it): that wait is a kernel-write worker's, with the write
  timeout, never the event loop's. A device the admin persisted for a passthrough driver is
  never fought; something that takes it back again and again is healed ``FIGHT_LIMIT`` times a
  minute at most. What comes back above the NIC (bond, bridge, addresses) is the network
  manager's: the outcome says whether the interface came back;
- a device leased to a VM rebound by someone else: its lease is marked broken.

Each violation is logged, counted, kept as the device's last one and told to the listeners (the
D-Bus ``ProtectionViolated`` signal), once when found and once with the outcome.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

from nicpassd.engine.config import Config
from nicpassd.engine.guard_memory import Remembered
from nicpassd.engine.hostview import HostView
from nicpassd.engine.leases import BROKEN, Lease
from nicpassd.engine.operations import Operations
from nicpassd.errors import Busy, NicpassError
from nicpassd.host.events import UEvent
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS, VFIO
from nicpassd.host.model import PciFunction
from nicpassd.host.vfio_latch import NOBODY

log = logging.getLogger(__name__)

FIGHT_LIMIT = 5
FIGHT_WINDOW = 60.0
DETECTED = "detected"
WAITING = "not healed yet"  # a VM holds it; healed once it lets go
RELEASE_POLL = 1.0


@dataclass(frozen=True)
class Violation:
    """A protected or leased device changed by someone other than nicpassd."""

    address: str
    kind: str  # "management" or "lease"
    interfaces: tuple[str, ...]
    reasons: tuple[str, ...]
    old_driver: str
    new_driver: str
    driver_override: str
    culprit: str  # "qemu-system-x86_64 (pid 1234, guest vm1)" or "unknown writer"
    culprit_pid: int = 0
    guest: str = ""
    vm_uuid: str = ""  # kind "lease": the VM whose lease broke
    detected: float = 0.0
    outcome: str = DETECTED  # then: healed: ..., heal failed: ..., not healed: ..., lease marked broken

    @property
    def summary(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.detected))
        now = self.new_driver or "no driver"
        if self.driver_override and self.driver_override != self.new_driver:
            now += f", driver_override {self.driver_override}"
        return f"{when}: taken from {self.old_driver or 'no driver'} (now {now}) by {self.culprit}: {self.outcome}"


class Sentinel:
    def __init__(self, view: HostView, ops: Operations, config: Callable[[], Config],
                 leases_changed: Callable[[Lease, str], None]) -> None:
        self.view = view
        self.ops = ops
        self._config = config
        self._leases_changed = leases_changed
        self.active: dict[str, Violation] = {}  # violations not over yet (device not back)
        self.last: dict[str, Violation] = {}  # the last violation of each device, for guard/show
        self.count = 0  # violations found since start (the metrics' counter)
        self.listeners: list[Callable[[Violation], None]] = []
        self.healing = False  # the daemon turns it on once the boot recovery is done
        self.fight_limit = FIGHT_LIMIT  # heals of one device per FIGHT_WINDOW
        self._heals: dict[str, collections.deque[float]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._breaking: set[str] = set()  # lease ids being marked broken
        self._in_heal: set[str] = set()  # devices nicpassd is giving back right now: their heal settles them
        self._unreported: dict[str, Violation] = {}  # found, heal started, "detected" not yet reported
        self._waiters: dict[str, asyncio.Task] = {}  # devices a VM holds: healed when it lets go
        view.listeners.append(lambda _delta: self.look())

    # --------------------------------------------------------------- detection
    def on_event(self, event: UEvent) -> None:
        """The first kernel event of someone else's change to a management device (its unbind,
        or its bind to another driver), acted on at once: its driver link is one read, and
        the heal starts before the refresh the event also causes (routing, sessions, the guard,
        the D-Bus properties) — its latency is the management network's outage. ``look`` then
        finds the violation already known."""
        if event.subsystem != "pci" or event.action not in ("unbind", "bind"):
            return
        address = event.sys_name
        entry = self.view.memory.entries.get(address)
        function = self.view.snapshot.functions.get(address)
        if (entry is None or not entry.driver or function is None or address in self.active
                or address in self._in_heal or address not in self.view.protected):
            return
        if event.action == "bind" and event.driver == entry.driver:
            return
        # The driver link only: driver_override's read takes the device lock, which the kernel
        # may still hold right after an unbind's uevent; the heal reads it under nicpassd's lock.
        driver = self.view.host.driver_of(address)
        if driver == entry.driver:
            return
        self._found(self._violation(address, entry, replace(function, driver=driver)))

    def look(self) -> None:
        """Compare what is protected or leased with what the kernel shows (after every publish)."""
        snapshot, memory = self.view.snapshot, self.view.memory
        seen: set[str] = set()
        for address, entry in memory.entries.items():
            function = snapshot.functions.get(address)
            if function is None or not entry.driver or address not in self.view.protected:
                continue
            if function.driver == entry.driver and function.driver_override in ("", entry.driver):
                continue  # on its host driver
            seen.add(address)
            if address not in self.active:
                self._found(self._violation(address, entry, function))
        for address in [a for a, v in self.active.items() if v.kind == "management" and a not in seen]:
            violation = self.active.pop(address)  # back on its host driver (healed, or given back by someone)
            waiting = violation.outcome == DETECTED or violation.outcome.startswith(WAITING)
            if waiting and address not in self._in_heal:
                # Given back before nicpassd's heal got to it (libvirt reattaching after a failed
                # hot-attach, an admin's own undo): the report must not stay "detected" for ever.
                function = snapshot.functions[address]
                self._settle(violation, f"back on {function.driver} before nicpassd healed it (given back by "
                                        "someone else)")
        self._look_at_leases()

    def _violation(self, address: str, entry: Remembered, function: PciFunction) -> Violation:
        culprit, pid, guest = self._culprit(function)
        return Violation(address, "management", entry.interfaces, self.view.protected.reasons(address),
                         entry.driver, function.driver, function.driver_override, culprit, pid, guest,
                         detected=time.time())

    def _culprit(self, function: PciFunction, driver: str | None = None) -> tuple[str, int, str]:
        """Who has it, as far as the kernel and libvirt let us see (``Host.vfio_holder``)."""
        host = self.view.host
        driver = function.driver if driver is None else driver
        if driver not in PASSTHROUGH_DRIVERS:
            # Unbound, or on another host driver: no VM has it (libvirt puts a device in a domain's
            # live XML once QEMU holds it through vfio-pci). Reading every running domain's status
            # XML here cost the heal ~20 ms under TCG; the heal looks again if vfio-pci took it.
            return NOBODY, 0, ""
        return host.vfio_holder(function.address, function.iommu_group if driver == VFIO else -1)

    def _found(self, violation: Violation) -> None:
        self.count += 1
        self.active[violation.address] = violation
        if violation.kind == "management" and self._config().guard.heal and self.healing:
            # The heal first, up to its first kernel write; the report (the journal's structured
            # entry, the D-Bus signal: ~10 ms under TCG) while the kernel probes.
            self._unreported[violation.address] = violation
            self._spawn(self._heal(violation.address))
            asyncio.get_running_loop().call_soon(self._report_found, violation.address)
            return
        self._report(violation)
        if violation.kind == "management" and not self._config().guard.heal:
            self._settle(violation, "not healed: [guard] heal is off; give it back with "
                                    f"`nicpassctl unbind {violation.address}`")

    def _look_at_leases(self) -> None:
        snapshot = self.view.snapshot
        for lease in list(self.view.leases.leases.values()):
            if lease.state == BROKEN or lease.lease_id in self._breaking:
                continue
            broken = [address for address in lease.devices if address in snapshot.functions
                      and snapshot.functions[address].driver not in PASSTHROUGH_DRIVERS]
            if not broken:
                continue
            function = snapshot.functions[broken[0]]
            violation = Violation(broken[0], "lease", function.interfaces, (f"leased to VM {lease.vm_name}",), VFIO,
                                  function.driver, function.driver_override, NOBODY,
                                  vm_uuid=lease.vm_uuid, detected=time.time(),
                                  outcome=f"lease of VM {lease.vm_name} marked broken")
            self.count += 1
            self.last[violation.address] = violation
            self._report(violation)
            self._breaking.add(lease.lease_id)
            self._spawn(self._break(lease))

    async def _break(self, lease: Lease) -> None:
        try:
            async with self.ops.lock:
                current = self.view.leases.leases.get(lease.lease_id)
                if current is None or current.state == BROKEN:
                    return
                current.state = BROKEN
                self.view.leases.update(current, save=False)
                await self.view.leases.save_async()
        finally:
            self._breaking.discard(lease.lease_id)
        self._leases_changed(current, BROKEN)

    # ------------------------------------------------------------------ report
    def _report(self, violation: Violation) -> None:
        self.last[violation.address] = violation
        name = f"{violation.address} ({', '.join(violation.interfaces)})" if violation.interfaces else violation.address
        if violation.outcome == DETECTED or violation.kind == "lease":
            log.critical("%s %s was taken from %s by %s: now %s%s; it is protected (%s)", "leased device" if
                         violation.kind == "lease" else "host-critical device", name,
                         violation.old_driver or "no driver", violation.culprit, violation.new_driver or "no driver",
                         f", driver_override {violation.driver_override}" if violation.driver_override else "",
                         "; ".join(violation.reasons) or "-", extra=self._fields(violation))
        else:
            level = logging.INFO if violation.outcome.startswith("healed") else logging.CRITICAL
            log.log(level, "%s: %s", name, violation.outcome, extra=self._fields(violation))
        for listener in list(self.listeners):
            listener(violation)

    @staticmethod
    def _fields(violation: Violation) -> dict[str, object]:
        return {"device": violation.address, "action": "guard-violation", "interface": ",".join(violation.interfaces),
                "old_driver": violation.old_driver, "new_driver": violation.new_driver,
                "culprit": violation.culprit, "culprit_pid": violation.culprit_pid, "guest": violation.guest,
                "reasons": "; ".join(violation.reasons), "outcome": violation.outcome}

    def _report_found(self, address: str) -> None:
        violation = self._unreported.pop(address, None)
        if violation is not None:
            self._report(violation)

    def _settle(self, violation: Violation, outcome: str) -> None:
        self._report_found(violation.address)  # "detected" always comes first
        done = replace(violation, outcome=outcome)
        if violation.address in self.active:
            self.active[violation.address] = done
        self._report(done)

    # -------------------------------------------------------------------- heal
    def start_healing(self) -> None:
        """From now on heal (at start: after the undo journal; the boot heals what it found)."""
        self.healing = True
        if self._config().guard.heal:
            for violation in list(self.active.values()):
                if violation.kind == "management" and violation.outcome == DETECTED:
                    self._spawn(self._heal(violation.address))

    async def _heal(self, address: str) -> None:
        view, ops, host = self.view, self.ops, self.view.host
        async with ops.lock:
            violation = self.active.get(address)
            entry = view.memory.entries.get(address)
            if violation is None or entry is None:
                return
            desire = view.store.get(address)
            if desire is not None and desire.driver in PASSTHROUGH_DRIVERS:
                self._settle(violation, f"not healed: persisted for {desire.driver} by an admin")
                return
            stamps = self._heals.setdefault(address, collections.deque())
            now = time.monotonic()
            while stamps and now - stamps[0] > FIGHT_WINDOW:
                stamps.popleft()
            if len(stamps) >= self.fight_limit:
                self._settle(violation, f"not healed: taken {len(stamps)} times in {FIGHT_WINDOW:g} s; "
                                        "find what keeps taking it")
                return
            stamps.append(now)
            function = view.snapshot.functions.get(address)
            if function is not None and host.driver_of(address) == VFIO:  # QEMU may have opened it meanwhile
                culprit, pid, guest = self._culprit(function, VFIO)
                if pid:
                    violation = replace(violation, culprit=culprit, culprit_pid=pid, guest=guest)
            # Refreshes while it binds (events) see the device back: the heal, not look(), settles it.
            self._in_heal.add(address)
            try:
                # What the heal verified: read again after the journal's writes, the link may already
                # show the next step of the writer it answered (libvirt's probe of vfio-pci).
                outcome = f"healed: back on {await ops.give_back(address)}"  # journaled; blocks in a worker
                if violation.interfaces:
                    outcome += await self._netdev_back(address, violation.interfaces)
            except Busy as exc:  # a VM holds it: nothing was written (nicpassd.host.vfio_latch)
                stamps.pop()
                if function is not None and not violation.culprit_pid:  # libvirt's status file may be there now
                    culprit, pid, guest = self._culprit(function, VFIO)
                    violation = replace(violation, culprit=culprit, culprit_pid=pid, guest=guest)
                self._wait_for_release(violation, exc)
                return
            except NicpassError as exc:
                outcome = f"heal failed: {exc.message}"
            finally:
                self._in_heal.discard(address)
            self._settle(violation, outcome)
            view.mark([address])
            view.refresh_changed()

    def _wait_for_release(self, violation: Violation, busy: Busy) -> None:
        """A VM holds the device through VFIO: taking it off vfio-pci now would block in the kernel,
        the device locked, until the VM lets go (and journald and udevd behind it). Say so, once,
        then look at its group every ``RELEASE_POLL`` seconds at most (a VFIO close sends no
        uevent) and heal as soon as nothing holds it: the VM stopped, or the device was detached."""
        address = violation.address
        if not violation.outcome.startswith(WAITING):
            self._settle(violation, self._waiting(busy))
        if address not in self._waiters:
            self._waiters[address] = asyncio.get_running_loop().create_task(self._heal_when_released(address))

    async def _heal_when_released(self, address: str) -> None:
        try:
            delay = 0.05
            while (violation := self.active.get(address)) is not None and violation.outcome.startswith(WAITING):
                await asyncio.sleep(delay)
                delay = min(delay * 2, RELEASE_POLL)
                busy = self.view.host.vfio_busy(address)
                if busy is None:
                    self._spawn(self._heal(address))
                    return
                if violation.culprit == NOBODY:
                    self._name_late(violation, busy)
        finally:
            self._waiters.pop(address, None)

    def _name_late(self, violation: Violation, busy: Busy) -> None:
        """QEMU opened the device in the middle of libvirt's hot-attach: the status file that names
        the domain comes a moment later. Once it does, the wait is reported again, naming it."""
        function = self.view.snapshot.functions.get(violation.address)
        if function is None:
            return
        culprit, pid, guest = self._culprit(function, VFIO)
        if culprit != NOBODY:
            self._settle(replace(violation, culprit=culprit, culprit_pid=pid, guest=guest), self._waiting(busy))

    @staticmethod
    def _waiting(busy: Busy) -> str:
        return f"{WAITING}: {busy.message}; nicpassd gives it back as soon as it is let go ({busy.remedy})"

    async def _netdev_back(self, address: str, wanted: tuple[str, ...]) -> str:
        deadline = time.monotonic() + max(self._config().daemon.bind_verify_timeout, 1.0)
        interval = 0.002
        while True:
            interfaces = self.view.host.interfaces_of(address)
            if interfaces or time.monotonic() >= deadline:
                break
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.05)
        if not interfaces:
            return f"; its interface {', '.join(wanted)} did not come back"
        return f", {', '.join(interfaces)} is back (bond, bridge and addresses are the network manager's to restore)"

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("guard: healing failed unexpectedly", exc_info=task.exception())

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def idle(self) -> None:
        """Wait for every heal in progress (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        for task in [*self._tasks, *self._waiters.values()]:
            task.cancel()
