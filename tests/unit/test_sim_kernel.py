"""The simulated kernel obeys the kernel rules (docs/kernel-rules.md §1-8) at its write
boundary, so code tested against it is tested against the kernel's behaviour."""

from __future__ import annotations

import errno
import os
import time

import pytest

from nicpassd.sim.topology import Function

PF = "0000:3b:00.0"  # i40e, 64 VFs of iavf, offset 16 stride 1, netdev enp59s0f0
PF_VFS = ["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2", "0000:3b:02.3"]
NIC = "0000:af:00.0"  # e1000e, netdev enp175s0f0, IOMMU group 40 with a USB controller


def write(sim, relative: str, data: str) -> None:
    sim.kernel.write(sim.paths.sys / relative, data)


def numvfs(sim, pf: str, data: str) -> None:
    write(sim, f"bus/pci/devices/{pf}/sriov_numvfs", data)


def expect_errno(code: int, fn, *args) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"
    return info.value


def tree(sim) -> dict:
    """Everything a VF-count change could alter, for 'nothing changed' assertions."""
    return {
        "devices": sorted(os.listdir(sim.paths.pci_devices)),
        "groups": sorted(os.listdir(sim.paths.iommu_groups)),
        "net": sorted(sim.netdevs()),
        "numvfs": {pf: sim.numvfs(pf) for pf in (PF, "0000:3b:00.1")},
        "drivers": {a: sim.driver(a) for a in sorted(os.listdir(sim.paths.pci_devices))},
    }


NO_SRIOV_CONFIGURE = """
[[functions]]
address = "0000:3b:00.0"
vendor = "8086"
device = "1572"
driver = "i40e"
netdev = "enp59s0f0"
sriov_totalvfs = 8
vf_device = "154c"
vf_driver = "iavf"
sriov_configure = false
"""

PF_AT_END_OF_BUS = """
[[functions]]
address = "0000:3b:1f.7"
vendor = "8086"
device = "1572"
driver = "i40e"
netdev = "p1"
sriov_totalvfs = 8
vf_device = "154c"
vf_driver = "iavf"
vf_offset = 1
vf_stride = 1
"""


# ------------------------------------------------------------------------ sriov_numvfs (§1)
def test_numvfs_zero_to_n_creates_n_vfs(ksim):
    numvfs(ksim, PF, "4")
    assert ksim.numvfs(PF) == 4
    assert ksim.vfs(PF) == PF_VFS
    assert all(ksim.driver(vf) == "iavf" for vf in PF_VFS)


def test_numvfs_n_to_other_m_is_ebusy_and_changes_nothing(ksim):
    numvfs(ksim, PF, "4")
    before, events = tree(ksim), len(ksim.events)
    expect_errno(errno.EBUSY, numvfs, ksim, PF, "2")
    assert tree(ksim) == before
    assert len(ksim.events) == events


def test_numvfs_same_value_is_a_silent_noop(ksim):
    numvfs(ksim, PF, "4")
    before, events = tree(ksim), len(ksim.events)
    numvfs(ksim, PF, "4")
    assert tree(ksim) == before
    assert len(ksim.events) == events


def test_numvfs_above_total_is_erange(ksim):
    before = tree(ksim)
    expect_errno(errno.ERANGE, numvfs, ksim, PF, "65")
    assert tree(ksim) == before


@pytest.mark.parametrize("garbage", ["abc", "4x", "1.5", "\n", "-1"])
def test_numvfs_garbage_is_einval(ksim, garbage):
    # kstrtou16() rejects all of these, "-1" included, with -EINVAL.
    before = tree(ksim)
    expect_errno(errno.EINVAL, numvfs, ksim, PF, garbage)
    assert tree(ksim) == before


def test_numvfs_without_pf_driver_is_enoent(ksim):
    write(ksim, "bus/pci/drivers/i40e/unbind", PF)
    expect_errno(errno.ENOENT, numvfs, ksim, PF, "4")
    assert ksim.numvfs(PF) == 0 and ksim.vfs(PF) == []


def test_numvfs_with_driver_lacking_sriov_configure_is_enoent(make_kernel):
    sim = make_kernel(NO_SRIOV_CONFIGURE)
    expect_errno(errno.ENOENT, numvfs, sim, PF, "2")
    assert sim.numvfs(PF) == 0


