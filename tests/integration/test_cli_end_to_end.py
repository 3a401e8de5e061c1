"""nicpassctl against a real `nicpassd --simulate` process on the private bus: the issue's acceptance
list, asserted on exit codes, JSON and what the simulated kernel shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.daemon import SimulatedDaemon

SPEC_FIELDS = {
    "address", "vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id", "driver",
    "iommu_group", "interfaces", "physical_function", "total_vfs", "num_vfs", "protected",
    "protection_reasons", "leased_to", "persisted", "desired_driver",
}


@pytest.fixture
def daemon(private_bus, polkit, tmp_path):
    with SimulatedDaemon(private_bus, tmp_path / "host") as process:
        yield process


def nicpassctl(bus, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    return subprocess.run([sys.executable, "-m", "nicpassctl", *args], capture_output=True, text=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)


def sysfs(daemon, address: str, attr: str) -> str:
    return (daemon.root / "sys/bus/pci/devices" / address / attr).read_text().strip()


def driver(daemon, address: str) -> str:
    link = daemon.root / "sys/bus/pci/devices" / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def listing(bus) -> dict[str, dict]:
    result = nicpassctl(bus, "--json", "list")
    assert result.returncode == 0, result.stderr
    return {entry["address"]: entry for entry in json.loads(result.stdout)}


def test_json_list_shows_every_function_with_the_spec_fields(private_bus, daemon):
    devices = listing(private_bus)
    assert set(devices) == {"0000:01:00.0", "0000:01:00.1", "0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0",
                            "0000:af:00.0"}
    for entry in devices.values():
        assert SPEC_FIELDS <= set(entry), SPEC_FIELDS - set(entry)
    assert devices["0000:3b:00.0"]["total_vfs"] == 64 and devices["0000:3b:00.0"]["interfaces"] == ["enp59s0f0"]
    assert devices["0000:01:00.0"]["protected"] is True
    everything = json.loads(nicpassctl(private_bus, "--json", "list", "--all").stdout)
    assert "0000:af:00.1" in {entry["address"] for entry in everything}  # the USB group mate


def test_vfs_then_fewer_vfs_then_over_total(private_bus, daemon):
    result = nicpassctl(private_bus, "vfs", "0000:3b:00.0", "4")
    assert result.returncode == 0, result.stderr
    assert sysfs(daemon, "0000:3b:00.0", "sriov_numvfs") == "4"
    devices = listing(private_bus)
    vfs = sorted(a for a, e in devices.items() if e["physical_function"] == "0000:3b:00.0")
    assert len(vfs) == 4
    groups = {devices[vf]["iommu_group"] for vf in vfs}
    assert len(groups) == 4 and devices["0000:3b:00.0"]["iommu_group"] not in groups

    result = nicpassctl(private_bus, "vfs", "enp59s0f0", "2")  # the kernel needs 0 first: nicpassd does it
    assert result.returncode == 0, result.stderr
    assert sysfs(daemon, "0000:3b:00.0", "sriov_numvfs") == "2"

    result = nicpassctl(private_bus, "vfs", "3b:00.0", "65")
    assert result.returncode == 2
    assert "at most 64" in result.stderr and result.stdout == ""
    assert sysfs(daemon, "0000:3b:00.0", "sriov_numvfs") == "2"


def test_bind_vf_lands_on_vfio_and_management_nic_is_refused(private_bus, daemon):
    assert nicpassctl(private_bus, "vfs", "3b:00.0", "1").returncode == 0
    result = nicpassctl(private_bus, "bind", "0000:3b:02.0")
    assert result.returncode == 0, result.stderr
    assert driver(daemon, "0000:3b:02.0") == "vfio-pci"
    assert sysfs(daemon, "0000:3b:02.0", "driver_override") == "vfio-pci"

    for device in ("eno1", "0000:01:00.0", "eno2"):
        result = nicpassctl(private_bus, "bind", device, "--driver", "vfio-pci")
        assert result.returncode == 3, (device, result.stderr)
        assert "default route" in result.stderr and "br0 → bond0" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert driver(daemon, "0000:01:00.0") == "igb" and driver(daemon, "0000:01:00.1") == "igb"


def test_exit_codes_for_each_kind_of_failure(private_bus, daemon):
    cases = [
        (("bind", "0000:99:00.0"), 7),
        (("bind", "bond0"), 2),
        (("vfs", "af:00.0", "2"), 1),  # NotSupported: not a PF
        (("vfs", "3b:00.0", "many"), 2),
        (("frobnicate",), 2),
    ]
    for argv, code in cases:
        result = nicpassctl(private_bus, *argv)
        assert result.returncode == code, (argv, result.returncode, result.stderr)
        assert result.stderr.strip(), argv


def test_unbind_gives_back_and_forgets(private_bus, daemon):
    assert nicpassctl(private_bus, "bind", "af:00.0").returncode == 0
    assert listing(private_bus)["0000:af:00.0"]["desired_driver"] == "vfio-pci"
    result = nicpassctl(private_bus, "unbind", "af:00.0")
    assert result.returncode == 0, result.stderr
    assert driver(daemon, "0000:af:00.0") == "e1000e"
    assert sysfs(daemon, "0000:af:00.0", "driver_override") == "(null)"
    entry = listing(private_bus)["0000:af:00.0"]
    assert (entry["persisted"], entry["desired_driver"]) == (False, None)


def test_show_check_and_guard(private_bus, daemon):
    shown = nicpassctl(private_bus, "--json", "show", "af:00.0")
    assert shown.returncode == 0, shown.stderr
    explain = json.loads(shown.stdout)["explain"]
    assert explain["group_viable"] is False
    assert {"address": "0000:af:00.1", "driver": "xhci_hcd"} in explain["group_members"]
    guard = nicpassctl(private_bus, "guard")
    assert guard.returncode == 0 and "0000:01:00.0" in guard.stdout and "bond0" in guard.stdout
    check = nicpassctl(private_bus, "--json", "check")
    assert check.returncode == 0, check.stdout
    assert {finding["id"] for finding in json.loads(check.stdout)} >= {"iommu", "management"}


def test_persisted_binding_shows_drift_after_a_simulated_reboot(private_bus, polkit, tmp_path):
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root):
        assert nicpassctl(private_bus, "bind", "af:00.0").returncode == 0
        assert nicpassctl(private_bus, "bind", "5e:00.0", "--runtime").returncode == 0
    with SimulatedDaemon(private_bus, root) as rebooted:
        devices = listing(private_bus)
        assert devices["0000:af:00.0"]["persisted"] is True
        assert devices["0000:5e:00.0"]["persisted"] is False  # --runtime left no trace
        assert driver(rebooted, "0000:5e:00.0") == "mlx5_core"


def test_vf_settings_from_the_command_line_and_the_vf_table_of_show(private_bus, daemon):
    """Issue 14: `nicpassctl vf` as `ip link set PF vf N` takes it; `show PF` lists the VFs with
    their settings like `ip link show`; bad words are usage errors; what the driver does not
    implement says so and exits 1."""
    assert nicpassctl(private_bus, "vfs", "enp59s0f0", "2").returncode == 0
    result = nicpassctl(private_bus, "vf", "enp59s0f0:1", "mac", "02:00:00:00:00:07", "vlan", "30", "qos", "2",
                        "trust", "on")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("enp59s0f0:1: mac 02:00:00:00:00:07, vlan 30, qos 2, proto 802.1Q, spoofchk on, "
                                     "trust on, state auto (persisted)")
    shown = nicpassctl(private_bus, "show", "enp59s0f0")
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout.split("VFs of 0000:3b:00.0\n", 1)[1].splitlines()
    assert table[0].split() == ["VF", "ADDRESS", "DRIVER", "MAC", "VLAN", "SPOOFCHK", "TRUST", "STATE", "RATE",
                                "PERSISTED"]
    assert table[2].split()[:8] == ["1", "0000:3b:02.1", "iavf", "02:00:00:00:00:07", "30/2", "on", "on", "auto"]
    as_json = json.loads(nicpassctl(private_bus, "--json", "show", "enp59s0f0").stdout)
    assert as_json["vfs"][1]["desired_vf_settings"] == {"mac": "02:00:00:00:00:07", "vlan": 30, "qos": 2,
                                                        "trust": True}
    vf = nicpassctl(private_bus, "show", "0000:3b:02.1").stdout
    assert "vf settings" in vf and "mac 02:00:00:00:00:07" in vf

    for words, fragment in ((["mac"], "has no value"), (["colour", "red"], "unknown VF setting"),
                            (["trust", "yes"], "on or off"), (["vlan", "ten"], "whole number")):
        result = nicpassctl(private_bus, "vf", "enp59s0f0:0", *words)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert fragment in result.stderr
    result = nicpassctl(private_bus, "vf", "enp59s0f0:0", "vlan", "5", "proto", "802.1ad")
    assert result.returncode == 1 and "i40e" in result.stderr and "802.1Q only" in result.stderr, result


def test_prepare_with_a_vm_s_own_vf_settings_and_release_puts_the_host_s_back(private_bus, daemon):
    """Issue 14, item 5: `prepare --vf` gives a VF the VM's MAC and VLAN for the lease only (never
    persisted); `release` puts back what the VF had; a bad word is a usage error that leases nothing."""
    uuid = "6f1c2a8e-0000-4000-8000-000000000091"
    assert nicpassctl(private_bus, "vfs", "enp59s0f0", "1").returncode == 0
    assert nicpassctl(private_bus, "vf", "enp59s0f0:0", "trust", "on").returncode == 0
    before = json.loads(nicpassctl(private_bus, "--json", "show", "enp59s0f0").stdout)["vfs"][0]
    result = nicpassctl(private_bus, "prepare", "web01", uuid, "3b:02.0", "--vf", "3b:02.0 mac 52:54:00:00:00:91 lan 7")
    assert (result.returncode, result.stdout) == (2, ""), result
    assert "unknown VF setting 'lan'" in result.stderr and driver(daemon, "0000:3b:02.0") == "iavf"

    result = nicpassctl(private_bus, "prepare", "web01", uuid, "3b:02.0", "--vf", "3b:02.0 mac 52:54:00:00:00:91 vlan 7")
    assert result.returncode == 0, result.stderr
    during = json.loads(nicpassctl(private_bus, "--json", "show", "enp59s0f0").stdout)["vfs"][0]
    assert (during["driver"], during["vf_settings"]["mac"], during["vf_settings"]["vlan"]) == (
        "vfio-pci", "52:54:00:00:00:91", 7)
    assert during["desired_vf_settings"] == {"trust": True}  # the VM's settings are not persisted
    assert nicpassctl(private_bus, "release", uuid).returncode == 0
    after = json.loads(nicpassctl(private_bus, "--json", "show", "enp59s0f0").stdout)["vfs"][0]
    assert after["vf_settings"] == before["vf_settings"]


def test_mutations_name_every_device_they_changed_and_what_persistence_they_dropped(private_bus, daemon):
    """Issue 20: `bind --group` names the mate it took; a bind whose group a VM cannot use yet says
    so (exit 0); `unbind --group` gives the group back; `vfs` without --vfio says that the VFs
    are no longer persisted on vfio-pci; `list` shows where a PF's VFs are persisted."""
    result = nicpassctl(private_bus, "bind", "af:00.0", "--runtime")
    assert result.returncode == 0, result
    assert "not viable" in result.stderr and "0000:af:00.1 on xhci_hcd" in result.stderr and \
        "nicpassctl bind --group af:00.0" in result.stderr, result.stderr
    assert nicpassctl(private_bus, "unbind", "af:00.0", "--runtime").returncode == 0

    result = nicpassctl(private_bus, "bind", "--group", "af:00.0", "--runtime")
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        "af:00.0: bound to vfio-pci (runtime only)",
        "0000:af:00.1: bound to vfio-pci with the IOMMU group of af:00.0 (runtime only)"]
    assert driver(daemon, "0000:af:00.1") == "vfio-pci"
    result = nicpassctl(private_bus, "unbind", "--group", "af:00.0", "--runtime")
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[1] == "0000:af:00.1: given back to its host driver with the IOMMU group of af:00.0"
    assert (driver(daemon, "0000:af:00.0"), driver(daemon, "0000:af:00.1")) == ("e1000e", "xhci_hcd")

    result = nicpassctl(private_bus, "vfs", "enp59s0f0", "2", "--vfio")
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["enp59s0f0: 2 VFs on vfio-pci (persisted)",
                                          "  0000:3b:02.0: vfio-pci", "  0000:3b:02.1: vfio-pci"]  # what it made
    assert listing(private_bus)["0000:3b:00.0"]["desired_vf_driver"] == "vfio-pci"
    assert "vfs=2@vfio-pci" in nicpassctl(private_bus, "list").stdout
    result = nicpassctl(private_bus, "vfs", "enp59s0f0", "2")
    assert result.returncode == 0, result
    assert "no longer persisted on vfio-pci" in result.stdout and "add --vfio" in result.stdout, result.stdout
    assert json.loads(nicpassctl(private_bus, "--json", "vfs", "enp59s0f0", "2").stdout)["dropped_vf_driver"] is None


