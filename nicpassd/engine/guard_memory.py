"""Protection that remembers: the host's management path outlives the kernel state it came from.

The guard computes the protected set from what the kernel shows now. The moment the management
NIC is taken — by a sysfs write, ``virsh nodedev-detach``, ``driverctl``, a ``virsh attach-device
--live``, or at boot by ``vfio-pci.ids=`` — its netdev and routes vanish, and a guard of the
present alone would drop it and hand it to the next VM that asks. ``GuardMemory`` keeps every
function that was on the management path (its reasons and chain, its identity), in memory and in
/var/lib/nicpassd/guard.json, and gives it back to the guard as protected while it is *taken*:

- present with no driver, on a passthrough driver, with a passthrough ``driver_override``, or (a
  NIC) without its netdev: still protected, with a reason that says it was the management path
  until when and what is gone (the healer and ``Check`` read it);
- not present: remembered, listed (``present`` False), until it comes back;
- present, on a host driver, with its netdev: not protected for what it was (the protection
  follows the live path within one event); forgotten once the live management path is seen on
  another device, remembered meanwhile (so that taking it is still taking the management NIC);
- present with another identity (another card in the slot): forgotten;
- released by an admin (``release``: ``nicpassctl guard --release``).

Loaded before the first inventory is published, so a device captured before nicpassd started is
known as the management NIC from the first moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from nicpassd.host import kernelio
from nicpassd.atomicfile import atomic_write, atomic_write_async, keep_aside
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS
from nicpassd.host.model import HostSnapshot, PciFunction

log = logging.getLogger(__name__)
MEMORY_FILE = "guard.json"
VERSION = 1


@dataclass(frozen=True)
class Remembered:
    """One function of the management path as it was last seen on it."""

    address: str
    reasons: tuple[str, ...]
    kinds: tuple[str, ...]
    vendor_id: str = ""
    device_id: str = ""
    serial: str = ""
    permanent_mac: str = ""
    driver: str = ""  # its host driver
    interfaces: tuple[str, ...] = ()
    is_network: bool = True
    since: float = 0.0  # first seen on the management path
    until: float = 0.0  # last seen on it (0: it is on it now)

    def same_card(self, function: PciFunction) -> bool:
        if (self.vendor_id, self.device_id) != (function.vendor_id, function.device_id):
            return False
        if self.serial and function.serial and self.serial != function.serial:
            return False
        return True


_DRIVER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TEXT_FIELDS = ("vendor_id", "device_id", "serial", "permanent_mac", "driver")
_LIST_FIELDS = ("reasons", "kinds", "interfaces")


def _remembered_from(item: object) -> Remembered:
    """One entry, checked field by field (ValueError/TypeError name the field): the remembered
    host driver is what ``Bind`` accepts besides vfio-pci, so a hand-edited one must not widen that."""
    if not isinstance(item, dict):
        raise TypeError(f"an entry is {type(item).__name__}, not an object")
    address = item.get("address")
    if not isinstance(address, str) or not kernelio.PCI_ADDRESS.fullmatch(address):
        raise ValueError(f"address {address!r} is not a PCI address")
    unknown = set(item) - {f.name for f in fields(Remembered)}
    if unknown:
        raise ValueError(f"{address}: unknown field(s) {', '.join(sorted(unknown))}")
    for name in _TEXT_FIELDS:
        if not isinstance(item.get(name, ""), str):
            raise TypeError(f"{address}: {name} is not a string")
    driver = item.get("driver", "")
    if driver and (not _DRIVER.fullmatch(driver) or driver in PASSTHROUGH_DRIVERS):
        raise ValueError(f"{address}: driver {driver!r} is not a host driver's name")
    for name in _LIST_FIELDS:
        value = item.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{address}: {name} is not a list of strings")
    for name in ("since", "until"):
        value = item.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e11:
            raise ValueError(f"{address}: {name} {value!r} is not a time")
    if not isinstance(item.get("is_network", True), bool):
        raise TypeError(f"{address}: is_network is not true or false")
    return Remembered(**{**item, **{name: tuple(item.get(name, ())) for name in _LIST_FIELDS}})


@dataclass
class Held:
    """A remembered function the guard protects although the live path no longer shows it."""

    entry: Remembered
    state: str  # what is gone: "its driver is gone", "it is on vfio-pci", ...

    @property
    def reasons(self) -> tuple[str, ...]:
        when = time.strftime("%H:%M:%S", time.localtime(self.entry.until)) if self.entry.until else "now"
        return tuple(f"was the management path until {when}: {reason}; {self.state}" for reason in self.entry.reasons)


def taken_state(entry: Remembered, function: PciFunction | None) -> str:
    """What is gone of a remembered function ("" = nothing: it is healthy)."""
    if function is None:
        return "it is not present"
    if function.driver in PASSTHROUGH_DRIVERS:
        return f"it is on {function.driver}"
    if function.driver_override in PASSTHROUGH_DRIVERS:
        return f"its driver_override is {function.driver_override}"
    if not function.driver:
        return "its driver is gone"
    if entry.is_network and function.is_network and not function.interfaces:
        gone = ", ".join(entry.interfaces)
        return f"its interface {gone} is gone" if gone else "its interface is gone"
    return ""


@dataclass
class GuardMemory:
    path: Path
    entries: dict[str, Remembered] = field(default_factory=dict)
    held: dict[str, Held] = field(default_factory=dict)  # of the last observe
    _saving: asyncio.Task | None = None
    _dirty: bool = False

    @classmethod
    def load(cls, directory: Path) -> "GuardMemory":
        path = directory / MEMORY_FILE
        memory = cls(path)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            for item in data["entries"]:
                entry = _remembered_from(item)
                memory.entries[entry.address] = entry
        except FileNotFoundError:
            pass
        except (IsADirectoryError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # Fail towards protection: the file is kept for a human; nothing is forgotten silently.
            broken, _named = keep_aside(path)
            log.critical("the guard's memory %s is unreadable (%s); kept as %s. Devices that were on the "
                         "management path before this start are protected only if they still are", path, exc,
                         broken)
        except OSError as exc:  # unreadable where it is (permissions, its directory is not one)
            log.critical("cannot read the guard's memory %s: %s", path, exc)
        return memory

    # -------------------------------------------------------------- observing
    def observe(self, snapshot: HostSnapshot, live: dict[str, tuple[tuple[str, ...], frozenset[str]]],
                now: float | None = None) -> dict[str, Held]:
        """Take in the live management path (address → reasons, kinds) of a fresh snapshot;
        returns the remembered functions the guard must still protect, with why."""
        now = time.time() if now is None else now
        changed = False
        for address, (reasons, kinds) in live.items():
            function = snapshot.functions.get(address)
            old = self.entries.get(address)
            entry = Remembered(
                address=address, reasons=tuple(reasons), kinds=tuple(sorted(kinds)),
                vendor_id=function.vendor_id if function else (old.vendor_id if old else ""),
                device_id=function.device_id if function else (old.device_id if old else ""),
                serial=(function.serial if function else "") or (old.serial if old else ""),
                permanent_mac=(function.permanent_mac if function else "") or (old.permanent_mac if old else ""),
                driver=(function.driver if function and function.driver not in PASSTHROUGH_DRIVERS else "")
                or (old.driver if old else ""),
                interfaces=(function.interfaces if function else ()) or (old.interfaces if old else ()),
                is_network=function.is_network if function else (old.is_network if old else True),
                since=old.since if old else now, until=0.0)
            if old != entry:
                self.entries[address] = entry
                changed = True
        live_network = any((snapshot.functions.get(address) or _NOT_NETWORK).is_network for address in live)
        held: dict[str, Held] = {}
        for address, entry in list(self.entries.items()):
            if address in live:
                continue
            function = snapshot.functions.get(address)
            if function is not None and not entry.same_card(function):
                log.info("forgetting %s as a management device: another card is in its slot now", address)
                del self.entries[address]
                changed = True
                continue
            if not entry.until:
                entry = replace(entry, until=now)
                self.entries[address] = entry
                changed = True
            state = taken_state(entry, function)
            if state:
                held[address] = Held(entry, state)
            elif live_network or not entry.is_network:
                log.info("%s is no longer on the host's management path (it is healthy and the path is elsewhere)",
                         address, extra={"device": address, "action": "guard"})
                del self.entries[address]
                changed = True
            # else: healthy, and no management path is seen anywhere (routes being reconfigured,
            # a tunnel gone): not protected for what it was, but remembered, so that taking it
            # now is still seen as taking the management NIC.
        self.held = held
        if changed:
            self.save_soon()
        return held

    def release(self, address: str) -> bool:
        """An admin's word: ``address`` is no longer needed for management (while it is held)."""
        if address not in self.entries:
            return False
        del self.entries[address]
        self.held.pop(address, None)
        self.save_soon()
        return True

    # ---------------------------------------------------------------- the file
    def _payload(self) -> bytes:
        entries = [_stored(entry) for entry in sorted(self.entries.values(), key=lambda e: e.address)]
        return json.dumps({"version": VERSION, "entries": entries}, indent=1).encode()

    def save_soon(self) -> None:
        """Write the file off the event loop, coalescing bursts (in order: one write at a time)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            atomic_write(self.path, self._payload())
            return
        self._dirty = True
        if self._saving is None or self._saving.done():
            self._saving = loop.create_task(self._save())

    async def _save(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await atomic_write_async(self.path, self._payload())
            except OSError as exc:
                log.error("cannot write the guard's memory %s: %s", self.path, exc)
                return

    async def flush(self) -> None:
        """Wait for a pending write (shutdown, tests)."""
        if self._saving is not None:
            await asyncio.shield(self._saving)


_NOT_NETWORK = PciFunction("", "", "", "", "", "000000")


def _stored(entry: Remembered) -> dict:
    data = asdict(entry)
    data["reasons"], data["kinds"], data["interfaces"] = list(entry.reasons), list(entry.kinds), list(entry.interfaces)
    return data
