"""Reads the kernel's view of PCI functions and network links into a ``HostSnapshot``.

Only functions of network class are inventoried, plus every function sharing an IOMMU group
with one (they decide whether the group is viable) and the PF of every VF.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from nicpassd.host.model import HostSnapshot, NetLink, PciFunction, Route
from nicpassd.paths import HostPaths

DSN_CAPABILITY = 0x0003


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


def read_serial(config: Path) -> str:
    """The PCIe Device Serial Number from extended config space, "" when absent or unreadable."""
    try:
        with config.open("rb") as handle:
            data = handle.read(4096)
    except OSError:
        return ""
    offset, seen = 0x100, 0
    while 0x100 <= offset <= len(data) - 12 and seen < 64:
        header = int.from_bytes(data[offset:offset + 4], "little")
        if header == 0 or header == 0xFFFFFFFF:
            return ""
        if header & 0xFFFF == DSN_CAPABILITY:
            serial = int.from_bytes(data[offset + 4:offset + 12], "little")
            raw = serial.to_bytes(8, "big").hex()
            return "-".join(raw[i:i + 2] for i in range(0, 16, 2))
        offset, seen = header >> 20, seen + 1
    return ""


def read_function(paths: HostPaths, address: str) -> PciFunction | None:
    base = paths.pci_device(address)
    if not base.exists():
        return None
    group_link = base / "iommu_group"
    net_dir = base / "net"
    interfaces = tuple(sorted(os.listdir(net_dir))) if net_dir.is_dir() else ()
    virtfns = sorted(
        (entry for entry in os.listdir(base) if entry.startswith("virtfn")),
        key=lambda name: int(name.removeprefix("virtfn")),
    )
    sriov_capable = (base / "sriov_totalvfs").exists()
    override = _read(base / "driver_override")
    permanent_mac = ""
    for name in interfaces:
        if _read(base / "net" / name / "addr_assign_type") == "0":
            permanent_mac = _read(base / "net" / name / "address")
            break
    return PciFunction(
        address=address,
        vendor_id=_hex_id(base / "vendor"),
        device_id=_hex_id(base / "device"),
        subsystem_vendor_id=_hex_id(base / "subsystem_vendor"),
        subsystem_device_id=_hex_id(base / "subsystem_device"),
        class_code=_read(base / "class").lower().removeprefix("0x").rjust(6, "0"),
        driver=_link_name(base / "driver"),
        driver_override="" if override == "(null)" else override,
        iommu_group=int(_link_name(group_link)) if group_link.is_symlink() else -1,
        interfaces=interfaces,
        physfn=_link_name(base / "physfn"),
        virtfns=tuple(_link_name(base / name) for name in virtfns),
        total_vfs=_read_int(base / "sriov_totalvfs"),
        num_vfs=_read_int(base / "sriov_numvfs"),
        sriov_capable=sriov_capable,
        autoprobe=_read(base / "sriov_drivers_autoprobe", "1") != "0",
        permanent_mac=permanent_mac,
        serial=read_serial(base / "config"),
    )


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
        devices = root / entry / "devices"
        if entry.isdigit() and devices.is_dir():
            groups[int(entry)] = tuple(sorted(os.listdir(devices)))
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


def read_links(paths: HostPaths) -> dict[str, NetLink]:
    links: dict[str, NetLink] = {}
    root = paths.class_net
    if not root.is_dir():
        return links
    for name in os.listdir(root):
        net_dir = root / name
        entries = os.listdir(net_dir) if net_dir.is_dir() else []
        device = _link_name(net_dir / "device") if "device" in entries else ""
        if device and _link_name(net_dir / "device" / "subsystem") != "pci":
            device = _pci_ancestor(net_dir / "device")  # virtio-net: the netdev hangs off virtioN
        links[name] = NetLink(
            name=name,
            kind=_link_kind(net_dir, device),
            device=device,
            lowers=tuple(sorted(e.removeprefix("lower_") for e in entries if e.startswith("lower_"))),
            uppers=tuple(sorted(e.removeprefix("upper_") for e in entries if e.startswith("upper_"))),
            mac=_read(net_dir / "address"),
            carrier=_read(net_dir / "carrier") == "1",
        )
    return links


def _ipv4_from_le_hex(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(bytes.fromhex(text)[::-1])


def read_routes(paths: HostPaths) -> tuple[Route, ...]:
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
    return HostSnapshot(
        functions=functions,
        groups=groups,
        links=read_links(paths),
        routes=read_routes(paths),
        iommu_present=class_iommu.is_dir() and any(class_iommu.iterdir()),
        cmdline=_read(paths.proc_cmdline),
        loaded_drivers=loaded,
    )