def test_check_of_devices_a_line_each_and_exit_8_when_one_fails(private_bus, daemon):
    """Issue 15: `check --devices` adds a readiness line per NIC function; `check DEVICE` of the
    management NIC fails (it is protected): exit 8, which no other outcome uses."""
    result = nicpassctl(private_bus, "check", "--devices")
    print(result.stdout)
    assert result.returncode == 8, result  # eno1 and eno2 are protected
    lines = result.stdout.splitlines()
    assert "[ ok ] 0000:3b:00.0" in lines[lines.index("Devices") + 1:], result.stdout
    assert any(line.startswith("[fail] 0000:01:00.0") for line in lines), result.stdout
    result = nicpassctl(private_bus, "--json", "check", "enp59s0f0")
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert {f["id"] for f in report["host"]} >= {"cpu-virtualization", "iommu", "interrupt-remapping", "vfio"}
    (device,) = report["devices"]
    assert device["address"] == "0000:3b:00.0" and device["ready"] is True
    assert {f["id"] for f in device["findings"]} == {"function", "iommu-group", "reset", "sriov", "guard"}
    result = nicpassctl(private_bus, "check", "eno1")
    assert result.returncode == 8 and "protected: " in result.stdout, result
    assert nicpassctl(private_bus, "check", "nosuch0").returncode == 7


