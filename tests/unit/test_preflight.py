"""Issue 15: the preflight check on simulated hosts built for each case — a finding per step an
admin does by hand before passthrough, each with a remedy written for this host (its boot
loader, its CPU vendor), and a readiness report per device."""

from __future__ import annotations

import pytest

from nicpassd.engine.store import DeviceDesire, identity_of

NIC = """
[[functions]]
address = "0000:02:00.0"
vendor = "8086"
device = "10d3"
driver = "e1000e"
netdev = "enp2s0"
iommu_group = 7
"""


def host(platform: str = "", *, iommu: bool = True, cmdline: str = "ro quiet intel_iommu=on", functions: str = NIC) -> str:
    return f"iommu = {str(iommu).lower()}\ncmdline = \"{cmdline}\"\n" + (f"[platform]\n{platform}\n" if platform else "") \
        + functions


def findings(sim) -> dict[str, tuple[str, str, str]]:
    return {f.id: (f.level.value, f.message, f.remedy) for f in sim.engine.check()}


async def test_a_ready_host_says_so_finding_by_finding(sim):
    found = findings(sim)
    assert found["cpu-virtualization"][:2] == ("ok", "Intel VT-x is on and /dev/kvm is there")
    assert found["iommu"][0] == "ok" and "dmar0" in found["iommu"][1] and "Intel VT-d (ACPI DMAR)" in found["iommu"][1]
    assert found["iommu-domain"][0] == "ok" and "iommu=pt" in found["iommu-domain"][1]  # fine, and said so
    assert found["interrupt-remapping"][0] == "ok"
    assert found["vfio"][:2] == ("ok", "vfio-pci is available for 6.1.0-sim-amd64 (loaded when first needed)")
    assert not [f for f in found.values() if f[0] == "fail"]


async def test_no_virtualization_fails_and_a_missing_dev_kvm_warns(make_sim):
    found = findings(make_sim(host("virtualization = false")))
    assert found["cpu-virtualization"][0] == "fail" and "no vmx or svm" in found["cpu-virtualization"][1]
    assert "enable Intel VT-x in the firmware setup" == found["cpu-virtualization"][2]
    found = findings(make_sim(host('cpu = "amd"\nkvm = false\n', cmdline="ro")))
    assert found["cpu-virtualization"][:2] == ("warn", "AMD-V is on, but /dev/kvm is missing")
    assert "modprobe kvm_amd" in found["cpu-virtualization"][2]


@pytest.mark.parametrize("platform, words", [
    ("", "add intel_iommu=on in GRUB_CMDLINE_LINUX_DEFAULT of /etc/default/grub, run `update-grub`, then reboot"),
    ('boot_loader = "systemd-boot"', "add intel_iommu=on in /etc/kernel/cmdline (one line), run `kernel-install add"),
    ('boot_loader = "proxmox-boot-tool"', "add intel_iommu=on in /etc/kernel/cmdline (one line), run "
                                          "`proxmox-boot-tool refresh`, then reboot"),
    ('cpu = "amd"\nboot_loader = "none"', "add amd_iommu=on on the kernel command line of your boot loader"),
])
async def test_an_iommu_the_firmware_has_and_the_kernel_left_off_names_this_host_s_file_and_command(make_sim, platform,
                                                                                                words):
    found = findings(make_sim(host(platform, iommu=False, cmdline="ro quiet")))
    level, message, remedy = found["iommu"]
    assert level == "fail" and "the kernel did not turn it on" in message
    assert words in remedy, remedy


async def test_no_iommu_in_the_firmware_is_told_apart(make_sim):
    level, message, remedy = findings(make_sim(host("firmware_iommu = false", iommu=False)))["iommu"]
    assert level == "fail" and "the firmware describes none (no ACPI DMAR or IVRS table)" in message
    assert remedy.startswith("enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup")


async def test_the_default_domain_is_reported_without_iommu_pt(make_sim):
    level, message, _ = findings(make_sim(host()))["iommu-domain"]
    assert level == "ok" and "DMA-FQ domain" in message and "iommu=pt would spare" in message


