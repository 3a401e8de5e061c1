"""Read-only answers about the host: ``explain`` one device, ``check`` the whole host.

Pure functions of what the engine knows (``HostView``) and its configuration; typed results
(``Explanation``, ``Finding``) that the transport maps to D-Bus types.
"""

from __future__ import annotations

from nicpassd.engine import preflight
from nicpassd.engine.config import Config
from nicpassd.engine.hostview import HostView
from nicpassd.engine.results import Explanation, Finding, GroupMember, Level
from nicpassd.host import legacy
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS

RISKY_CMDLINE = {
    "pcie_acs_override": "pcie_acs_override fakes IOMMU isolation (out-of-tree patch)",
    "vfio_iommu_type1.allow_unsafe_interrupts": "allow_unsafe_interrupts lets a VM inject interrupts",
    "vfio.enable_unsafe_noiommu_mode": "vfio no-IOMMU mode gives VMs unrestricted DMA",
    "vfio-pci.ids": "vfio-pci.ids= captures every device of those IDs, possibly the management NIC",
}


def explain(view: HostView, device: str) -> Explanation:
    address = view.resolve(device)
    snapshot, device_view = view.snapshot, view.views[address]
    members = tuple(GroupMember(mate, snapshot.functions[mate].driver if mate in snapshot.functions else "")
                    for mate in snapshot.group_members(address))
    blockers = [f"{member.address} on {member.driver}" for member in members
                if member.address != address and member.driver and member.driver not in PASSTHROUGH_DRIVERS
                and not (member.address in snapshot.functions and snapshot.functions[member.address].is_bridge)]
    viable = not blockers and device_view.iommu_group >= 0
    name = view.label(address)
    if device_view.protected:
        verdict = f"{name} is protected: {'; '.join(device_view.protection_reasons)}"
    elif device_view.leased_to:
        verdict = f"{name} is leased to VM {device_view.leased_to}"
    elif device_view.iommu_group < 0:
        verdict = f"{name} has no IOMMU group: the IOMMU is off or the device is not behind it"
    elif not viable:
        verdict = f"{name} can be bound, but its IOMMU group is not viable: {', '.join(blockers)}"
    else:
        verdict = f"{name} may be passed through"
    return Explanation(
        address=address, allowed=not device_view.protected and not device_view.leased_to and viable,
        verdict=verdict, protected=device_view.protected, reasons=tuple(device_view.protection_reasons),
        iommu_group=device_view.iommu_group, group_members=members, group_viable=viable,
        leased_to=device_view.leased_to, persisted=device_view.persisted,
        desired_driver=device_view.desired_driver, driver=device_view.driver,
        interfaces=tuple(device_view.interfaces), drift=device_view.drift,
        overridable=bool(device_view.protected and view.protected.entries[address].overridable),
    )


def check(view: HostView, config: Config) -> list[Finding]:
    snapshot = view.snapshot
    platform = view.host.read_platform()
    findings = preflight.platform_findings(platform)
    for word in snapshot.cmdline.split():
        key = word.split("=", 1)[0].replace("-", "_")  # the kernel treats - and _ alike
        key = next((name for name in RISKY_CMDLINE if name.replace("-", "_") == key), "")
        if key:
            findings.append(Finding(f"cmdline-{key}", Level.WARN, f"kernel command line has {word}: {RISKY_CMDLINE[key]}",
                                    preflight.cmdline_remedy(platform, remove=word)))
    default_routes = [route for route in snapshot.routes if route.is_default]
    if not default_routes and not config.guard.management_interfaces:
        findings.append(Finding("management", Level.WARN, "no default route and no configured management interface: "
                                "the guard cannot tell which NIC keeps the host reachable",
                                "set guard.management_interfaces in /etc/nicpassd/nicpassd.toml"))
    else:
        protected = ", ".join(sorted(view.protected.entries)) or "none"
        findings.append(Finding("management", Level.OK, f"management path protected: {protected}"))
    for address, held in sorted(view.memory.held.items()):
        function = snapshot.functions.get(address)
        name = view.label(address) if function and function.interfaces else (
            f"{address} ({', '.join(held.entry.interfaces)})" if held.entry.interfaces else address)
        driver = held.entry.driver or "its host driver"
        findings.append(Finding(
            f"guard-taken-{address}", Level.FAIL,
            f"{name} was the host's management path and is taken: {held.reasons[0]}",
            f"give it back to {driver} (`nicpassctl unbind {address}`), and find what took it (a vfio-pci.ids= or "
            f"modprobe.d option, driverctl, a VM); if it is no longer needed for management, "
            f"`nicpassctl guard --release {address}`"))
    findings += preflight.passthrough_of_management(view)
    findings += boot_capture(view)
    for number, note in enumerate(view.protected.notes):
        findings.append(Finding(f"guard-{number}", Level.WARN, note, "fix the [guard] section of /etc/nicpassd/nicpassd.toml"))
    for address, device_view in sorted(view.views.items()):
        if device_view.drift:
            level = Level.FAIL if device_view.drift.startswith("identity") else Level.WARN
            findings.append(Finding(f"drift-{address}", level, f"{address}: {device_view.drift}",
                                    f"re-apply with nicpassctl, or drop it with `nicpassctl forget {address}`"))
    for address, desire in sorted(view.store.state.devices.items()):
        if address not in snapshot.functions:
            identity = desire.identity
            known = [f"{identity.vendor_id}:{identity.device_id}"]
            if identity.physfn:
                known.append(f"VF {identity.vf_index} of {identity.physfn}")
            known += [f"MAC {identity.permanent_mac}"] if identity.permanent_mac else []
            known += [f"serial {identity.serial}"] if identity.serial else []
            findings.append(Finding(f"missing-{address}", Level.WARN,
                                    f"persisted device {address} ({', '.join(known)}) is not present",
                                    f"`nicpassctl forget {address}` if the card was removed for good"))
    return findings


