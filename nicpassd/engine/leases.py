"""Leases: which VM holds which device. Kept in /run/nicpassd/leases.json (survives a daemon
restart, not a reboot — after a reboot no VM holds anything)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
LEASE_FILE = "leases.json"


@dataclass
class Lease:
    lease_id: str
    vm_name: str
    vm_uuid: str
    devices: list[str]
    state: str = "reserved"  # reserved (prepared, VM not yet running) or active
    expires: float = 0.0  # unix time after which a reservation is reclaimed; 0 = never
    pid: int = 0
    created: float = field(default_factory=time.time)


class LeaseTable:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LEASE_FILE
        self.leases: dict[str, Lease] = self._load()

    def _load(self) -> dict[str, Lease]:
        try:
            data = json.loads(self.path.read_text())
            return {item["lease_id"]: Lease(**item) for item in data.get("leases", [])}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, KeyError) as exc:
            log.error("ignoring unreadable lease file %s: %s", self.path, exc)
            return {}

    def holder(self) -> dict[str, str]:
        """device address -> VM uuid holding it."""
        return {device: lease.vm_uuid for lease in self.leases.values() for device in lease.devices}

    def of_vm(self, vm_uuid: str) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.vm_uuid == vm_uuid]

    def add(self, vm_name: str, vm_uuid: str, devices: list[str], *, expires: float) -> Lease:
        lease = Lease(uuid.uuid4().hex, vm_name, vm_uuid, sorted(devices), expires=expires)
        self.leases[lease.lease_id] = lease
        self._save()
        return lease

    def update(self, lease: Lease) -> None:
        self.leases[lease.lease_id] = lease
        self._save()

    def drop(self, lease_id: str) -> Lease | None:
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            self._save()
        return lease

    def expired(self, now: float) -> list[Lease]:
        return [lease for lease in self.leases.values()
                if lease.state == "reserved" and lease.expires and lease.expires < now]

    def _save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version": 1, "leases": [asdict(x) for x in self.leases.values()]}, indent=2)
        fd, temp = tempfile.mkstemp(prefix=".leases-", dir=self.directory)
        with os.fdopen(fd, "w") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
