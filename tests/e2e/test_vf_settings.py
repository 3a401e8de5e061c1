"""Issue 14 on a real igb (82576 as QEMU emulates it, Linux 6.1): VF settings set through nicpassctl
are what the kernel's own `ip -d link show` lists, refusals name the driver, and the persisted
settings come back when the VFs are created again or changed behind nicpassd's back."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import IGB

pytestmark = pytest.mark.e2e
MAC = "02:00:00:00:00:51"


def vf_lines(g, interface: str) -> list[dict]:
    """The kernel's view: `ip -j -d link show PF`'s VF list."""
    out = g.run(["ip", "-j", "-d", "link", "show", "dev", interface]).check().stdout
    return json.loads(out)[0].get("vfinfo_list", [])


def wanted(vf: dict) -> bool:
    vlans = vf.get("vlan_list") or [{}]
    return (vf.get("address") == MAC and vlans[0].get("vlan") == 12 and vlans[0].get("qos") == 3
            and vf.get("spoofchk") is False and vf.get("trust") is True)


def test_a_mac_set_while_the_pf_is_down_is_not_forced_on_igbvf(g):
    """igb answers a probing VF's mailbox only while the PF is up ("PF still in reset state. Is the
    PF interface up?"): the MAC is set in the PF and nicpassd says what takes it."""
    assert g.ctl("vfs", IGB, "1").returncode == 0
    pf = g.fn(IGB)
    interface = pf["net"][0]
    g.run(["ip", "link", "set", interface, "down"]).check()
    result = g.ctl("vf", f"{IGB}:0", "mac", MAC)
    assert result.returncode == 0, result.stderr
    assert vf_lines(g, interface)[0]["address"] == MAC
    said = f"{interface} is down: igbvf takes it when {interface} is up"
    for _ in range(20):  # journald takes the line in on its own time
        if said in g.journal(20):
            break
        time.sleep(0.5)
    assert said in g.journal(20)


def test_settings_reach_the_kernel_refusals_name_igb_and_persisted_ones_come_back(g):
    assert g.ctl("vfs", IGB, "2").returncode == 0
    pf = g.fn(IGB)
    interface, vfs = pf["net"][0], pf["virtfns"]
    g.run(["ip", "link", "set", interface, "up"]).check()  # igbvf takes a MAC only from a PF that is up
    try:
        check_settings(g, interface, vfs)
    finally:
        g.run(["ip", "link", "set", interface, "down"])


def check_settings(g, interface: str, vfs: list[str]) -> None:
    result = g.ctl("vf", f"{IGB}:1", "mac", MAC, "vlan", "12", "qos", "3", "trust", "on", "spoofchk", "off")
    assert result.returncode == 0, result.stderr + g.journal(20)
    shown = vf_lines(g, interface)
    assert wanted(shown[1]), shown
    assert shown[0].get("address") != MAC and not (shown[0].get("vlan_list") or [{}])[0].get("vlan")
    # igbvf was probed again and took the administrative MAC
    vf = g.wait(lambda s: s["functions"][vfs[1]]["driver"] == "igbvf" and s["functions"][vfs[1]]["net"], 30,
                what="igbvf back on the VF")["functions"][vfs[1]]
    assert g.run(["cat", f"/sys/class/net/{vf['net'][0]}/address"]).check().stdout.strip() == MAC
    as_json = {d["address"]: d for d in g.ctl_json("list")}
    assert as_json[vfs[1]]["desired_vf_settings"] == {"mac": MAC, "vlan": 12, "qos": 3, "trust": True,
                                                      "spoofchk": False}

    # igb has no ndo_set_vf_link_state, and only tags 802.1Q
    result = g.ctl("vf", vfs[0], "state", "disable")
    assert result.returncode == 1 and "igb" in result.stderr and "link state" in result.stderr, result
    result = g.ctl("vf", vfs[0], "vlan", "7", "proto", "802.1ad")
    assert result.returncode == 1 and "igb" in result.stderr, result
    assert not (vf_lines(g, interface)[0].get("vlan_list") or [{}])[0].get("vlan")  # nothing left half-done

    # Changed behind nicpassd's back: the kernel's RTM_NEWLINK of the PF, and it is put back.
    g.run(["ip", "link", "set", interface, "vf", "1", "trust", "off"]).check()
    g.wait(lambda _s: wanted(vf_lines(g, interface)[1]), 30, what="the persisted trust put back")
    # The VFs gone and created again (what a reboot or a PF reset does): the settings come back.
    g.run(["sh", "-c", f"echo 0 > /sys/bus/pci/devices/{IGB}/sriov_numvfs"]).check()
    g.wait(lambda s: s["functions"][IGB]["sriov_numvfs"] == 2 and len(vf_lines(g, interface)) == 2
           and wanted(vf_lines(g, interface)[1]), 60, what="the VFs and VF 1's settings back")


