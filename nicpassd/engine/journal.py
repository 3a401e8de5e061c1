"""The undo journal in /run/nicpassd/journal.json: what a multi-step change was about to do.

Before the first kernel write of a multi-step change — a VF count change (autoprobe, 0, N, VF
binds), a bind (driver_override, unbind, drivers_probe), a batch of VF binds, a prepare of several
devices, a VF's settings (one netlink request each) — the operations layer (``Operations.journaled``) records its intent and the state to
restore (``record``); the entry is dropped once the kernel shows the change complete, or once the
previous state was restored after a failure (``finish``). So each device is, at every instant, either
inside a journaled change or in a consistent state.

An entry still there when the daemon starts was interrupted by a crash:
``nicpassd.engine.recovery.recover`` rolls its devices back to the journaled state (a prepare
whose lease was written is finished instead), before the boot reconcile runs — which then brings
persisted devices to their desired state. A crash therefore leaves every device in its pre-change
state or its desired state, never half-way. /run is a tmpfs: after a reboot there is nothing to undo.

Every write is atomic (temp file, rename), and made in the caller's thread without fsync: the
journal must survive the daemon's death, which the rename alone guarantees, not a power loss,
after which the kernel state it describes is gone too. On the tmpfs of /run such a write is a
few system calls: 0.4 ms in the e2e guest (TCG), against 2.9 ms for the same write with its
fsyncs in a worker thread, on a quiet loop; within a bind of 7 VFs, beside the state file's own
write, the journal's phase went from 42 ms to 8-25 ms (issue 22).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nicpassd.host import kernelio
from nicpassd.atomicfile import atomic_write, keep_aside, remove_stale_temps
from nicpassd.host.model import PciFunction

log = logging.getLogger(__name__)
JOURNAL_FILE = "journal.json"
VERSION = 1
KINDS = ("vf-count", "bind", "prepare", "vf-settings")
_FUNCTION_FIELDS = {f.name: f for f in dataclasses.fields(PciFunction)}


def function_to_json(function: PciFunction) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(function).items()}


def function_from_json(data: dict[str, Any]) -> PciFunction:
    known = {name: tuple(value) if isinstance(value, list) else value
             for name, value in data.items() if name in _FUNCTION_FIELDS}
    return PciFunction(**known)


@dataclass
class DeviceBefore:
    """One device as it was before the change: the function, and for a PF its VFs' drivers."""

    function: PciFunction
    vf_drivers: list[str] = field(default_factory=list)
    vf_overrides: list[str] = field(default_factory=list)  # a crash may leave an override written
    # vf-settings: {VF index: the settings it changes, as they were} (a change is one netlink
    # request per setting: a crash between two leaves it half-applied)
    vf_settings: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Entry:
    id: str
    kind: str  # vf-count, bind, prepare, vf-settings
    devices: dict[str, DeviceBefore]
    target: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_vfs": 8, "vf_driver": "vfio-pci"}
    vm_uuid: str = ""
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "target": self.target, "vm_uuid": self.vm_uuid, "started": self.started,
            "devices": {address: {"before": function_to_json(before.function), "vf_drivers": before.vf_drivers,
                                  "vf_overrides": before.vf_overrides,
                                  "vf_settings": {str(index): settings for index, settings in before.vf_settings.items()}}
                        for address, before in self.devices.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Entry":
        if data.get("kind") not in KINDS:
            raise ValueError(f"unknown journal entry kind {data.get('kind')!r}")
        if not isinstance(data["devices"], dict) or not all(kernelio.PCI_ADDRESS.fullmatch(a) for a in data["devices"]):
            raise ValueError(f"journal entry devices {list(data['devices'])[:5]!r} are not PCI addresses")
        devices = {address: DeviceBefore(function_from_json(item["before"]), list(item.get("vf_drivers", [])),
                                         list(item.get("vf_overrides", [])),
                                         {int(index): dict(settings)
                                          for index, settings in (item.get("vf_settings") or {}).items()})
                   for address, item in data["devices"].items()}
        return cls(id=str(data["id"]), kind=data["kind"], devices=devices, target=dict(data.get("target") or {}),
                   vm_uuid=str(data.get("vm_uuid", "")), started=float(data.get("started", 0.0)))

    def describe(self) -> str:
        what = ", ".join(self.devices) or "no device"
        return f"{self.kind} of {what} (target {self.target})"


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_FILE
        self.suspects: list[str] = []  # devices an unreadable journal named
        self.broken_as = ""
        remove_stale_temps(directory, f".{JOURNAL_FILE}-")
        self.entries: dict[str, Entry] = self._load()

    def _load(self) -> dict[str, Entry]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:  # a directory in its place
            return self._unreadable(exc)
        try:
            data = json.loads(raw.decode())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            entries = [Entry.from_json(item) for item in data["entries"]]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # UnicodeDecodeError is a ValueError
            return self._unreadable(exc)
        return {entry.id: entry for entry in entries}

    def _unreadable(self, exc: Exception) -> dict[str, Entry]:
        """Written atomically, so this is no torn write: kept for a human (never overwritten), and
        every device it names is held: it may be half-way through a change nobody can undo."""
        self.broken_as, self.suspects = keep_aside(self.path)
        log.critical("the undo journal %s is unreadable (%s); kept as %s, nothing is rolled back. %s", self.path,
                     exc, self.broken_as, f"{', '.join(self.suspects)} may be half-way through a change: nicpassd leaves "
                     "them alone until an admin gives each its state (nicpassctl bind/unbind/vfs)"
                     if self.suspects else "It names no device.")
        return {}

    def pending(self) -> list[Entry]:
        return sorted(self.entries.values(), key=lambda entry: entry.started)

    def begin(self, kind: str, devices: dict[str, DeviceBefore], *, target: dict[str, Any] | None = None,
              vm_uuid: str = "") -> Entry:
        entry = Entry(uuid.uuid4().hex, kind, devices, dict(target or {}), vm_uuid)
        self._save({**self.entries, entry.id: entry})
        return entry

    def end(self, entry: Entry) -> None:
        if entry.id in self.entries:
            self._save({key: value for key, value in self.entries.items() if key != entry.id})

    async def record(self, kind: str, devices: dict[str, DeviceBefore], *, target: dict[str, Any] | None = None,
                     vm_uuid: str = "") -> Entry:
        """``begin`` as a coroutine: written when it runs. A heal schedules it as a task, so that
        it runs while the heal's kernel writes wait in their worker thread (``Operations.give_back``)."""
        return self.begin(kind, devices, target=target, vm_uuid=vm_uuid)

    async def finish(self, entry: Entry) -> None:
        """``end``, for the daemon's coroutines."""
        self.end(entry)

    @staticmethod
    def _payload(entries: dict[str, Entry]) -> bytes:
        # One line: json's C encoder (with indent=, json.dumps falls back to its Python one).
        return json.dumps({"version": VERSION, "entries": [entry.to_json() for entry in entries.values()]}).encode()

    def _save(self, entries: dict[str, Entry]) -> None:
        atomic_write(self.path, self._payload(entries), durable=False)
        self.entries = entries
