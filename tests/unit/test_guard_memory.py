"""Protection that remembers (nicpassd/engine/guard_memory.py): the management path stays
protected when the kernel stops showing it because someone took its device, follows the network
when the path really moves, survives a restart, and is released only by an admin."""

from __future__ import annotations

import json

import pytest

from nicpassd.engine.guard_memory import GuardMemory, Remembered
from nicpassd.errors import InvalidArgument, NotFound, Protected
from nicpassd.host.model import HostSnapshot, PciFunction
from nicpassd.sim.topology import Route

ENO1, ENO2, NIC = "0000:01:00.0", "0000:01:00.1", "0000:af:00.0"
VM = "6f1c2d3e-0000-4000-8000-00000000000a"



def take_by_hand(sim, address: str, driver: str = "igb", *, override: str = "") -> None:
    """What a shell user, driverctl or libvirt does: (driver_override,) unbind (, drivers_probe)."""
    if override:
        sim.kernel.load_module(override)  # modprobe vfio-pci, as every recipe does first
        sim.kernel.write(sim.dir(address) / "driver_override", override + "\n")
    sim.kernel.write(sim.paths.pci_drivers / driver / "unbind", address)
    if override:
        sim.kernel.write(sim.paths.drivers_probe, address)


async def test_the_management_nic_unbound_by_hand_stays_protected_with_why(sim):
    assert "IPv4 default route 0.0.0.0/0 via 192.0.2.1: br0 → bond0 → eno1" in sim.engine.protected.reasons(ENO1)
    take_by_hand(sim, ENO1)
    await sim.engine.quiesce()
    assert sim.driver(ENO1) == "" and "eno1" not in sim.netdevs()
    reasons = sim.engine.protected.reasons(ENO1)
    remembered = [r for r in reasons if r.startswith("was the management path until ")]
    assert len(remembered) == 2 and remembered[0].endswith(
        ": IPv4 default route 0.0.0.0/0 via 192.0.2.1: br0 → bond0 → eno1; its driver is gone")
    assert "shares IOMMU group 14 with protected 0000:01:00.1" in reasons  # eno2 is still live
    assert not sim.engine.protected.entries[ENO1].overridable
    assert sim.engine.views[ENO1].protected and sim.engine.explain(ENO1).allowed is False
    with pytest.raises(Protected, match="was the management path"):
        await sim.engine.bind(ENO1, "vfio-pci", force=True)
    with pytest.raises(Protected):
        await sim.engine.prepare("vm", VM, [ENO1])
    assert sim.driver(ENO1) == ""
    findings = {finding.id: finding for finding in sim.engine.check()}
    assert findings[f"guard-taken-{ENO1}"].level == "fail"
    assert "eno1" in findings[f"guard-taken-{ENO1}"].message


async def test_taken_the_driverctl_way_it_is_held_as_on_vfio_pci(sim):
    take_by_hand(sim, ENO1, override="vfio-pci")
    await sim.engine.quiesce()
    assert sim.driver(ENO1) == "vfio-pci"
    assert any(r.endswith("; it is on vfio-pci") for r in sim.engine.protected.reasons(ENO1))


async def test_a_source_that_moves_takes_the_protection_along_in_one_event(sim):
    """The default route moves to another NIC: eno1 and eno2 are healthy and off the path: free."""
    sim.kernel.set_routes([Route(dev="enp175s0f0", dst="default", gateway="192.0.2.1")])
    await sim.engine.quiesce()
    assert ENO1 not in sim.engine.view.memory.entries and ENO1 not in sim.engine.view.memory.held
    assert NIC in sim.engine.view.memory.entries


async def test_memory_survives_a_restart_and_a_capture_before_start_is_known(sim):
    await sim.engine.view.memory.flush()
    stored = json.loads((sim.paths.state_dir / "guard.json").read_text())
    assert ENO1 in {entry["address"] for entry in stored["entries"]}
    # nicpassd is down; at the next boot vfio-pci.ids= captures eno1 before nicpassd starts
    sim.engine.leasing.close()
    take_by_hand(sim, ENO1, override="vfio-pci")
    engine = sim.restart()
    assert ENO1 in engine.protected
    assert any("it is on vfio-pci" in r for r in engine.protected.reasons(ENO1))
    assert [f.level for f in engine.check() if f.id == f"guard-taken-{ENO1}"] == ["fail"]


