"""Early binding: put ``driver_override`` on a persisted function *before* its host driver probes it.

nicpassd applies persisted bindings once it runs, but at boot and on hotplug the host driver of a
NIC would grab the function first (and its netdev would appear and be configured). udev runs the
helper ``nicpassd-udev-override %k`` on the PCI ``add`` of a function with a marker in
``/var/lib/nicpassd/early-binding.d/`` (packaging/udev/90-nicpassd.rules); it writes the override
(and loads vfio-pci) for the functions nicpassd listed in ``/var/lib/nicpassd/early-binding.json``,
so they land on vfio-pci without ever binding the host
driver — driverctl's model, per device, never ``new_id`` (docs/kernel-rules.md §7, §15).

The list is written by the daemon (``write_list``) from its desired state after every reconcile:
only desires that pass the guard and whose device still has the identity it was persisted with.
So a desire that became dangerous is not applied early either. The helper checks the identity
again (vendor, device, subsystem ids, PCIe serial when the list has one) and does nothing for a
device that does not match, or that is not listed.

The list also carries the VF counts that ``nicpassd.host.early_vfs`` creates first thing when the
daemon starts (``vf_counts``: only for PFs whose VFs need nothing but a count and, for all of them,
one driver; the daemon's reconcile does the rest).

Standard library only, imports nothing of nicpassd but the host layer's stdlib-only kernel reads
and writes (``nicpassd.host.kernelio``: the same serial parser and sysfs writer as the daemon)
and, for the daemon's writes of the list, the crash-safe file writer: udev runs it early at boot
(python3 -I starts in ~20 ms; importing the daemon's stack would take 300 ms).
"""

from __future__ import annotations

import json
import os
import re
import sys

from nicpassd.host import kernelio

# Paths are plain strings here, and nothing is imported that the boot path does not use: this
# module runs before anything else at boot (udev's helper, ``nicpassd.start``), where under a
# hypervisor pathlib, typing and logging cost 0.25 s to import (measured in the e2e guest).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Protocol

    StrPath = str | os.PathLike[str]
else:
    Protocol = object

LIST_FILE = "var/lib/nicpassd/early-binding.json"
MARKER_DIR = "var/lib/nicpassd/early-binding.d"  # the udev rule's TEST (see _sync_markers)
PCI_DEVICES = "sys/bus/pci/devices"
VF_MARKER = "vfs"
VERSION = 1
HEX_ID = re.compile(r"[0-9a-f]{4}")
ENTRY_KEYS = {"driver", "vendor", "device", "subsystem_vendor", "subsystem_device", "serial"}
SECTIONS = ("devices", "vf_drivers", "vf_counts")
# The drivers a vf_counts entry may name for its VFs: "" (the VFs' host driver, as the kernel's
# autoprobe gives it) or vfio-pci (the engine's SetVfCount with driver vfio-pci).
VF_COUNT_DRIVERS = ("", kernelio.VFIO)


class BadList(ValueError):
    """The early-binding list is not what nicpassd writes: the helper binds nothing early."""


class Kernel(Protocol):
    def write(self, path: StrPath, data: str) -> None: ...

    def load_module(self, name: str) -> None: ...


class SysfsKernel:
    """The real write boundary: plain sysfs writes, modprobe."""

    def __init__(self, root: StrPath) -> None:
        self.root = root

    def write(self, path: StrPath, data: str) -> None:
        kernelio.write_sysfs(path, data)

    def load_module(self, name: str) -> None:
        module = kernelio.DRIVER_MODULES.get(name, name)
        if os.path.isdir(join_path(self.root, "sys/module", module)) \
                or os.path.isdir(join_path(self.root, "sys/bus/pci/drivers", name)):
            return
        if not _is_slash(self.root):
            return  # a test root: never load a module into the machine running the test
        kernelio.load_module(name)


# ------------------------------------------------------------------------------- the list
def identity_entry(driver: str, vendor: str, device: str, subsystem_vendor: str = "",
                   subsystem_device: str = "", serial: str = "") -> dict[str, str]:
    return {"driver": driver, "vendor": vendor, "device": device, "subsystem_vendor": subsystem_vendor,
            "subsystem_device": subsystem_device, "serial": serial}


def vf_count_entry(count: int, driver: str, vendor: str, device: str, subsystem_vendor: str = "",
                   subsystem_device: str = "", serial: str = "") -> dict[str, str]:
    """A PF's persisted VF count and its VFs' driver, with the PF's identity."""
    return {**identity_entry(driver, vendor, device, subsystem_vendor, subsystem_device, serial), "count": str(count)}


