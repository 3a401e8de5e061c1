"""A VF persisted on vfio-pci when its PF's VFs are created again (at boot): the kernel's own probe
of the new VFs must not win over nicpassd (issue 5, seen 1 boot in 4 in the e2e guest).

The simulated kernel's fault ``probe_after_numvfs`` makes that probe late, the way the real
igbvf probe can be: a reader sees "no driver", writes driver_override, and the host driver binds
anyway right after that write (its probe had matched before).
"""

from __future__ import annotations


from nicpassd.engine.store import DeviceDesire, identity_of
from nicpassd.host.model import PciFunction

PF = "0000:3b:00.0"
VFS = ["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2"]



def persist_vf1_on_vfio(sim) -> None:
    """PF with 3 VFs on the host driver, VF 1 on vfio-pci, persisted; then the VFs are gone (a
    reboot): nothing of it is in the kernel any more."""
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "3")
    sim.engine.refresh()
    snapshot = sim.engine.snapshot
    for address, fields in ((PF, {"num_vfs": 3}), (VFS[1], {"driver": "vfio-pci"})):
        identity = identity_of(snapshot.functions[address], snapshot)
        sim.engine.store.put(DeviceDesire(address=address, identity=identity, **fields))
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "0")
    sim.engine.refresh()
    sim.writer.clear()
    sim.events.clear()


def test_the_fault_reproduces_the_race(ksim):
    """Without nicpassd: autoprobe on, the VF shows no driver, the override is written, and the
    host driver binds it anyway."""
    ksim.kernel.faults.probe_after_numvfs[PF] = 1
    ksim.kernel.write(ksim.paths.sys / f"bus/pci/devices/{PF}/sriov_numvfs", "3")
    assert ksim.driver(VFS[1]) == ""
    ksim.kernel.load_module("vfio-pci")
    ksim.kernel.write(ksim.paths.sys / f"bus/pci/devices/{VFS[1]}/driver_override", "vfio-pci")
    assert ksim.driver(VFS[1]) == "iavf"
    assert PF not in ksim.kernel.faults.probe_after_numvfs  # consumed


async def test_boot_reconcile_creates_the_vfs_with_autoprobe_off_and_binds_the_persisted_vf(sim):
    persist_vf1_on_vfio(sim)
    sim.kernel.faults.probe_after_numvfs[PF] = 1  # armed: would bite if autoprobe stayed on
    sim.engine.reconciler.auto = True
    await sim.engine.reconciler.run(explicit=False)  # the boot run
    await sim.engine.quiesce()
    assert sim.vfs(PF) == VFS
    assert (sim.driver(VFS[1]), sim.override(VFS[1])) == ("vfio-pci", "vfio-pci")
    assert sim.driver(VFS[0]) == "iavf" and sim.driver(VFS[2]) == "iavf"
    assert sim.autoprobe(PF) == "1"  # the previous value, back
    writes = [(parent, attr, data.strip()) for parent, attr, data in sim.writer.writes]
    assert (writes.index((PF, "sriov_drivers_autoprobe", "0")) < writes.index((PF, "sriov_numvfs", "3"))
            < writes.index((VFS[1], "driver_override", "vfio-pci")) < writes.index((PF, "sriov_drivers_autoprobe", "1")))
    assert not [e for e in sim.events if e.action == "bind" and e.sys_name == VFS[1] and e.driver == "iavf"]
    assert sim.engine.reconciler.failed == {}
    assert all(sim.engine.views[a].drift == "" for a in (PF, *VFS))


async def test_the_plan_names_the_vf_bound_with_the_vf_count(sim):
    persist_vf1_on_vfio(sim)
    plan = sim.engine.reconciler.plan(explicit=True)
    assert [(s.address, s.action, s.vf_drivers) for s in plan.steps] == [(PF, "vfs", ((1, "vfio-pci"),))]
    assert "0 → 3 VFs (VF 1 on vfio-pci)" in str(plan)


async def test_a_bind_raced_by_the_kernel_probe_is_retried_once(sim):
    """VFs created by someone else with autoprobe on, their probe late: the bind's verify finds
    the host driver that appeared meanwhile, and the bind is done once more."""
    sim.kernel.faults.probe_after_numvfs[PF] = 1
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "3")
    sim.engine.refresh()
    assert sim.driver(VFS[1]) == ""
    await sim.engine.bind(VFS[1], "vfio-pci")
    assert (sim.driver(VFS[1]), sim.override(VFS[1])) == ("vfio-pci", "vfio-pci")


async def test_restoring_no_driver_leaves_a_host_driver_the_kernel_bound(sim):
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "3")
    sim.engine.refresh()
    assert sim.driver(VFS[1]) == "iavf"
    before = PciFunction(VFS[1], "", "", "", "", "", driver="", driver_override="")
    note = await sim.engine.ops.restore_binding(VFS[1], before)
    assert sim.driver(VFS[1]) == "iavf" and "left on iavf" in note