async def test_only_an_admin_releases_a_remembered_device(sim):
    with pytest.raises(InvalidArgument, match="on the host's management path now"):
        await sim.engine.release_protection(ENO1)
    with pytest.raises(NotFound):
        await sim.engine.release_protection(NIC)
    take_by_hand(sim, ENO1)
    await sim.engine.quiesce()
    await sim.engine.release_protection("eno1")  # its interface name, gone from the kernel, still names it
    assert ENO1 not in sim.engine.view.memory.entries
    # What is left is what the live host says: a group mate of eno2, overridable with force.
    assert sim.engine.protected.reasons(ENO1) == ("shares IOMMU group 14 with protected 0000:01:00.1",)
    await sim.engine.bind(ENO1, "vfio-pci", force=True)
    assert sim.driver(ENO1) == "vfio-pci"


def _function(address: str, **fields) -> PciFunction:
    values = dict(vendor_id="8086", device_id="1521", subsystem_vendor_id="", subsystem_device_id="",
                  class_code="020000", driver="igb", interfaces=("eno1",), serial="00-11")
    values.update(fields)
    return PciFunction(address, **values)


def test_another_card_in_the_slot_is_not_the_management_nic(tmp_path):
    memory = GuardMemory(tmp_path / "guard.json")
    live = {ENO1: (("configured management interface: eno1",), frozenset({"management-interface"}))}
    memory.observe(HostSnapshot(functions={ENO1: _function(ENO1)}), live, now=100.0)
    taken = HostSnapshot(functions={ENO1: _function(ENO1, driver="", interfaces=())})
    assert memory.observe(taken, {}, now=200.0)[ENO1].state == "its driver is gone"
    assert set(memory.held) == {ENO1} and memory.entries[ENO1].until == 200.0
    other = HostSnapshot(functions={ENO1: _function(ENO1, device_id="10fb", driver="", interfaces=())})
    assert memory.observe(other, {}, now=300.0) == {} and memory.entries == {}


def test_an_absent_device_is_remembered_until_it_returns(tmp_path):
    memory = GuardMemory(tmp_path / "guard.json")
    live = {ENO1: (("configured management interface: eno1",), frozenset({"management-interface"}))}
    memory.observe(HostSnapshot(functions={ENO1: _function(ENO1)}), live, now=100.0)
    held = memory.observe(HostSnapshot(), {}, now=200.0)
    assert held[ENO1].state == "it is not present" and held[ENO1].entry.until == 200.0
    assert GuardMemory.load(tmp_path).entries[ENO1] == memory.entries[ENO1]  # on disk (no loop: written at once)
    back = memory.observe(HostSnapshot(functions={ENO1: _function(ENO1)}), live, now=300.0)
    assert back == {} and memory.entries[ENO1].until == 0.0 and memory.entries[ENO1].since == 100.0


def test_an_unreadable_memory_is_kept_aside_and_said_loudly(tmp_path, caplog):
    (tmp_path / "guard.json").write_text('{"version": 1, "entries": [{"address": 5}]}')
    memory = GuardMemory.load(tmp_path)
    assert memory.entries == {}
    assert [p.name.startswith("guard.json.broken-") for p in tmp_path.iterdir()] == [True]
    assert any(record.levelname == "CRITICAL" for record in caplog.records)


def test_remembered_round_trips(tmp_path):
    entry = Remembered(ENO1, ("a",), ("default-route",), "8086", "1521", "00-11", "aa:bb", "igb", ("eno1",),
                       True, 1.0, 2.0)
    memory = GuardMemory(tmp_path / "guard.json", {ENO1: entry})
    memory.save_soon()
    assert GuardMemory.load(tmp_path).entries == {ENO1: entry}


async def test_a_taken_management_nic_can_be_given_back_by_hand(sim):
    take_by_hand(sim, ENO1, override="vfio-pci")
    await sim.engine.quiesce()
    await sim.engine.unbind(ENO1)  # back to its host driver: the guard does not stand in the way
    assert (sim.driver(ENO1), sim.override(ENO1)) == ("igb", "")
    with pytest.raises(Protected):
        await sim.engine.bind(ENO1, "vfio-pci")


async def test_check_s_remedy_for_a_taken_management_nic_clears_it(sim):
    """Issue 20: the remedy `check` gives (`nicpassctl unbind ADDRESS`) is a command that works:
    run, and the failure is gone."""
    take_by_hand(sim, ENO1)
    await sim.engine.quiesce()
    finding = next(f for f in sim.engine.check() if f.id == f"guard-taken-{ENO1}")
    assert finding.level.value == "fail" and f"`nicpassctl unbind {ENO1}`" in finding.remedy
    await sim.engine.unbind(ENO1)
    await sim.engine.quiesce()
    assert sim.driver(ENO1) == "igb"
    assert f"guard-taken-{ENO1}" not in {f.id for f in sim.engine.check()}
