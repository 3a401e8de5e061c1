"""Persistent desired state in /var/lib/nicpassd/state.json: versioned, written atomically.

Each entry records the identity of the device it was made for, so a different card found at the
same address later is not configured by mistake (``Identity.mismatch``), and the same card found
at another address is followed there (``Identity.same_card``).

The file is written as a temporary file in the same directory, fsynced, renamed over the old one,
then the directory is fsynced: a reader (or the daemon after a crash or power loss) sees the old
file or the new one, never a mix. Older schema versions are migrated on load (``MIGRATIONS``); the
file as it was is kept beside it (``state.json.v1``) and the migrated state is written back.

``RuntimeHolds`` (in /run/nicpassd/runtime.json) lists devices changed with ``--runtime``: the
reconciler leaves them alone until the device goes away or the host reboots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from nicpassd.host import kernelio
from nicpassd.atomicfile import atomic_write, atomic_write_async, keep_aside, remove_stale_temps
from nicpassd.host.model import HostSnapshot, PciFunction

log = logging.getLogger(__name__)
SCHEMA_VERSION = 3
STATE_FILE = "state.json"
TEMP_PREFIX = ".state-"
RUNTIME_FILE = "runtime.json"


class Identity(BaseModel):
    """What makes a device the one a desire was made for. Never the IOMMU group *number*."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    vendor_id: str
    device_id: str
    subsystem_vendor_id: str = ""
    subsystem_device_id: str = ""
    serial: str = ""  # PCIe Device Serial Number; shared by the functions of one card
    permanent_mac: str = ""  # of the PF's netdev; unknown ("") while no host driver is bound
    physfn: str = ""  # for a VF: the PF address (VF identity is its PF plus its index)
    vf_index: int = -1  # v2: for a VF, N of the PF's virtfnN link
    # v2: "vendor:device" of the other members of its IOMMU group (its own PF and VFs excluded);
    # None when not recorded (no IOMMU, or a v1 file, which could not tell "alone" from "unknown").
    group_members: tuple[str, ...] | None = None

    def mismatch(self, other: "Identity") -> str:
        """A sentence naming the first difference, or "" when both describe the same device.

        ``self`` is what was recorded, ``other`` what the device shows now. Fields one side does
        not know (a MAC while the device is on vfio-pci, a serial without CAP_SYS_ADMIN) are not
        compared; vendor, device and whether it is a VF of which PF always are.
        """
        for name in ("vendor_id", "device_id", "physfn"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} was {mine or 'none'} and is now {theirs or 'none'}"
        for name in ("subsystem_vendor_id", "subsystem_device_id", "serial", "permanent_mac"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine and theirs and mine != theirs:
                return f"{name} was {mine} and is now {theirs}"
        if self.vf_index >= 0 and other.vf_index >= 0 and self.vf_index != other.vf_index:
            return f"vf_index was {self.vf_index} and is now {other.vf_index}"
        if self.group_members is not None and other.group_members is not None \
                and sorted(self.group_members) != sorted(other.group_members):
            before = ", ".join(self.group_members) or "none"
            now = ", ".join(other.group_members) or "none"
            return f"IOMMU group mates were {before} and are now {now}"
        return ""

    def same_card(self, recorded_address: str, other: "Identity", address: str) -> bool:
        """Is the function at ``address`` (identity ``other``) the one recorded at
        ``recorded_address``, moved? Only a serial number (with the same function number: the
        functions of one card share it) or a permanent MAC can tell; vendor and device must agree."""
        if self.physfn or other.physfn:
            return False  # VFs follow their PF
        if (self.vendor_id, self.device_id) != (other.vendor_id, other.device_id):
            return False
        if self.permanent_mac and other.permanent_mac:
            return self.permanent_mac == other.permanent_mac
        if self.serial and other.serial:
            return self.serial == other.serial and function_number(recorded_address) == function_number(address)
        return False


def function_number(address: str) -> str:
    return address.rsplit(".", 1)[-1]


def identity_of(function: PciFunction, snapshot: HostSnapshot) -> Identity:
    family = {function.address, function.physfn, *function.virtfns} - {""}
    if function.physfn and function.physfn in snapshot.functions:
        family.update(snapshot.functions[function.physfn].virtfns)
    if function.iommu_group < 0:
        mates: tuple[str, ...] | None = None
    else:
        mates = tuple(sorted(
            f"{snapshot.functions[m].vendor_id}:{snapshot.functions[m].device_id}"
            for m in snapshot.group_members(function.address)
            if m not in family and m in snapshot.functions
            and snapshot.functions[m].physfn not in family  # VFs of siblings in a shared group
        ))
    vf_index = -1
    if function.physfn:
        parent = snapshot.functions.get(function.physfn)
        if parent is not None and function.address in parent.virtfns:
            vf_index = parent.virtfns.index(function.address)
    return Identity(
        vendor_id=function.vendor_id, device_id=function.device_id,
        subsystem_vendor_id=function.subsystem_vendor_id, subsystem_device_id=function.subsystem_device_id,
        serial=function.serial, permanent_mac=function.permanent_mac, physfn=function.physfn,
        vf_index=vf_index, group_members=mates,
    )


PCI_ADDRESS = r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$"
PersistedDriver = Literal["", "vfio-pci", "pci-stub"]


class VfDesire(BaseModel):
    """A VF's persisted settings (kept in its PF's desire, keyed by the VF index: a VF's identity is
    its PF and its index). None: that setting is left as the driver has it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mac: str | None = Field(None, pattern=rf"^{kernelio.MAC_TEXT}$")
    vlan: int | None = Field(None, ge=0, le=4095)
    qos: int | None = Field(None, ge=0, le=7)
    vlan_proto: Literal["802.1Q", "802.1ad"] | None = None
    spoofchk: bool | None = None
    trust: bool | None = None
    link_state: Literal["auto", "enable", "disable"] | None = None
    min_tx_rate: int | None = Field(None, ge=0, le=1_000_000)
    max_tx_rate: int | None = Field(None, ge=0, le=1_000_000)

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler):
        return {name: value for name, value in handler(self).items() if value is not None}


class DeviceDesire(BaseModel):
    """One device's desired state. Strict: a value nicpassd would not write is a broken file
    (a driver of "../../evil" was once bound at boot; a num_vfs of -5 accepted)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    address: str = Field(pattern=PCI_ADDRESS)
    identity: Identity
    driver: PersistedDriver = ""  # "vfio-pci" to keep the function on vfio-pci; "" = leave the driver alone
    num_vfs: int | None = Field(None, ge=0, le=4096)  # for a PF: VFs to create
    vf_driver: PersistedDriver = ""  # for a PF: driver for its VFs ("" = host driver)
    vf_settings: dict[str, VfDesire] = Field(default_factory=dict)  # v3: for a PF: VF index -> settings
    stable_macs: bool = False  # v3: for a PF: each VF without a persisted MAC gets one derived from the PF's

    @model_validator(mode="after")
    def _vf_indexes(self) -> "DeviceDesire":
        for key in self.vf_settings:
            if not key.isdigit() or int(key) > 4095 or key != str(int(key)):
                raise ValueError(f"VF settings key {key!r} is not a VF index")
        return self

    @property
    def empty(self) -> bool:
        return (not self.driver and self.num_vfs is None and not self.vf_driver and not self.vf_settings
                and not self.stable_macs)


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = SCHEMA_VERSION
    generation: int = Field(0, ge=0)  # v2: +1 per commit, so the undo journal can tell whether a commit happened
    devices: dict[str, DeviceDesire] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys_are_addresses(self) -> "DesiredState":
        for key, desire in self.devices.items():
            if key != desire.address:
                raise ValueError(f"device key {key!r} is not its address {desire.address!r}")
        return self


# ------------------------------------------------------------------------------ migrations
def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 adds ``generation``, ``Identity.vf_index``, and makes ``group_members`` optional.

    v1 wrote ``[]`` both for "alone in its group" and "no group known": that cannot be compared
    safely, so it becomes ``None`` (not recorded); the next change of the device records it.
    """
    devices = {}
    for address, entry in (data.get("devices") or {}).items():
        entry = dict(entry)
        identity = dict(entry.get("identity") or {})
        if not identity.get("group_members"):
            identity["group_members"] = None
        identity.setdefault("vf_index", -1)
        entry["identity"] = identity
        devices[address] = entry
    return {**data, "version": 2, "generation": 0, "devices": devices}


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """v3 adds a PF's ``vf_settings`` and ``stable_macs`` (none in a v2 file)."""
    return {**data, "version": 3}


# version N -> function turning a version-N document into a version N+1 document
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3}


