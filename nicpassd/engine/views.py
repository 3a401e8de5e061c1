"""What the engine shows of each device: one flat, comparable view per PCI function."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from nicpassd.engine.guard import ProtectedSet
from nicpassd.engine.store import DeviceDesire, StateStore, identity_of
from nicpassd.engine.vf_settings import desired_settings
from nicpassd.errors import InvalidArgument, NotFound
from nicpassd.host.model import HostSnapshot, PciFunction, VfSettings

FULL_ADDRESS = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
SHORT_ADDRESS = re.compile(r"^[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")  # what the kernel takes (IFNAMSIZ 16, no / or :)


@dataclass(frozen=True)
class DeviceView:
    address: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: str
    is_network: bool
    driver: str
    iommu_group: int
    interfaces: tuple[str, ...]
    physical_function: str
    total_vfs: int
    num_vfs: int
    protected: bool
    protection_reasons: tuple[str, ...]
    leased_to: str
    persisted: bool
    desired_driver: str
    desired_vfs: int  # -1 when no VF count is persisted
    drift: str
    desired_vf_driver: str = ""  # a PF's: the driver its VFs are persisted on ("": their host driver)
    # A VF's settings as its PF's driver reports them, and those persisted for it: (name, value)
    # pairs of VfSettings fields (a setting the driver does not report is left out).
    vf_settings: tuple[tuple[str, object], ...] = ()
    desired_vf_settings: tuple[tuple[str, object], ...] = ()

    def changed_fields(self, other: "DeviceView") -> dict[str, object]:
        return {name: getattr(other, name) for name in _FIELDS if getattr(self, name) != getattr(other, name)}


_FIELDS = tuple(f.name for f in fields(DeviceView))


def label(function: PciFunction) -> str:
    if function.interfaces:
        return f"{function.address} ({', '.join(function.interfaces)})"
    return function.address


MAX_DEVICE_ARGUMENT = 64  # an interface name is at most 15 bytes, a PCI address 12


def full_address(text: str) -> str:
    """A short PCI address (3b:00.0) with its domain (0000:3b:00.0); a full one as it is."""
    return text if len(text) > 7 else f"0000:{text}"


def resolve_device(snapshot: HostSnapshot, argument: str) -> str:
    """A full or short PCI address, or a current interface name, to a known PCI address. Taken
    as written: whitespace or control characters are not part of any (a name with a trailing
    newline is another string than the interface's)."""
    if len(argument) > MAX_DEVICE_ARGUMENT or any(ch.isspace() or not ch.isprintable() for ch in argument):
        raise InvalidArgument(f"{_shown(argument)} is not a device: a PCI address (0000:3b:00.0 or 3b:00.0) or an "
                              "interface name has no whitespace or control characters",
                              "list the devices with `nicpassctl list`")
    text = argument
    if FULL_ADDRESS.match(text) or SHORT_ADDRESS.match(text):
        address = full_address(text.lower())
        if address not in snapshot.functions:
            raise NotFound(f"no NIC function at {address}", "list the devices with `nicpassctl list`")
        return address
    link = snapshot.links.get(text)
    if link is not None:
        if link.device and link.device in snapshot.functions:
            return link.device
        lowers = f"; it sits on {', '.join(link.lowers)}" if link.lowers else ""
        raise InvalidArgument(f"{text} is a {link.kind} interface, not a PCI function{lowers}",
                              "name a physical interface or a PCI address")
    if INTERFACE_NAME.fullmatch(text) and ":" not in text:
        # Could be an interface: one that is not there is not found, as an absent address is.
        raise NotFound(f"no network interface {text} (and no PCI function by that name)",
                       "list the devices with `nicpassctl list`")
    raise InvalidArgument(
        f"{argument!r} is neither a PCI address (0000:3b:00.0 or 3b:00.0) nor a network interface name",
        "list the devices with `nicpassctl list`",
    )


def _shown(text: str, limit: int = 40) -> str:
    """Caller input in a message: escaped, and cut short (it may be 1 MB long)."""
    shown = repr(text[:limit])
    return shown + ("…" if len(text) > limit else "")


def _desired_driver(function: PciFunction, store: StateStore) -> tuple[DeviceDesire | None, str]:
    desire = store.get(function.address)
    if desire is not None and desire.driver:
        return desire, desire.driver
    if function.physfn:
        parent = store.get(function.physfn)
        if parent is not None and parent.vf_driver:
            return desire, parent.vf_driver
    return desire, ""


def _drift(function: PciFunction, snapshot: HostSnapshot, desire: DeviceDesire | None,
           desired_driver: str) -> str:
    problems = []
    if desire is not None:
        changed = desire.identity.mismatch(identity_of(function, snapshot))
        if changed:
            return f"identity changed since it was persisted ({changed})"
        if desire.num_vfs is not None and desire.num_vfs != function.num_vfs:
            problems.append(f"{desire.num_vfs} VFs persisted, {function.num_vfs} present")
    if desired_driver and function.driver != desired_driver:
        problems.append(f"persisted on {desired_driver}, bound to {function.driver or 'no driver'}")
    return "; ".join(problems)


def build_views(snapshot: HostSnapshot, protected: ProtectedSet, store: StateStore,
                leases: dict[str, str], notes: dict[str, str] | None = None) -> dict[str, DeviceView]:
    """``notes``: per device, why the reconciler does not apply its persisted state (added to Drift)."""
    return ViewBuilder().build(snapshot, protected, store, leases, notes)


class ViewBuilder:
    """``build_views`` that keeps the view of a function whose inputs are what they were at the
    last build: after a burst of uevents a refresh re-reads a few functions (or 1,000 new VFs
    once), and every publish would otherwise build every view again (~10 µs each)."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[tuple, DeviceView]] = {}

    def build(self, snapshot: HostSnapshot, protected: ProtectedSet, store: StateStore,
              leases: dict[str, str], notes: dict[str, str] | None = None) -> dict[str, DeviceView]:
        notes = notes or {}
        built: dict[str, tuple[tuple, DeviceView]] = {}
        views: dict[str, DeviceView] = {}
        families: dict[str, _VfFamily] = {}
        for address, function in snapshot.functions.items():
            inputs = _inputs(address, function, snapshot, protected, store, leases, notes)
            kept = self._built.get(address)
            # Compared by identity first (tuple equality does): an input that is the same object
            # costs nothing; an equal one re-read from the kernel is compared field by field.
            view = kept[1] if kept is not None and kept[0] == inputs else _view(
                address, function, snapshot, protected, store, leases, notes, families)
            built[address] = (inputs, view)
            views[address] = view
        self._built = built
        return views


def _inputs(address: str, function: PciFunction, snapshot: HostSnapshot, protected: ProtectedSet,
            store: StateStore, leases: dict[str, str], notes: dict[str, str]) -> tuple:
    """Everything ``_view`` reads for ``address``: its function, its PF and the PF's VF settings,
    its IOMMU group's members (its persisted identity names them), the persisted desires of it and
    its PF, its protection, lease and note."""
    physfn = function.physfn
    members = snapshot.groups.get(function.iommu_group, ()) if function.iommu_group >= 0 else ()
    return (function, store.get(address), protected.entries.get(address), leases.get(address, ""),
            notes.get(address), members, tuple(snapshot.functions.get(member) for member in members),
            (store.get(physfn), snapshot.functions.get(physfn), snapshot.vf_settings.get(physfn)) if physfn else None)


def _view(address: str, function: PciFunction, snapshot: HostSnapshot, protected: ProtectedSet,
          store: StateStore, leases: dict[str, str], notes: dict[str, str],
          families: dict[str, "_VfFamily"]) -> DeviceView:
    desire, desired_driver = _desired_driver(function, store)
    drift = _drift(function, snapshot, desire, desired_driver)
    if address in notes and not drift.startswith("identity"):
        drift = f"{drift}; {notes[address]}" if drift else notes[address]
    shown, wanted = _vf_settings(address, function, snapshot, store, families)
    if wanted:
        differ = [f"{name.replace('_', ' ')} {value}" for name, value in wanted if dict(shown).get(name) != value]
        if differ:
            drift = f"{drift}; " if drift else ""
            drift += f"VF settings persisted and not shown: {', '.join(differ)}"
    return DeviceView(
        address=address,
        vendor_id=function.vendor_id,
        device_id=function.device_id,
        subsystem_vendor_id=function.subsystem_vendor_id,
        subsystem_device_id=function.subsystem_device_id,
        class_code=function.class_code,
        is_network=function.is_network,
        driver=function.driver,
        iommu_group=function.iommu_group,
        interfaces=function.interfaces,
        physical_function=function.physfn,
        total_vfs=function.total_vfs,
        num_vfs=function.num_vfs,
        protected=address in protected,
        protection_reasons=protected.reasons(address),
        leased_to=leases.get(address, ""),
        persisted=desire is not None,
        desired_driver=desired_driver,
        desired_vfs=desire.num_vfs if desire is not None and desire.num_vfs is not None else -1,
        drift=drift,
        desired_vf_driver=desire.vf_driver if desire is not None else "",
        vf_settings=shown,
        desired_vf_settings=wanted,
    )


def _vf_settings(address: str, function: PciFunction, snapshot: HostSnapshot, store: StateStore,
                 families: dict[str, "_VfFamily"]
                 ) -> tuple[tuple[tuple[str, object], ...], tuple[tuple[str, object], ...]]:
    """(shown, persisted) settings of a VF. ``families``: what the views of one PF's VFs share,
    worked out once per build (a PF has up to 4,096 VFs)."""
    pf = snapshot.functions.get(function.physfn) if function.physfn else None
    if pf is None:
        return (), ()
    family = families.get(pf.address)
    if family is None:
        family = families[pf.address] = _VfFamily(pf, snapshot, store)
    index = family.index_of.get(address)
    if index is None:
        return (), ()
    settings = family.shown.get(index)
    shown = () if settings is None else tuple(
        (name, value) for name, value in vars(settings).items() if name != "index" and value is not None)
    desired = family.wanted().get(index)
    return shown, tuple(desired.items()) if desired else ()


class _VfFamily:
    """A PF's VFs by address, their settings as its driver reports them by index, and those
    persisted for them (worked out on first use)."""

    def __init__(self, pf: PciFunction, snapshot: HostSnapshot, store: StateStore) -> None:
        self.pf = pf
        self.index_of = {vf: index for index, vf in reversed(list(enumerate(pf.virtfns)))}
        self.shown: dict[int, VfSettings] = {}
        for settings in snapshot.vf_settings.get(pf.address, ()):
            self.shown.setdefault(settings.index, settings)
        self.desire = store.get(pf.address)
        self._wanted: dict[int, dict[str, object]] | None = None

    def wanted(self) -> dict[int, dict[str, object]]:
        if self._wanted is None:
            desire = self.desire
            self._wanted = {} if desire is None else desired_settings(
                desire, desire.identity.permanent_mac or self.pf.permanent_mac, len(self.pf.virtfns))
        return self._wanted