def test_numvfs_on_function_without_sriov_is_enoent(ksim):
    # The attribute does not exist on a non-SR-IOV function: open(2) fails with ENOENT.
    assert not (ksim.dir(NIC) / "sriov_numvfs").exists()
    expect_errno(errno.ENOENT, numvfs, ksim, NIC, "1")


# ------------------------------------------------------------------------- VF layout (§6)
def test_vfs_have_virtfn_and_physfn_links(ksim):
    numvfs(ksim, PF, "2")
    for index, vf in enumerate(PF_VFS[:2]):
        assert os.readlink(ksim.dir(PF) / f"virtfn{index}").endswith(vf)
        assert os.path.basename(os.readlink(ksim.dir(vf) / "physfn")) == PF
        assert (ksim.dir(vf) / "device").read_text().strip() == "0x154c"


def test_vf_addresses_follow_offset_and_stride(ksim):
    # 01:00.0 has First VF Offset 128 and VF Stride 4: routing IDs 0x180, 0x184, 0x188.
    numvfs(ksim, "0000:01:00.0", "3")
    assert ksim.vfs("0000:01:00.0") == ["0000:01:10.0", "0000:01:10.4", "0000:01:11.0"]


def test_vf_routing_ids_carry_into_the_next_bus(make_kernel):
    sim = make_kernel(PF_AT_END_OF_BUS)
    numvfs(sim, "0000:3b:1f.7", "2")
    assert sim.vfs("0000:3b:1f.7") == ["0000:3c:00.0", "0000:3c:00.1"]


def test_each_vf_gets_its_own_iommu_group(ksim):
    numvfs(ksim, PF, "3")
    groups = [os.path.basename(os.readlink(ksim.dir(vf) / "iommu_group")) for vf in PF_VFS[:3]]
    pf_group = os.path.basename(os.readlink(ksim.dir(PF) / "iommu_group"))
    assert len(set(groups)) == 3 and pf_group not in groups
    for group, vf in zip(groups, PF_VFS):
        assert os.listdir(ksim.paths.iommu_groups / group / "devices") == [vf]


def test_vfs_bound_to_the_vf_driver_get_netdevs(ksim):
    numvfs(ksim, PF, "2")
    assert {"enp59s0f0v0", "enp59s0f0v1"} <= ksim.netdevs()
    net = ksim.paths.class_net / "enp59s0f0v0"
    assert os.path.basename(os.readlink(net / "device")) == PF_VFS[0]
    assert (net / "addr_assign_type").read_text().strip() == "1"  # random, not permanent


def test_vfs_without_autoprobe_get_no_driver_and_no_netdev(ksim):
    write(ksim, f"bus/pci/devices/{PF}/sriov_drivers_autoprobe", "0")
    numvfs(ksim, PF, "2")
    assert ksim.vfs(PF) == PF_VFS[:2]
    assert [ksim.driver(vf) for vf in PF_VFS[:2]] == ["", ""]
    assert not any(name.startswith("enp59s0f0v") for name in ksim.netdevs())


def test_autoprobe_rejects_non_boolean(ksim):
    expect_errno(errno.EINVAL, write, ksim, f"bus/pci/devices/{PF}/sriov_drivers_autoprobe", "2")
    assert ksim.autoprobe(PF) == "1"


def test_numvfs_to_zero_removes_vfs_groups_netdevs_and_links(ksim):
    before = tree(ksim)
    numvfs(ksim, PF, "3")
    groups = [os.path.basename(os.readlink(ksim.dir(vf) / "iommu_group")) for vf in PF_VFS[:3]]
    numvfs(ksim, PF, "0")
    assert tree(ksim) == before
    assert not any(entry.startswith("virtfn") for entry in os.listdir(ksim.dir(PF)))
    assert not any((ksim.paths.iommu_groups / group).exists() for group in groups)
    assert not any((ksim.paths.pci_drivers / "iavf" / vf).is_symlink() for vf in PF_VFS)


# --------------------------------------------------------------------- driver binding (§7-8)
def test_override_unbind_probe_binds_the_override(ksim):
    ksim.kernel.load_module("vfio-pci")
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "vfio-pci\n")
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    write(ksim, "bus/pci/drivers_probe", NIC)
    assert ksim.driver(NIC) == "vfio-pci"
    assert ksim.override(NIC) == "vfio-pci"
    assert "enp175s0f0" not in ksim.netdevs()


