"""Immutable snapshots of what the kernel shows: PCI functions, IOMMU groups, netdevs, routes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PciFunction:
    address: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: str
    driver: str = ""
    driver_override: str = ""
    iommu_group: int = -1
    interfaces: tuple[str, ...] = ()
    physfn: str = ""
    virtfns: tuple[str, ...] = ()
    total_vfs: int = 0
    num_vfs: int = 0
    sriov_capable: bool = False
    autoprobe: bool = True
    permanent_mac: str = ""
    serial: str = ""

    @property
    def is_network(self) -> bool:
        return self.class_code.startswith("02")

    @property
    def is_bridge(self) -> bool:
        return self.class_code.startswith("0604")

    @property
    def is_vf(self) -> bool:
        return bool(self.physfn)


@dataclass(frozen=True)
class NetLink:
    name: str
    kind: str  # physical, bond, bridge, vlan, macvlan, team, virtual
    device: str = ""  # PCI address for a physical netdev
    lowers: tuple[str, ...] = ()
    uppers: tuple[str, ...] = ()
    mac: str = ""
    carrier: bool = False


@dataclass(frozen=True)
class Route:
    family: int
    prefix: str
    dev: str
    gateway: str = ""

    @property
    def is_default(self) -> bool:
        return self.prefix in ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class HostSnapshot:
    functions: dict[str, PciFunction] = field(default_factory=dict)
    groups: dict[int, tuple[str, ...]] = field(default_factory=dict)
    links: dict[str, NetLink] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    iommu_present: bool = False
    cmdline: str = ""
    loaded_drivers: frozenset[str] = frozenset()

    def group_members(self, address: str) -> tuple[str, ...]:
        function = self.functions.get(address)
        if function is None or function.iommu_group < 0:
            return ()
        return self.groups.get(function.iommu_group, (address,))

    def function_of_interface(self, name: str) -> PciFunction | None:
        link = self.links.get(name)
        if link is None or not link.device:
            return None
        return self.functions.get(link.device)
