"""Immutable snapshots of what the kernel shows: PCI functions, IOMMU groups, netdevs, routes."""

from __future__ import annotations

import ipaddress
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
class VfSettings:
    """One VF's settings as its PF's driver holds them (``ip link show PF``'s "vf N" line)."""

    index: int
    mac: str = ""  # the administrative MAC; "" when none is set (all zeroes)
    vlan: int = 0  # 0 = no VLAN enforced
    qos: int = 0
    vlan_proto: str = "802.1Q"
    spoofchk: bool | None = None  # None: the driver does not report it
    trust: bool | None = None
    link_state: str = "auto"  # auto, enable, disable
    min_tx_rate: int = 0  # Mbit/s, 0 = none
    max_tx_rate: int = 0
    rss_query: bool | None = None


@dataclass(frozen=True)
class NetLink:
    name: str
    kind: str  # physical, bond, bridge, vlan, macvlan, team, virtual
    device: str = ""  # PCI address for a physical netdev
    lowers: tuple[str, ...] = ()
    uppers: tuple[str, ...] = ()
    mac: str = ""
    carrier: bool = False


MAIN_TABLE = 254


@dataclass(frozen=True)
class Route:
    """One next hop of a unicast route: an ECMP route is one ``Route`` per next hop."""

    family: int
    prefix: str
    dev: str
    gateway: str = ""
    table: int = MAIN_TABLE

    @property
    def is_default(self) -> bool:
        return self.prefix in ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class Rule:
    """A policy-routing rule that sends traffic to a table (``ip rule``)."""

    family: int
    priority: int
    table: int  # 0 for an l3mdev (VRF) rule: each VRF's own table
    selector: str = ""  # "from 10.1.0.0/16", "iif eth1", ... ("" = all)
    l3mdev: bool = False


@dataclass(frozen=True)
class Tunnel:
    """A tunnel interface and what it rides on: remote endpoint(s), local address, lower device."""

    name: str
    kind: str  # wireguard, vxlan, geneve, gre, ipip, sit, vti, xfrm, ...
    remotes: tuple[str, ...] = ()
    local: str = ""
    dev: str = ""


@dataclass(frozen=True)
class ClusterPrefix:
    """A network a cluster's links run on (corosync, Ceph), and where it was configured."""

    prefix: str
    reason: str


@dataclass(frozen=True)
class NetStorage:
    """Storage reached over the network: what (a mount point, a session), of which kind, on
    which server address."""

    kind: str  # NFS, CIFS, Ceph, GlusterFS, iSCSI, NVMe-oF, libvirt pool
    server: str
    what: str


@dataclass(frozen=True)
class Session:
    """An established TCP connection to a local port (sock_diag)."""

    local: str
    local_port: int
    peer: str
    peer_port: int


@dataclass(frozen=True)
class IfAddress:
    """An address configured on an interface (``ip addr``): ``address`` in interface form."""

    family: int
    address: str  # "192.0.2.10/24", "2001:db8::10/64"
    dev: str
    scope: int = 0  # RT_SCOPE_*: 0 universe, 200 site, 253 link, 254 host

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]

    @property
    def reaches_host(self) -> bool:
        """Could another machine reach the host on it? Not loopback, not link-local."""
        ip = ipaddress.ip_address(self.ip)
        return self.scope < 253 and not (ip.is_loopback or ip.is_link_local)


@dataclass(frozen=True)
class RootStorage:
    """A PCI function the root file system lives on (through partitions, dm, md)."""

    address: str
    chain: tuple[str, ...]  # "/ on /dev/sda2", "sda2", "sda", ... down to the function


@dataclass(frozen=True)
class HostSnapshot:
    functions: dict[str, PciFunction] = field(default_factory=dict)
    groups: dict[int, tuple[str, ...]] = field(default_factory=dict)
    links: dict[str, NetLink] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()
    sessions: tuple[Session, ...] = ()
    tunnels: dict[str, Tunnel] = field(default_factory=dict)
    network_storage: tuple[NetStorage, ...] = ()
    cluster: tuple[ClusterPrefix, ...] = ()
    addresses: tuple[IfAddress, ...] = ()
    root_storage: tuple[RootStorage, ...] = ()
    iommu_present: bool = False
    cmdline: str = ""
    loaded_drivers: frozenset[str] = frozenset()
    vf_settings: dict[str, tuple[VfSettings, ...]] = field(default_factory=dict)  # PF address -> its VFs'

    def vf_settings_of(self, address: str) -> VfSettings | None:
        """A VF's settings as its PF's driver holds them (None: not a VF, or not reported)."""
        function = self.functions.get(address)
        if function is None or not function.physfn or function.physfn not in self.functions:
            return None
        parent = self.functions[function.physfn]
        if address not in parent.virtfns:
            return None
        index = parent.virtfns.index(address)
        return next((vf for vf in self.vf_settings.get(parent.address, ()) if vf.index == index), None)

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
