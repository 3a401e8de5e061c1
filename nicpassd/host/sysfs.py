"""Reads the kernel's view of PCI functions and network links into a ``HostSnapshot``.

Only functions of network class are inventoried, plus every function sharing an IOMMU group
with one (they decide whether the group is viable) and the PF of every VF.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path

from nicpassd.host import kernelio
from nicpassd.host.model import HostSnapshot, IfAddress, NetLink, PciFunction, RootStorage, Route, Rule
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)



def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError, OSError):
        return default


def _read_int(path: Path, default: int = 0) -> int:
    text = _read(path)
    try:
        return int(text, 0)
    except ValueError:
        return default


def _link_name(path: Path) -> str:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def _hex_id(path: Path) -> str:
    return _read(path).lower().removeprefix("0x").rjust(4, "0")


read_serial = kernelio.read_serial
# ``_read`` for a string path with plain os calls: read_function runs once per function on every
# refresh (1,000+ functions on a host with many VFs), where pathlib costs 5x the syscalls.
_read_str = kernelio.read_text


def _int_or(text: str, default: int = 0) -> int:
    try:
        return int(text, 0)
    except ValueError:
        return default


def _readlink_name(path: str) -> str:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


@functools.lru_cache(maxsize=8)
def _devices_root(paths: HostPaths) -> str:
    return os.fspath(paths.pci_devices)


def read_function(paths: HostPaths, address: str, *, known: PciFunction | None = None,
                  announced: tuple[str, ...] | None = None) -> PciFunction | None:
    """One function as the kernel shows it. ``known``: the same function as read before, while it
    stayed (no remove/add since): what cannot change while a function exists (its ids, class,
    PF, IOMMU group, PCIe serial) is taken from it instead of read again. On a real kernel every
    sysfs read is a syscall, under a hypervisor config-space reads trap, and a refresh reads the
    functions events named. ``announced``: the ids its "add" uevent carried
    (``events.pci_identity``), taken instead of reading the five files (1,000 new VFs at boot)."""
    if known is not None:
        return _reread_function(paths, address, known)
    base = f"{_devices_root(paths)}/{address}"
    try:
        entries = os.listdir(base)
    except OSError:  # gone (or a dangling link while the kernel removes it)
        return None
    present = set(entries)
    interfaces, permanent_mac = _netdevs(base, entries, present)
    virtfns = sorted((entry for entry in entries if entry.startswith("virtfn")),
                     key=lambda name: int(name.removeprefix("virtfn")))
    sriov_capable = "sriov_totalvfs" in present
    override = _read_str(f"{base}/driver_override")
    group = _readlink_name(f"{base}/iommu_group") if "iommu_group" in present else ""

    def hex_id(attr: str) -> str:
        return _read_str(f"{base}/{attr}").lower().removeprefix("0x").rjust(4, "0")

    if announced:
        vendor, device, subsystem_vendor, subsystem_device, class_code = announced
    else:
        vendor, device = hex_id("vendor"), hex_id("device")
        subsystem_vendor, subsystem_device = hex_id("subsystem_vendor"), hex_id("subsystem_device")
        class_code = _read_str(f"{base}/class").lower().removeprefix("0x").rjust(6, "0")
    return PciFunction(
        address=address,
        vendor_id=vendor,
        device_id=device,
        subsystem_vendor_id=subsystem_vendor,
        subsystem_device_id=subsystem_device,
        class_code=class_code,
        driver=_readlink_name(f"{base}/driver") if "driver" in present else "",
        driver_override="" if override == "(null)" else override,
        iommu_group=int(group) if group.isdigit() else -1,
        interfaces=interfaces,
        physfn=_readlink_name(f"{base}/physfn") if "physfn" in present else "",
        virtfns=tuple(_readlink_name(f"{base}/{name}") for name in virtfns),
        total_vfs=_int_or(_read_str(f"{base}/sriov_totalvfs")) if sriov_capable else 0,
        # Its virtfnN links, not sriov_numvfs: reading that takes the PF's device lock, which a VF
        # change holds while it creates and probes every VF (a second under a hypervisor). At rest
        # the two agree; while VFs come or go, the links are what is there.
        num_vfs=len(virtfns),
        sriov_capable=sriov_capable,
        autoprobe=_read_str(f"{base}/sriov_drivers_autoprobe", "1") != "0" if sriov_capable else True,
        permanent_mac=permanent_mac,
        serial=read_serial(f"{base}/config") if "config" in present else "",
    )


def _reread_function(paths: HostPaths, address: str, known: PciFunction) -> PciFunction | None:
    """``read_function`` of what can change: driver, override, netdevs, VFs, SR-IOV settings."""
    found = _reread_listing(paths, address, known)
    if found is None:
        return None
    function, base, entries, present = found
    override = _read_str(f"{base}/driver_override")
    sriov_capable = "sriov_totalvfs" in present
    virtfns = sorted((entry for entry in entries if entry.startswith("virtfn")),
                     key=lambda name: int(name.removeprefix("virtfn")))
    return dataclasses.replace(
        function,
        driver_override="" if override == "(null)" else override,
        virtfns=tuple(_readlink_name(f"{base}/{name}") for name in virtfns),
        # A PF driver may lower the VFs it supports when it binds (pci_sriov_set_totalvfs).
        total_vfs=_int_or(_read_str(f"{base}/sriov_totalvfs")) if sriov_capable else 0,
        # Its virtfnN links, not sriov_numvfs: reading that takes the PF's device lock, which a VF
        # change holds while it creates and probes every VF (a second under a hypervisor). At rest
        # the two agree; while VFs come or go, the links are what is there.
        num_vfs=len(virtfns),
        sriov_capable=sriov_capable,
        autoprobe=_read_str(f"{base}/sriov_drivers_autoprobe", "1") != "0" if sriov_capable else known.autoprobe,
    )


def reread_interfaces(paths: HostPaths, address: str, known: PciFunction) -> PciFunction | None:
    """What a network event can change of a function that stays: its netdevs (and the permanent
    MAC the first shows) and its driver link. Not driver_override: in Linux 6.1 reading it takes
    the device's lock, which a driver's remove holds for as long as it runs (the unbind of a NIC:
    tens of ms, under a hypervisor more), and the interface's removal is announced at its start. A
    refresh for that event would stall the daemon on the lock until the unbind is over, and the
    unbind's own uevent (the sentinel's) behind it. An override is read with the pci events."""
    found = _reread_listing(paths, address, known)
    return found[0] if found is not None else None


def _reread_listing(paths: HostPaths, address: str,
                    known: PciFunction) -> tuple[PciFunction, str, list[str], set[str]] | None:
    """``known`` with its driver link and netdevs read again, and the directory they came from."""
    base = f"{_devices_root(paths)}/{address}"
    try:
        entries = os.listdir(base)
    except OSError:  # gone
        return None
    present = set(entries)
    interfaces, permanent_mac = _netdevs(base, entries, present)
    function = dataclasses.replace(known, driver=_readlink_name(f"{base}/driver") if "driver" in present else "",
                                   interfaces=interfaces, permanent_mac=permanent_mac)
    return function, base, entries, present


def _netdevs(base: str, entries: list[str], present: set[str]) -> tuple[tuple[str, ...], str]:
    """The function's netdevs — <fn>/net/<name>, or for virtio-net <fn>/virtioN/net/<name> (the
    netdev hangs off the virtio device on the function) — and the permanent MAC of the first one
    that has its own."""
    net_dirs = [f"{base}/net"] if "net" in present else []
    net_dirs += [f"{base}/{entry}/net" for entry in sorted(entries) if entry.startswith("virtio")]
    where: dict[str, str] = {}
    for net_dir in net_dirs:
        try:
            names = os.listdir(net_dir)
        except OSError:  # no netdev there (or gone meanwhile)
            continue
        for name in names:
            where.setdefault(name, net_dir)
    interfaces = tuple(sorted(where))
    for name in interfaces:
        if _read_str(f"{where[name]}/{name}/addr_assign_type") == "0":
            return interfaces, _read_str(f"{where[name]}/{name}/address")
    return interfaces, ""


def _pci_ancestor(device: Path) -> str:
    """The PCI function a non-PCI parent (virtioN under a virtio-pci function) sits on, or ""."""
    try:
        parent = device.resolve().parent
    except OSError:
        return ""
    return parent.name if _link_name(parent / "subsystem") == "pci" else ""


def read_groups(paths: HostPaths) -> dict[int, tuple[str, ...]]:
    groups: dict[int, tuple[str, ...]] = {}
    root = paths.iommu_groups
    if not root.is_dir():
        return groups
    for entry in os.listdir(root):
        if not entry.isdigit():
            continue
        try:
            groups[int(entry)] = tuple(sorted(os.listdir(root / entry / "devices")))
        except OSError:  # a VF's group goes with the VF: gone between the two listdirs
            continue
    return groups


def _link_kind(net_dir: Path, device: str) -> str:
    if device:
        return "physical"
    devtype = ""
    for line in _read(net_dir / "uevent").splitlines():
        if line.startswith("DEVTYPE="):
            devtype = line.removeprefix("DEVTYPE=")
    if devtype:
        return devtype
    if (net_dir / "bridge").is_dir():
        return "bridge"
    if (net_dir / "bonding").is_dir():
        return "bond"
    return "virtual"


def read_link(paths: HostPaths, name: str) -> NetLink | None:
    """One interface of /sys/class/net, None when it does not exist (read_links reads them all)."""
    net_dir = paths.class_net / name
    try:
        entries = os.listdir(net_dir)
    except NotADirectoryError:
        entries = []
    except FileNotFoundError:  # never there, or gone meanwhile (a VF's netdev as its driver unbinds)
        return None
    device = _link_name(net_dir / "device") if "device" in entries else ""
    if device and _link_name(net_dir / "device" / "subsystem") != "pci":
        device = _pci_ancestor(net_dir / "device")  # virtio-net: the netdev hangs off virtioN
    return NetLink(
        name=name,
        kind=_link_kind(net_dir, device),
        device=device,
        lowers=tuple(sorted(e.removeprefix("lower_") for e in entries if e.startswith("lower_"))),
        uppers=tuple(sorted(e.removeprefix("upper_") for e in entries if e.startswith("upper_"))),
        mac=_read(net_dir / "address"),
        carrier=_read(net_dir / "carrier") == "1",
    )


def read_links(paths: HostPaths) -> dict[str, NetLink]:
    links: dict[str, NetLink] = {}
    root = paths.class_net
    if not root.is_dir():
        return links
    for name in os.listdir(root):
        link = read_link(paths, name)
        if link is not None:
            links[name] = link
    return links


def _ipv4_from_le_hex(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(bytes.fromhex(text)[::-1])


def read_routing(paths: HostPaths) -> tuple[tuple[Route, ...], tuple[Rule, ...]]:
    """Every reachable route (one per next hop) and the policy rules, over rtnetlink
    (host/routing.py); /proc's main table when no netlink answers for the root."""
    from nicpassd.host import routing

    source = routing.routing_source_for(paths)
    if source is None:
        return read_proc_routes(paths), ()
    try:
        data = source.dumps()
    except OSError as exc:
        log.warning("cannot dump the routing tables over netlink (%s); reading the main table from /proc", exc)
        return read_proc_routes(paths), ()
    if isinstance(source, routing.NetlinkRouting):
        def index_to_name(index: int) -> str:
            try:
                return socket.if_indextoname(index)
            except OSError:
                return f"if{index}"
    else:
        names = {}
        for name in os.listdir(paths.class_net) if paths.class_net.is_dir() else ():
            text = _read(paths.class_net / name / "ifindex")
            if text.isdigit():
                names[int(text)] = name
        index_to_name = lambda index: names.get(index, f"if{index}")  # noqa: E731
    return routing.routing_from_dumps(*data, index_to_name)