def test_writing_override_does_not_unbind(ksim):
    ksim.kernel.load_module("vfio-pci")
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "vfio-pci\n")
    write(ksim, "bus/pci/drivers_probe", NIC)  # already bound: probing changes nothing
    assert ksim.driver(NIC) == "e1000e"


def test_probe_without_override_binds_the_default_driver(ksim):
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    assert ksim.driver(NIC) == "" and "enp175s0f0" not in ksim.netdevs()
    write(ksim, "bus/pci/drivers_probe", NIC)
    assert ksim.driver(NIC) == "e1000e" and "enp175s0f0" in ksim.netdevs()


@pytest.mark.parametrize("override", ["vfio-pci", "nosuchdriver", "none"])
def test_probe_with_unmatched_override_binds_nothing_and_succeeds(ksim, override):
    # vfio-pci is not loaded yet; "none" is the documented way to block all binding.
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", override + "\n")
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    write(ksim, "bus/pci/drivers_probe", NIC)
    assert ksim.driver(NIC) == ""


def test_pci_stub_is_available_without_loading_a_module(ksim):
    # pci-stub is built in (ALWAYS_AVAILABLE_DRIVERS): its sysfs directory exists and it binds.
    assert (ksim.paths.pci_drivers / "pci-stub" / "bind").exists()
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "pci-stub\n")
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    write(ksim, "bus/pci/drivers_probe", NIC)
    assert ksim.driver(NIC) == "pci-stub"


def test_bind_attr_is_ebusy_when_already_bound(ksim):
    ksim.kernel.load_module("vfio-pci")
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "vfio-pci\n")
    expect_errno(errno.EBUSY, write, ksim, "bus/pci/drivers/vfio-pci/bind", NIC)
    assert ksim.driver(NIC) == "e1000e"


def test_bind_attr_is_enodev_when_driver_does_not_match(ksim):
    ksim.kernel.load_module("vfio-pci")
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    expect_errno(errno.ENODEV, write, ksim, "bus/pci/drivers/vfio-pci/bind", NIC)
    assert ksim.driver(NIC) == ""
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "vfio-pci\n")
    write(ksim, "bus/pci/drivers/vfio-pci/bind", NIC)
    assert ksim.driver(NIC) == "vfio-pci"


def test_unbind_is_enodev_when_not_bound_to_that_driver(ksim):
    expect_errno(errno.ENODEV, write, ksim, "bus/pci/drivers/i40e/unbind", NIC)
    assert ksim.driver(NIC) == "e1000e"


def test_newline_clears_the_override(ksim):
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "vfio-pci\n")
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "\n")
    assert (ksim.dir(NIC) / "driver_override").read_text().strip() == "(null)"


def test_zero_byte_write_to_override_is_ignored(ksim):
    # sysfs_kf_write() returns 0 for count == 0 without calling store(): the override stays.
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "vfio-pci\n")
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "")
    assert ksim.override(NIC) == "vfio-pci"


def test_read_only_attribute_is_eacces(ksim):
    expect_errno(errno.EACCES, write, ksim, f"bus/pci/devices/{NIC}/vendor", "0x1234")
    assert (ksim.dir(NIC) / "vendor").read_text().strip() == "0x8086"


# ------------------------------------------------------------------------------ uevents (§6)
# The order and payload are the real kernel's (6.1, igb/igbvf: tests/e2e/kernel-observations/):
# a driver's probe registers its netdev before "bind" is sent, its remove unregisters it before
# "unbind", and "unbind" carries no DRIVER (dev->driver is already cleared).
def uevents(sim) -> list[tuple[str, str, str, str]]:
    return [(e.action, e.subsystem, e.sys_name, e.driver) for e in sim.events]


def test_vf_creation_uevents(ksim):
    numvfs(ksim, PF, "2")
    assert uevents(ksim) == [
        ("add", "pci", PF_VFS[0], ""), ("change", "pci", PF_VFS[0], ""),  # change: virtfn/physfn links
        ("add", "net", "enp59s0f0v0", ""), ("bind", "pci", PF_VFS[0], "iavf"),
        ("add", "pci", PF_VFS[1], ""), ("change", "pci", PF_VFS[1], ""),
        ("add", "net", "enp59s0f0v1", ""), ("bind", "pci", PF_VFS[1], "iavf"),
        ("change", "pci", PF, "i40e"),  # sriov_enable() on the PF, bound to its driver
    ]


