"""The topology file: a declarative description of a host's PCI functions and network stack.

It is the input of the simulated kernel and the output of the recorder. TOML or JSON (by file
extension); the schema is validated by pydantic so a typo is reported with its location.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMAT_VERSION = 1
PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")
HEX4 = re.compile(r"^[0-9a-f]{4}$")


class TopologyError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Function(_Strict):
    """One PCI function as the kernel would present it at boot."""

    address: str
    vendor: str
    device: str
    subsystem_vendor: str = "0000"
    subsystem_device: str = "0000"
    class_code: str = Field("020000", alias="class")
    driver: str = ""  # the host driver the kernel probes for this function ("" = none matches)
    bound: bool = True  # whether that driver is bound at boot
    iommu_group: int | None = None  # None: a group of its own
    netdev: str = ""  # interface name while bound to a network driver
    mac: str = ""  # permanent MAC of netdev
    serial: str = ""  # PCIe device serial number, "" when the device has none
    carrier: bool = True
    sriov_totalvfs: int = 0
    vf_device: str = ""
    vf_driver: str = ""
    vf_offset: int = 1
    vf_stride: int = 1
    sriov_configure: bool = True  # driver implements sriov_configure (else ENOENT on writes)
    # SR-IOV capability in config space, but no VFs for the kernel (off in the firmware, or VF
    # BARs it could not place): no sriov_* attributes. Only with sriov_totalvfs = 0.
    sriov_disabled: bool = False
    # VFs the kernel shows, but whose memory (the IOV BARs) it could not place at boot: every IOV
    # BAR line of `resource` is zero and enabling VFs fails with ENOMEM ("not enough MMIO
    # resources for SR-IOV"). Only with sriov_totalvfs > 0.
    vf_bars_unassigned: bool = False
    reset_method: str = "flr bus"  # the kernel's reset_method ("" = it cannot reset the function)
    disks: tuple[str, ...] = ()  # block devices behind this (storage) function: "sda", "nvme0n1"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.lower()
        if not PCI_ADDRESS.match(value):
            raise ValueError(f"{value!r} is not a full PCI address like 0000:3b:00.0")
        return value

    @field_validator("vendor", "device", "subsystem_vendor", "subsystem_device")
    @classmethod
    def _hex4(cls, value: str) -> str:
        value = value.lower().removeprefix("0x")
        if not HEX4.match(value):
            raise ValueError(f"{value!r} is not a 4-digit hex id")
        return value

    @field_validator("vf_device")
    @classmethod
    def _vf_hex4(cls, value: str) -> str:
        value = value.lower().removeprefix("0x")
        if value and not HEX4.match(value):
            raise ValueError(f"{value!r} is not a 4-digit hex id")
        return value

    @field_validator("class_code")
    @classmethod
    def _class(cls, value: str) -> str:
        value = value.lower().removeprefix("0x")
        if not re.fullmatch(r"[0-9a-f]{6}", value):
            raise ValueError(f"{value!r} is not a 6-digit PCI class code like 020000")
        return value

    @model_validator(mode="after")
    def _sriov(self) -> "Function":
        if self.sriov_totalvfs and not self.vf_device:
            raise ValueError(f"{self.address}: sriov_totalvfs needs vf_device")
        if self.sriov_totalvfs < 0 or self.vf_stride < 1 or self.vf_offset < 1:
            raise ValueError(f"{self.address}: sriov_totalvfs, vf_offset and vf_stride must be positive")
        if self.vf_bars_unassigned and not self.sriov_totalvfs:
            raise ValueError(f"{self.address}: vf_bars_unassigned is about the VFs' memory: it needs sriov_totalvfs")
        if self.sriov_disabled and self.sriov_totalvfs:
            raise ValueError(f"{self.address}: sriov_disabled means the kernel shows no VFs: sriov_totalvfs must be 0")
        return self

    @property
    def is_network(self) -> bool:
        return self.class_code.startswith("02")


class Link(_Strict):
    """A virtual network interface stacked on other interfaces."""

    name: str
    kind: Literal["bond", "bridge", "vlan", "macvlan", "team", "dummy", "vrf", "wireguard", "vxlan", "geneve",
                  "gre", "ipip", "vti"]
    lowers: tuple[str, ...] = ()  # for a vrf: its member interfaces
    remotes: tuple[str, ...] = ()  # a tunnel's remote endpoint(s) (WireGuard: its peers' endpoints)
    local: str = ""  # a tunnel's local address
    dev: str = ""  # a tunnel's lower device (vxlan dev, gre link)
    vlan_id: int | None = None
    table: int | None = None  # a vrf's routing table
    mac: str = ""


class Address(_Strict):
    dev: str
    address: str

    @field_validator("address")
    @classmethod
    def _addr(cls, value: str) -> str:
        ipaddress.ip_interface(value)
        return value


class Hop(_Strict):
    """One next hop of an ECMP route, or of a nexthop object."""

    dev: str
    gateway: str = ""


class Nexthop(_Strict):
    """``ip nexthop add id ID dev DEV via GW`` or ``… id ID group A/B``."""

    id: int = Field(gt=0)
    dev: str = ""
    gateway: str = ""
    group: tuple[int, ...] = ()


class Rule(_Strict):
    """``ip rule add priority P from SOURCE lookup TABLE``; ``l3mdev`` the VRF rule."""

    priority: int = Field(ge=0)
    table: int = 0
    source: str = ""
    family: Literal[4, 6] = 4
    l3mdev: bool = False


class Session(_Strict):
    """An established TCP connection to this host (what sock_diag lists): ``local`` address and
    ``port`` of this host, the ``peer``'s address and port."""

    local: str
    port: int = Field(22, gt=0, lt=65536)
    peer: str
    peer_port: int = Field(50000, gt=0, lt=65536)

    @field_validator("local", "peer")
    @classmethod
    def _ip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))


