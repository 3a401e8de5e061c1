"""nicpassd's inventory matches what lspci and sysfs show in the guest."""

from __future__ import annotations

import shlex
import time

import pytest

from .conftest import E1000E, IGB, MGMT

pytestmark = pytest.mark.e2e


def test_inventory_matches_lspci_and_sysfs(g):
    listed = {d["address"]: d for d in g.ctl_json("list")}
    lspci = g.run(["lspci", "-D", "-n", "-mm"]).check().stdout.splitlines()
    # lspci -mm -n: slot "class" "vendor" "device" ...; every network-class function
    nics = {}
    for line in lspci:
        fields = [f for f in shlex.split(line) if not f.startswith("-")]
        if fields[1].startswith("02"):
            nics[fields[0]] = (fields[2], fields[3])
    kernel = g.state()["functions"]
    assert set(nics) == set(kernel) == {MGMT, IGB, E1000E}
    assert set(nics) <= set(listed), f"nicpassctl list misses {set(nics) - set(listed)}"
    for address, (vendor, device) in nics.items():
        d, k = listed[address], kernel[address]
        assert (d["vendor_id"].lower().removeprefix("0x"), d["device_id"].lower().removeprefix("0x")) == (vendor, device)
        assert d["driver"] == k["driver"], address
        assert d["iommu_group"] == k["iommu_group"], address
        assert d["total_vfs"] == k["sriov_totalvfs"] and d["num_vfs"] == k["sriov_numvfs"], address
        # a virtio NIC's netdev hangs off virtioN, below the PCI function
        if address != MGMT:
            assert sorted(d["interfaces"]) == k["net"], address
    assert listed[IGB]["total_vfs"] == 7
    assert listed[MGMT]["protected"] is True
    assert listed[IGB]["protected"] is False and listed[E1000E]["protected"] is False


def test_virtio_nic_interfaces_listed(g):
    """A virtio-net function's netdev sits under virtioN/net, not under the PCI function's net/."""
    assert g.run("ls /sys/bus/pci/devices/0000:01:00.0/virtio*/net").check().stdout.split() == ["enp1s0"]
    listed = {d["address"]: d for d in g.ctl_json("list")}
    assert listed[MGMT]["interfaces"] == ["enp1s0"], listed[MGMT]


def test_preflight_check_sees_the_iommu(g):
    findings = {f["id"]: f for f in g.ctl_json("check")}
    assert findings["iommu"]["level"] == "ok", findings
    assert g.run("ls /sys/class/iommu").check().stdout.strip(), "the guest has no IOMMU"


def test_vfs_created_out_of_band_show_the_ids_their_add_uevents_carried(g):
    """A function that comes is taken in with the ids its "add" uevent carries (PCI_ID,
    PCI_SUBSYS_ID, PCI_CLASS, parsed by nicpassd), not read from sysfs: they are the files'."""
    g.run(["sh", "-c", f"echo 2 > /sys/bus/pci/devices/{IGB}/sriov_numvfs"]).check()
    try:
        vfs = g.wait(lambda s: len(s["functions"][IGB]["virtfns"]) == 2, what="2 VFs")["functions"][IGB]["virtfns"]

        def listed():
            return {d["address"]: d for d in g.ctl_json("list") if d["address"] in vfs}

        deadline = time.monotonic() + 60
        while len(shown := listed()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert set(shown) == set(vfs), shown
        for vf in vfs:
            files = {name: g.run(["cat", f"/sys/bus/pci/devices/{vf}/{name}"]).check().stdout.strip().removeprefix("0x")
                     for name in ("vendor", "device", "subsystem_vendor", "subsystem_device")}
            ids = {name: shown[vf][f"{name}_id"].lower().removeprefix("0x") for name in files}
            assert ids == files, vf
            class_file = g.run(["cat", f"/sys/bus/pci/devices/{vf}/class"]).check().stdout.strip()
            assert shown[vf]["class_code"].lower().removeprefix("0x") == class_file.removeprefix("0x"), vf
    finally:
        g.run(["sh", "-c", f"echo 0 > /sys/bus/pci/devices/{IGB}/sriov_numvfs"])
