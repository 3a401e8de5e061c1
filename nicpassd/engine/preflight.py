"""The preflight check: every step an admin does by hand before passthrough, as findings with a
remedy written for this host (its boot loader, its CPU vendor, its devices).

Pure functions of what the host layer read (``Platform``, ``FunctionPlatform``) and of what the
engine knows (``HostView``); ``checks.check`` adds the host findings, ``device_findings`` answers
``nicpassctl check DEVICE…``.
"""

from __future__ import annotations

from nicpassd.engine.hostview import HostView
from nicpassd.engine.results import Finding, Level
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS
from nicpassd.host.platform import FunctionPlatform, Platform


def cmdline_remedy(platform: Platform, *, add: str = "", remove: str = "") -> str:
    """How to change this host's kernel command line: the file and the command, per boot loader."""
    change = f"add {add}" if add else f"remove {remove}"
    loader = platform.boot_loader
    if loader.file == "/etc/default/grub":
        how = f"{change} in GRUB_CMDLINE_LINUX_DEFAULT of /etc/default/grub, run `{loader.command}`"
    elif loader.file:
        how = f"{change} in {loader.file} (one line), run `{loader.command}`"
    else:
        how = f"{change} on the kernel command line of your boot loader (none was recognised here)"
    return f"{how}, then reboot"


def _iommu_parameter(platform: Platform) -> str:
    amd = platform.firmware_iommu == "IVRS" or platform.cpu_vendor == "amd"
    return "amd_iommu=on" if amd else "intel_iommu=on"


def platform_findings(platform: Platform) -> list[Finding]:
    findings = []
    technology = {"intel": "Intel VT-x", "amd": "AMD-V"}.get(platform.cpu_vendor, "CPU virtualization")
    if not platform.virtualization:
        findings.append(Finding("cpu-virtualization", Level.FAIL,
                                "the CPU shows no vmx or svm flag: virtualization is off in the firmware (or the host "
                                "is a VM without nested virtualization)",
                                f"enable {technology} in the firmware setup"))
    elif not platform.kvm:
        module = {"intel": "kvm_intel", "amd": "kvm_amd"}.get(platform.cpu_vendor, "kvm_intel or kvm_amd")
        findings.append(Finding("cpu-virtualization", Level.WARN, f"{technology} is on, but /dev/kvm is missing",
                                f"load the KVM module (`modprobe {module}`)"))
    else:
        findings.append(Finding("cpu-virtualization", Level.OK, f"{technology} is on and /dev/kvm is there"))
    findings += _iommu_findings(platform)
    if platform.vfio_pci == "missing":
        findings.append(Finding("vfio", Level.FAIL, f"vfio-pci is not available for the running kernel "
                                f"{platform.kernel_release or '(release unknown)'}",
                                "install the modules package of the running kernel (vfio-pci is part of every "
                                "distribution kernel), or boot a kernel that has it"))
    else:
        said = {"registered": "vfio-pci is loaded", "built in": "vfio-pci is built into the kernel",
                "loadable": f"vfio-pci is available for {platform.kernel_release} (loaded when first needed)"}
        findings.append(Finding("vfio", Level.OK, said[platform.vfio_pci]))
    return findings