def read_routes(paths: HostPaths) -> tuple[Route, ...]:
    return read_routing(paths)[0]


def read_proc_routes(paths: HostPaths) -> tuple[Route, ...]:
    """Routes of the main table from /proc/net/route and /proc/net/ipv6_route."""
    routes: list[Route] = []
    for line in _read(paths.proc_net / "route").splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        dev, dst, gateway, mask = fields[0], fields[1], fields[2], fields[7]
        prefixlen = bin(int(mask, 16)).count("1")
        network = ipaddress.ip_network(f"{_ipv4_from_le_hex(dst)}/{prefixlen}", strict=False)
        gw = _ipv4_from_le_hex(gateway)
        routes.append(Route(4, str(network), dev, "" if int(gw) == 0 else str(gw)))
    for line in _read(paths.proc_net / "ipv6_route").splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[9] == "lo":
            continue
        dst = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        network = ipaddress.ip_network(f"{dst}/{int(fields[1], 16)}", strict=False)
        gw = ipaddress.IPv6Address(bytes.fromhex(fields[4]))
        routes.append(Route(6, str(network), fields[9], "" if int(gw) == 0 else str(gw)))
    return tuple(routes)


# /proc/net/if_inet6 prints ipv6_addr_scope() (0x10 loopback, 0x20 link, 0x40 site): as RT_SCOPE_*.
IPV6_SCOPES = {0x10: 254, 0x20: 253, 0x40: 200}
IFA_F_DADFAILED = 0x08