@pytest.mark.parametrize("platform, level, words", [
    ('interrupt_remapping = "unsupported"', "fail", "the IOMMU unit(s) dmar0 do not support it"),
    ('interrupt_remapping = "off"', "fail", "no IR-* interrupt chip"),
    ('interrupt_remapping = "off"\nunsafe_interrupts = true', "warn", "allow unsafe interrupts"),
])
async def test_interrupt_remapping(make_sim, platform, level, words):
    found = findings(make_sim(host(platform)))["interrupt-remapping"]
    assert found[0] == level and words in found[1], found
    if "off\"" in platform and level == "fail":
        assert "remove intremap=off or nointremap in GRUB_CMDLINE_LINUX_DEFAULT" in found[2]


async def test_unsafe_interrupts_with_remapping_on_is_a_warning(make_sim):
    found = findings(make_sim(host("unsafe_interrupts = true")))
    assert found["unsafe-interrupts"][0] == "warn"


async def test_vfio_built_in_or_missing(make_sim):
    assert findings(make_sim(host('vfio = "builtin"')))["vfio"][:2] == ("ok", "vfio-pci is built into the kernel")
    level, message, remedy = findings(make_sim(host('vfio = "missing"')))["vfio"]
    assert level == "fail" and "6.1.0-sim-amd64" in message and "modules package" in remedy


async def test_a_risky_parameter_says_how_to_remove_it_on_this_host(make_sim):
    sim = make_sim(host('boot_loader = "systemd-boot"', cmdline="ro intel_iommu=on pcie_acs_override=downstream"))
    level, _message, remedy = findings(sim)["cmdline-pcie_acs_override"]
    assert level == "warn" and remedy.startswith("remove pcie_acs_override=downstream in /etc/kernel/cmdline")


async def test_the_management_nic_persisted_for_passthrough_fails(sim):
    snapshot = sim.engine.snapshot
    eno1 = "0000:01:00.0"
    sim.engine.store.put(DeviceDesire(address=eno1, identity=identity_of(snapshot.functions[eno1], snapshot),
                                      driver="vfio-pci"))
    level, message, remedy = findings(sim)[f"management-passthrough-{eno1}"]
    assert level == "fail" and "the host's management path" in message and "second one" in remedy


# ------------------------------------------------------------------------- per device
SHARED = NIC + """
[[functions]]
address = "0000:03:00.0"
vendor = "8086"
device = "10d3"
driver = "e1000e"
netdev = "enp3s0"
iommu_group = 7
reset_method = "bus"

[[functions]]
address = "0000:04:00.0"
vendor = "8086"
device = "1563"
driver = "ixgbe"
netdev = "enp4s0"
sriov_disabled = true
reset_method = ""
"""


def device_findings(sim, *devices: str) -> dict[str, dict[str, tuple[str, str, str]]]:
    out: dict[str, dict[str, tuple[str, str, str]]] = {}
    for address, f in sim.engine.check_devices(list(devices)):
        out.setdefault(address, {})[f.id] = (f.level.value, f.message, f.remedy)
    return out


async def test_a_group_shared_across_slots_a_bus_reset_a_card_without_reset_and_sr_iov_turned_off(make_sim):
    found = device_findings(make_sim(host(functions=SHARED)))
    assert set(found) == {"0000:02:00.0", "0000:03:00.0", "0000:04:00.0"}  # every NIC function
    level, message, remedy = found["0000:02:00.0"]["iommu-group"]
    assert level == "warn" and "shared with 0000:03:00.0 (e1000e); not viable until 0000:03:00.0 is on vfio-pci too" in message
    assert "does not isolate them (no ACS)" in remedy and "nicpassctl bind --group 0000:02:00.0" in remedy
    assert found["0000:02:00.0"]["reset"] == ("ok", "reset: flr, bus", "")
    assert found["0000:03:00.0"]["reset"][0] == "warn" and "only a bus reset" in found["0000:03:00.0"]["reset"][1]
    assert found["0000:04:00.0"]["reset"][0] == "warn" and "no reset method" in found["0000:04:00.0"]["reset"][1]
    level, message, remedy = found["0000:04:00.0"]["sriov"]
    assert level == "warn" and "the SR-IOV capability is there, but the kernel shows no VFs" in message
    assert "add pci=realloc in GRUB_CMDLINE_LINUX_DEFAULT" in remedy
    assert found["0000:04:00.0"]["iommu-group"][0] == "ok" and "alone" in found["0000:04:00.0"]["iommu-group"][1]
    assert found["0000:04:00.0"]["function"] == ("ok", "0000:04:00.0 (enp4s0) on ixgbe, 8086:1563", "")