def _iommu_findings(platform: Platform) -> list[Finding]:
    parameter = _iommu_parameter(platform)
    vendor = {"DMAR": "Intel VT-d (ACPI DMAR)", "IVRS": "AMD-Vi (ACPI IVRS)"}.get(platform.firmware_iommu, "")
    if not platform.units:
        if platform.firmware_iommu:
            return [Finding("iommu", Level.FAIL, f"the firmware describes an IOMMU ({vendor}), but the kernel did not "
                            "turn it on (/sys/class/iommu is empty)", cmdline_remedy(platform, add=parameter))]
        return [Finding("iommu", Level.FAIL, "no IOMMU: the firmware describes none (no ACPI DMAR or IVRS table), "
                        "so no device can be passed through safely",
                        "enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup; if it is on and the board "
                        f"still shows none, update the firmware; then check that {parameter} is on the kernel "
                        "command line")]
    names = ", ".join(unit.name for unit in platform.units)
    findings = [Finding("iommu", Level.OK, f"the IOMMU is on: {len(platform.units)} unit(s) ({names})"
                        + (f", {vendor}" if vendor else ""))]
    if platform.default_domain == "identity":
        findings.append(Finding("iommu-domain", Level.OK, "iommu=pt: the host's own devices bypass translation "
                                "(identity domain); devices given to VMs are translated and isolated all the same"))
    elif platform.default_domain:
        findings.append(Finding("iommu-domain", Level.OK, f"the host's devices are translated ({platform.default_domain} "
                                "domain); iommu=pt would spare the host the cost and is safe for passthrough"))
    incapable = [unit.name for unit in platform.units if unit.interrupt_remapping is False]
    if platform.interrupt_remapping:
        findings.append(Finding("interrupt-remapping", Level.OK, "interrupt remapping is in use (the kernel's interrupt "
                                "chips are IR-*)"))
        if platform.unsafe_interrupts:
            findings.append(Finding("unsafe-interrupts", Level.WARN, "vfio_iommu_type1.allow_unsafe_interrupts is on "
                                    "though interrupt remapping works: a VM may inject interrupts into the host",
                                    cmdline_remedy(platform, remove="vfio_iommu_type1.allow_unsafe_interrupts=1")
                                    + " (and the option from /etc/modprobe.d)"))
    elif platform.unsafe_interrupts:
        findings.append(Finding("interrupt-remapping", Level.WARN, "interrupt remapping is off, and vfio is told to "
                                "allow unsafe interrupts: passthrough works, but a VM can inject interrupts into the host",
                                "enable interrupt remapping (x2APIC / interrupt remapping in the firmware setup), then "
                                "drop allow_unsafe_interrupts"))
    elif incapable:
        findings.append(Finding("interrupt-remapping", Level.FAIL, f"interrupt remapping is off: the IOMMU unit(s) "
                                f"{', '.join(incapable)} do not support it, and vfio refuses to assign devices without it",
                                "enable x2APIC and interrupt remapping in the firmware setup (or update it); "
                                "vfio_iommu_type1.allow_unsafe_interrupts=1 works around it at the cost of isolation"))
    else:
        findings.append(Finding("interrupt-remapping", Level.FAIL, "interrupt remapping is off (no IR-* interrupt chip): "
                                "vfio refuses to assign devices without it",
                                cmdline_remedy(platform, remove="intremap=off or nointremap")
                                + "; if neither is there, enable interrupt remapping in the firmware setup"))
    return findings


def passthrough_of_management(view: HostView) -> list[Finding]:
    """A whole device of the host's management path persisted for passthrough: the guard refuses
    it (so the host stays reachable), but the admin's plan needs another NIC."""
    findings = []
    for address, desire in sorted(view.store.state.devices.items()):
        if desire.driver in PASSTHROUGH_DRIVERS and address in view.protected.entries:
            reasons = "; ".join(view.protected.reasons(address)) or "it is protected"
            findings.append(Finding(f"management-passthrough-{address}", Level.FAIL,
                                    f"{view.label(address)} is persisted for {desire.driver}, but it is the host's "
                                    f"management path ({reasons}): nicpassd will not hand it to a VM",
                                    "give the VM a VF of it or another NIC, and `nicpassctl forget "
                                    f"{address}`; a host with one NIC needs a second one for this"))
    return findings


