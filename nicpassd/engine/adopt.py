"""``nicpassctl import``: what other tools were told to do with NICs at boot, as nicpassd desires.

An admin moving to nicpassd has driverctl overrides, ``vfio-pci.ids=`` on the kernel command line
or in modprobe.d, and systemd-networkd ``[SR-IOV]``/``SR-IOVVirtualFunctions=`` or udev rules
writing ``sriov_numvfs``. ``plan`` turns each into the equivalent nicpassd desire for the
functions present, guard-checked (a line that captures the management NIC is refused, and says
so), each with what to remove from the old tool afterwards; the caller applies the adoptable ones
through the engine's own mutations (persisted, guard-checked again, journaled), so that both tools
hold the same state until the old lines go: no reboot gap.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from nicpassd.engine import preflight
from nicpassd.engine.hostview import HostView
from nicpassd.errors import NicpassError
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS, VFIO
from nicpassd.host import legacy
from nicpassd.host.legacy import NetworkdUnit

ADOPT = "adopt"  # the plan's status of a row the apply will persist
BIND, VFS, VF = "bind", "vfs", "vf"
_ORDER = {VFS: 0, VF: 1, BIND: 2}  # VFs exist before their settings; binds last
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")
# networkd's [SR-IOV] keys -> nicpassd's VF settings
_NETWORKD_VF_KEYS = {"MACAddress": "mac", "VLANId": "vlan", "QualityOfService": "qos", "VLANProtocol": "vlan_proto",
                     "MACSpoofCheck": "spoofchk", "Trust": "trust", "LinkState": "link_state"}


@dataclass(frozen=True)
class Adoption:
    source: str  # where the old tool was told: a file (and line), or the kernel command line
    device: str  # PCI address (of the PF for vfs and vf)
    action: str  # bind, vfs, vf
    target: str  # "vfio-pci"; "8"; "VF 0: mac 02:…, trust on"
    status: str  # ADOPT ("adopt: ..."), "already persisted", "refused: ...", "skipped: ..."
    remove: str  # what to take out of the old tool once adopted
    values: dict[str, object] = field(default_factory=dict, compare=False)  # vf: the settings
    index: int = -1  # vf: the VF index

    @property
    def row(self) -> tuple[str, str, str, str, str, str]:
        return (self.source, self.device, self.action, self.target, self.status, self.remove)

    @property
    def adoptable(self) -> bool:
        return self.status.startswith(ADOPT)


def plan(view: HostView) -> list[Adoption]:
    """Every line found, in the order the engine applies them (``restate`` before each)."""
    rows = _driverctl(view) + _vfio_ids(view) + _networkd(view) + _udev(view)
    return sorted(_conflicts(rows), key=lambda row: _ORDER[row.action])


def restate(view: HostView, row: Adoption) -> Adoption:
    """``row`` as it stands now, after the rows applied before it (two tools may say the same)."""
    if not row.adoptable:
        return row
    if row.action == BIND:
        status = _bind_status(view, row.device, row.target)
    elif row.action == VFS:
        status = _vfs_status(view, row.device, int(row.target))
    else:
        status = _vf_status(view, row.device, row.index, row.values)
    return replace(row, status=status)


def _conflicts(rows: list[Adoption]) -> list[Adoption]:
    """Two old tools that disagree about one thing (a .link and a udev rule with different
    counts): neither is adopted; the admin decides."""
    said: dict[tuple[str, str, int], set[str]] = {}
    for row in rows:
        if row.device and row.adoptable:
            said.setdefault((row.device, row.action, row.index), set()).add(str(row.values or row.target))
    return [replace(row, status="skipped: the old configuration disagrees with itself about "
                    f"{row.device}: adopt the one you mean by hand") if row.device and row.adoptable
            and len(said[(row.device, row.action, row.index)]) > 1 else row for row in rows]


# ----------------------------------------------------------------------------- sources
def _driverctl(view: HostView) -> list[Adoption]:
    rows = []
    for override in view.host.driverctl_overrides():
        remove = (f"rm {override.path} (not `driverctl unset-override`, which rebinds the device now)")
        if override.driver not in PASSTHROUGH_DRIVERS:
            rows.append(Adoption(override.path, override.address, BIND, override.driver,
                                 f"skipped: nicpassd persists passthrough drivers ({', '.join(PASSTHROUGH_DRIVERS)}) "
                                 "only; keep this override or bind the device with `driverctl` alone", ""))
            continue
        rows.append(Adoption(override.path, override.address, BIND, override.driver,
                             _bind_status(view, override.address, override.driver), remove))
    return rows


def _vfio_ids(view: HostView) -> list[Adoption]:
    rows = []
    for given in legacy.vfio_pci_ids(view.snapshot.cmdline, view.host.modprobe_config()):
        if given.file:
            source, remove = given.source, f"remove '{given.text}' from {given.file}, then `update-initramfs -u`"
        else:
            source = f"kernel command line ({given.text})"
            remove = preflight.cmdline_remedy(view.host.read_platform(), remove=given.text)
        captured = [Adoption(source, address, BIND, VFIO, _bind_status(view, address, VFIO), remove)
                    for address, function in sorted(view.snapshot.functions.items())
                    if f"{function.vendor_id}:{function.device_id}".lower() in given.ids]
        rows += captured or [Adoption(source, "", BIND, VFIO, "skipped: no function present has the ids "
                                      f"{','.join(sorted(given.ids))}", remove)]
    return rows


def _networkd(view: HostView) -> list[Adoption]:
    """networkd applies the first matching .link and the first matching .network (by file name) to
    an interface: SR-IOVVirtualFunctions= of the .link, [SR-IOV] sections of either."""
    units = view.host.networkd_units()
    rows = []
    for address, function in sorted(view.snapshot.functions.items()):
        if not function.sriov_capable or function.physfn or not function.interfaces:
            continue
        for kind in ("link", "network"):
            unit = next((u for u in units if u.kind == kind and _matches(u, view, address)), None)
            if unit is None:
                continue
            count = unit.link_value("SR-IOVVirtualFunctions") if kind == "link" else None
            if count is not None:
                value, number = count
                where = f"{unit.path}:{number}"
                remove = f"remove SR-IOVVirtualFunctions= from {unit.path} (line {number})"
                status = (_vfs_status(view, address, int(value)) if value.isdigit()
                          else f"skipped: {value!r} is not a VF count")
                rows.append(Adoption(where, address, VFS, value, status, remove))
            for section in unit.sriov():
                rows.append(_networkd_vf(view, address, unit, section))
    return rows


def _matches(unit: NetworkdUnit, view: HostView, address: str) -> bool:
    function = view.snapshot.functions[address]
    names = list(function.interfaces)
    links = [view.snapshot.links[name] for name in names if name in view.snapshot.links]
    facts = {
        "Name": names, "OriginalName": names,
        "MACAddress": [link.mac.lower() for link in links],
        "PermanentMACAddress": [function.permanent_mac.lower()] if function.permanent_mac else [],
        "Path": [f"pci-{address}"], "Driver": [function.driver] if function.driver else [],
    }
    if not unit.match:
        return False  # a catch-all unit: not a statement about one card
    for key, words in unit.match.items():
        if key not in facts:
            return False  # a condition nicpassd cannot evaluate: never guess a device
        invert = bool(words) and words[0].startswith("!")
        patterns = [words[0].lstrip("!"), *words[1:]] if words else []
        hit = any(fnmatch.fnmatchcase(fact, pattern.lower() if "MAC" in key else pattern)
                  for fact in facts[key] for pattern in patterns)
        if hit == invert:
            return False
    return True


def _networkd_vf(view: HostView, address: str, unit: NetworkdUnit, section) -> Adoption:
    where = f"{unit.path}:{section.line}"
    remove = f"remove the [SR-IOV] section at {unit.path} line {section.line}, then `networkctl reload`"
    index_text = section.values.get("VirtualFunction", ("", 0))[0]
    if not index_text.isdigit():
        return Adoption(where, address, VF, "", "skipped: the section has no VirtualFunction=", remove)
    index = int(index_text)
    values: dict[str, object] = {}
    for key, (value, _) in section.values.items():
        if key == "VirtualFunction":
            continue
        name = _NETWORKD_VF_KEYS.get(key)
        converted = _networkd_value(name, value) if name else None
        if converted is None:
            return Adoption(where, address, VF, f"VF {index}",
                            f"skipped: {key}={value} has no nicpassd equivalent; set the VF with `nicpassctl vf`", remove)
        values[name] = converted
    target = f"VF {index}: " + ", ".join(f"{name} {_shown(value)}" for name, value in values.items())
    return Adoption(where, address, VF, target, _vf_status(view, address, index, values), remove, values, index)


def _networkd_value(name: str, value: str) -> object | None:
    if name in ("spoofchk", "trust"):
        return True if value.lower() in _TRUE else False if value.lower() in _FALSE else None
    if name == "link_state":
        return {"yes": "enable", "no": "disable", "auto": "auto"}.get(value.lower(),
                                                                      "enable" if value.lower() in _TRUE else None)
    if name in ("vlan", "qos"):
        return int(value) if value.isdigit() else None
    if name == "mac":
        return value.lower()
    return value


def _shown(value: object) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _udev(view: HostView) -> list[Adoption]:
    rows = []
    for rule in view.host.udev_numvfs_rules():
        where = f"{rule.path}:{rule.line}"
        remove = f"remove the rule at {rule.path} line {rule.line}, then `udevadm control --reload`"
        patterns = [value for key, value in rule.match.items()
                    if key in ("KERNEL", "KERNELS", "NAME", "ENV{INTERFACE}", "ENV{ID_NET_NAME}")]
        if not patterns:
            rows.append(Adoption(where, "", VFS, str(rule.count), "skipped: the rule names no device (no KERNEL== "
                                 "or NAME==): it writes the count into every PF it meets", remove))
            continue
        found = [address for address, function in sorted(view.snapshot.functions.items())
                 if function.sriov_capable and not function.physfn
                 and all(any(fnmatch.fnmatchcase(name, pattern) for name in (address, *function.interfaces))
                         for pattern in patterns)]
        if not found:
            rows.append(Adoption(where, "", VFS, str(rule.count), f"skipped: no PF present matches "
                                 f"{' '.join(patterns)}", remove))
        rows += [Adoption(where, address, VFS, str(rule.count), _vfs_status(view, address, rule.count), remove)
                 for address in found]
    return rows


# ----------------------------------------------------------------------------- verdicts
def _refusal(view: HostView, address: str, action: str) -> str:
    try:
        view.guard_check(address, action)
    except NicpassError as exc:
        return f"refused: {exc}"
    return ""


def _bind_status(view: HostView, address: str, driver: str) -> str:
    function = view.snapshot.functions.get(address)
    if function is None:
        return "skipped: not present"
    desire = view.store.get(address)
    if desire is not None and desire.driver == driver:
        return "already persisted"
    refusal = _refusal(view, address, f"bind {view.label(address)} to {driver}")
    if refusal:
        return refusal + " (this line takes it at every boot: remove it first)"
    if function.num_vfs:
        return f"refused: it has {function.num_vfs} VFs, which unbinding its PF driver would orphan"
    if function.driver == driver:
        return f"{ADOPT}: persisted (already on {driver})"
    return f"{ADOPT}: persisted and bound now (on {function.driver or 'no driver'})"


def _vfs_status(view: HostView, address: str, count: int) -> str:
    function = view.snapshot.functions[address]
    desire = view.store.get(address)
    if desire is not None and desire.num_vfs == count:
        return "already persisted"
    if count > function.total_vfs:
        return f"skipped: {view.label(address)} supports at most {function.total_vfs} VFs"
    refusal = _refusal(view, address, f"change the VF count of {view.label(address)}")
    if refusal:
        return refusal
    if function.num_vfs == count:
        return f"{ADOPT}: persisted (it has {count} VFs)"
    return f"{ADOPT}: persisted and applied now ({function.num_vfs} → {count} VFs)"


def _vf_status(view: HostView, address: str, index: int, values: dict[str, object]) -> str:
    desire = view.store.get(address)
    kept = desire.vf_settings.get(str(index)) if desire is not None else None
    if kept is not None and all(kept.model_dump(exclude_none=True).get(k) == v for k, v in values.items()):
        return "already persisted"
    function = view.snapshot.functions[address]
    if index < function.num_vfs:
        refusal = _refusal(view, function.virtfns[index], f"change the settings of VF {index} of {view.label(address)}")
        if refusal:
            return refusal
    return f"{ADOPT}: persisted and written now"
