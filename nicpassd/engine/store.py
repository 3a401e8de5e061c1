"""Persistent desired state in /var/lib/nicpassd/state.json: versioned, written atomically.

Each entry records the identity of the device it was made for, so a different card found at the
same address later is not configured by mistake.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nicpassd.host.model import HostSnapshot, PciFunction

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
STATE_FILE = "state.json"


class Identity(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    vendor_id: str
    device_id: str
    subsystem_vendor_id: str = ""
    subsystem_device_id: str = ""
    serial: str = ""
    permanent_mac: str = ""
    physfn: str = ""  # for a VF: the PF address (VF identity is its PF plus its index)
    group_members: tuple[str, ...] = ()  # "vendor:device" of the other group members

    def mismatch(self, other: "Identity") -> str:
        """A sentence naming the first difference, or "" when both describe the same device."""
        for name in ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id", "serial",
                     "permanent_mac", "physfn", "group_members"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine and theirs and mine != theirs:
                return f"{name} was {mine} and is now {theirs}"
            if name in ("vendor_id", "device_id") and mine != theirs:
                return f"{name} was {mine} and is now {theirs}"
        return ""


def identity_of(function: PciFunction, snapshot: HostSnapshot) -> Identity:
    mates = tuple(sorted(
        f"{snapshot.functions[m].vendor_id}:{snapshot.functions[m].device_id}"
        for m in snapshot.group_members(function.address)
        if m != function.address and m in snapshot.functions
    ))
    return Identity(
        vendor_id=function.vendor_id, device_id=function.device_id,
        subsystem_vendor_id=function.subsystem_vendor_id, subsystem_device_id=function.subsystem_device_id,
        serial=function.serial, permanent_mac=function.permanent_mac, physfn=function.physfn,
        group_members=mates,
    )


class DeviceDesire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str
    identity: Identity
    driver: str = ""  # "vfio-pci" to keep the function on vfio-pci; "" = leave the driver alone
    num_vfs: int | None = None  # for a PF: VFs to create
    vf_driver: str = ""  # for a PF: driver for its VFs ("" = host driver)


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = SCHEMA_VERSION
    devices: dict[str, DeviceDesire] = Field(default_factory=dict)


class StateStoreError(RuntimeError):
    pass


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.state = self._load()

    def _load(self) -> DesiredState:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return DesiredState()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StateStoreError(f"{self.path} is not valid JSON: {exc}") from exc
        version = data.get("version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise StateStoreError(f"{self.path} has schema version {version!r}; this nicpassd reads {SCHEMA_VERSION}")
        try:
            return DesiredState.model_validate(data)
        except ValidationError as exc:
            raise StateStoreError(f"{self.path}: {exc}") from exc

    def get(self, address: str) -> DeviceDesire | None:
        return self.state.devices.get(address)

    def put(self, desire: DeviceDesire) -> None:
        devices = dict(self.state.devices)
        devices[desire.address] = desire
        self._commit(DesiredState(devices=devices))

    def remove(self, address: str) -> bool:
        if address not in self.state.devices:
            return False
        devices = {key: value for key, value in self.state.devices.items() if key != address}
        self._commit(DesiredState(devices=devices))
        return True

    def _commit(self, state: DesiredState) -> None:
        """Temp file, fsync, rename, fsync the directory: the file is old or new, never half."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = state.model_dump_json(indent=2).encode()
        fd, temp = tempfile.mkstemp(prefix=".state-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.state = state