class Mount(_Strict):
    """A file system of /proc/self/mountinfo: ``fstype``, ``source``, mount point ``target`` and
    the super-block ``options`` (the kernel adds ``addr=SERVER`` for NFS and CIFS)."""

    fstype: str
    source: str
    target: str
    options: str = "rw"


class Route(_Strict):
    dev: str = ""  # "" when the route has ``nexthops`` or a ``nexthop`` object
    dst: str = "default"  # "default" means 0.0.0.0/0 or ::/0 per family
    gateway: str = ""
    family: Literal[4, 6] | None = None
    metric: int = 0
    table: int = 254  # main
    nexthops: tuple[Hop, ...] = ()  # ECMP
    nexthop: int = 0  # a nexthop object's id

    @property
    def devs(self) -> tuple[str, ...]:
        return (self.dev,) if self.dev else tuple(hop.dev for hop in self.nexthops)

    @model_validator(mode="after")
    def _family(self) -> "Route":
        if not self.dev and not self.nexthops and not self.nexthop:
            raise ValueError(f"route {self.dst}: needs a dev, nexthops or a nexthop object")
        family = self.family
        if self.dst != "default":
            family_from_dst = ipaddress.ip_network(self.dst, strict=False).version
            if family and family != family_from_dst:
                raise ValueError(f"route {self.dst}: family {family} does not match")
            family = family_from_dst
        elif self.gateway or any(hop.gateway for hop in self.nexthops):
            gateway = self.gateway or next(hop.gateway for hop in self.nexthops if hop.gateway)
            family = family or ipaddress.ip_address(gateway).version
        object.__setattr__(self, "family", family or 4)
        return self

    @property
    def prefix(self) -> str:
        if self.dst == "default":
            return "0.0.0.0/0" if self.family == 4 else "::/0"
        return str(ipaddress.ip_network(self.dst, strict=False))


