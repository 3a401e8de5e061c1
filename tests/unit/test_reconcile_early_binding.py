"""Early binding: the udev helper (packaging/udev/, nicpassd/host/early_binding.py) puts driver_override
on a persisted function on "add", before its host driver probes — at boot and on hotplug."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nicpassd.host import early_binding
from nicpassd.host.early_binding import udev_rule
from nicpassd.engine.store import DeviceDesire, identity_of
from nicpassd.sim.kernel import SimKernel
from support import REPO

NIC, ENO1, PF = "0000:af:00.0", "0000:01:00.0", "0000:3b:00.0"
HELPER = REPO / "packaging" / "udev" / "nicpassd-udev-override"
RULES = REPO / "packaging" / "udev" / "90-nicpassd.rules"


def spec_of(sim, address: str):
    return next(f for f in sim.kernel.topology.functions if f.address == address)


def host_binds(events, address: str, host_driver: str) -> list:
    return [e for e in events if e.action == "bind" and e.sys_name == address and e.driver == host_driver]


async def persisted_nic(make_sim):
    sim = make_sim()
    await sim.engine.bind(NIC, "vfio-pci")
    await sim.engine.reconcile()  # writes the early-binding list
    return sim


async def test_the_list_holds_persisted_passthrough_desires_with_their_identity(make_sim):
    sim = await persisted_nic(make_sim)
    await sim.engine.set_vf_count(PF, 2, driver="vfio-pci")
    await sim.engine.reconcile()
    listing = early_binding.read_list(sim.paths.root)
    assert listing["devices"] == {NIC: {"driver": "vfio-pci", "vendor": "8086", "device": "10d3",
                                        "subsystem_vendor": "8086", "subsystem_device": "a01f", "serial": ""}}
    assert listing["vf_drivers"][PF]["serial"] == "3c-fd-fe-ff-ff-a0-00-00"


async def test_a_desire_that_became_dangerous_is_not_bound_early(sim):
    snapshot = sim.engine.snapshot
    sim.engine.store.put(DeviceDesire(address=ENO1, identity=identity_of(snapshot.functions[ENO1], snapshot),
                                      driver="vfio-pci"))
    await sim.engine.reconcile()
    assert ENO1 not in early_binding.read_list(sim.paths.root).get("devices", {})


async def test_after_a_reboot_the_persisted_nic_comes_up_on_vfio_pci_without_its_host_driver(make_sim):
    sim = await persisted_nic(make_sim)
    events = []
    rebooted = SimKernel(sim.paths, sim.kernel.topology, rules=(udev_rule,))  # the tree is rebuilt
    rebooted.subscribe(events.append)
    assert sim.driver(NIC) == "vfio-pci" and sim.override(NIC) == "vfio-pci"
    assert "enp175s0f0" not in sim.netdevs()  # e1000e never bound: its netdev never appeared
    assert sim.driver("0000:3b:00.1") == "i40e"  # everything else boots as usual


async def test_a_replugged_persisted_nic_lands_on_vfio_pci_and_never_on_its_host_driver(make_sim):
    sim = await persisted_nic(make_sim)
    sim.kernel.rules.append(udev_rule)
    sim.kernel.unplug(NIC)
    sim.events.clear()
    sim.kernel.plug(spec_of(sim, NIC))
    assert [(e.action, e.sys_name, e.driver) for e in sim.events if e.subsystem == "pci"] == [
        ("add", NIC, ""), ("bind", NIC, "vfio-pci")]
    assert host_binds(sim.events, NIC, "e1000e") == [] and not [e for e in sim.events if e.subsystem == "net"]


async def test_vfs_of_a_persisted_pf_get_the_override_as_they_appear(make_sim):
    sim = make_sim()
    await sim.engine.set_vf_count(PF, 3, driver="vfio-pci")
    await sim.engine.reconcile()
    await sim.engine.set_vf_count(PF, 0, persist=False)
    sim.kernel.rules.append(udev_rule)
    sim.kernel.write(sim.dir(PF) / "sriov_drivers_autoprobe", "1")
    sim.events.clear()
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "3")  # e.g. a systemd .link file at boot
    assert {sim.driver(vf) for vf in sim.vfs(PF)} == {"vfio-pci"}
    assert not [e for e in sim.events if e.action == "bind" and e.driver == "iavf"]


async def test_a_different_card_at_the_address_is_left_to_its_host_driver(make_sim):
    sim = await persisted_nic(make_sim)
    path = sim.paths.root / early_binding.LIST_FILE
    listing = json.loads(path.read_text())
    listing["devices"][NIC]["device"] = "10d4"  # persisted for another model
    path.write_text(json.dumps(listing))
    sim.kernel.rules.append(udev_rule)
    sim.kernel.unplug(NIC)
    sim.kernel.plug(spec_of(sim, NIC))
    assert (sim.driver(NIC), sim.override(NIC)) == ("e1000e", "")
    assert early_binding.override_for(sim.paths.root, NIC, listing) == ("", "identity changed (device is 10d3, "
                                                                          "persisted 10d4)")


async def test_when_the_host_driver_won_the_race_it_is_unbound_and_reprobed(make_sim):
    sim = await persisted_nic(make_sim)
    await sim.engine.unbind(NIC, persist=False)  # on e1000e now, still listed
    sim.events.clear()
    assert early_binding.apply(sim.paths.root, NIC, sim.kernel) == "vfio-pci"
    assert sim.driver(NIC) == "vfio-pci"
    # the kernel's "unbind" carries no DRIVER: that it was e1000e's shows as its netdev going first
    assert [(e.action, e.subsystem, e.driver) for e in sim.events] == [
        ("remove", "net", ""), ("unbind", "pci", ""), ("bind", "pci", "vfio-pci")]


async def test_unlisted_devices_are_not_touched(make_sim):
    sim = await persisted_nic(make_sim)
    sim.writer.clear()
    for address in ("0000:3b:00.1", "0000:af:00.1", "0000:00:17.0"):
        assert early_binding.apply(sim.paths.root, address, sim.writer) == ""
    assert sim.writer.calls == []


async def test_the_installed_helper_runs_stdlib_only_against_a_root(make_sim):
    sim = await persisted_nic(make_sim)
    sim.kernel.write(sim.dir(NIC) / "driver_override", "\n")  # as after a fresh boot
    run = subprocess.run([sys.executable, "-I", str(HELPER), "--root", str(sim.paths.root), NIC],
                         capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stdout, run.stderr) == (0, "NICPASSD_OVERRIDE=vfio-pci\n", "")
    # A plain-file root: the helper wrote the attribute (the simulator's semantics are not involved).
    assert (sim.dir(NIC) / "driver_override").read_text() == "vfio-pci\n"
    other = subprocess.run([sys.executable, "-I", str(HELPER), "--root", str(sim.paths.root), "0000:3b:00.1"],
                           capture_output=True, text=True, timeout=30)
    assert (other.returncode, other.stdout) == (0, "")
    usage = subprocess.run([sys.executable, "-I", str(HELPER)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage" in usage.stderr
    imported = subprocess.run([sys.executable, "-I", "-X", "importtime", str(HELPER), "--root",
                               str(sim.paths.root), "0000:3b:00.1"], capture_output=True, text=True, timeout=30)
    # Of nicpassd, only the stdlib-only modules it shares with the daemon's host layer.
    heavy = [name for name in ("pydantic", "dbus_fast", "nicpassd.engine", "nicpassd.host.host", "nicpassd.host.sysfs",
                               "nicpassd.host.netlink", "nicpassd.host.inventory", "nicpassd.host.writer")
             if f" {name}" in imported.stderr]
    assert heavy == []
    assert " nicpassd.host.kernelio" in imported.stderr  # the daemon's own sysfs writer and serial parser


def test_the_rule_starts_the_helper_on_pci_add_of_marked_functions_only():
    rules = [line for line in RULES.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert rules == [
        'ACTION!="add", GOTO="nicpassd_end"',
        'SUBSYSTEM!="pci", GOTO="nicpassd_end"',
        f'TEST=="/{early_binding.MARKER_DIR}/$kernel", GOTO="nicpassd_override"',
        f'TEST=="physfn", TEST=="/{early_binding.MARKER_DIR}/{early_binding.VF_MARKER}", GOTO="nicpassd_override"',
        'GOTO="nicpassd_end"',
        'LABEL="nicpassd_override"',
        'IMPORT{program}="/usr/libexec/nicpassd/nicpassd-udev-override %k"',
        'LABEL="nicpassd_end"',
    ]
    assert os.access(HELPER, os.X_OK) and HELPER.read_text().startswith("#!/usr/bin/python3 -I\n")


async def test_markers_follow_the_list(make_sim):
    sim = await persisted_nic(make_sim)
    markers = sim.paths.root / early_binding.MARKER_DIR
    assert sorted(p.name for p in markers.iterdir()) == [NIC]
    await sim.engine.set_vf_count(PF, 2, driver="vfio-pci")
    await sim.engine.reconcile()
    assert sorted(p.name for p in markers.iterdir()) == [NIC, "vfs"]
    await sim.engine.forget(NIC)
    await sim.engine.reconcile()
    assert sorted(p.name for p in markers.iterdir()) == ["vfs"]
    assert early_binding.rule_matches(sim.paths.root, sim.vfs(PF)[0])
    assert not early_binding.rule_matches(sim.paths.root, NIC)


async def test_markers_are_restored_when_the_list_is_already_current(make_sim):
    """An upgrade from a version without markers, or a marker deleted by hand."""
    sim = await persisted_nic(make_sim)
    (sim.paths.root / early_binding.MARKER_DIR / NIC).unlink()
    await sim.engine.reconcile()
    assert (sim.paths.root / early_binding.MARKER_DIR / NIC).exists()


async def test_an_unmarked_device_is_not_given_to_the_helper(make_sim):
    """udev's TEST fails without the marker: the helper is not even started, listed or not."""
    sim = await persisted_nic(make_sim)
    await sim.engine.unbind(NIC, persist=False)
    (sim.paths.root / early_binding.MARKER_DIR / NIC).unlink()
    sim.kernel.rules.append(udev_rule)
    sim.kernel.unplug(NIC)
    sim.kernel.plug(spec_of(sim, NIC))
    assert (sim.driver(NIC), sim.override(NIC)) == ("e1000e", "")


