"""Taking a device off vfio-pci while a VM holds it (nicpassd/host/vfio_latch.py).

The kernel's rules, as the simulator serves them: a VFIO group is opened by one process at a time,
and an unbind from vfio-pci waits, the device locked, until the process holding it lets go. So
nicpassd holds the group around every unbind from vfio-pci: a device a VM holds is refused with
Busy before anything is written, and no VM can open a device while nicpassd takes it away."""

from __future__ import annotations

import errno

import pytest

from nicpassd.errors import Busy
from nicpassd.sim import kernel as sim_kernel

NIC, PF2 = "0000:af:00.0", "0000:3b:00.1"


async def test_a_vfio_group_is_opened_by_one_process_at_a_time(sim):
    await sim.engine.bind(NIC, "vfio-pci")
    node = sim.paths.dev_vfio / str(sim.group(NIC))
    with pytest.raises(OSError) as absent:
        sim.kernel.hold_vfio_group(node)
    assert absent.value.errno == errno.ENOENT
    with sim.vm_holding(NIC):
        with pytest.raises(OSError) as held:
            sim.kernel.hold_vfio_group(node)
        assert held.value.errno == errno.EBUSY
    release = sim.kernel.hold_vfio_group(node)
    with pytest.raises(OSError) as twice:
        sim.kernel.hold_vfio_group(node)
    assert twice.value.errno == errno.EBUSY
    release()
    sim.kernel.hold_vfio_group(node)()


async def test_the_kernels_unbind_from_vfio_pci_waits_while_a_vm_holds_the_device(sim, monkeypatch):
    await sim.engine.bind(NIC, "vfio-pci")
    monkeypatch.setattr(sim_kernel, "VFIO_RELEASE_WAIT", 0.3)  # the kernel waits for ever
    with sim.vm_holding(NIC):
        with pytest.raises(OSError) as blocked:
            sim.kernel.write(sim.paths.pci_drivers / "vfio-pci" / "unbind", NIC)
        assert blocked.value.errno == errno.EINTR and "in use" in str(blocked.value)
        assert sim.driver(NIC) == "vfio-pci"
    sim.kernel.write(sim.paths.pci_drivers / "vfio-pci" / "unbind", NIC)
    assert sim.driver(NIC) == ""


async def test_unbinding_a_device_a_vm_holds_is_busy_and_writes_nothing(sim):
    await sim.engine.bind(NIC, "vfio-pci")
    sim.writer.clear()
    with sim.vm_holding(NIC, guest="db07"):
        with pytest.raises(Busy) as refused:
            await sim.engine.unbind(NIC)
        assert sim.writer.writes == []
        assert (sim.driver(NIC), sim.override(NIC)) == ("vfio-pci", "vfio-pci")
    assert "in use through VFIO" in refused.value.message and "guest db07" in refused.value.message
    assert "virsh detach-device" in refused.value.remedy
    await sim.engine.unbind(NIC)
    assert sim.driver(NIC) != "vfio-pci" and sim.override(NIC) == ""


async def test_a_batch_refuses_only_the_devices_a_vm_holds(sim):
    await sim.engine.set_vf_count(PF2, 2)
    held, free = sim.vfs(PF2)
    host_driver = sim.driver(held)
    assert await sim.engine.bind_each([held, free], "vfio-pci") == {held: None, free: None}
    assert sim.group(held) != sim.group(free)
    sim.writer.clear()
    with sim.vm_holding(held):
        outcomes = await sim.engine.bind_each([held, free], "")
    assert isinstance(outcomes[held], Busy) and outcomes[free] is None, outcomes
    assert sim.driver(held) == "vfio-pci" and sim.driver(free) == host_driver
    assert not [write for write in sim.writer.writes if held in write]


async def test_no_vm_opens_a_device_while_nicpassd_takes_it_off_vfio_pci(sim):
    """The group is nicpassd's from its first write to its last; the unbind inside finds it so."""
    await sim.engine.bind(NIC, "vfio-pci")
    node = sim.paths.dev_vfio / str(sim.group(NIC))
    node.parent.mkdir(parents=True, exist_ok=True)
    node.touch()
    host = sim.engine.ops.host
    with host.vfio_latched([NIC]) as busy:
        assert busy == {}
        with pytest.raises(OSError) as vm:
            sim.kernel.hold_vfio_group(node)  # QEMU's open, meanwhile
        assert vm.value.errno == errno.EBUSY
        await host.unbind(NIC, "vfio-pci")
    assert sim.driver(NIC) == ""
    sim.kernel.hold_vfio_group(node)()  # let go afterwards


async def test_a_vf_count_change_that_would_remove_a_vf_a_vm_holds_is_busy_and_writes_nothing(sim):
    """Removing VFs unbinds each: one on vfio-pci that a VM holds would block the PF's sriov_numvfs
    write the same way."""
    await sim.engine.set_vf_count(PF2, 2, driver="vfio-pci")
    held = sim.vfs(PF2)[0]
    assert sim.driver(held) == "vfio-pci"
    sim.writer.clear()
    with sim.vm_holding(held):
        with pytest.raises(Busy) as refused:
            await sim.engine.set_vf_count(PF2, 0)
        assert sim.numvfs(PF2) == 2 and sim.writer.writes == []
    assert held in refused.value.message
    await sim.engine.set_vf_count(PF2, 0)
    assert sim.numvfs(PF2) == 0