def test_a_reader_that_goes_away_is_not_the_daemon_going_away(private_bus, daemon):
    """Issue 20: `nicpassctl list | head -1` printed "nicpassd is not running ... Broken pipe" and
    exited 6. The reader here is gone before the answer comes: quiet, exit 0."""
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address)
    for command in (["list"], ["--json", "list"], ["show", "enp59s0f0"], ["guard"]):
        process = subprocess.Popen([sys.executable, "-m", "nicpassctl", *command], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL)
        process.stdout.close()  # the reader is gone before a line is written
        stderr = process.stderr.read().decode()
        assert (process.wait(timeout=60), stderr) == (0, ""), command


def test_a_locale_without_the_arrows_still_reads_every_chain(private_bus, daemon):
    """Issue 20: `PYTHONIOENCODING=ascii nicpassctl guard` died on the arrow of `br0 → bond0 → eno2`."""
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus.address, PYTHONIOENCODING="ascii")
    for argv in (["guard"], ["bind", "eno2"]):
        result = subprocess.run([sys.executable, "-m", "nicpassctl", *argv], capture_output=True, text=True,
                                env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == (0 if argv == ["guard"] else 3), result
        assert "br0 -> bond0 -> eno2" in result.stdout + result.stderr


def test_import_shows_the_plan_then_adopts_and_lists_what_to_remove(private_bus, daemon):
    """Issue 20, item 6: `import` on a host with driverctl and a modprobe.d recipe that also takes
    the management NICs: the plan changes nothing and exits 1 (something would be refused);
    `--apply` persists what can be adopted, names the lines to remove, and leaves the rest."""
    (daemon.root / "etc/driverctl.d").mkdir(parents=True)
    (daemon.root / "etc/driverctl.d/pci-0000:af:00.0").write_text("vfio-pci\n")
    (daemon.root / "etc/modprobe.d").mkdir(parents=True, exist_ok=True)
    (daemon.root / "etc/modprobe.d/vfio.conf").write_text("options vfio-pci ids=8086:1521\n")
    result = nicpassctl(private_bus, "import")
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SOURCE", "DEVICE", "ACTION", "TARGET", "STATUS"]
    assert any(line.startswith("/etc/driverctl.d/pci-0000:af:00.0") and "adopt: persisted and bound now (on e1000e)"
               in line for line in lines), result.stdout
    assert any(line.startswith("/etc/modprobe.d/vfio.conf:1") and "0000:01:00.0" in line and "refused:" in line
               for line in lines), result.stdout
    assert "1 to adopt; nothing was changed" in result.stdout and "2 refused or failed" in result.stdout
    assert driver(daemon, "0000:af:00.0") == "e1000e"

    result = nicpassctl(private_bus, "--json", "import", "--apply")
    assert result.returncode == 1, result  # the refused lines still stand
    rows = {(row["source"], row["device"]): row for row in json.loads(result.stdout)}
    adopted = rows[("/etc/driverctl.d/pci-0000:af:00.0", "0000:af:00.0")]
    assert adopted["status"] == "adopted: persisted and bound now (on e1000e)"
    assert adopted["remove"].startswith("rm /etc/driverctl.d/pci-0000:af:00.0")
    assert rows[("/etc/modprobe.d/vfio.conf:1", "0000:01:00.0")]["status"].startswith("refused:")
    assert driver(daemon, "0000:af:00.0") == "vfio-pci" and driver(daemon, "0000:01:00.0") == "igb"
    assert listing(private_bus)["0000:af:00.0"]["desired_driver"] == "vfio-pci"
    result = nicpassctl(private_bus, "import", "--apply")
    assert "already persisted" in result.stdout and "Remove from the old configuration:" in result.stdout
    assert "  - rm /etc/driverctl.d/pci-0000:af:00.0" in result.stdout, result.stdout


def test_vfs_names_the_vfs_it_removed_and_a_vf_that_comes_back_on_its_own_persisted_driver(private_bus, daemon):
    """Issue 20: after `vfs PF 1` (it had 3 VFs, one persisted on vfio-pci) `check` warned about the
    persisted VF with a remedy that failed, and raising the count again silently put that VF back
    on vfio-pci. Now `vfs` names what it removed and why a VF lands where it does."""
    assert nicpassctl(private_bus, "vfs", "enp59s0f1", "3").returncode == 0
    vf1 = sorted(a for a, e in listing(private_bus).items() if e["physical_function"] == "0000:3b:00.1")[1]
    assert nicpassctl(private_bus, "bind", vf1).returncode == 0  # persisted on vfio-pci, this VF alone
    result = nicpassctl(private_bus, "vfs", "enp59s0f1", "1")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == "enp59s0f1: 1 VFs (persisted)" and lines[1].endswith(": iavf"), result.stdout
    assert lines[2] == (f"  {vf1}: removed (its own persisted vfio-pci stays for when the count brings it back; "
                        f"`nicpassctl forget {vf1}` drops it)"), result.stdout
    assert len(lines) == 4 and lines[3].endswith(": removed"), result.stdout

    result = nicpassctl(private_bus, "--json", "vfs", "enp59s0f1", "3")
    assert result.returncode == 0, result
    answer = json.loads(result.stdout)
    assert answer["persisted_per_vf"] == {vf1: "vfio-pci"} and answer["removed"] == []
    assert driver(daemon, vf1) == "vfio-pci"  # bound in the call itself, not behind the answer's back
    result = nicpassctl(private_bus, "vfs", "enp59s0f1", "1")
    assert nicpassctl(private_bus, "forget", vf1).returncode == 0  # the remedy the line named
    result = nicpassctl(private_bus, "vfs", "enp59s0f1", "3")
    assert "persisted on" not in result.stdout and driver(daemon, vf1) == "iavf", result.stdout
