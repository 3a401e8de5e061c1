"""Leases: which VM holds which device. Kept in /run/nicpassd/leases.json (survives a daemon
restart, not a reboot — after a reboot no VM holds anything).

A lease starts as a *reservation* (``state="reserved"``, ``expires`` a unix time) when a VM is
about to start, and becomes *active* (``expires=0``) once it is tied to the running VM: its QEMU
process (``pid`` plus ``pid_start``, the process start time, which tells a reused PID apart after
a daemon restart) or, without a PID, just its uuid. ``changes`` records, per device, what nicpassd
changed to make it ready (the previous driver and driver_override), so a ``restore`` release
gives back exactly that and nothing else.

This module is storage only; the policy (timers, pidfds, release policy) is in leasing.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nicpassd.host import kernelio
from nicpassd.host.model import VfSettings
from nicpassd.atomicfile import atomic_write, atomic_write_async, keep_aside

log = logging.getLogger(__name__)
LEASE_FILE = "leases.json"
FORMAT_VERSION = 2  # 1 had no pid_start/pidfile/changes; it loads with their defaults

RESERVED = "reserved"
ACTIVE = "active"
BROKEN = "broken"  # someone other than nicpassd rebound a device of it while the VM ran


@dataclass
class Lease:
    lease_id: str
    vm_name: str
    vm_uuid: str
    devices: list[str]
    state: str = RESERVED  # reserved (prepared, VM not yet running), active, or broken
    expires: float = 0.0  # unix time after which a reservation is reclaimed; 0 = never
    pid: int = 0  # the VM's QEMU process, once known
    pid_start: int = 0  # its start time (/proc/PID/stat field 22), to tell a reused PID apart
    pidfile: str = ""  # where the QEMU PID will appear (absolute host path), given at prepare
    created: float = field(default_factory=time.time)
    # address -> {"driver": ..., "driver_override": ...}: the state before nicpassd changed it.
    # A device absent here was already ready; a release never touches it.
    changes: dict[str, dict[str, str]] = field(default_factory=dict)
    # VF address -> its settings (MAC, VLAN, trust, ...) before the lease: whatever the VM or
    # libvirt sets meanwhile, these go back at release, whichever driver the policy picks.
    vf_settings: dict[str, dict[str, object]] = field(default_factory=dict)


_FIELDS = {f.name for f in dataclasses.fields(Lease)}
_VF_SETTINGS = {f.name for f in dataclasses.fields(VfSettings)} - {"index"}


# The VM that holds what an unreadable lease file may have leased, until an admin releases it.
UNKNOWN_VM = "00000000-0000-0000-0000-000000000000"
_TYPES = {"lease_id": str, "vm_name": str, "vm_uuid": str, "state": str, "pidfile": str,
          "expires": (int, float), "created": (int, float), "pid": int, "pid_start": int}


def _lease_from(item: dict) -> Lease:
    """One lease of the file, every field checked: a wrong type or value is an unreadable file."""
    if not isinstance(item, dict):
        raise ValueError("a lease is not an object")
    known = {key: value for key, value in item.items() if key in _FIELDS}
    for key, kind in _TYPES.items():
        if key in known and (not isinstance(known[key], kind) or isinstance(known[key], bool)):
            raise ValueError(f"lease field {key!r} is {known[key]!r}")
    if known.get("state", RESERVED) not in (RESERVED, ACTIVE, BROKEN):
        raise ValueError(f"lease state {known['state']!r}")
    devices = known.get("devices")
    if not isinstance(devices, list) or not all(isinstance(d, str) and kernelio.PCI_ADDRESS.fullmatch(d) for d in devices):
        raise ValueError(f"lease devices {devices!r}")
    changes = known.get("changes", {})
    if not isinstance(changes, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in changes.values()):
        raise ValueError("lease changes are not {address: {field: text}}")
    settings = known.get("vf_settings", {})
    if not isinstance(settings, dict) or not all(
            isinstance(v, dict) and set(v) <= _VF_SETTINGS and all(isinstance(x, (str, int)) for x in v.values())
            for v in settings.values()):
        raise ValueError("lease vf_settings are not {address: {setting: value}}")
    if any(known.get(key, 0) < 0 for key in ("expires", "pid", "pid_start")):
        raise ValueError("a negative time or pid in a lease")
    return Lease(**known)


class LeaseTable:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LEASE_FILE
        self.recovered = False  # the file was unreadable: what it may have leased is held (fail closed)
        self.leases: dict[str, Lease] = self._load()
        if self.recovered and self.leases:
            self.save()  # the hold survives the next restart too

    def _load(self) -> dict[str, Lease]:
        try:
            data = json.loads(self.path.read_text())
            version = data.get("version", 1)
            if version > FORMAT_VERSION:
                log.warning("%s has format version %s (this nicpassd knows %d); reading what it can",
                            self.path, version, FORMAT_VERSION)
            leases = [_lease_from(item) for item in data.get("leases", [])]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # OSError: a directory in its place
            return self._fail_closed(exc)
        table: dict[str, Lease] = {}
        taken: dict[str, str] = {}
        for lease in leases:
            clash = [device for device in lease.devices if device in taken]
            if clash:  # never trust a file that leases a device twice: keep the first holder
                log.error("lease %s of VM %s claims %s, already leased to VM %s: dropped",
                          lease.lease_id, lease.vm_uuid, ", ".join(clash), taken[clash[0]])
                continue
            taken.update({device: lease.vm_uuid for device in lease.devices})
            table[lease.lease_id] = lease
        return table

    def _fail_closed(self, exc: Exception) -> dict[str, Lease]:
        """An unreadable lease file never frees a device: it is kept aside (never overwritten), and
        every device it names is held by UNKNOWN_VM until an admin releases that."""
        broken, devices = keep_aside(self.path)
        self.recovered = True
        log.critical("the lease file %s is unreadable (%s); kept as %s. %s: they are held by VM %s until an "
                     "admin checks that no VM uses them and runs `nicpassctl release %s`", self.path, exc, broken,
                     f"It names {', '.join(devices)}" if devices else "It names no device",
                     UNKNOWN_VM, UNKNOWN_VM)
        if not devices:
            return {}
        lease = Lease(f"recovered-{uuid.uuid4().hex[:8]}", "(unreadable lease file)", UNKNOWN_VM, devices,
                      state=ACTIVE)
        return {lease.lease_id: lease}

    def holder(self) -> dict[str, str]:
        """device address -> VM uuid holding it."""
        return {device: lease.vm_uuid for lease in self.leases.values() for device in lease.devices}

    def of_vm(self, vm_uuid: str) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.vm_uuid == vm_uuid]

    def add(self, vm_name: str, vm_uuid: str, devices: list[str], *, expires: float,
            changes: dict[str, dict[str, str]] | None = None, pidfile: str = "", save: bool = True,
            vf_settings: dict[str, dict[str, object]] | None = None) -> Lease:
        holder = self.holder()
        taken = [device for device in devices if device in holder]
        if taken:  # the engine checks first; this is the last line against a double lease
            raise ValueError(f"{', '.join(taken)} already leased to VM {holder[taken[0]]}")
        lease = Lease(uuid.uuid4().hex, vm_name, vm_uuid, sorted(devices), expires=expires,
                      pidfile=pidfile, changes=dict(changes or {}), vf_settings=dict(vf_settings or {}))
        self.leases[lease.lease_id] = lease
        if save:
            self.save()
        return lease

    def update(self, lease: Lease, *, save: bool = True) -> None:
        self.leases[lease.lease_id] = lease
        if save:
            self.save()

    def drop(self, lease_id: str, *, save: bool = True) -> Lease | None:
        """Forget a lease; ``save=False`` leaves the file to a later ``save`` (or the ``add`` of its
        replacement), so that replacing or ending a VM's leases is one atomic write."""
        lease = self.leases.pop(lease_id, None)
        if lease is not None and save:
            self.save()
        return lease

    def expired(self, now: float) -> list[Lease]:
        return [lease for lease in self.leases.values()
                if lease.state == RESERVED and lease.expires and lease.expires <= now]

    def next_expiry(self) -> float:
        """The earliest reservation expiry (unix time), 0 when nothing expires."""
        times = [lease.expires for lease in self.leases.values() if lease.state == RESERVED and lease.expires]
        return min(times, default=0.0)

    def save(self) -> None:
        """Write the table (atomically: temp file, fsync, rename, fsync of the directory)."""
        atomic_write(self.path, self._payload(), prefix=".leases-")

    async def save_async(self) -> None:
        """``save`` in a worker thread (the daemon's way; the table in memory is already changed:
        under the mutation lock nothing reads the file meanwhile)."""
        await atomic_write_async(self.path, self._payload(), prefix=".leases-")

    def _payload(self) -> bytes:
        return json.dumps({"version": FORMAT_VERSION, "leases": [asdict(x) for x in self.leases.values()]},
                          indent=2).encode()