UNPLACED = NIC + """
[[functions]]
address = "0000:05:00.0"
vendor = "8086"
device = "1521"
driver = "igb"
netdev = "enp5s0"
sriov_totalvfs = 7
vf_device = "1520"
vf_driver = "igbvf"
vf_bars_unassigned = true
"""


async def test_vfs_whose_memory_the_kernel_could_not_place_are_a_warning_and_the_kernel_refuses_them(make_sim):
    """Issue 15: "capable but disabled" that needs no capability to see: the VFs' IOV BARs in the
    world-readable `resource` are all unassigned (the kernel's 'BAR 7: failed to assign' at boot),
    so sriov_totalvfs says 7 and enabling them fails with ENOMEM."""
    from nicpassd.errors import KernelError

    sim = make_sim(host(functions=UNPLACED))
    level, message, remedy = device_findings(sim, "enp5s0")["0000:05:00.0"]["sriov"]
    assert level == "warn" and message.startswith("SR-IOV capable (up to 7 VFs), but the kernel could not place the "
                                                  "VFs' memory")
    assert remedy.endswith("add pci=realloc in GRUB_CMDLINE_LINUX_DEFAULT of /etc/default/grub, run `update-grub`, "
                           "then reboot")
    with pytest.raises(KernelError, match="not enough MMIO resources for SR-IOV"):
        await sim.engine.set_vf_count("enp5s0", 2)
    assert sim.numvfs("0000:05:00.0") == 0


async def test_the_default_host_s_devices(sim):
    found = device_findings(sim, "enp59s0f0", "af:00.0", "eno1")
    assert found["0000:3b:00.0"]["sriov"] == ("ok", "SR-IOV capable: up to 64 VFs (0 now)", "")
    assert found["0000:3b:00.0"]["guard"][0] == "ok"
    level, message, remedy = found["0000:af:00.0"]["iommu-group"]
    assert level == "warn" and "0000:af:00.1 (xhci_hcd)" in message and "functions of one card share it" in remedy
    level, message, _ = found["0000:01:00.0"]["guard"]
    assert level == "fail" and message.startswith("protected: ") and "default route" in message


async def test_a_vf_and_no_iommu_group(make_sim, sim):
    sim.kernel.write(sim.dir("0000:3b:00.0") / "sriov_numvfs", "1")
    sim.engine.refresh()
    found = device_findings(sim, "3b:02.0")
    assert found["0000:3b:02.0"]["sriov"][:2] == ("ok", "a VF of 0000:3b:00.0 (enp59s0f0)")
    found = device_findings(make_sim(host(iommu=False)))
    assert found["0000:02:00.0"]["iommu-group"][0] == "fail"


async def test_the_remedy_of_a_persisted_management_nic_is_a_command_that_clears_it(sim):
    """Issue 20: a remedy is a command that works. `nicpassctl forget ADDRESS` (the engine call
    behind it) clears the management-passthrough failure it is given for."""
    snapshot = sim.engine.snapshot
    eno1 = "0000:01:00.0"
    sim.engine.store.put(DeviceDesire(address=eno1, identity=identity_of(snapshot.functions[eno1], snapshot),
                                      driver="vfio-pci"))
    level, _message, remedy = findings(sim)[f"management-passthrough-{eno1}"]
    assert level == "fail" and f"`nicpassctl forget {eno1}`" in remedy
    await sim.engine.forget(eno1)
    assert f"management-passthrough-{eno1}" not in findings(sim)


async def test_the_remedy_of_a_drift_is_a_command_that_clears_it(sim):
    """A persisted binding changed with --runtime shows as drift; `nicpassctl forget ADDRESS`,
    the remedy `check` gives, clears the finding."""
    nic = "0000:3b:00.1"
    await sim.engine.bind(nic, "vfio-pci")
    await sim.engine.unbind(nic, persist=False)  # held against its persisted state until reboot
    await sim.engine.reconcile()
    level, message, remedy = findings(sim)[f"drift-{nic}"]
    assert level == "warn" and f"`nicpassctl forget {nic}`" in remedy, (level, message, remedy)
    await sim.engine.forget(nic)
    await sim.engine.reconcile()
    assert f"drift-{nic}" not in findings(sim)