def test_vf_creation_without_autoprobe_sends_no_bind(ksim):
    write(ksim, f"bus/pci/devices/{PF}/sriov_drivers_autoprobe", "0")
    numvfs(ksim, PF, "1")
    assert uevents(ksim) == [
        ("add", "pci", PF_VFS[0], ""), ("change", "pci", PF_VFS[0], ""), ("change", "pci", PF, "i40e")]


def test_vf_removal_uevents(ksim):
    numvfs(ksim, PF, "2")
    ksim.events.clear()
    numvfs(ksim, PF, "0")
    assert uevents(ksim) == [  # sriov_del_vfs(): VF 0 first; no "change" on the PF
        ("remove", "net", "enp59s0f0v0", ""), ("unbind", "pci", PF_VFS[0], ""), ("remove", "pci", PF_VFS[0], ""),
        ("remove", "net", "enp59s0f0v1", ""), ("unbind", "pci", PF_VFS[1], ""), ("remove", "pci", PF_VFS[1], ""),
    ]


def test_unbind_and_probe_uevents(ksim):
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    write(ksim, "bus/pci/drivers_probe", NIC)
    assert uevents(ksim) == [
        ("remove", "net", "enp175s0f0", ""), ("unbind", "pci", NIC, ""),
        ("add", "net", "enp175s0f0", ""), ("bind", "pci", NIC, "e1000e"),
    ]


def test_bind_to_vfio_pci_has_no_netdev_events(ksim):
    ksim.kernel.load_module("vfio-pci")
    write(ksim, f"bus/pci/devices/{NIC}/driver_override", "vfio-pci")
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    write(ksim, "bus/pci/drivers_probe", NIC)
    assert uevents(ksim) == [
        ("remove", "net", "enp175s0f0", ""), ("unbind", "pci", NIC, ""), ("bind", "pci", NIC, "vfio-pci")]


# -------------------------------------------------------------------------------- faults
def test_hung_write_fails_with_eintr_after_the_delay_and_changes_nothing(ksim):
    ksim.kernel.hang_write("sriov_numvfs", 0.15, device=PF)
    started = time.monotonic()
    expect_errno(errno.EINTR, numvfs, ksim, PF, "2")
    assert time.monotonic() - started >= 0.15
    assert ksim.numvfs(PF) == 0 and ksim.events == []
    numvfs(ksim, PF, "2")  # fired once
    assert ksim.numvfs(PF) == 2


def test_hang_fires_the_given_number_of_times(ksim):
    ksim.kernel.hang_write("sriov_numvfs", 0.01, times=2)
    expect_errno(errno.EINTR, numvfs, ksim, PF, "1")
    expect_errno(errno.EINTR, numvfs, ksim, "0000:3b:00.1", "1")
    numvfs(ksim, PF, "1")
    assert ksim.numvfs(PF) == 1


def test_failed_write_fires_once_and_changes_nothing(ksim):
    ksim.kernel.fail_write("sriov_numvfs", errno.EIO)
    before = tree(ksim)
    expect_errno(errno.EIO, numvfs, ksim, PF, "2")
    assert tree(ksim) == before and ksim.events == []
    numvfs(ksim, PF, "2")
    assert ksim.numvfs(PF) == 2


def test_device_scoped_fault_hits_only_that_device(ksim):
    ksim.kernel.fail_write("sriov_numvfs", errno.EIO, device="0000:3b:00.1")
    numvfs(ksim, PF, "1")
    expect_errno(errno.EIO, numvfs, ksim, "0000:3b:00.1", "1")
    assert ksim.numvfs("0000:3b:00.1") == 0


@pytest.mark.parametrize("attr, relative", [
    ("unbind", "bus/pci/drivers/e1000e/unbind"),
    ("drivers_probe", "bus/pci/drivers_probe"),
])
def test_device_scoped_fault_fires_on_driver_attributes(ksim, attr, relative):
    # bind/unbind/drivers_probe name the device in the data written, not in the path.
    ksim.kernel.fail_write(attr, errno.EIO, device=NIC)
    if attr == "drivers_probe":
        write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    expect_errno(errno.EIO, write, ksim, relative, NIC)


