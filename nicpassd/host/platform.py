"""What the preflight check reads about the platform: CPU virtualization, the IOMMU as the firmware
and the kernel show it, interrupt remapping, vfio modules, the boot loader, and per function its
reset methods and SR-IOV capability. Read-only and rooted in ``HostPaths`` like everything here.

The sources, all of them files (the simulator writes the same ones):

- ``/proc/cpuinfo`` flags ``vmx`` (Intel VT-x) or ``svm`` (AMD-V), ``/dev/kvm``;
- ``/sys/firmware/acpi/tables/DMAR`` (Intel VT-d) or ``IVRS`` (AMD-Vi): the firmware describes an
  IOMMU; ``/sys/class/iommu/*``: the kernel turned it on;
- ``/sys/class/iommu/dmar*/intel-iommu/ecap``: bit 3 is interrupt remapping support (Intel VT-d
  spec, Extended Capability Register "IR"); ``/proc/interrupts``: chips named ``IR-…`` (IR-PCI-MSI,
  IR-IO-APIC) are the kernel's own word that remapping is in use, on Intel and AMD alike;
- ``/sys/kernel/iommu_groups/N/type``: the default domain (``identity`` with ``iommu=pt``);
- ``/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts``;
- ``/sys/bus/pci/drivers/vfio-pci`` (registered), else ``/lib/modules/RELEASE/modules.builtin`` and
  ``modules.dep`` (built in, or loadable);
- ``/etc/kernel/proxmox-boot-uuids``, ``/etc/kernel/cmdline``, ``/etc/default/grub``: how this
  host's kernel command line is changed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from nicpassd.host.kernelio import has_sriov_capability
from nicpassd.paths import HostPaths

ECAP_INTERRUPT_REMAPPING = 1 << 3


@dataclass(frozen=True)
class IommuUnit:
    name: str  # dmar0, ivhd0
    interrupt_remapping: bool | None  # the unit's capability (Intel ecap); None: not readable


@dataclass(frozen=True)
class BootLoader:
    name: str  # "proxmox-boot-tool", "systemd-boot", "GRUB", "" when not recognised
    file: str  # where the kernel command line is set
    command: str  # what makes the change take effect


@dataclass(frozen=True)
class Platform:
    cpu_vendor: str  # "intel", "amd", "" when /proc/cpuinfo does not say
    virtualization: bool  # vmx or svm
    kvm: bool  # /dev/kvm
    firmware_iommu: str  # "DMAR", "IVRS" or "" (no ACPI table describes an IOMMU)
    units: tuple[IommuUnit, ...]  # active units (/sys/class/iommu)
    default_domain: str  # "identity", "DMA", "DMA-FQ"; "" with no IOMMU group
    interrupt_remapping: bool  # in use (/proc/interrupts)
    unsafe_interrupts: bool
    kernel_release: str
    vfio_pci: str  # "registered", "built in", "loadable", "missing"
    boot_loader: BootLoader
    cmdline: str


@dataclass(frozen=True)
class FunctionPlatform:
    """What passthrough needs of one function beyond its driver and group."""

    reset_methods: tuple[str, ...]  # flr, pm, bus, ...; () when the kernel can reset it no way
    sriov_capability: bool | None  # in config space, whatever the kernel made of it; None: unreadable
    # Whether the kernel placed the VFs' memory (any IOV BAR of `resource` assigned); None: the
    # kernel shows no IOV BARs (not a PF, or built without SR-IOV). World-readable, no capability.
    vf_memory: bool | None = None


def _read(path: "os.PathLike[str]") -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def read_platform(paths: HostPaths) -> Platform:
    cpuinfo = _read(paths.under("/proc/cpuinfo"))
    flags = set()
    vendor = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "vendor_id" and not vendor:
            vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(value.strip(), "")
    tables = paths.under("/sys/firmware/acpi/tables")
    firmware = next((name for name in ("DMAR", "IVRS") if (tables / name).exists()), "")
    units = []
    class_iommu = paths.class_iommu
    for name in sorted(os.listdir(class_iommu)) if class_iommu.is_dir() else []:
        ecap = _read(class_iommu / name / "intel-iommu" / "ecap").strip()
        capable = bool(int(ecap, 16) & ECAP_INTERRUPT_REMAPPING) if re.fullmatch(r"[0-9a-fA-F]+", ecap) else None
        units.append(IommuUnit(name, capable))
    release = _read(paths.under("/proc/sys/kernel/osrelease")).strip()
    return Platform(
        cpu_vendor=vendor,
        virtualization=bool(flags & {"vmx", "svm"}),
        kvm=paths.under("/dev/kvm").exists(),
        firmware_iommu=firmware,
        units=tuple(units),
        default_domain=_default_domain(paths),
        interrupt_remapping=bool(re.search(r"\bIR-", _read(paths.under("/proc/interrupts")))),
        unsafe_interrupts=_read(paths.under("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"))
        .strip() in ("Y", "1"),
        kernel_release=release,
        vfio_pci=_vfio_pci(paths, release),
        boot_loader=_boot_loader(paths),
        cmdline=_read(paths.proc_cmdline).strip(),
    )


def _default_domain(paths: HostPaths) -> str:
    groups = paths.iommu_groups
    for name in sorted(os.listdir(groups), key=lambda n: int(n) if n.isdigit() else 0) if groups.is_dir() else []:
        kind = _read(groups / name / "type").strip()
        if kind:
            return kind
    return ""


def _vfio_pci(paths: HostPaths, release: str) -> str:
    if (paths.pci_drivers / "vfio-pci").is_dir():
        return "registered"
    modules = paths.under(f"/lib/modules/{release}") if release else None
    if modules is None:
        return "missing"
    if re.search(r"(^|/)vfio-pci\.ko", _read(modules / "modules.builtin"), re.M):
        return "built in"
    if re.search(r"(^|/)vfio-pci\.ko[^:]*:", _read(modules / "modules.dep"), re.M):
        return "loadable"
    return "missing"


def _boot_loader(paths: HostPaths) -> BootLoader:
    """How the kernel command line is changed on this host (the first that applies)."""
    if paths.under("/etc/kernel/proxmox-boot-uuids").exists():
        if paths.under("/etc/kernel/cmdline").exists():  # proxmox-boot-tool with systemd-boot (ZFS root, UEFI)
            return BootLoader("proxmox-boot-tool", "/etc/kernel/cmdline", "proxmox-boot-tool refresh")
        return BootLoader("proxmox-boot-tool", "/etc/default/grub", "proxmox-boot-tool refresh")
    if paths.under("/etc/kernel/cmdline").exists():
        return BootLoader("systemd-boot", "/etc/kernel/cmdline", "kernel-install add $(uname -r) /boot/vmlinuz-$(uname -r)")
    if paths.under("/etc/default/grub").exists():
        return BootLoader("GRUB", "/etc/default/grub", "update-grub")
    return BootLoader("", "", "")


def read_function_platform(paths: HostPaths, address: str) -> FunctionPlatform:
    directory = paths.pci_device(address)
    methods = _read(directory / "reset_method").split()
    if not methods and (directory / "reset").exists() and not (directory / "reset_method").exists():
        methods = ["unknown"]  # a kernel before 5.15: it can reset the function, it does not say how
    return FunctionPlatform(tuple(methods), has_sriov_capability(directory / "config"),
                            _vf_memory(_read(directory / "resource"), (directory / "sriov_totalvfs").exists()))


def _vf_memory(resource: str, physfn: bool) -> bool | None:
    """Lines 7-12 of ``resource`` are the IOV BARs (after the six BARs and the ROM): an assigned
    one has non-zero flags; the kernel resets (all zero) an optional BAR it could not place, and
    sriov_enable() then fails with ENOMEM."""
    lines = resource.splitlines()
    if not physfn or len(lines) < 13:
        return None
    return any(int(line.split()[2], 16) for line in lines[7:13] if len(line.split()) == 3)
