"""Issue 20, item 6: `nicpassctl import` adopts what other tools do at boot — driverctl overrides,
vfio-pci.ids= (kernel command line, modprobe.d), systemd-networkd SR-IOV settings, udev rules
writing sriov_numvfs — on simulated hosts carrying each, one of which would capture the management
NIC; the plan changes nothing, the apply persists what the kernel already shows (or applies it),
and every row says what to remove from the old tool."""

from __future__ import annotations

import json

from nicpassd.host import legacy
from nicpassd.paths import HostPaths

ENO1, ENO2 = "0000:01:00.0", "0000:01:00.1"
PF0, PF1, NIC = "0000:3b:00.0", "0000:3b:00.1", "0000:af:00.0"


def put(sim, path: str, text: str) -> None:
    target = sim.paths.under(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def rows(adoptions) -> dict[tuple[str, str], tuple[str, str, str]]:
    return {(a.device, a.action): (a.target, a.status, a.remove) for a in adoptions}


def persisted(sim) -> dict:
    path = sim.state_json()
    return json.loads(path.read_text())["devices"] if path.exists() else {}


def driverctl_took(sim, address: str, driver: str, host_driver: str) -> None:
    """What driverctl's udev rule did at boot: driver_override, unbind, drivers_probe."""
    put(sim, f"/etc/driverctl.d/pci-{address}", driver + "\n")
    sim.kernel.load_module(driver)
    sim.kernel.write(sim.dir(address) / "driver_override", driver + "\n")
    sim.kernel.write(sim.paths.pci_drivers / host_driver / "unbind", address)
    sim.kernel.write(sim.paths.drivers_probe, address)


async def test_driverctl_overrides_are_adopted_without_touching_the_kernel(sim):
    driverctl_took(sim, NIC, "vfio-pci", "e1000e")
    put(sim, f"/etc/driverctl.d/pci-{PF1}", "i40e\n")  # a host-driver override: not nicpassd's business
    put(sim, f"/etc/driverctl.d/pci-{ENO1}", "vfio-pci\n")  # not applied yet (vfio-pci came late, say)
    await sim.engine.quiesce()
    sim.writer.clear()
    plan = rows(await sim.engine.plan_import())
    assert plan[(NIC, "bind")] == ("vfio-pci", "adopt: persisted (already on vfio-pci)",
                                   f"rm /etc/driverctl.d/pci-{NIC} (not `driverctl unset-override`, which rebinds "
                                   "the device now)")
    assert plan[(PF1, "bind")][1].startswith("skipped: nicpassd persists passthrough drivers")
    target, status, _ = plan[(ENO1, "bind")]
    assert status.startswith("refused: refusing to bind 0000:01:00.0 (eno1) to vfio-pci") and \
        status.endswith("(this line takes it at every boot: remove it first)")
    assert persisted(sim) == {} and sim.writer.calls == []  # the plan changes nothing

    done = rows(await sim.engine.adopt())
    assert done[(NIC, "bind")][1] == "adopted: persisted (already on vfio-pci)"
    assert done[(ENO1, "bind")][1].startswith("refused:")
    assert persisted(sim)[NIC]["driver"] == "vfio-pci" and ENO1 not in persisted(sim)
    assert (sim.driver(NIC), sim.driver(ENO1)) == ("vfio-pci", "igb")
    again = rows(await sim.engine.adopt())  # a second run finds it done
    assert again[(NIC, "bind")][1] == "already persisted"


async def test_vfio_pci_ids_in_modprobe_d_adopt_each_device_and_refuse_the_management_nics(sim):
    put(sim, "/etc/modprobe.d/vfio.conf", "# passthrough\noptions vfio-pci ids=8086:1572,8086:1521 disable_vga=1\n")
    plan = await sim.engine.plan_import()
    found = rows(plan)
    remove = "remove 'options vfio-pci ids=8086:1572,8086:1521 disable_vga=1' from /etc/modprobe.d/vfio.conf, " \
             "then `update-initramfs -u`"
    assert found[(PF0, "bind")] == ("vfio-pci", "adopt: persisted and bound now (on i40e)", remove)
    assert found[(PF1, "bind")][1] == "adopt: persisted and bound now (on i40e)"
    for eno in (ENO1, ENO2):  # the same model as the management NICs: the classic recipe's trap
        assert found[(eno, "bind")][1].startswith("refused: ") and "br0 → bond0" in found[(eno, "bind")][1]
    assert {a.source for a in plan} == {"/etc/modprobe.d/vfio.conf:2"}

    done = rows(await sim.engine.adopt())
    assert done[(PF0, "bind")][1] == "adopted: persisted and bound now (on i40e)"
    assert (sim.driver(PF0), sim.driver(PF1), sim.driver(ENO1), sim.driver(ENO2)) == (
        "vfio-pci", "vfio-pci", "igb", "igb")
    assert sorted(persisted(sim)) == [PF0, PF1]


async def test_vfio_pci_ids_on_the_command_line_name_this_host_s_boot_loader_file(make_sim):
    sim = make_sim()
    sim.paths.proc_cmdline.write_text("BOOT_IMAGE=/vmlinuz ro quiet intel_iommu=on vfio-pci.ids=8086:10d3\n")
    sim.engine.refresh()
    (row,) = [a for a in await sim.engine.plan_import() if a.device]
    assert (row.source, row.device, row.status) == ("kernel command line (vfio-pci.ids=8086:10d3)", NIC,
                                                    "adopt: persisted and bound now (on e1000e)")
    assert row.remove == ("remove vfio-pci.ids=8086:10d3 in GRUB_CMDLINE_LINUX_DEFAULT of /etc/default/grub, run "
                          "`update-grub`, then reboot")


NETWORK = """\
[Match]
Name=enp59s0f0

[Network]
DHCP=no

[SR-IOV]
VirtualFunction=0
MACAddress=02:00:00:00:01:00
Trust=yes

[SR-IOV]
VirtualFunction=1
VLANId=100
MACSpoofCheck=no
"""


async def test_networkd_sr_iov_and_a_udev_rule_are_adopted_with_the_vfs_they_made(sim):
    put(sim, "/etc/systemd/network/10-pf.link", "[Match]\nOriginalName=enp59s0f0\n\n[Link]\nSR-IOVVirtualFunctions=4\n")
    put(sim, "/usr/lib/systemd/network/10-pf.link", "[Match]\nOriginalName=*\n[Link]\nSR-IOVVirtualFunctions=7\n")
    put(sim, "/etc/systemd/network/20-pf.network", NETWORK)
    put(sim, "/etc/udev/rules.d/70-sriov.rules",
        '# VFs for the second port\nACTION=="add", SUBSYSTEM=="net", KERNEL=="enp59s0f1", '
        'ATTR{device/sriov_numvfs}="2"\n')
    sim.kernel.write(sim.dir(PF0) / "sriov_numvfs", "4")  # what networkd did at boot
    sim.engine.refresh()
    sim.writer.clear()
    plan = await sim.engine.plan_import()
    assert [a.action for a in plan] == ["vfs", "vfs", "vf", "vf"]  # counts first: the VFs exist for their settings
    found = rows(plan)
    assert found[(PF0, "vfs")] == ("4", "adopt: persisted (it has 4 VFs)",
                                   "remove SR-IOVVirtualFunctions= from /etc/systemd/network/10-pf.link (line 5)")
    assert found[(PF1, "vfs")] == ("2", "adopt: persisted and applied now (0 → 2 VFs)",
                                   "remove the rule at /etc/udev/rules.d/70-sriov.rules line 2, then "
                                   "`udevadm control --reload`")
    settings = [(a.index, a.target, a.status) for a in plan if a.action == "vf"]
    assert settings == [(0, "VF 0: mac 02:00:00:00:01:00, trust on", "adopt: persisted and written now"),
                        (1, "VF 1: vlan 100, spoofchk off", "adopt: persisted and written now")]

    done = await sim.engine.adopt()
    assert [a.status.split(":")[0] for a in done] == ["adopted"] * 4
    assert sim.numvfs(PF0) == 4 and sim.numvfs(PF1) == 2
    assert (PF0, "sriov_numvfs") not in {call[:2] for call in sim.writer.writes}  # never 4 → 0 → 4
    state = persisted(sim)
    assert (state[PF0]["num_vfs"], state[PF1]["num_vfs"]) == (4, 2)
    assert state[PF0]["vf_settings"] == {"0": {"mac": "02:00:00:00:01:00", "trust": True},
                                         "1": {"vlan": 100, "spoofchk": False}}


async def test_old_tools_that_disagree_or_name_the_management_nic_are_not_adopted(sim):
    put(sim, "/etc/systemd/network/10-pf.link", "[Match]\nOriginalName=enp59s0f0\n[Link]\nSR-IOVVirtualFunctions=4\n")
    put(sim, "/etc/udev/rules.d/70-sriov.rules",
        'ACTION=="add", SUBSYSTEM=="net", KERNEL=="enp59s0f0", ATTR{device/sriov_numvfs}="8"\n'
        'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="0000:01:00.0", ATTR{sriov_numvfs}="2"\n'
        'ACTION=="add", SUBSYSTEM=="pci", ATTR{sriov_numvfs}="2"\n')
    found = [(a.source, a.device, a.status) for a in await sim.engine.plan_import()]
    disagree = "skipped: the old configuration disagrees with itself about 0000:3b:00.0: adopt the one you mean by hand"
    assert ("/etc/systemd/network/10-pf.link:4", PF0, disagree) in found
    assert ("/etc/udev/rules.d/70-sriov.rules:1", PF0, disagree) in found
    (eno1,) = [status for source, device, status in found if device == ENO1]
    assert eno1.startswith("refused: refusing to change the VF count of 0000:01:00.0 (eno1)")
    assert ("/etc/udev/rules.d/70-sriov.rules:3", "", "skipped: the rule names no device (no KERNEL== or NAME==): it "
            "writes the count into every PF it meets") in found
    await sim.engine.adopt()
    assert persisted(sim) == {} and sim.numvfs(PF0) == 0 and sim.numvfs(ENO1) == 0


async def test_nothing_to_import_is_an_empty_plan(sim):
    assert await sim.engine.plan_import() == []


def test_units_and_rules_are_read_as_systemd_and_udev_read_them(tmp_path):
    paths = HostPaths(tmp_path)
    for directory, name, text in [
        ("etc/systemd/network", "10-a.network", "[Match]\nName=enp1s0 \\\n  enp2s0\nMACAddress=!02:00:00:00:00:01\n"
                                                 "; comment\n[SR-IOV]\nVirtualFunction=3\nTrust=yes\nTrust=no\n"),
        ("usr/lib/systemd/network", "10-a.network", "[Match]\nName=*\n"),  # hidden by /etc's file of that name
        ("usr/lib/systemd/network", "99-default.link", "[Match]\nOriginalName=*\n"),
        ("etc/udev/rules.d", "70-x.rules", 'KERNEL=="enp*", ATTR{device/sriov_numvfs}="4", RUN+="/bin/true"\n'
                                           'KERNEL=="x", ATTR{sriov_numvfs}=="4"\n'),
    ]:
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
        (tmp_path / directory / name).write_text(text)
    units = legacy.read_networkd(paths)
    assert [(u.path, u.kind) for u in units] == [("/etc/systemd/network/10-a.network", "network"),
                                                  ("/usr/lib/systemd/network/99-default.link", "link")]
    assert units[0].match == {"Name": ["enp1s0", "enp2s0"], "MACAddress": ["!02:00:00:00:00:01"]}
    (section,) = units[0].sriov()
    assert section.values == {"VirtualFunction": ("3", 7), "Trust": ("no", 9)}  # the last assignment wins
    (rule,) = legacy.read_udev_numvfs(paths)  # a == on sriov_numvfs is a match, not a write
    assert (rule.path, rule.line, rule.match, rule.count) == ("/etc/udev/rules.d/70-x.rules", 1,
                                                              {"KERNEL": "enp*"}, 4)