def device_findings(view: HostView, address: str, fp: FunctionPlatform, platform: Platform) -> list[Finding]:
    """One function's readiness for passthrough: its group, its reset, SR-IOV, the guard."""
    function = view.snapshot.functions[address]
    findings = [Finding("function", Level.OK, f"{view.label(address)} on {function.driver or 'no driver'}, "
                        f"{function.vendor_id}:{function.device_id}"), _group_finding(view, address)]
    methods = [method for method in fp.reset_methods if method]
    if not methods:
        findings.append(Finding("reset", Level.WARN, "no reset method: a VM gets it in whatever state "
                                "the previous user left it, and some guests fail to start a second time",
                                "prefer a function with FLR (a VF, or a card that has it) for passthrough"))
    elif methods == ["bus"]:
        findings.append(Finding("reset", Level.WARN, "only a bus reset, which resets every "
                                "device behind the same bridge", "pass its whole slot to one VM"))
    elif methods == ["unknown"]:
        findings.append(Finding("reset", Level.OK, "reset: possible (this kernel does not say how)"))
    else:
        findings.append(Finding("reset", Level.OK, f"reset: {', '.join(methods)}"))
    if function.physfn:
        findings.append(Finding("sriov", Level.OK, f"a VF of {view.label(function.physfn)}"))
    elif function.total_vfs and fp.vf_memory is False:
        findings.append(Finding("sriov", Level.WARN, f"SR-IOV capable (up to {function.total_vfs} VFs), but the "
                                "kernel could not place the VFs' memory (every IOV BAR is unassigned): creating VFs "
                                "fails with \"not enough MMIO resources for SR-IOV\"",
                                "enable \"Above 4G decoding\" and SR-IOV in the system firmware, or let the kernel "
                                "re-place the bridges' windows: " + cmdline_remedy(platform, add="pci=realloc")))
    elif function.total_vfs:
        findings.append(Finding("sriov", Level.OK, f"SR-IOV capable: up to {function.total_vfs} VFs "
                                f"({function.num_vfs} now)"))
    elif fp.sriov_capability:
        findings.append(Finding("sriov", Level.WARN, "the SR-IOV capability is there, but the kernel shows no VFs "
                                "for it: SR-IOV is off in the card's or the system's firmware, or the kernel could not "
                                "place the VFs' memory (a kernel log line about IOV BARs)",
                                "enable SR-IOV in the firmware setup (system and card); if the kernel log names the "
                                "BARs, " + cmdline_remedy(platform, add="pci=realloc")))
    if address in view.protected.entries:
        reasons = "; ".join(view.protected.reasons(address))
        findings.append(Finding("guard", Level.FAIL, f"protected: {reasons}",
                                "it keeps the host reachable: give the VM another function"))
    else:
        findings.append(Finding("guard", Level.OK, "not protected"))
    return findings


def _group_finding(view: HostView, address: str) -> Finding:
    snapshot = view.snapshot
    function = snapshot.functions[address]
    if function.iommu_group < 0:
        return Finding("iommu-group", Level.FAIL, "no IOMMU group: the IOMMU is off or does not cover it",
                       "turn the IOMMU on (see the host's iommu finding)")
    mates = [mate for mate in snapshot.group_members(address) if mate != address
             and not (mate in snapshot.functions and snapshot.functions[mate].is_bridge)]
    if not mates:
        return Finding("iommu-group", Level.OK, f"IOMMU group {function.iommu_group}: alone (viable, isolated)")
    busy = [mate for mate in mates if (snapshot.functions.get(mate) and snapshot.functions[mate].driver
                                       not in ("", *PASSTHROUGH_DRIVERS))]
    shown = ", ".join(f"{mate} ({snapshot.functions[mate].driver if mate in snapshot.functions else '?'})"
                      for mate in mates)
    same_slot = all(mate.rsplit(".", 1)[0] == address.rsplit(".", 1)[0] for mate in mates)
    hint = ("the functions of one card share it (no ACS between them): pass them together (`nicpassctl bind --group "
            f"{address}`)" if same_slot else
            "devices of other slots share it: the PCIe bridge or root port above them does not isolate them (no ACS); "
            f"pass the whole group (`nicpassctl bind --group {address}`) or move the card to a slot with a group of its own")
    level = Level.WARN if busy else Level.OK
    state = (f"not viable until {', '.join(busy)} {'is' if len(busy) == 1 else 'are'} on vfio-pci too" if busy
             else "viable: every mate is on vfio-pci or unbound")
    return Finding("iommu-group", level, f"IOMMU group {function.iommu_group}: shared with {shown}; {state}", hint)