def test_fewer_vfs_fault_fires_once(ksim):
    ksim.kernel.enable_fewer_vfs(PF, 2)
    numvfs(ksim, PF, "4")  # the kernel only warns: the write succeeds (§2)
    assert ksim.numvfs(PF) == 2 and ksim.vfs(PF) == PF_VFS[:2]
    numvfs(ksim, PF, "0")
    numvfs(ksim, PF, "4")
    assert ksim.numvfs(PF) == 4


def test_silent_bind_failure_fires_once(ksim):
    ksim.kernel.fail_binds_silently(NIC)
    write(ksim, "bus/pci/drivers/e1000e/unbind", NIC)
    write(ksim, "bus/pci/drivers_probe", NIC)  # succeeds, binds nothing (§8)
    assert ksim.driver(NIC) == ""
    write(ksim, "bus/pci/drivers_probe", NIC)
    assert ksim.driver(NIC) == "e1000e"


# ----------------------------------------------------------------------------- hotplug
def test_unplug_removes_the_device_with_uevents(ksim):
    ksim.kernel.unplug(NIC)
    assert not ksim.exists(NIC) and "enp175s0f0" not in ksim.netdevs()
    assert ksim.event_tuples()[-1] == ("remove", "pci", NIC)
    assert ("unbind", "pci", NIC) in ksim.event_tuples()
    assert os.listdir(ksim.paths.iommu_groups / "40" / "devices") == ["0000:af:00.1"]


def test_unplug_uevents(ksim):
    ksim.kernel.unplug(NIC)
    assert uevents(ksim) == [
        ("remove", "net", "enp175s0f0", ""), ("unbind", "pci", NIC, ""), ("remove", "pci", NIC, "")]


def test_unplug_of_a_pf_removes_its_vfs(ksim):
    numvfs(ksim, PF, "2")
    ksim.events.clear()
    ksim.kernel.unplug(PF)
    assert not any(ksim.exists(a) for a in [PF, *PF_VFS[:2]])
    # pciehp_unconfigure_device() walks the bus in reverse: the VFs go first, the last one first,
    # then the PF; each device: its netdev, "unbind" (no driver), "remove". No "change" on the PF.
    assert uevents(ksim) == [
        ("remove", "net", "enp59s0f0v1", ""), ("unbind", "pci", PF_VFS[1], ""), ("remove", "pci", PF_VFS[1], ""),
        ("remove", "net", "enp59s0f0v0", ""), ("unbind", "pci", PF_VFS[0], ""), ("remove", "pci", PF_VFS[0], ""),
        ("remove", "net", "enp59s0f0", ""), ("unbind", "pci", PF, ""), ("remove", "pci", PF, ""),
    ]


def test_unplug_of_a_vf_then_its_pf(ksim):
    numvfs(ksim, PF, "2")
    ksim.kernel.unplug(PF_VFS[1])
    ksim.events.clear()
    ksim.kernel.unplug(PF)
    assert not any(ksim.exists(a) for a in [PF, *PF_VFS[:2]])
    assert [(a, n) for a, s, n, _ in uevents(ksim) if s == "pci"] == [
        ("unbind", PF_VFS[0]), ("remove", PF_VFS[0]), ("unbind", PF), ("remove", PF)]


def test_plug_adds_and_probes(ksim):
    ksim.kernel.plug(Function(address="0000:d8:00.0", vendor="8086", device="10d3", driver="e1000e", netdev="ens9"))
    assert ksim.driver("0000:d8:00.0") == "e1000e" and "ens9" in ksim.netdevs()
    assert uevents(ksim) == [
        ("add", "pci", "0000:d8:00.0", ""), ("add", "net", "ens9", ""), ("bind", "pci", "0000:d8:00.0", "e1000e")]


# -------------------------------------------------------------------------------- misc
def test_load_module_makes_the_driver_appear(ksim):
    assert not (ksim.paths.pci_drivers / "vfio-pci").exists()
    ksim.kernel.load_module("vfio-pci")
    assert (ksim.paths.pci_drivers / "vfio-pci" / "bind").exists()
    expect_errno(errno.ENOENT, ksim.kernel.load_module, "nosuchmodule")


@pytest.mark.parametrize("relative", ["etc/passwd", "sys/../etc/passwd", "proc/cmdline"])
def test_write_outside_sys_is_eacces(ksim, relative):
    target = ksim.paths.root / relative
    before = target.read_text() if target.exists() else None
    expect_errno(errno.EACCES, ksim.kernel.write, target, "x")
    assert (target.read_text() if target.exists() else None) == before
