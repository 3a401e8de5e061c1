"""VF creation and vfio-pci binding, checked on the guest kernel and through the VFIO API."""

from __future__ import annotations

import pytest

from .conftest import E1000E, IGB

pytestmark = pytest.mark.e2e


def test_vfs_created_with_their_own_iommu_groups(g):
    result = g.ctl("vfs", IGB, "4")
    assert result.returncode == 0, result.stderr
    pf = g.fn(IGB)
    assert pf["sriov_numvfs"] == 4 and len(pf["virtfns"]) == 4
    state = g.wait(lambda s: all(s["functions"].get(vf, {}).get("driver") == "igbvf" for vf in pf["virtfns"]),
                   30, what="4 VFs on igbvf")["functions"]
    groups = [state[vf]["iommu_group"] for vf in pf["virtfns"]]
    assert -1 not in groups and len(set(groups)) == 4 and pf["iommu_group"] not in groups, groups
    for vf in pf["virtfns"]:
        assert state[vf]["physfn"] == IGB
        assert state[vf]["group_members"] == [vf], f"{vf} shares its group: {state[vf]['group_members']}"
        assert state[vf]["device"] == "10ca"


def test_vf_count_change_goes_through_zero(g):
    assert g.ctl("vfs", IGB, "4", "--runtime").returncode == 0
    mark = g.kmsg_mark()
    result = g.ctl("vfs", IGB, "2", "--runtime")
    assert result.returncode == 0, result.stderr
    pf = g.fn(IGB)
    assert pf["sriov_numvfs"] == 2 and len(pf["virtfns"]) == 2
    # the kernel refuses 4 -> 2 directly (EBUSY): nicpassd must have written 0 first
    assert "VFs already enabled" not in g.kmsg_since(mark), "nicpassd wrote N->M to sriov_numvfs (EBUSY)"


def test_vf_count_above_total_is_invalid(g):
    result = g.ctl("vfs", IGB, "8")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert g.fn(IGB)["sriov_numvfs"] == 0


def test_vfs_and_e1000e_on_vfio_pci_open_through_vfio_api(g):
    assert g.ctl("vfs", IGB, "2").returncode == 0
    vfs = g.fn(IGB)["virtfns"]
    result = g.ctl("bind", *vfs, E1000E, "--driver", "vfio-pci")
    assert result.returncode == 0, result.stderr
    state = g.state()
    for bdf in [*vfs, E1000E]:
        fn = state["functions"][bdf]
        assert fn["driver"] == "vfio-pci", (bdf, fn)
        assert fn["iommu_group"] in state["vfio"], f"/dev/vfio/{fn['iommu_group']} missing for {bdf}"
    opened = g.vfio_open(*vfs, E1000E)
    for report in opened:
        assert report["ok"], report
        assert report["viable"] and report["device_fd"], report
    assert [r["config_ids"] for r in opened] == ["8086:10ca", "8086:10ca", "8086:10d3"]
    # and back to the host drivers
    result = g.ctl("unbind", *vfs, E1000E)
    assert result.returncode == 0, result.stderr
    state = g.wait(lambda s: s["functions"][E1000E]["net"] and all(s["functions"][v]["driver"] == "igbvf" for v in vfs),
                   30, what="host drivers back")
    assert state["functions"][E1000E]["driver"] == "e1000e"
    assert all(state["functions"][v]["driver_override"] == "(null)" for v in [*vfs, E1000E])


def test_new_vfs_straight_to_vfio(g):
    result = g.ctl("vfs", IGB, "3", "--vfio")
    assert result.returncode == 0, result.stderr
    state = g.state()
    vfs = state["functions"][IGB]["virtfns"]
    assert len(vfs) == 3
    assert all(state["functions"][v]["driver"] == "vfio-pci" for v in vfs), state["functions"]
    assert all(r["ok"] for r in g.vfio_open(*vfs)), g.vfio_open(*vfs)


def test_persisted_vfs_are_on_vfio_pci_before_the_daemon_has_imported_its_stack(g):
    """What a reboot leaves (no VFs, no overrides) and the daemon started: the `nicpassd` command
    creates the persisted VFs and binds them with the standard library alone, before it imports
    the daemon (nicpassd/host/early_vfs.py); the daemon then finds nothing left to do."""
    assert g.ctl("vfs", IGB, "3", "--vfio").returncode == 0
    vfs = g.fn(IGB)["virtfns"]
    g.sh("systemctl stop nicpassd")
    g.sh("".join(f"echo > /sys/bus/pci/devices/{vf}/driver_override; " for vf in vfs)
         + f"echo 0 > /sys/bus/pci/devices/{IGB}/sriov_numvfs; "
         f"echo 1 > /sys/bus/pci/devices/{IGB}/sriov_drivers_autoprobe; udevadm settle")
    cursor = g.run("journalctl -u nicpassd -n 0 --show-cursor --no-pager").check().stdout.split("cursor: ")[-1].strip()
    g.sh("systemctl start nicpassd")  # returns at READY=1
    journal = g.run(["journalctl", "-u", "nicpassd", "--no-pager", "-o", "cat", f"--after-cursor={cursor}"]).stdout
    assert f"VFs at start, before the engine: {IGB}: 3 VFs created on vfio-pci" in journal, journal
    assert "boot reconcile" not in journal, journal
    state = g.state()["functions"]
    assert state[IGB]["virtfns"] == vfs and all(state[vf]["driver"] == "vfio-pci" for vf in vfs), state
    assert all(r["ok"] for r in g.vfio_open(*vfs))