def write_list(root: StrPath, devices: dict[str, dict[str, str]], vf_drivers: dict[str, dict[str, str]],
               vf_counts: dict[str, dict[str, str]] | None = None) -> bool:
    """Atomically replace the list and bring the markers in line; returns False when the list
    already said exactly this."""
    from pathlib import Path

    from nicpassd.atomicfile import atomic_write

    path = Path(root) / LIST_FILE
    payload = json.dumps({"version": VERSION, "devices": devices, "vf_drivers": vf_drivers,
                          "vf_counts": vf_counts or {}}, indent=2, sort_keys=True).encode()
    try:
        changed = path.read_bytes() != payload
    except OSError:
        changed = True
    if changed:
        atomic_write(path, payload, mode=0o644, prefix=".early-binding-")
    _sync_markers(Path(root) / MARKER_DIR, set(devices) | ({VF_MARKER} if vf_drivers else set()))
    return changed


def _sync_markers(directory: Path, wanted: set[str]) -> None:
    """One empty file per listed function (and ``vfs`` when VFs of some PF are listed): the
    rule's TEST, so that udev starts the helper for these devices only. At coldplug udev would
    otherwise start a Python process for every PCI function of the host at once (seen in the e2e
    guest: 25 of them, ~13 s each under TCG, the listed one done long after nicpassd started).
    The list stays the helper's only authority: a marker without an entry does nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    present = {entry.name for entry in directory.iterdir() if not entry.name.startswith(".")}
    for name in sorted(present - wanted):
        (directory / name).unlink(missing_ok=True)
    for name in sorted(wanted - present):
        (directory / name).touch(mode=0o644)


def read_list(root: StrPath) -> dict:
    """The list, checked field by field ({} when there is none). ``BadList`` names the file and the
    field: a list that is not exactly what the daemon writes (a hand edit, a torn or foreign file)
    binds nothing early, rather than writing whatever it says into a driver_override at boot."""
    path = join_path(root, LIST_FILE)
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadList(f"{path}: unreadable ({exc}); nicpassd rewrites it at its next reconcile "
                      "(`nicpassctl reconcile`)") from None
    problem = _list_problem(data)
    if problem:
        raise BadList(f"{path}: {problem}; nicpassd rewrites it at its next reconcile (`nicpassctl reconcile`)")
    return data


def _list_problem(data: object) -> str:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return f"not a version {VERSION} early-binding list"
    unknown = set(data) - {"version", *SECTIONS}
    if unknown:
        return f"unknown key(s) {', '.join(sorted(map(str, unknown)))}"
    for section in SECTIONS:
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            return f"{section} is not an object"
        keys, drivers = ENTRY_KEYS, kernelio.PASSTHROUGH_DRIVERS
        if section == "vf_counts":
            keys, drivers = ENTRY_KEYS | {"count"}, VF_COUNT_DRIVERS
        for address, entry in entries.items():
            where = f"{section}.{address!r}"
            if not kernelio.PCI_ADDRESS.fullmatch(address):
                return f"{where}: not a PCI address (DDDD:BB:SS.F)"
            required = {"driver", *(keys - ENTRY_KEYS)}
            if not isinstance(entry, dict) or not required <= set(entry) <= keys:
                return f"{where}: not an entry of {', '.join(sorted(keys))}"
            if not all(isinstance(value, str) for value in entry.values()):
                return f"{where}: every field is a string"
            if entry["driver"] not in drivers:
                return f"{where}.driver: {entry['driver']!r} is not one of {', '.join(map(repr, drivers))}"
            count = entry.get("count", "1")
            if not (count.isascii() and count.isdigit() and int(count) > 0):
                return f"{where}.count: {entry['count']!r} is not a VF count above 0"
            for key in ("vendor", "device", "subsystem_vendor", "subsystem_device"):
                if entry.get(key) and not HEX_ID.fullmatch(entry[key]):
                    return f"{where}.{key}: {entry[key]!r} is not four hex digits"
            if entry.get("serial") and not kernelio.SERIAL.fullmatch(entry["serial"]):
                return f"{where}.serial: {entry['serial']!r} is not a PCIe serial (xx-xx-xx-xx-xx-xx-xx-xx)"
    return ""


# ----------------------------------------------------------------------------- the helper
def _hex(path: StrPath) -> str:
    return kernelio.hex_id(path)


def mismatch(entry: dict[str, str], device_dir: StrPath, *, vf: bool = False) -> str:
    checks = [("vendor", "vendor"), ("device", "device")] if not vf else [("vendor", "vendor")]
    checks += [("subsystem_vendor", "subsystem_vendor"), ("subsystem_device", "subsystem_device")]
    for key, attr in checks:
        wanted = entry.get(key, "")
        if wanted and _hex(join_path(device_dir, attr)) != wanted:
            return f"{attr} is {_hex(join_path(device_dir, attr))}, persisted {wanted}"
    if entry.get("serial") and not vf:
        serial = kernelio.read_serial(join_path(device_dir, "config"))
        if serial and serial != entry["serial"]:
            return f"serial is {serial}, persisted {entry['serial']}"
    return ""


def override_for(root: StrPath, name: str, listing: dict) -> tuple[str, str]:
    """(driver to put in driver_override or "", why) for PCI function ``name``."""
    device_dir = join_path(root, PCI_DEVICES, name)
    entry = (listing.get("devices") or {}).get(name)
    if entry is not None:
        problem = mismatch(entry, device_dir)
        return ("", f"identity changed ({problem})") if problem else (entry["driver"], "persisted")
    physfn = kernelio.link_name(join_path(device_dir, "physfn"))
    if not physfn:
        return "", "not listed"
    entry = (listing.get("vf_drivers") or {}).get(physfn)
    if entry is None:
        return "", "not listed"
    problem = mismatch(entry, join_path(root, PCI_DEVICES, physfn))
    if problem:
        return "", f"its PF {physfn} changed ({problem})"
    return entry["driver"], f"VF of {physfn}"


def apply(root: StrPath, name: str, kernel: Kernel) -> str:
    """Set the override of ``name`` if listed; returns the driver set ("" = nothing done)."""
    driver, why = override_for(root, name, read_list(root))
    if not driver:
        if why != "not listed":
            _journal(root, f"{name}: persisted for passthrough but left alone: {why}")
        return ""
    device_dir = join_path(root, PCI_DEVICES, name)
    kernel.load_module(driver)
    kernel.write(join_path(device_dir, "driver_override"), driver + "\n")
    done = [f"driver_override {driver} ({why})"]
    current = _driver_of(device_dir)
    if current and current != driver:  # udev lost the race with an already-loaded host driver
        try:
            kernel.write(join_path(root, "sys/bus/pci/drivers", current, "unbind"), name)
            done.append(f"unbound from {current}")
        except OSError:
            if _driver_of(device_dir) == current:
                raise
            # unbound meanwhile by someone else: nicpassd, if it started during coldplug
    if not _driver_of(device_dir):
        kernel.write(join_path(root, "sys/bus/pci/drivers_probe"), name)
        done.append("probed")
    _journal(root, f"{name}: {', '.join(done)}; now on {_driver_of(device_dir) or 'no driver'}")
    return driver


def _journal(root: StrPath, message: str) -> None:
    """What the helper did, in the system log (udev keeps a program's stderr only at debug
    level): the admin's answer to "who put my NIC on vfio-pci at boot?". Not for a test root."""
    if not _is_slash(root):
        return
    import syslog

    syslog.openlog("nicpassd-udev-override", 0, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_INFO, message)