def read_ipv6_addresses(paths: HostPaths) -> list[IfAddress]:
    found = []
    for line in _read(paths.proc_net / "if_inet6").splitlines():
        fields = line.split()
        if len(fields) != 6 or int(fields[4], 16) & IFA_F_DADFAILED:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        scope = IPV6_SCOPES.get(int(fields[3], 16) & 0xF0, 0)
        found.append(IfAddress(6, f"{address}/{int(fields[2], 16)}", fields[5], scope))
    return found


def read_addresses(paths: HostPaths, source=None) -> tuple[IfAddress, ...]:
    """IPv6 from /proc/net/if_inet6, IPv4 from rtnetlink (``netlink.address_source_for``)."""
    from nicpassd.host import netlink

    source = source if source is not None else netlink.address_source_for(paths)
    try:
        ipv4 = source.addresses(4)
    except OSError as exc:
        log.warning("cannot read the IPv4 addresses over netlink: %s", exc)
        ipv4 = []
    return (*ipv4, *read_ipv6_addresses(paths))


PCI_PART = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def _root_mount(paths: HostPaths) -> tuple[str, str] | None:
    """(major:minor, source) of the file system mounted on / (the topmost), from mountinfo."""
    found = None
    for line in _read(paths.under("/proc/self/mountinfo")).splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) >= 5 and fields[4] == "/" and len(rest) >= 2:
            found = (fields[2], rest[1])
    if found is None:
        for line in _read(paths.under("/proc/mounts")).splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1] == "/":
                found = ("", fields[0])
    return found