async def test_the_helper_tolerates_nicpassd_unbinding_the_device_first(make_sim):
    """At coldplug nicpassd may start while udev still runs the helper: if the host driver is gone
    by the time the helper's unbind comes, that is not a failure."""
    sim = await persisted_nic(make_sim)
    await sim.engine.unbind(NIC, persist=False)  # on e1000e, still listed

    class RacedKernel:
        def write(self, path, data):
            if os.path.basename(path) == "unbind":
                sim.kernel.write(path, data)  # nicpassd got there first ...
            sim.kernel.write(path, data)  # ... so the helper's own unbind fails (ENODEV)

        def load_module(self, name):
            sim.kernel.load_module(name)

    assert early_binding.apply(sim.paths.root, NIC, RacedKernel()) == "vfio-pci"
    assert sim.driver(NIC) == "vfio-pci"


async def test_what_the_helper_did_goes_to_the_system_log(make_sim, monkeypatch):
    """Only on the real root: a test root never writes to the machine's log."""
    import syslog
    logged = []
    monkeypatch.setattr(syslog, "syslog", lambda priority, message: logged.append((priority, message)))
    sim = await persisted_nic(make_sim)
    await sim.engine.unbind(NIC, persist=False)
    early_binding.apply(sim.paths.root, NIC, sim.kernel)
    assert logged == []
    early_binding._journal("/", f"{NIC}: driver_override vfio-pci (persisted)")
    assert logged == [(syslog.LOG_INFO, f"{NIC}: driver_override vfio-pci (persisted)")]