DOMAIN, DOMAIN_UUID = "e2e-vf-iface", "5b0c2d4e-1f3a-4b5c-8d6e-7f8091a2b3c4"
VM_MAC = "52:54:00:6e:00:01"


def interface_domain(vf: str) -> str:
    from .test_libvirt import domain_of, pci_address

    return domain_of(DOMAIN, DOMAIN_UUID, f"""    <interface type='hostdev' managed='no'>
      <mac address='{VM_MAC}'/>
      <source><address type='pci' {pci_address(vf)}/></source>
      <vlan><tag id='42'/></vlan>
    </interface>
""")


def test_a_libvirt_interface_hostdev_carries_its_mac_and_vlan_and_gets_the_vf_s_own_back(g):
    """Issue 14, item 5: libvirt sets an <interface type='hostdev'>'s <mac> and <vlan> through the
    PF itself. nicpassd's hook leases the VF, the reconciler does not fight libvirt while the VM
    runs (the VF's persisted trust stays), and after the VM is destroyed the VF is back to the
    settings it had before the lease."""
    from .test_libvirt import VIRSH

    assert g.ctl("vfs", IGB, "2").returncode == 0
    pf = g.fn(IGB)
    interface, vf = pf["net"][0], pf["virtfns"][0]
    assert g.ctl("vf", f"{IGB}:0", "trust", "on").returncode == 0
    before = vf_lines(g, interface)[0]
    g.vm.write_file("/tmp/e2e-vf-iface.xml", interface_domain(vf))
    g.run([*VIRSH, "define", "/tmp/e2e-vf-iface.xml"]).check()
    # libvirt: "Unable to configure VF 0 of PF 'enp2s0' because the PF is not online"
    g.run(["ip", "link", "set", interface, "up"]).check()
    try:
        started = g.run([*VIRSH, "start", "--paused", DOMAIN], timeout=300)
        assert started.returncode == 0, f"virsh start failed: {started.stderr}\n{g.journal(30)}"
        assert g.fn(vf)["driver"] == "vfio-pci"
        running = vf_lines(g, interface)[0]
        assert running["address"] == VM_MAC and (running.get("vlan_list") or [{}])[0].get("vlan") == 42, running
        time.sleep(3)  # the PF's RTM_NEWLINKs from libvirt's writes have reached nicpassd
        assert vf_lines(g, interface)[0] == running, "nicpassd changed what libvirt set for the VM"
        assert running["trust"] is True
    finally:
        g.run([*VIRSH, "destroy", DOMAIN], timeout=120)
        g.run([*VIRSH, "undefine", DOMAIN])
    try:
        g.wait(lambda _s: not [lease for lease in g.ctl_json("leases") if DOMAIN_UUID in str(lease)], 30,
               what="the lease released")
        after = vf_lines(g, interface)[0]
        assert {key: after.get(key) for key in ("address", "vlan_list", "trust", "spoofchk")} == \
            {key: before.get(key) for key in ("address", "vlan_list", "trust", "spoofchk")}, (before, after)
    finally:
        g.run(["ip", "link", "set", interface, "down"])