def _driver_of(device_dir: str) -> str:
    return kernelio.link_name(join_path(device_dir, "driver"))


def join_path(*parts: StrPath) -> str:
    """os.path.join of str and PathLike parts (this module's paths are strings, see above)."""
    return os.path.join(*map(os.fspath, parts))


def _is_slash(root: StrPath) -> bool:
    return os.path.realpath(root) == "/"


def rule_matches(root: StrPath, name: str) -> bool:
    """packaging/udev/90-nicpassd.rules' TESTs: would udev start the helper for ``name``?"""
    markers = join_path(root, MARKER_DIR)
    return os.path.exists(join_path(markers, name)) or (
        os.path.exists(join_path(root, PCI_DEVICES, name, "physfn")) and os.path.exists(join_path(markers, VF_MARKER)))


def udev_rule(kernel, address: str) -> None:
    """The rule and its helper as a rule of the simulated kernel (``SimKernel(rules=[udev_rule])``):
    run on "add", before the probe, writing through the simulated kernel's write boundary."""
    if rule_matches(kernel.paths.root, address):
        try:
            apply(kernel.paths.root, address, kernel)
        except BadList:
            pass  # the helper binds nothing early (it says so on stderr, which udev keeps)


def main(argv: list[str] | None = None, kernel: Kernel | None = None) -> int:
    """nicpassd-udev-override [--root DIR] KERNEL_NAME; prints NICPASSD_OVERRIDE=... for IMPORT{program}."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = os.environ.get("NICPASSD_ROOT", "/")
    if len(args) == 3 and args[0] == "--root":
        root, args = args[1], args[2:]
    if len(args) != 1 or not kernelio.PCI_ADDRESS.fullmatch(args[0]):
        print("usage: nicpassd-udev-override [--root DIR] PCI_ADDRESS (DDDD:BB:SS.F)", file=sys.stderr)
        return 2
    try:
        driver = apply(root, args[0], kernel or SysfsKernel(root))
    except BadList as exc:
        print(f"nicpassd-udev-override: {args[0]}: nothing bound early: {exc}", file=sys.stderr)
        _journal(root, f"{args[0]}: nothing bound early: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - udev logs stderr; never a traceback at boot
        print(f"nicpassd-udev-override: {args[0]}: {exc}", file=sys.stderr)
        return 1
    if driver:
        print(f"NICPASSD_OVERRIDE={driver}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
