"""A simulated Linux kernel: a sysfs-shaped tree plus the kernel's behaviour at the write boundary.

The tree is plain files and symlinks laid out like the real ``/sys`` (and ``/proc/net``), so the
host model reads it with exactly the code that reads a real host. Writes go through
``SimKernel.write`` (the simulator's ``KernelWriter``), which applies the rules of
``drivers/pci/iov.c`` and the PCI driver core — 0→N only, ``EBUSY``/``ERANGE``/``ENOENT``/
``ENODEV``, ``driver_override`` and ``drivers_probe`` semantics, VFs appearing with ``virtfnN``/
``physfn`` links and their own IOMMU groups — and emits the uevents the kernel would, in the
kernel's order and with its payload (checked against a real 6.1 kernel by tests/e2e/conformance.py
and tests/e2e/kernel-observations/): a driver's netdev comes before its "bind" and goes before its
"unbind", "unbind" carries no driver, each new VF gets a "change" after its "add", the PF a
"change" (with its driver) once its VFs are enabled and none when they are disabled, VF 0 first.

Faults can be armed for tests: a hung write, fewer VFs than asked, a bind that silently fails, a
write that fails with an errno.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from nicpassd.host import netlink, procfs
from nicpassd.host import vf_netlink as wire
from nicpassd.host.events import UEvent, UEventCallback, pci_identity
from nicpassd.host.model import IfAddress, VfSettings
from nicpassd.paths import HostPaths
from nicpassd.sim import vf_settings as sim_vf_settings
from nicpassd.sim.topology import Function, Topology, root_disk

log = logging.getLogger(__name__)

ALWAYS_AVAILABLE_DRIVERS = ("pci-stub",)
VFIO_RELEASE_WAIT = 30.0
LOADABLE_MODULES = {"vfio-pci": "vfio-pci", "vfio_pci": "vfio-pci", "pci-stub": "pci-stub"}
PCI_ROOT = "devices/pci0000:00"


def _oserror(code: int, detail: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {detail}")


def _parse_address(address: str) -> tuple[int, int, int]:
    domain, bus, devfn = address.split(":")
    slot, fn = devfn.split(".")
    return int(domain, 16), int(bus, 16), (int(slot, 16) << 3) | int(fn, 16)


def vf_address(pf: str, offset: int, stride: int, index: int) -> str:
    """The routing-ID arithmetic of the SR-IOV capability (First VF Offset, VF Stride)."""
    domain, bus, devfn = _parse_address(pf)
    rid = (bus << 8 | devfn) + offset + stride * index
    bus, devfn = rid >> 8, rid & 0xFF
    return f"{domain:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7:x}"


@dataclass
class SimDevice:
    spec: Function
    driver: str = ""
    override: str = ""
    group: int = -1
    netdev: str = ""
    numvfs: int = 0
    autoprobe: bool = True
    physfn: str = ""
    vf_index: int = -1
    vf_settings: list[VfSettings] = field(default_factory=list)  # a PF's, held by its driver


def _pci_uevent_ids(spec) -> dict[str, str]:
    """The ids the kernel puts in every uevent of a PCI function, formatted as pci_uevent() does
    (upper-case hex, the class without leading zeroes)."""
    return {"PCI_CLASS": f"{int(spec.class_code, 16):04X}",
            "PCI_ID": f"{int(spec.vendor, 16):04X}:{int(spec.device, 16):04X}",
            "PCI_SUBSYS_ID": f"{int(spec.subsystem_vendor, 16):04X}:{int(spec.subsystem_device, 16):04X}"}


@dataclass
class Faults:
    """Faults armed by tests. Each is consumed when it fires (``times`` counts down)."""

    hang_seconds: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    short_vfs: dict[str, int] = field(default_factory=dict)  # PF -> VFs actually enabled
    silent_bind_failure: dict[str, int] = field(default_factory=dict)  # device -> times
    write_errors: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    # PF -> times: the kernel's own probe of the VFs a sriov_numvfs write creates (autoprobe on)
    # finishes late; see "Fault: late autoprobe of new VFs" below.
    probe_after_numvfs: dict[str, int] = field(default_factory=dict)


class SimKernel:
    """Builds the tree under ``paths.root`` and serves writes like the kernel."""

    def __init__(self, paths: HostPaths, topology: Topology, *,
                 rules: Sequence[Callable[["SimKernel", str], None]] = ()) -> None:
        self.paths = paths
        self.topology = topology
        # udev rules run on a PCI "add", before the kernel probes a driver (the udev helper of
        # packaging/udev/ sets driver_override there): ``rule(kernel, address)``, at boot, on
        # plug, for new VFs. ``nicpassd.host.early_binding.udev_rule`` is that helper.
        self.rules = list(rules)
        self.faults = Faults()
        self._lock = threading.RLock()
        self._subscribers: list[UEventCallback] = []
        self._queue = threading.local()  # uevents of the operation in progress on this thread
        self._devices: dict[str, SimDevice] = {}
        self._drivers: set[str] = set(ALWAYS_AVAILABLE_DRIVERS)
        self._next_group = 0
        self._ifindex = 1
        self._late_probes: dict[str, str] = {}  # VF -> host driver (Faults.probe_after_numvfs)
        self._late_enable = ""
        self._vfio_held: set[str] = set()  # group nodes nicpassd holds (hold_vfio_group)
        self._vfio_foreign: set[str] = set()  # held by a process nicpassd cannot see into
        self._build()

    # ----------------------------------------------------------------- events
    def subscribe(self, callback: UEventCallback) -> None:
        self._subscribers.append(callback)

    def _emit(self, action: str, subsystem: str, name: str, driver: str = "",
              properties: dict[str, str] | None = None) -> None:
        event = UEvent(action, subsystem, name, driver, pci_identity(properties) if properties else ())
        queued = getattr(self._queue, "events", None)
        if queued is not None:
            queued.append(event)  # raised inside a write: delivered, in order, when it returns
            return
        for callback in list(self._subscribers):
            callback(event)

    def operation(self):
        """A batch of writes as one operation (see ``_operation``): the engine's batched writes."""
        return self._operation()

    @contextlib.contextmanager
    def _operation(self):
        """One kernel operation (a write, a hotplug): its uevents reach subscribers together once it
        returns, the way a listener finds them queued in its netlink socket — not one wakeup of the
        daemon's loop per event while the simulated kernel still runs in its write thread."""
        if getattr(self._queue, "events", None) is not None:
            yield  # nested (a udev rule writing during an add): the outermost one delivers
            return
        self._queue.events = []
        try:
            yield
        finally:
            events, self._queue.events = self._queue.events, None
            for event in events:
                for callback in list(self._subscribers):
                    callback(event)

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        root = self.paths.root
        for top in ("sys", "proc"):
            shutil.rmtree(root / top, ignore_errors=True)
        sysfs = self.paths.sys
        for sub in (PCI_ROOT, "devices/virtual/net", "bus/pci/devices", "bus/pci/drivers",
                    "kernel/iommu_groups", "class/net", "class/iommu", "module"):
            (sysfs / sub).mkdir(parents=True, exist_ok=True)
        self.paths.drivers_probe.write_text("")
        self.paths.proc_net.mkdir(parents=True, exist_ok=True)
        self.paths.proc_cmdline.write_text(self.topology.cmdline + "\n")
        self._write_platform()
        for driver in ALWAYS_AVAILABLE_DRIVERS:
            self._add_driver(driver)
        fixed = [fn.iommu_group for fn in self.topology.functions if fn.iommu_group is not None]
        self._next_group = max(fixed, default=-1) + 1
        for fn in self.topology.functions:
            if fn.driver:
                self._add_driver(fn.driver)
        for fn in self.topology.functions:
            group = fn.iommu_group if fn.iommu_group is not None else self._allocate_group()
            device = SimDevice(spec=fn, group=group if self.topology.iommu else -1)
            self._add_pci_device(device, emit=False)
            self._run_rules(device)
            if device.driver:
                pass  # a udev rule set driver_override and probed it
            elif device.override:  # only that driver may bind (if it is loaded)
                if device.override in self._drivers and fn.bound:
                    self._attach_driver(device, device.override, emit=False)
            elif fn.bound and fn.driver:
                self._attach_driver(device, fn.driver, emit=False)
        for link in self.topology.links:
            self._add_virtual_link(link.name, link.kind, link.mac, link.lowers)
        self._write_routes()
        self._write_block_devices()

    def _write_platform(self) -> None:
        """/proc/cpuinfo, /dev/kvm, the ACPI tables, the IOMMU units, interrupts, vfio and the boot
        loader's files, as ``nicpassd.host.platform`` reads them."""
        spec, root, sysfs = self.topology.platform, self.paths.root, self.paths.sys
        intel = spec.cpu == "intel"
        flag = ("vmx" if intel else "svm") if spec.virtualization else ""
        (root / "proc/cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {'GenuineIntel' if intel else 'AuthenticAMD'}"
                                           f"\nflags\t\t: fpu de pse msr pae {flag} x2apic\n\n")
        (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
        (root / "proc/sys/kernel/osrelease").write_text(spec.kernel_release + "\n")
        chips = "IR-PCI-MSI" if spec.interrupt_remapping == "on" and self.topology.iommu else "PCI-MSI"
        (root / "proc/interrupts").write_text(f"           CPU0\n 24:          5  {chips} 1048576-edge      eno1\n")
        kvm = root / "dev/kvm"
        kvm.parent.mkdir(parents=True, exist_ok=True)
        kvm.write_text("") if spec.kvm else kvm.unlink(missing_ok=True)
        if spec.firmware_iommu:
            (sysfs / "firmware/acpi/tables").mkdir(parents=True)
            (sysfs / "firmware/acpi/tables" / ("DMAR" if intel else "IVRS")).write_bytes(b"\0" * 48)
        self._iommu_unit = ("dmar0" if intel else "ivhd0") if self.topology.iommu else ""
        if self._iommu_unit:
            unit = sysfs / "devices/virtual/iommu" / self._iommu_unit
            unit.mkdir(parents=True)
            (sysfs / "class/iommu" / self._iommu_unit).symlink_to(f"../../devices/virtual/iommu/{self._iommu_unit}")
            if intel:  # the Extended Capability Register, IR is bit 3 (a real VT-d unit's value otherwise)
                ecap = 0xF0050E if spec.interrupt_remapping != "unsupported" else 0xF05006
                (unit / "intel-iommu").mkdir()
                (unit / "intel-iommu/ecap").write_text(f"{ecap:x}\n")
        parameters = sysfs / "module/vfio_iommu_type1/parameters"
        parameters.mkdir(parents=True)
        (parameters / "allow_unsafe_interrupts").write_text("Y\n" if spec.unsafe_interrupts else "N\n")
        modules = root / "lib/modules" / spec.kernel_release
        modules.mkdir(parents=True, exist_ok=True)
        vfio = "kernel/drivers/vfio/pci/vfio-pci.ko"
        (modules / "modules.dep").write_text(f"{vfio}: kernel/drivers/vfio/vfio.ko\n" if spec.vfio == "module" else "")
        (modules / "modules.builtin").write_text(f"{vfio}\n" if spec.vfio == "builtin" else "")
        files = {"grub": ["etc/default/grub"], "systemd-boot": ["etc/kernel/cmdline"],
                 "proxmox-boot-tool": ["etc/kernel/cmdline", "etc/kernel/proxmox-boot-uuids"], "none": []}
        for name in {path for paths in files.values() for path in paths}:
            (root / name).unlink(missing_ok=True)
        for name in files[spec.boot_loader]:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(f'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n' if name.endswith("grub") else
                                     self.topology.cmdline + "\n" if name.endswith("cmdline") else "1234-ABCD\n")

    def _allocate_group(self) -> int:
        group = self._next_group
        self._next_group += 1
        return group

    def _add_driver(self, name: str) -> None:
        if name in self._drivers and (self.paths.pci_drivers / name).exists():
            return
        self._drivers.add(name)
        directory = self.paths.pci_drivers / name
        directory.mkdir(parents=True, exist_ok=True)
        for attr in ("bind", "unbind", "new_id", "remove_id"):
            (directory / attr).write_text("")

    def _device_dir(self, address: str) -> Path:
        return self.paths.sys / PCI_ROOT / address

    def _add_pci_device(self, device: SimDevice, *, emit: bool) -> None:
        spec, address = device.spec, device.spec.address
        directory = self._device_dir(address)
        directory.mkdir(parents=True)
        attrs = {
            "vendor": f"0x{spec.vendor}", "device": f"0x{spec.device}",
            "subsystem_vendor": f"0x{spec.subsystem_vendor}",
            "subsystem_device": f"0x{spec.subsystem_device}",
            "class": f"0x{spec.class_code}", "driver_override": "(null)", "numa_node": "0",
            "remove": "",
        }
        if spec.reset_method:  # the kernel shows neither when it cannot reset the function
            attrs.update({"reset": "", "reset_method": spec.reset_method})
        if spec.sriov_totalvfs:
            attrs.update({
                "sriov_totalvfs": str(spec.sriov_totalvfs), "sriov_numvfs": "0",
                "sriov_drivers_autoprobe": "1", "sriov_offset": str(spec.vf_offset),
                "sriov_stride": str(spec.vf_stride), "sriov_vf_device": spec.vf_device,
            })
        for name, value in attrs.items():
            (directory / name).write_text(value + "\n")
        (directory / "config").write_bytes(_config_space(spec))
        (directory / "resource").write_text(_resources(spec, address))
        (directory / "subsystem").symlink_to("../../../bus/pci")
        (self.paths.pci_devices / address).symlink_to(f"../../../{PCI_ROOT}/{address}")
        if device.group >= 0:
            group_dir = self.paths.iommu_groups / str(device.group) / "devices"
            group_dir.mkdir(parents=True, exist_ok=True)
            (group_dir / address).symlink_to(f"../../../../{PCI_ROOT}/{address}")
            (directory / "iommu_group").symlink_to(f"../../../kernel/iommu_groups/{device.group}")
            (directory / "iommu").symlink_to(f"../../virtual/iommu/{self._iommu_unit or 'dmar0'}")
            kind = group_dir.parent / "type"
            if not kind.exists():
                kind.write_text("identity\n" if "iommu=pt" in self.topology.cmdline.split() else "DMA-FQ\n")
        self._devices[address] = device
        if emit:
            self._emit("add", "pci", address, properties=_pci_uevent_ids(spec))

    def _remove_pci_device(self, device: SimDevice) -> None:
        """pci_stop_and_remove_bus_device(): the driver lets go (its netdev goes, then "unbind"),
        then the device goes ("remove").

        A PF with VFs is removed the way pciehp_unconfigure_device() and pci_stop_bus_device()
        walk the bus: in reverse, so its VFs go first (the last one first), each the same way,
        then the PF; its driver finds no VF left to disable and no "change" is sent."""
        address = device.spec.address
        for index in reversed(range(device.numvfs)):
            self._remove_vf(device, index)
        if device.numvfs:
            device.numvfs = 0
            self._set_attr(address, "sriov_numvfs", "0")
        if device.driver:
            self._detach_driver(device)
        (self.paths.pci_devices / address).unlink()
        if device.group >= 0:
            (self.paths.iommu_groups / str(device.group) / "devices" / address).unlink()
            group_dir = self.paths.iommu_groups / str(device.group)
            if not any((group_dir / "devices").iterdir()):
                shutil.rmtree(group_dir)
        shutil.rmtree(self._device_dir(address))
        del self._devices[address]
        self._emit("remove", "pci", address)

    # --------------------------------------------------------------- netdevs
    def _netdev_name(self, device: SimDevice) -> str:
        if device.physfn:
            pf = self._devices[device.physfn]
            base = pf.spec.netdev or "vf" + device.physfn.replace(":", "").replace(".", "")
            return f"{base}v{device.vf_index}"
        return device.spec.netdev

    def _add_netdev(self, device: SimDevice) -> None:
        name = self._netdev_name(device)
        if not name:
            return
        address = device.spec.address
        net_dir = self._device_dir(address) / "net" / name
        net_dir.mkdir(parents=True)
        if device.physfn:
            # The VF driver takes the administrative MAC its PF holds, else picks a random one.
            pf = self._devices[device.physfn]
            settings = pf.vf_settings
            admin = settings[device.vf_index].mac if device.vf_index < len(settings) else ""
            if not sim_vf_settings.vf_reaches_pf(pf.driver, pf.spec.carrier):
                admin = ""  # igb: "PF still in reset state. Is the PF interface up?" -> a random MAC
            mac, assign_type = admin or _vf_mac(address), "1"
        else:
            mac, assign_type = device.spec.mac or _vf_mac(address), "0"
        self._net_attrs(net_dir, mac, assign_type, carrier=device.spec.carrier)
        (net_dir / "uevent").write_text(f"INTERFACE={name}\n")
        (net_dir / "device").symlink_to(f"../../../{address}")
        (self.paths.class_net / name).symlink_to(f"../../{PCI_ROOT}/{address}/net/{name}")
        device.netdev = name
        self._relink_uppers(name)
        if self._in_routing(name):
            self._write_routes()
        self._emit("add", "net", name)

    def _remove_netdev(self, device: SimDevice) -> None:
        if not device.netdev:
            return
        name = device.netdev
        (self.paths.class_net / name).unlink()
        shutil.rmtree(self._device_dir(device.spec.address) / "net")
        device.netdev = ""
        for link in self.topology.links:  # the upper keeps existing, its lower link goes
            lower = self.paths.sys / "devices/virtual/net" / link.name / f"lower_{name}"
            if lower.is_symlink():
                lower.unlink()
        if self._in_routing(name):
            self._write_routes()
        self._emit("remove", "net", name)

    def _in_routing(self, name: str) -> bool:
        """Whether a route, next hop or address names the interface: only then do the routing
        files change when it comes or goes (rewriting them for every VF netdev cost the
        simulator's bind ~1 ms, five times the rest of its work)."""
        topology = self.topology
        return (any(route.dev == name or any(hop.dev == name for hop in route.nexthops) for route in topology.routes)
                or any(hop.dev == name for hop in topology.nexthops)
                or any(item.dev == name for item in topology.addresses))

    def _net_attrs(self, net_dir: Path, mac: str, assign_type: str, *, carrier: bool) -> None:
        values = {
            "address": mac, "addr_assign_type": assign_type, "ifindex": str(self._ifindex),
            "operstate": "up" if carrier else "down", "carrier": "1" if carrier else "0",
            "flags": "0x1003" if carrier else "0x1002",  # IFF_UP: a simulated netdev with a link is up
            "type": "1", "mtu": "1500",
        }
        self._ifindex += 1
        for attr, value in values.items():
            (net_dir / attr).write_text(value + "\n")

    def _add_virtual_link(self, name: str, kind: str, mac: str, lowers: tuple[str, ...]) -> None:
        net_dir = self.paths.sys / "devices/virtual/net" / name
        net_dir.mkdir(parents=True)
        self._net_attrs(net_dir, mac or "02:00:00:00:00:01", "3", carrier=True)
        (net_dir / "uevent").write_text(f"DEVTYPE={kind}\nINTERFACE={name}\n")
        if kind == "bridge":
            (net_dir / "bridge").mkdir()
        if kind == "bond":
            (net_dir / "bonding").mkdir()
            (net_dir / "bonding" / "slaves").write_text(" ".join(lowers) + "\n")
        (self.paths.class_net / name).symlink_to(f"../../devices/virtual/net/{name}")
        self._relink_uppers(name)

    def _relink_uppers(self, name: str) -> None:
        """(Re)create lower_/upper_ links between ``name`` and the virtual links stacked on it."""
        for link in self.topology.links:
            upper_dir = self.paths.class_net / link.name
            if not upper_dir.exists():
                continue
            for lower in link.lowers:
                if name not in (lower, link.name):
                    continue
                lower_dir = self.paths.class_net / lower
                if not lower_dir.exists():
                    continue
                lower_link = upper_dir.resolve() / f"lower_{lower}"
                if not lower_link.is_symlink():
                    lower_link.symlink_to(os.path.relpath(lower_dir.resolve(), upper_dir.resolve()))
                upper_link = lower_dir.resolve() / f"upper_{link.name}"
                if not upper_link.is_symlink():
                    upper_link.symlink_to(os.path.relpath(upper_dir.resolve(), lower_dir.resolve()))

    # ---------------------------------------------------------------- routes
    def _write_routes(self) -> None:
        """/proc/net/route and ipv6_route (the main table, a multipath route's first hop: what
        procfs shows) and the answers to rtnetlink's route, rule and nexthop dumps (every table,
        every next hop: host/routing.py reads them as the kernel's)."""
        from nicpassd.host import routing

        v4, v6 = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"], []
        self._write_addresses()
        index = {name: int((self.paths.class_net / name / "ifindex").read_text())
                 for name in os.listdir(self.paths.class_net)}
        nexthops = {hop.id: hop for hop in self.topology.nexthops}
        dump_routes, dump_nexthops = [], []
        for hop in self.topology.nexthops:
            if hop.group or hop.dev in index:
                family = ipaddress.ip_address(hop.gateway).version if hop.gateway else 4
                dump_nexthops.append(routing.encode_nexthop(hop.id, family=family, oif=index.get(hop.dev, 0),
                                                            gateway=hop.gateway, group=hop.group))
        for route in self.topology.routes:
            hops = [(hop.dev, hop.gateway) for hop in route.nexthops] or [(route.dev, route.gateway)]
            hops = [(dev, gateway) for dev, gateway in hops if dev in index]  # gone with their interface
            if route.nexthop and route.nexthop in nexthops:
                dump_routes.append(routing.encode_route(route.family, route.prefix, route.table, nh_id=route.nexthop))
                continue
            if not hops:
                continue  # the kernel drops the routes of an interface that goes away
            dump_routes.append(routing.encode_route(
                route.family, route.prefix, route.table, oif=index[hops[0][0]] if len(hops) == 1 else 0,
                gateway=hops[0][1] if len(hops) == 1 else "",
                nexthops=tuple((index[dev], gateway) for dev, gateway in hops) if len(hops) > 1 else ()))
            if route.table != 254:
                continue
            dev, gateway_text = hops[0]
            net = ipaddress.ip_network(route.prefix)
            if route.family == 4:
                gateway = ipaddress.IPv4Address(gateway_text or "0.0.0.0")
                flags = 0x1 | (0x2 if gateway_text else 0)
                v4.append("\t".join([
                    dev, _le_hex(net.network_address), _le_hex(gateway), f"{flags:04X}", "0", "0",
                    str(route.metric), _le_hex(net.netmask), "0", "0", "0"]))
            else:
                gateway6 = ipaddress.IPv6Address(gateway_text or "::")
                flags = 0x1 | (0x2 if gateway_text else 0)
                v6.append(" ".join([
                    net.network_address.packed.hex(), f"{net.prefixlen:02x}", "0" * 32, "00",
                    gateway6.packed.hex(), f"{route.metric:08x}", "00000001", "00000000",
                    f"{flags:08x}", f"{dev:>8}"]))
        (self.paths.proc_net / "route").write_text("\n".join(v4) + "\n")
        (self.paths.proc_net / "ipv6_route").write_text("".join(line + "\n" for line in v6))
        rules = [(4, 0, 255, "", False), (4, 32766, 254, "", False), (4, 32767, 253, "", False),
                 (6, 0, 255, "", False), (6, 32766, 254, "", False)]
        rules += [(rule.family, rule.priority, rule.table, rule.source, rule.l3mdev) for rule in self.topology.rules]
        dump_rules = [routing.encode_rule(family, priority, table, source=source, l3mdev=l3mdev)
                      for family, priority, table, source, l3mdev in sorted(rules)]
        for name, parts in ((routing.SIM_ROUTES, dump_routes), (routing.SIM_RULES, dump_rules),
                            (routing.SIM_NEXTHOPS, dump_nexthops)):
            self.paths.under(name).write_bytes(b"".join(parts) + routing.done())
        self._write_sessions()
        self._write_tunnels()

    def _write_tunnels(self) -> None:
        """The tunnels' link info (host/tunnels.py), for the tunnel interfaces that exist."""
        import json

        from nicpassd.host import tunnels

        items = [{"name": link.name, "kind": link.kind, "remotes": list(link.remotes), "local": link.local,
                  "dev": link.dev}
                 for link in self.topology.links
                 if link.kind in ("wireguard", "vxlan", "geneve", "gre", "ipip", "vti")
                 and (self.paths.class_net / link.name).exists()]
        self.paths.under(tunnels.SIM_TUNNELS).write_text(json.dumps(items))

    def _write_sessions(self) -> None:
        """The answer to a sock_diag dump of established TCP sockets (host/sessions.py)."""
        from nicpassd.host import sessions
        from nicpassd.host.model import Session

        self.paths.under(sessions.SIM_DUMP).write_bytes(sessions.encode_dump([
            Session(item.local, item.port, item.peer, item.peer_port) for item in self.topology.sessions]))

    def set_sessions(self, items: list) -> None:
        """Replace the established TCP sessions (``sim.topology.Session``); a closed one is
        announced as the kernel's SKNLGRP_INET_TCP_DESTROY would be."""
        with self._lock:
            self.topology = self.topology.model_copy(update={"sessions": tuple(items)})
            self._write_sessions()
        self._emit("change", "route", "")

    def set_routes(self, routes: list, *, rules: list | None = None, nexthops: list | None = None) -> None:
        """Replace the routing tables (and the rules, the nexthop objects when given: the
        simulated netlink) and announce it."""
        with self._lock:
            update: dict = {"routes": tuple(routes)}
            if rules is not None:
                update["rules"] = tuple(rules)
            if nexthops is not None:
                update["nexthops"] = tuple(nexthops)
            self.topology = self.topology.model_copy(update=update)
            self._write_routes()
        self._emit("change", "route", "")

    def set_addresses(self, addresses: list) -> None:
        """Replace every interface address (``sim.topology.Address``) and announce it, as
        RTM_NEWADDR/RTM_DELADDR would."""
        with self._lock:
            self.topology = self.topology.model_copy(update={"addresses": tuple(addresses)})
            self._write_addresses()
        self._emit("change", "route", "")

    def delete_link(self, name: str) -> None:
        """``ip link del NAME`` of a virtual interface: gone with its routes (RTM_DELLINK)."""
        with self._lock:
            if not any(link.name == name for link in self.topology.links):
                raise _oserror(errno.ENODEV, f"no virtual interface {name}")
            self.topology = self.topology.model_copy(update={
                "links": tuple(link for link in self.topology.links if link.name != name)})
            for entry in os.listdir(self.paths.class_net):
                for prefix in ("lower_", "upper_"):
                    (self.paths.class_net / entry / f"{prefix}{name}").unlink(missing_ok=True)
            (self.paths.class_net / name).unlink()
            shutil.rmtree(self.paths.sys / "devices/virtual/net" / name, ignore_errors=True)
            self._write_routes()
        self._emit("remove", "net", name)

    def set_carrier(self, name: str, carrier: bool) -> None:
        """A cable pulled or plugged on interface ``name`` (RTM_NEWLINK)."""
        with self._lock:
            net_dir = self.paths.class_net / name
            if not net_dir.exists():
                raise _oserror(errno.ENODEV, f"no interface {name}")
            (net_dir / "carrier").write_text("1\n" if carrier else "0\n")
            (net_dir / "operstate").write_text("up\n" if carrier else "down\n")
        self._emit("change", "route", name)

    def _write_addresses(self) -> None:
        """/proc/net/if_inet6 (IPv6) and the RTM_GETADDR dump answer (both families) of the
        interfaces that exist now: the kernel forgets the addresses of an interface that goes."""
        inet6, dump = [], []
        for item in self.topology.addresses:
            net_dir = self.paths.class_net / item.dev
            if not net_dir.exists():
                continue
            interface = ipaddress.ip_interface(item.address)
            index = int((net_dir / "ifindex").read_text())
            scope = 253 if interface.ip.is_link_local else 254 if interface.ip.is_loopback else 0
            dump.append((IfAddress(interface.version, str(interface), item.dev, scope), index))
            if interface.version == 6:
                code = {253: 0x20, 254: 0x10}.get(scope, 0)
                inet6.append(f"{interface.ip.packed.hex()} {index:02x} {interface.network.prefixlen:02x} "
                             f"{code:02x} 80 {item.dev:>8}")
        (self.paths.proc_net / "if_inet6").write_text("".join(line + "\n" for line in inet6))
        self.paths.under(netlink.SIM_DUMP).write_bytes(netlink.encode_dump(dump))

    def _write_block_devices(self) -> None:
        """The disks of storage functions under /sys/class/block, and / mounted from ``root``."""
        block, by_number = self.paths.sys / "class/block", self.paths.sys / "dev/block"
        block.mkdir(parents=True, exist_ok=True)
        by_number.mkdir(parents=True, exist_ok=True)
        major, disks = 8, [(fn, disk) for fn in self.topology.functions for disk in fn.disks]
        for number, (fn, disk) in enumerate(disks):
            parent = "nvme/nvme0" if disk.startswith("nvme") else f"ata{number + 1}/host{number}/block"
            directory = self._device_dir(fn.address) / parent / disk
            directory.mkdir(parents=True)
            minor = number * 16
            (directory / "dev").write_text(f"{major}:{minor}\n")
            (block / disk).symlink_to(os.path.relpath(directory, block))
            (by_number / f"{major}:{minor}").symlink_to(os.path.relpath(directory, by_number))
        self._write_network_storage()
        found = root_disk(self.topology)
        if found is None:
            return
        fn, disk, partition = found
        directory = next(path for path in self._device_dir(fn.address).rglob(disk) if path.is_dir())
        devnum = (directory / "dev").read_text().strip()
        name = disk
        if partition:
            name = f"{disk}{'p' if disk[-1].isdigit() else ''}{partition}"
            part = directory / name
            part.mkdir()
            (part / "partition").write_text(f"{partition}\n")
            devnum = f"{major}:{int(devnum.split(':')[1]) + partition}"
            (part / "dev").write_text(devnum + "\n")
            (block / name).symlink_to(os.path.relpath(part, block))
            (by_number / devnum).symlink_to(os.path.relpath(part, by_number))
        self._root_mount = f"22 1 {devnum} / / rw,relatime shared:1 - ext4 /dev/{name} rw,errors=remount-ro\n"
        self._write_network_storage()

    def _write_network_storage(self) -> None:
        """/proc/self/mountinfo (/, /proc and the topology's mounts), iSCSI connections and NVMe
        over TCP controllers in /sys/class (host/storage.py)."""
        self_dir = self.paths.under("/proc/self")
        self_dir.mkdir(parents=True, exist_ok=True)
        lines = [getattr(self, "_root_mount", ""),
                 "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"]
        for number, mount in enumerate(self.topology.mounts):
            target = mount.target.replace(" ", "\\040")  # mountinfo escapes a space as \040
            lines.append(f"{40 + number} 22 0:{60 + number} / {target} rw,relatime - "
                         f"{mount.fstype} {mount.source} {mount.options}\n")
        (self_dir / "mountinfo").write_text("".join(lines))
        for kind, addresses in (("iscsi_connection", self.topology.iscsi), ("nvme", self.topology.nvme_of)):
            directory = self.paths.sys / "class" / kind
            shutil.rmtree(directory, ignore_errors=True)
            for number, address in enumerate(addresses):
                entry = directory / (f"connection{number + 1}:0" if kind == "iscsi_connection" else f"nvme{number + 5}")
                entry.mkdir(parents=True)
                if kind == "iscsi_connection":
                    (entry / "persistent_address").write_text(address + "\n")
                else:
                    (entry / "transport").write_text("tcp\n")
                    (entry / "address").write_text(f"traddr={address},trsvcid=4420\n")

    def set_mounts(self, mounts: list) -> None:
        """mount/umount (``sim.topology.Mount``): announced as the kernel's mountinfo poll flag is."""
        with self._lock:
            self.topology = self.topology.model_copy(update={"mounts": tuple(mounts)})
            self._write_network_storage()
        self._emit("change", "route", "")

    # --------------------------------------------------------------- drivers
    def _attach_driver(self, device: SimDevice, driver: str, *, emit: bool = True) -> None:
        """really_probe() then driver_bound(): the driver's probe registers its netdev ("add" net),
        and only then does the driver core announce "bind" (with DRIVER)."""
        address = device.spec.address
        (self.paths.pci_drivers / driver / address).symlink_to(f"../../../../{PCI_ROOT}/{address}")
        (self._device_dir(address) / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
        device.driver = driver
        if driver == self._host_driver(device) and driver not in ("vfio-pci", "pci-stub"):
            self._add_netdev(device) if emit else self._add_netdev_quiet(device)
        if emit:
            self._emit("bind", "pci", address, driver)

    def _add_netdev_quiet(self, device: SimDevice) -> None:
        subscribers, self._subscribers = self._subscribers, []
        try:
            self._add_netdev(device)
        finally:
            self._subscribers = subscribers

    def _detach_driver(self, device: SimDevice) -> None:
        """__device_release_driver(): the driver's remove unregisters its netdev ("remove" net),
        then "unbind" is sent once dev->driver is cleared, so it carries no DRIVER."""
        address, driver = device.spec.address, device.driver
        self._remove_netdev(device)
        (self.paths.pci_drivers / driver / address).unlink()
        (self._device_dir(address) / "driver").unlink()
        device.driver = ""
        self._emit("unbind", "pci", address)

    def _host_driver(self, device: SimDevice) -> str:
        if device.physfn:
            return self._devices[device.physfn].spec.vf_driver
        return device.spec.driver

    def _driver_matches(self, device: SimDevice, driver: str) -> bool:
        """pci_bus_match(): driver_override wins; otherwise the driver's ID table."""
        if device.override:
            return device.override == driver
        return driver == self._host_driver(device)

    def _probe(self, device: SimDevice) -> None:
        """__device_attach(): try every loaded driver; binding nothing is not an error."""
        if device.driver:
            return
        if self._consume(self.faults.silent_bind_failure, device.spec.address):
            return
        for driver in sorted(self._drivers):
            if self._driver_matches(device, driver):
                self._attach_driver(device, driver)
                return

    # ------------------------------------------------------------------ SR-IOV
    def _enable_vfs(self, pf: SimDevice, count: int) -> None:
        enabled = min(count, self.faults.short_vfs.pop(pf.spec.address, count))
        if enabled < count:
            log.warning("%s: %d VFs requested; only %d enabled", pf.spec.address, count, enabled)
        spec = pf.spec
        if spec.vf_driver:
            self._add_driver(spec.vf_driver)
        for index in range(enabled):
            address = vf_address(spec.address, spec.vf_offset, spec.vf_stride, index)
            if address in self._devices:
                raise _oserror(errno.EEXIST, f"VF address {address} already in use")
            vf_spec = Function(
                address=address, vendor=spec.vendor, device=spec.vf_device,
                subsystem_vendor=spec.subsystem_vendor, subsystem_device=spec.subsystem_device,
                **{"class": spec.class_code}, driver=spec.vf_driver, carrier=spec.carrier,
            )
            group = self._allocate_group() if pf.group >= 0 else -1
            vf = SimDevice(spec=vf_spec, group=group, physfn=spec.address, vf_index=index)
            # pci_iov_add_virtfn(): pci_device_add() ("add"), pci_iov_sysfs_link() (virtfnN and
            # physfn, then KOBJ_CHANGE: "change", no driver yet), pci_bus_add_device() (the probe)
            self._add_pci_device(vf, emit=True)
            vf_dir = self._device_dir(address)
            (vf_dir / "physfn").symlink_to(f"../{spec.address}")
            (self._device_dir(spec.address) / f"virtfn{index}").symlink_to(f"../{address}")
            self._emit("change", "pci", address)
            self._run_rules(vf)
            if pf.autoprobe and not self._probe_late(pf, vf):
                self._probe(vf)
        pf.numvfs = enabled
        pf.vf_settings = sim_vf_settings.defaults(pf.driver, enabled)
        self._set_attr(spec.address, "sriov_numvfs", str(enabled))
        # sriov_enable(): KOBJ_CHANGE on the PF once its VFs are added; the PF is bound to its
        # driver (sriov_numvfs needs it), so the event carries DRIVER.
        self._emit("change", "pci", spec.address, pf.driver)

    def _disable_vfs(self, pf: SimDevice) -> None:
        """sriov_disable() -> sriov_del_vfs(): VF 0 first, up to the last; no "change" on the PF."""
        for index in range(pf.numvfs):
            self._remove_vf(pf, index)
        pf.numvfs = 0
        pf.vf_settings = []
        self._set_attr(pf.spec.address, "sriov_numvfs", "0")

    def _remove_vf(self, pf: SimDevice, index: int) -> None:
        """pci_iov_remove_virtfn(): the virtfnN link goes, then the VF (netdev, unbind, remove)."""
        link = self._device_dir(pf.spec.address) / f"virtfn{index}"
        vf = self._devices.get(os.readlink(link).removeprefix("../"))
        link.unlink()
        if vf is not None:  # not unplugged on its own before
            self._remove_pci_device(vf)

    def _set_attr(self, address: str, attr: str, value: str) -> None:
        (self._device_dir(address) / attr).write_text(value + "\n")

    # ------------------------------------------- Fault: late autoprobe of new VFs
    # A real kernel's probe of a new VF (pci_bus_add_device(), or the VF driver's module loading
    # and attaching every matching device) can still be running when a reader sees "no driver":
    # the driver matched before driver_override was written, so it binds anyway. With
    # ``faults.probe_after_numvfs[pf]`` armed, the VFs one sriov_numvfs write creates (with
    # autoprobe on) stay driverless, and each binds its host driver right after the next write
    # that names it (its driver_override, drivers_probe, ...), whatever that write said.
    def _probe_late(self, pf: SimDevice, vf: SimDevice) -> bool:
        key = pf.spec.address
        if vf.vf_index == 0:
            self._late_enable = key if self._consume(self.faults.probe_after_numvfs, key) else ""
        if self._late_enable != key:
            return False
        self._late_probes[vf.spec.address] = self._host_driver(vf)
        return True

    def _run_late_probe(self, path: Path, data: str) -> None:
        if not self._late_probes:
            return
        try:
            parts = path.resolve().relative_to(self.paths.sys.resolve()).parts
        except (OSError, ValueError):
            return
        target = self._target_of(parts, data)
        with self._lock:
            driver = self._late_probes.pop(target, "")
            device = self._devices.get(target)
            if driver and device is not None and not device.driver and driver in self._drivers:
                self._attach_driver(device, driver)

    # ------------------------------------------------------------ write boundary
    def load_module(self, name: str) -> None:
        driver = LOADABLE_MODULES.get(name)
        if driver == "vfio-pci" and self.topology.platform.vfio == "missing":
            driver = None
        if driver is None:
            raise _oserror(errno.ENOENT, f"module {name} not found in directory /lib/modules")
        with self._lock:
            self._add_driver(driver)

    def netlink(self, request: bytes) -> bytes:
        """Answer one rtnetlink request about a PF's VFs (RTM_GETLINK, RTM_SETLINK of
        ``nicpassd.host.vf_netlink``) with the bytes the kernel would."""
        with self._lock:
            kind = wire.NLMSGHDR.unpack_from(request)[1]
            if kind == wire.RTM_GETLINK:
                name = wire.parse_get(request)
                pf = self._device_with_netdev(name)
                if pf is None:
                    return wire.encode_error(errno.ENODEV, request, "Cannot find device")
                mac = (self._device_dir(pf.spec.address) / "net" / name / "address").read_text().strip()
                return wire.encode_link(name, mac, pf.vf_settings, wire.NLMSGHDR.unpack_from(request)[3])
            name, attributes = wire.parse_set(request)
            pf = self._device_with_netdev(name)
            if pf is None:
                return wire.encode_error(errno.ENODEV, request, "Cannot find device")
            settings = list(pf.vf_settings)
            try:
                for attribute, value in attributes:
                    sim_vf_settings.apply(pf.driver, settings, attribute, value, link_up=pf.spec.carrier)
            except sim_vf_settings.Refused as refusal:
                return wire.encode_error(refusal.code, request, refusal.detail)
            pf.vf_settings = settings
            self._emit("change", "route", name)  # do_setlink() notifies: RTM_NEWLINK of the PF
            return wire.encode_error(0, request)

    def _device_with_netdev(self, name: str) -> SimDevice | None:
        return next((device for device in self._devices.values() if device.netdev and device.netdev == name), None)

    def write(self, path: "Path | str", data: str) -> None:
        """Serve one write(2) to a sysfs attribute, like the kernel would."""
        path = Path(path)  # the stdlib-only boot path (nicpassd/host/early_binding.py) passes strings
        with self._operation():
            try:
                self._write(path, data)
            finally:
                self._run_late_probe(path, data)

    def _write(self, path: Path, data: str) -> None:
        resolved = path.resolve()
        try:
            relative = resolved.relative_to(self.paths.sys.resolve())
        except ValueError:
            raise _oserror(errno.EACCES, f"{path} is not a sysfs attribute") from None
        parts = relative.parts
        if data == "" and resolved.exists():
            return  # sysfs_kf_write() never calls the store method for a 0-byte write
        target = self._target_of(parts, data)
        self._wait_for_vfio_users(parts, target)
        self._maybe_hang(target, parts[-1])
        self._maybe_fail(target, parts[-1])
        with self._lock:
            if parts[:3] == ("bus", "pci", "drivers_probe"):
                return self._write_probe(data)
            if parts[:3] == ("bus", "pci", "drivers") and len(parts) == 5:
                return self._write_driver_attr(parts[3], parts[4], data)
            if parts[:2] == tuple(PCI_ROOT.split("/")) and len(parts) == 4:
                return self._write_device_attr(parts[2], parts[3], data)
        if not resolved.exists():
            raise _oserror(errno.ENOENT, str(path))
        raise _oserror(errno.EACCES, f"{parts[-1]} is read-only")

    def _target_of(self, parts: tuple[str, ...], data: str) -> str:
        """The device a write is about, so that device-scoped faults can match it."""
        if parts[:2] == tuple(PCI_ROOT.split("/")) and len(parts) == 4:
            return parts[2]
        if parts[:3] == ("bus", "pci", "drivers_probe") or (parts[:3] == ("bus", "pci", "drivers") and len(parts) == 5):
            return data.strip()
        return "*"

    def hold_vfio_group(self, path: "Path | str") -> Callable[[], None]:
        """vfio_group_fops_open(): one opener at a time. EBUSY while a process holds the node open
        (a test's stand-in QEMU: a real process with the file open) or nicpassd holds it already;
        ENOENT without a node (the simulator makes none: a test that needs one creates it)."""
        node = os.fspath(path)
        if not os.path.exists(node):
            raise _oserror(errno.ENOENT, node)
        with self._lock:
            if self._vfio_group_busy(node):
                raise _oserror(errno.EBUSY, f"{node} is held")
            self._vfio_held.add(node)
        return lambda: self._vfio_held.discard(node)

    def hold_vfio_group_as_another_user(self, address: str) -> Callable[[], None]:
        """A process of another user holds the device's group (libvirt's QEMU runs as
        libvirt-qemu): the kernel knows the group is held, nicpassd cannot read that process's
        /proc/PID/fd to see by whom. Returns what lets go."""
        node = os.fspath(self.paths.dev_vfio / str(self._device(address).group))
        with self._lock:
            self._vfio_foreign.add(node)
        return lambda: self._vfio_foreign.discard(node)

    def _vfio_group_busy(self, node: str) -> bool:
        return node in self._vfio_held or self._vfio_group_used(node)

    def _vfio_group_used(self, node: str) -> bool:
        """Held by a VFIO user (a VM): nicpassd's own hold of the group holds no device."""
        return node in self._vfio_foreign or bool(procfs.holders_of(node))

    def _wait_for_vfio_users(self, parts: tuple[str, ...], target: str) -> None:
        """vfio-pci's remove waits for the device's user to let go (the kernel relays a request to
        QEMU), the device locked meanwhile: an unbind from vfio-pci, or the removal of VFs one of
        which is on vfio-pci, blocks while a process holds the group node. The kernel waits for
        ever; the simulator gives up after VFIO_RELEASE_WAIT."""
        if parts[:3] == ("bus", "pci", "drivers") and parts[3:] == ("vfio-pci", "unbind"):
            leaving = [self._devices.get(target)]
        elif parts[-1] == "sriov_numvfs" and target in self._devices:  # removing VFs unbinds each
            leaving = [device for device in self._devices.values() if device.physfn == target]
        else:
            return
        nodes = [os.fspath(self.paths.dev_vfio / str(device.group)) for device in leaving
                 if device is not None and device.driver == "vfio-pci"]
        deadline = time.monotonic() + VFIO_RELEASE_WAIT
        while any(os.path.exists(node) and self._vfio_group_used(node) for node in nodes):
            if time.monotonic() > deadline:
                raise _oserror(errno.EINTR, f"{target}: device is currently in use, blocked until it is released")
            time.sleep(0.05)

    def _maybe_hang(self, target: str, attr: str) -> None:
        for key in ((target, attr), ("*", attr)):
            with self._lock:
                entry = self.faults.hang_seconds.get(key)
                if entry is None:
                    continue
                seconds, times = entry
                if times <= 1:
                    del self.faults.hang_seconds[key]
                else:
                    self.faults.hang_seconds[key] = (seconds, times - 1)
            # A hung driver: the write sleeps, then fails without changing anything.
            threading.Event().wait(seconds)
            raise _oserror(errno.EINTR, f"{attr} write interrupted after hanging {seconds:g} s")

    def _maybe_fail(self, target: str, attr: str) -> None:
        with self._lock:
            for key in ((target, attr), ("*", attr)):
                entry = self.faults.write_errors.get(key)
                if entry is None:
                    continue
                code, times = entry
                if times <= 1:
                    del self.faults.write_errors[key]
                else:
                    self.faults.write_errors[key] = (code, times - 1)
                raise _oserror(code, f"injected failure of {attr}")

    @staticmethod
    def _consume(table: dict[str, int], key: str) -> bool:
        times = table.get(key, 0)
        if times <= 0:
            return False
        if times == 1:
            del table[key]
        else:
            table[key] = times - 1
        return True

    def _device(self, address: str) -> SimDevice:
        device = self._devices.get(address.strip())
        if device is None:
            raise _oserror(errno.ENODEV, f"no such device {address.strip()!r}")
        return device

    def _write_probe(self, data: str) -> None:
        self._probe(self._device(data))

    def _write_driver_attr(self, driver: str, attr: str, data: str) -> None:
        if driver not in self._drivers:
            raise _oserror(errno.ENOENT, f"driver {driver}")
        device = self._device(data)
        if attr == "unbind":
            if device.driver != driver:
                raise _oserror(errno.ENODEV, f"{device.spec.address} is not bound to {driver}")
            self._detach_driver(device)
        elif attr == "bind":
            if device.driver:
                raise _oserror(errno.EBUSY, f"{device.spec.address} is bound to {device.driver}")
            if not self._driver_matches(device, driver):
                raise _oserror(errno.ENODEV, f"{driver} does not match {device.spec.address}")
            self._attach_driver(device, driver)
        else:
            raise _oserror(errno.EINVAL, f"{attr} is not simulated")

    def _write_device_attr(self, address: str, attr: str, data: str) -> None:
        device = self._device(address)
        if attr == "driver_override":
            value = data.strip()
            if len(value) >= 4096:
                raise _oserror(errno.EINVAL, "override too long")
            device.override = value
            self._set_attr(address, attr, value or "(null)")
        elif attr == "sriov_numvfs":
            self._write_numvfs(device, data)
        elif attr == "sriov_drivers_autoprobe":
            value = data.strip()
            if value not in ("0", "1", "y", "n", "Y", "N"):
                raise _oserror(errno.EINVAL, f"{value!r} is not a boolean")
            device.autoprobe = value in ("1", "y", "Y")
            self._set_attr(address, attr, "1" if device.autoprobe else "0")
        else:
            raise _oserror(errno.EACCES, f"{attr} is read-only")

    def _write_numvfs(self, pf: SimDevice, data: str) -> None:
        """sriov_numvfs_store() in drivers/pci/iov.c."""
        if not pf.spec.sriov_totalvfs:
            raise _oserror(errno.ENOENT, "sriov_numvfs is not an attribute of this device")
        try:
            if data.strip().startswith("-"):
                raise ValueError  # kstrtou16() takes no sign
            count = int(data.strip(), 0)
        except ValueError:
            raise _oserror(errno.EINVAL, f"{data.strip()!r} is not a number") from None
        if count < 0 or count > pf.spec.sriov_totalvfs:
            raise _oserror(errno.ERANGE, f"{count} is above sriov_totalvfs {pf.spec.sriov_totalvfs}")
        if count == pf.numvfs:
            return
        if pf.driver != pf.spec.driver or not pf.spec.sriov_configure:
            raise _oserror(errno.ENOENT, "Driver does not support SRIOV configuration via sysfs")
        if count == 0:
            self._disable_vfs(pf)
            return
        if pf.numvfs:
            raise _oserror(errno.EBUSY, f"{pf.numvfs} VFs already enabled. Disable before enabling {count} VFs")
        if pf.spec.vf_bars_unassigned:  # sriov_enable(): no IOV BAR has a parent resource
            raise _oserror(errno.ENOMEM, "not enough MMIO resources for SR-IOV")
        self._enable_vfs(pf, count)

    # ------------------------------------------------------------ test helpers
    def hang_write(self, attr: str, seconds: float, *, device: str = "*", times: int = 1) -> None:
        with self._lock:
            self.faults.hang_seconds[(device, attr)] = (seconds, times)

    def fail_write(self, attr: str, code: int, *, device: str = "*", times: int = 1) -> None:
        with self._lock:
            self.faults.write_errors[(device, attr)] = (code, times)

    def enable_fewer_vfs(self, pf: str, enabled: int) -> None:
        with self._lock:
            self.faults.short_vfs[pf] = enabled

    def fail_binds_silently(self, device: str, times: int = 1) -> None:
        with self._lock:
            self.faults.silent_bind_failure[device] = times

    def unplug(self, address: str) -> None:
        """Surprise removal of a function (and its VFs), as PCIe hotplug would do."""
        with self._operation(), self._lock:
            self._remove_pci_device(self._device(address))

    def plug(self, function: Function) -> None:
        """Hot-add a function; it is probed like a device found at boot."""
        with self._operation(), self._lock:
            if function.driver:
                self._add_driver(function.driver)
            group = function.iommu_group if function.iommu_group is not None else self._allocate_group()
            device = SimDevice(spec=function, group=group if self.topology.iommu else -1)
            self._add_pci_device(device, emit=True)
            self._run_rules(device)
            self._probe(device)

    def _run_rules(self, device: SimDevice) -> None:
        """udev processing the "add" before the driver probe; a failing RUN program is logged."""
        for rule in self.rules:
            try:
                rule(self, device.spec.address)
            except Exception as exc:  # noqa: BLE001 - udev logs a failed RUN+= and goes on
                log.warning("udev rule for %s failed: %s", device.spec.address, exc)

    def devices(self) -> list[str]:
        with self._lock:
            return sorted(self._devices)


def _le_hex(address: ipaddress.IPv4Address) -> str:
    return address.packed[::-1].hex().upper()


def _vf_mac(address: str) -> str:
    digits = address.replace(":", "").replace(".", "")[-8:].rjust(8, "0")
    return "02:" + ":".join(digits[i:i + 2] for i in range(0, 8, 2)) + ":01"


def _resources(spec: Function, address: str) -> str:
    """``resource`` as resource_show() prints it for a function (not a bridge): 13 lines, the six
    BARs, the ROM, then the six IOV BARs; "start end flags", all zero for a BAR that is absent or
    that the kernel could not place. A 128 KiB memory BAR 0 and, for a PF, a VF BAR 7 of 16 KiB
    per VF, at addresses derived from the function's address."""
    lines = [(0, 0, 0)] * 13
    base = 0xF0000000 + (int(address.replace(":", "").replace(".", "")[-6:], 16) << 12) % 0x0F000000
    lines[0] = (base, base + 0x1FFFF, 0x40200)  # IORESOURCE_MEM | IORESOURCE_SIZEALIGN
    if spec.sriov_totalvfs and not spec.vf_bars_unassigned:
        vf_base = 0x380000000000 + base * 0x100
        lines[7] = (vf_base, vf_base + 0x4000 * spec.sriov_totalvfs - 1, 0x140204)  # MEM_64 | prefetch
    return "".join(f"0x{start:016x} 0x{end:016x} 0x{flags:016x}\n" for start, end, flags in lines)


def _config_space(spec: Function) -> bytes:
    """4 KiB of config space carrying the IDs and, when the device has one, a DSN capability."""
    config = bytearray(4096)
    config[0:2] = int(spec.vendor, 16).to_bytes(2, "little")
    config[2:4] = int(spec.device, 16).to_bytes(2, "little")
    config[0x2C:0x2E] = int(spec.subsystem_vendor, 16).to_bytes(2, "little")
    config[0x2E:0x30] = int(spec.subsystem_device, 16).to_bytes(2, "little")
    capabilities = []  # (id, body) of the extended capabilities, chained from 0x100
    if spec.serial:
        capabilities.append((0x0003, int(spec.serial.replace("-", ""), 16).to_bytes(8, "little")))
    if spec.sriov_totalvfs or spec.sriov_disabled:
        # SR-IOV: TotalVFs at +0x0E (0 when the firmware turned it off), VF offset, stride, device id
        body = bytearray(0x3C)
        body[0x0A:0x0C] = spec.sriov_totalvfs.to_bytes(2, "little")
        body[0x10:0x12] = spec.vf_offset.to_bytes(2, "little")
        body[0x12:0x14] = spec.vf_stride.to_bytes(2, "little")
        body[0x16:0x18] = int(spec.vf_device or "0", 16).to_bytes(2, "little")
        capabilities.append((0x0010, bytes(body)))
    offset = 0x100
    for number, (capability, body) in enumerate(capabilities):
        following = offset + 4 + len(body) if number + 1 < len(capabilities) else 0
        following = (following + 3) & ~3
        config[offset:offset + 4] = (capability | (1 << 16) | (following << 20)).to_bytes(4, "little")
        config[offset + 4:offset + 4 + len(body)] = body
        offset = following
    return bytes(config)