def _module(name: str) -> str:
    return name.replace("-", "_")


def boot_capture(view: HostView) -> list[Finding]:
    """What would take a management device at the next boot, before nicpassd runs: vfio-pci's
    ``ids=`` (kernel command line or modprobe.d) matching it, or its host driver blacklisted,
    replaced (``install``) or preceded by vfio-pci (``softdep``)."""
    devices: dict[str, tuple[str, str]] = {}  # address -> (vendor:device, host driver)
    for address, entry in view.memory.entries.items():
        if entry.vendor_id:
            devices[address] = (f"{entry.vendor_id}:{entry.device_id}", entry.driver)
    if not devices:
        return []

    def captured(ids: frozenset[str]) -> list[str]:
        return [address for address, (pci_id, _) in sorted(devices.items()) if pci_id in ids]

    def name(address: str) -> str:
        entry = view.memory.entries[address]
        return f"{address} ({', '.join(entry.interfaces)})" if entry.interfaces else address

    per_device = ("pass the other devices through one by one (`nicpassctl import --apply` persists those it "
                  "captures, each applied at boot before its host driver, never by model)")
    findings = []
    modprobe_lines = view.host.modprobe_config()
    for given in legacy.vfio_pci_ids(view.snapshot.cmdline, modprobe_lines):
        for address in captured(given.ids):
            if given.file:
                findings.append(Finding(f"boot-capture-modprobe-{address}", Level.FAIL,
                                        f"{given.source}: '{given.text}' captures {name(address)}, a device of the "
                                        "host's management path, whenever vfio-pci loads",
                                        f"{per_device}; then remove the line from {given.file} and run "
                                        "`update-initramfs -u`"))
            else:
                remove = preflight.cmdline_remedy(view.host.read_platform(), remove=given.text)
                findings.append(Finding(f"boot-capture-cmdline-{address}", Level.FAIL,
                                        f"the kernel command line's {given.text} captures {name(address)}, a device "
                                        "of the host's management path, at every boot", f"{per_device}; then {remove}"))
    drivers: dict[str, list[str]] = {}
    for address, (_, driver) in sorted(devices.items()):
        if driver:
            drivers.setdefault(_module(driver), []).append(address)
    for file, line_number, line in modprobe_lines:
        words = line.split()
        where = f"{file}:{line_number}"
        if len(words) >= 2 and words[0] in ("blacklist", "install") and _module(words[1]) in drivers:
            what = "keeps its driver from loading" if words[0] == "blacklist" else "replaces the loading of its driver"
            for address in drivers[_module(words[1])]:
                findings.append(Finding(f"boot-capture-{words[0]}-{address}", Level.FAIL,
                                        f"{where}: '{line}' {what} ({words[1]}): {name(address)}, of the host's "
                                        "management path, comes up without it",
                                        f"remove the line from {file} and run `update-initramfs -u`"))
        elif len(words) >= 3 and words[0] == "softdep" and _module(words[1]) in drivers and \
                "vfio_pci" in {_module(w) for w in words[2:]}:
            for address in drivers[_module(words[1])]:
                findings.append(Finding(f"boot-capture-softdep-{address}", Level.WARN,
                                        f"{where}: '{line}' loads vfio-pci before {words[1]}, the driver of "
                                        f"{name(address)} (management path): with any vfio-pci ids= of its model, "
                                        "vfio-pci takes it", f"remove the line from {file} and run `update-initramfs -u`"))
    return findings


def config_findings(path, *, present: bool, rejected: str, read_at: str) -> list[Finding]:
    """Which configuration is in force, and a ``fail`` while the last reload was refused: the
    admin believes the file on disk is what the guard follows, and it is not."""
    source = f"{path} (read {read_at})" if present else f"the defaults ({path} does not exist; read {read_at})"
    if rejected:
        return [Finding("config", Level.FAIL, f"the last reload of {path} was refused, so the configuration in force "
                        f"is still {source}: {rejected}",
                        f"fix it (`nicpassd --check-config` names each problem with its line), then "
                        "`systemctl reload nicpassd`")]
    return [Finding("config", Level.OK, f"configuration in force: {source}")]


def check_devices(view: HostView, devices: list[str]) -> list[tuple[str, Finding]]:
    """``nicpassctl check DEVICE…``: each function's readiness (every network function when
    ``devices`` is empty), as (address, finding)."""
    snapshot = view.snapshot
    addresses = [view.resolve(device) for device in devices] or sorted(
        address for address, function in snapshot.functions.items() if function.is_network)
    platform = view.host.read_platform()
    return [(address, finding) for address in dict.fromkeys(addresses)
            for finding in preflight.device_findings(view, address, view.host.read_function_platform(address), platform)]