def _block_dir(paths: HostPaths, devnum: str, source: str) -> Path | None:
    by_number = paths.under(f"/sys/dev/block/{devnum}") if devnum and not devnum.startswith("0:") else None
    if by_number is not None and by_number.exists():
        return by_number
    name = os.path.basename(source)
    if not (paths.under("/sys/class/block") / name).exists() and source.startswith("/dev/"):
        name = _link_name(paths.under(source)) or name  # /dev/mapper/root -> ../dm-0
    candidate = paths.under("/sys/class/block") / name
    return candidate if candidate.exists() else None


def _pci_of(real: Path) -> str:
    """The deepest PCI function in a resolved /sys/devices path, or ""."""
    return next((part for part in reversed(real.parts) if PCI_PART.match(part)), "")


def _walk_block(paths: HostPaths, block: Path, chain: list[str], found: dict[str, RootStorage], depth: int = 0) -> None:
    try:
        real = block.resolve()
    except OSError:
        return
    chain = [*chain, real.name]
    if (real / "partition").exists():
        chain.append(real.parent.name)
    slaves = sorted(os.listdir(real / "slaves")) if (real / "slaves").is_dir() else []
    if slaves and depth < 8:  # dm (LVM, LUKS), md RAID: every member device counts
        for slave in slaves:
            _walk_block(paths, paths.under("/sys/class/block") / slave, chain, found, depth + 1)
        return
    candidates = [real]
    if "nvme-subsystem" in real.parts:  # native NVMe multipath: the controllers of the subsystem
        candidates = [entry.resolve() for entry in real.parent.iterdir() if re.fullmatch(r"nvme\d+", entry.name)]
    for path in candidates:
        address = _pci_of(path)
        if address and address not in found:
            found[address] = RootStorage(address, tuple(chain))


def read_root_storage(paths: HostPaths) -> tuple[RootStorage, ...]:
    """The PCI functions under the root file system: / → block device → its device → PCI."""
    mount = _root_mount(paths)
    if mount is None:
        return ()
    devnum, source = mount
    block = _block_dir(paths, devnum, source)
    if block is None:
        return ()  # overlay, tmpfs, nfs, zfs...: no local block device to protect
    found: dict[str, RootStorage] = {}
    _walk_block(paths, block, [f"/ on {source}"], found)
    return tuple(found.values())


def read_snapshot(paths: HostPaths) -> HostSnapshot:
    pci_root = paths.pci_devices
    addresses = sorted(os.listdir(pci_root)) if pci_root.is_dir() else []
    groups = read_groups(paths)
    classes = {address: _read(pci_root / address / "class").lower() for address in addresses}
    wanted = {address for address, cls in classes.items() if cls.removeprefix("0x").startswith("02")}
    group_of = {member: number for number, members in groups.items() for member in members}
    for address in list(wanted):
        number = group_of.get(address)
        if number is not None:
            wanted.update(groups[number])
    functions: dict[str, PciFunction] = {}
    for address in sorted(wanted):
        function = read_function(paths, address)
        if function is not None:
            functions[address] = function
    for function in list(functions.values()):
        if function.physfn and function.physfn not in functions:
            parent = read_function(paths, function.physfn)
            if parent is not None:
                functions[parent.address] = parent
    drivers_dir = paths.pci_drivers
    loaded = frozenset(os.listdir(drivers_dir)) if drivers_dir.is_dir() else frozenset()
    class_iommu = paths.class_iommu
    routes, rules = read_routing(paths)
    from nicpassd.host.sessions import read_sessions
    from nicpassd.host.cluster import read_cluster
    from nicpassd.host.storage import read_network_storage
    from nicpassd.host.tunnels import read_tunnels

    return HostSnapshot(
        functions=functions,
        groups=groups,
        links=read_links(paths),
        routes=routes,
        rules=rules,
        sessions=read_sessions(paths),
        tunnels=read_tunnels(paths),
        network_storage=read_network_storage(paths),
        cluster=read_cluster(paths),
        addresses=read_addresses(paths),
        root_storage=read_root_storage(paths),
        iommu_present=class_iommu.is_dir() and any(class_iommu.iterdir()),
        cmdline=_read(paths.proc_cmdline),
        loaded_drivers=loaded,
    )