class Platform(_Strict):
    """What the preflight check reads beyond PCI: the CPU, the firmware's IOMMU, vfio, the boot loader."""

    cpu: Literal["intel", "amd"] = "intel"
    virtualization: bool = True  # vmx/svm in /proc/cpuinfo
    kvm: bool = True  # /dev/kvm
    firmware_iommu: bool = True  # an ACPI DMAR (intel) or IVRS (amd) table; the kernel's use of it is ``iommu``
    interrupt_remapping: Literal["on", "off", "unsupported"] = "on"  # unsupported: the IOMMU has no IR
    unsafe_interrupts: bool = False  # vfio_iommu_type1 allow_unsafe_interrupts
    vfio: Literal["module", "builtin", "missing"] = "module"
    boot_loader: Literal["grub", "systemd-boot", "proxmox-boot-tool", "none"] = "grub"
    kernel_release: str = "6.1.0-sim-amd64"


class Topology(_Strict):
    format: int = FORMAT_VERSION
    description: str = ""
    platform: Platform = Platform()
    iommu: bool = True
    cmdline: str = "BOOT_IMAGE=/vmlinuz root=/dev/sda2 ro intel_iommu=on iommu=pt"
    functions: tuple[Function, ...] = ()
    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()  # beyond the kernel's own (local, main, default)
    nexthops: tuple[Nexthop, ...] = ()
    sessions: tuple[Session, ...] = ()
    mounts: tuple[Mount, ...] = ()  # beyond / and /proc
    iscsi: tuple[str, ...] = ()  # iSCSI connections' target addresses
    nvme_of: tuple[str, ...] = ()  # NVMe over TCP controllers' target addresses
    root: str = ""  # block device mounted on /: a disk of some function or its partition ("sda2")

    @model_validator(mode="after")
    def _consistent(self) -> "Topology":
        if self.root and root_disk(self) is None:
            raise ValueError(f"root {self.root!r} is neither a disk of a function nor a partition of one")
        if self.format != FORMAT_VERSION:
            raise ValueError(f"topology format {self.format} is not supported (expected {FORMAT_VERSION})")
        seen: set[str] = set()
        for fn in self.functions:
            if fn.address in seen:
                raise ValueError(f"function {fn.address} is listed twice")
            seen.add(fn.address)
        names = [fn.netdev for fn in self.functions if fn.netdev] + [link.name for link in self.links]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"interface names used twice: {', '.join(sorted(duplicates))}")
        known = set(names)
        for link in self.links:
            for lower in link.lowers:
                if lower not in known:
                    raise ValueError(f"link {link.name}: lower device {lower!r} is not defined")
        devs = [item.dev for item in self.addresses] + [dev for route in self.routes for dev in route.devs]
        devs += [hop.dev for hop in self.nexthops if hop.dev]
        for dev in devs:
            if dev not in known:
                raise ValueError(f"{dev!r} in addresses/routes is not a defined interface")
        ids = {hop.id for hop in self.nexthops}
        for route in self.routes:
            if route.nexthop and route.nexthop not in ids:
                raise ValueError(f"route {route.dst}: nexthop object {route.nexthop} is not defined")
        return self


def root_disk(topology: "Topology") -> tuple[Function, str, int] | None:
    """(function, disk, partition number or 0) of ``topology.root``."""
    name = topology.root.removeprefix("/dev/")
    for fn in topology.functions:
        for disk in fn.disks:
            if name == disk:
                return fn, disk, 0
            tail = name.removeprefix(disk).removeprefix("p")
            if name.startswith(disk) and tail.isdigit():
                return fn, disk, int(tail)
    return None


def parse_topology(text: str, *, source: str = "<topology>", json_format: bool = False) -> Topology:
    try:
        data = json.loads(text) if json_format else tomllib.loads(text)
        return Topology.model_validate(data)
    except (ValidationError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise TopologyError(f"{source}: {exc}") from exc


def load_topology(path: Path | str | None = None) -> Topology:
    """Load a topology file, or the built-in default host when ``path`` is None."""
    if path is None:
        text = resources.files(__package__).joinpath("default-host.toml").read_text()
        return parse_topology(text, source="built-in default host")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"cannot read topology file {path}: {exc.strerror}") from exc
    return parse_topology(text, source=str(path), json_format=path.suffix == ".json")


def dump_topology_json(topology: Topology) -> str:
    return topology.model_dump_json(indent=2, by_alias=True, exclude_defaults=True)
