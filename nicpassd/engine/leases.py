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

from nicpassd.atomicfile import atomic_write, atomic_write_async

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
    # A device absent here was already ready; a release never touches it. (nicpassd sets no VF
    # MAC yet; when it does, the previous admin MAC belongs here too.)
    changes: dict[str, dict[str, str]] = field(default_factory=dict)


_FIELDS = {f.name for f in dataclasses.fields(Lease)}


def _lease_from(item: dict) -> Lease:
    known = {key: value for key, value in item.items() if key in _FIELDS}
    lease = Lease(**known)
    lease.devices = [str(device) for device in lease.devices]
    return lease


class LeaseTable:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LEASE_FILE
        self.leases: dict[str, Lease] = self._load()

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
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("ignoring unreadable lease file %s: %s", self.path, exc)
            return {}
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

    def holder(self) -> dict[str, str]:
        """device address -> VM uuid holding it."""
        return {device: lease.vm_uuid for lease in self.leases.values() for device in lease.devices}

    def of_vm(self, vm_uuid: str) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.vm_uuid == vm_uuid]

    def add(self, vm_name: str, vm_uuid: str, devices: list[str], *, expires: float,
            changes: dict[str, dict[str, str]] | None = None, pidfile: str = "", save: bool = True) -> Lease:
        holder = self.holder()
        taken = [device for device in devices if device in holder]
        if taken:  # the engine checks first; this is the last line against a double lease
            raise ValueError(f"{', '.join(taken)} already leased to VM {holder[taken[0]]}")
        lease = Lease(uuid.uuid4().hex, vm_name, vm_uuid, sorted(devices), expires=expires,
                      pidfile=pidfile, changes=dict(changes or {}))
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