def migrate(data: dict[str, Any], *, target: int = SCHEMA_VERSION) -> tuple[dict[str, Any], int]:
    """Upgrade a parsed state document to ``target``; returns it and the version it had."""
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"has no valid schema version ({version!r})")
    if version > target:
        raise ValueError(f"has schema version {version}; this nicpassd reads {target} "
                         "(written by a newer nicpassd: upgrade it, or restore a backup)")
    original = version
    while version < target:
        step = MIGRATIONS.get(version)
        if step is None:
            raise ValueError(f"has schema version {version}; this nicpassd reads {target} and cannot migrate it")
        data = step(data)
        if data.get("version") != version + 1:
            raise AssertionError(f"migration from v{version} did not produce v{version + 1}")
        version += 1
    return data, original


class StateStoreError(RuntimeError):
    pass


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        if directory.exists() and not directory.is_dir():
            raise StateStoreError(f"{directory} is not a directory; nicpassd keeps its desired state there")
        remove_stale_temps(directory, TEMP_PREFIX)
        self.state = self._load()

    def _load(self) -> DesiredState:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return DesiredState()
        except (OSError, UnicodeDecodeError) as exc:  # a directory in its place, not UTF-8...
            raise StateStoreError(f"cannot read {self.path}: {exc}; nicpassd does not start on a state it cannot "
                                  "read (fix or move the file; it is never changed)") from exc
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StateStoreError(f"{self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise StateStoreError(f"{self.path} does not hold a JSON object")
        try:
            data, version = migrate(data)
        except ValueError as exc:
            raise StateStoreError(f"{self.path} {exc}") from exc
        try:
            state = DesiredState.model_validate(data)
        except ValidationError as exc:
            raise StateStoreError(f"{self.path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            backup = self.path.with_name(f"{STATE_FILE}.v{version}")
            atomic_write(backup, raw.encode(), prefix=TEMP_PREFIX)
            self._write(state)
            log.info("migrated %s from schema version %d to %d (the old file is kept as %s)",
                     self.path, version, SCHEMA_VERSION, backup.name)
        return state

    @property
    def generation(self) -> int:
        return self.state.generation

    def get(self, address: str) -> DeviceDesire | None:
        return self.state.devices.get(address)

    def put(self, desire: DeviceDesire) -> None:
        self.apply({desire.address: desire})

    def remove(self, address: str) -> bool:
        if address not in self.state.devices:
            return False
        self.apply({address: None})
        return True

    def apply(self, changes: dict[str, DeviceDesire | None]) -> None:
        """Several changes in one commit (``None`` removes): re-keying a PF and its VFs is one."""
        state = self._next(changes)
        self._write(state)
        self.state = state

    async def commit(self, changes: dict[str, DeviceDesire | None]) -> None:
        """``apply``, the file written by a worker thread (the daemon's way: two fsyncs are no
        work for the event loop). The new state is visible once it is on disk."""
        state = self._next(changes)
        await atomic_write_async(self.path, self._payload(state), prefix=TEMP_PREFIX)
        self.state = state

    def _next(self, changes: dict[str, DeviceDesire | None]) -> DesiredState:
        devices = dict(self.state.devices)
        for address, desire in changes.items():
            if desire is None or desire.empty:
                devices.pop(address, None)
            else:
                devices[address] = desire
        return DesiredState(generation=self.state.generation + 1, devices=dict(sorted(devices.items())))

    @staticmethod
    def _payload(state: DesiredState) -> bytes:
        return state.model_dump_json(indent=2).encode()

    def _write(self, state: DesiredState) -> None:
        atomic_write(self.path, self._payload(state), prefix=TEMP_PREFIX)


class RuntimeHolds:
    """Devices changed with ``--runtime`` (persist=false): what the kernel shows now is what the
    admin wants until the device goes or the host reboots, so the reconciler must not "fix" it.
    Kept in /run (survives a daemon restart, not a reboot). ``op`` is the id of the change."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / RUNTIME_FILE
        remove_stale_temps(directory, f".{RUNTIME_FILE}-")
        self.holds: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
            holds = data["holds"]
            if not isinstance(holds, dict):
                raise TypeError("holds is not an object")
            for key, value in holds.items():
                if not kernelio.PCI_ADDRESS.fullmatch(key) or not isinstance(value, str):
                    raise ValueError(f"hold {key!r}: {value!r} is not a PCI address and why it is held")
            return dict(holds)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            # Fail closed: a runtime change nobody can see any more is still no reason to undo it.
            broken, held = keep_aside(self.path)
            log.critical("%s is unreadable (%s); kept as %s. %s", self.path, exc, broken,
                         f"{', '.join(held)} stay as they are (held) until re-plugged or given a state with "
                         "nicpassctl" if held else "It names no device.")
            return dict.fromkeys(held, f"its runtime hold file was unreadable (kept as {broken})")

    def __contains__(self, address: str) -> bool:
        return address in self.holds

    def hold(self, address: str, op: str) -> None:
        self._save({**self.holds, address: op})

    def release(self, *addresses: str) -> None:
        if any(address in self.holds for address in addresses):
            self._save({key: value for key, value in self.holds.items() if key not in addresses})

    async def hold_async(self, *addresses: str, op: str = "runtime") -> None:
        """``hold`` of each address, the file written by a worker thread."""
        if any(self.holds.get(address) != op for address in addresses):
            await self._save_async({**self.holds, **dict.fromkeys(addresses, op)})

    async def release_async(self, *addresses: str) -> None:
        if any(address in self.holds for address in addresses):
            await self._save_async({key: value for key, value in self.holds.items() if key not in addresses})

    @staticmethod
    def _payload(holds: dict[str, str]) -> bytes:
        return json.dumps({"version": 1, "holds": holds}, indent=2).encode()

    def _save(self, holds: dict[str, str]) -> None:
        atomic_write(self.path, self._payload(holds))
        self.holds = holds

    async def _save_async(self, holds: dict[str, str]) -> None:
        await atomic_write_async(self.path, self._payload(holds))
        self.holds = holds