# --- a list that is not what the daemon wrote binds nothing early ---------------------------------
def _tampered(listing: dict, change) -> bytes:
    data = json.loads(json.dumps(listing))
    change(data)
    return json.dumps(data).encode()


BAD_LISTS = {
    "a driver that is not a passthrough driver": lambda d: d["devices"][NIC].update(driver="ahci"),
    "a driver that is a path": lambda d: d["devices"][NIC].update(driver="../../evil"),
    "a key that is not a PCI address": lambda d: d["devices"].update({"../../x": d["devices"][NIC]}),
    "an id that is not hex": lambda d: d["devices"][NIC].update(vendor="80 86"),
    "a serial of another shape": lambda d: d["devices"][NIC].update(serial="x"),
    "a field of the wrong type": lambda d: d["devices"][NIC].update(driver=["vfio-pci"]),
    "an unknown field": lambda d: d["devices"][NIC].update(extra="1"),
    "devices not an object": lambda d: d.update(devices=[NIC]),
    "another version": lambda d: d.update(version=2),
}


async def test_a_tampered_list_binds_nothing_and_says_which_field(make_sim):
    sim = await persisted_nic(make_sim)
    path = sim.paths.root / early_binding.LIST_FILE
    good = json.loads(path.read_bytes())
    cases = {name: _tampered(good, change) for name, change in BAD_LISTS.items()}
    cases["truncated"] = path.read_bytes()[:40]
    cases["not UTF-8"] = b'{"version": 1, "devices": {"\xff": {}}}'
    for name, payload in cases.items():
        path.write_bytes(payload)
        written = []

        class Recording:
            def write(self, target, data):
                written.append((target, data))

            def load_module(self, module):
                written.append(("modprobe", module))

        rc = early_binding.main(["--root", str(sim.paths.root), NIC], kernel=Recording())
        assert (rc, written) == (1, []), name
        try:
            early_binding.read_list(sim.paths.root)
        except early_binding.BadList as exc:
            assert str(path) in str(exc) and "nicpassctl reconcile" in str(exc), (name, exc)
        else:
            raise AssertionError(f"{name}: accepted")
        assert path.read_bytes() == payload, name  # the helper never rewrites it


def test_the_helper_takes_a_pci_address_only(tmp_path, capsys):
    for name in ("../../../etc", "0000:af:00.0/../x", "af:00.0", ""):
        assert early_binding.main(["--root", str(tmp_path), name]) == 2, name
    assert "PCI_ADDRESS" in capsys.readouterr().err
