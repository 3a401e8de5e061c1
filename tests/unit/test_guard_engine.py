"""The guard at the engine's choke point: force (never on the management path), the group option,
IOMMU group mates of leased devices, and the protected set following the network without restart."""

from __future__ import annotations

import logging

import pytest

from nicpassd.errors import Busy, Protected
from nicpassd.sim.topology import Route

NIC, USB = "0000:af:00.0", "0000:af:00.1"
ENO1, ENO2 = "0000:01:00.0", "0000:01:00.1"
A, B = "0000:10:00.0", "0000:11:00.0"
VM = "6f1c2d3e-0000-4000-8000-00000000000a"

# A management NIC (default route) and a NIC in its IOMMU group that is on no management path.
SHARED_GROUP = """
[[functions]]
address = "0000:10:00.0"
vendor = "8086"
device = "1572"
driver = "i40e"
netdev = "eno1"
iommu_group = 20
sriov_totalvfs = 4
vf_device = "154c"
vf_driver = "iavf"
vf_offset = 16

[[functions]]
address = "0000:11:00.0"
vendor = "8086"
device = "1572"
driver = "i40e"
netdev = "eno2"
iommu_group = 20
sriov_totalvfs = 4
vf_device = "154c"
vf_driver = "iavf"
vf_offset = 16

[[routes]]
dev = "eno1"
gateway = "192.0.2.1"
"""



async def test_force_overrides_a_group_mate_and_is_logged_with_the_caller(make_sim, caplog):
    sim = make_sim(SHARED_GROUP)
    with pytest.raises(Protected, match="shares IOMMU group 20 with protected 0000:10:00.0.*override with force"):
        await sim.engine.bind("eno2", "vfio-pci")
    assert sim.driver(B) == "i40e"
    with caplog.at_level(logging.WARNING, logger="nicpassd.engine.engine"):
        await sim.engine.bind("eno2", "vfio-pci", force=True, caller=":1.42 (uid 0)")
    assert sim.driver(B) == "vfio-pci"
    assert any("guard overridden with force by :1.42 (uid 0): bind 0000:11:00.0 (eno2) to vfio-pci" in record.message
               and record.levelno == logging.WARNING for record in caplog.records)


async def test_force_never_overrides_the_management_path(make_sim):
    sim = make_sim(SHARED_GROUP)
    for call in (sim.engine.bind("eno1", "vfio-pci", force=True), sim.engine.set_vf_count("eno1", 2, force=True)):
        with pytest.raises(Protected, match="IPv4 default route 0.0.0.0/0 via 192.0.2.1: eno1"):
            await call
    assert (sim.driver(A), sim.numvfs(A), sim.override(A)) == ("i40e", 0, "")
    # Giving it "back" to the host driver it is on takes nothing from the host: a no-op, not a refusal.
    written, write = [], sim.kernel.write
    sim.kernel.write = lambda path, data: (written.append((path, data)), write(path, data))[1]
    await sim.engine.unbind(A)
    await sim.engine.forget(A, restore=True)
    assert (sim.driver(A), sim.numvfs(A), sim.override(A), written) == ("i40e", 0, "", [])
    sim.kernel.write = write
    await sim.engine.set_vf_count("eno2", 2, force=True)  # the mate's VFs: allowed with force
    assert sim.numvfs(B) == 2


async def test_the_pf_of_a_management_vf_is_not_overridable(make_sim):
    sim = make_sim(SHARED_GROUP)
    await sim.engine.set_vf_count("eno2", 2, force=True)
    vf = sim.vfs(B)[1]
    sim.kernel.set_routes([Route(dev="eno2v1", dst="default", gateway="192.0.2.1")])
    await sim.engine.quiesce()
    with pytest.raises(Protected, match=f"even with force.*PF of protected VF {vf}"):
        await sim.engine.set_vf_count("eno2", 0, force=True)
    assert sim.numvfs(B) == 2


async def test_group_option_binds_the_unprotected_mates_and_prepare_then_passes(sim):
    with pytest.raises(Protected, match="IOMMU group 40 of 0000:af:00.0 .* is not viable: 0000:af:00.1 on xhci_hcd"):
        await sim.engine.prepare("vm", VM, ["af:00.0"])
    assert sim.driver(USB) == "xhci_hcd"  # never bound silently
    await sim.engine.bind("af:00.0", "vfio-pci", group=True)
    assert (sim.driver(NIC), sim.driver(USB)) == ("vfio-pci", "vfio-pci")
    await sim.engine.quiesce()
    assert sim.engine.explain(NIC).group_viable is True
    await sim.engine.prepare("vm", VM, ["af:00.0"])
    # A host driver on the mate would take DMA ownership of the group the VM uses.
    with pytest.raises(Busy, match="shares IOMMU group 40 with 0000:af:00.0, leased to VM"):
        await sim.engine.unbind(USB)
    assert sim.driver(USB) == "vfio-pci"


async def test_group_option_never_takes_a_protected_mate_even_with_force(make_sim):
    sim = make_sim(SHARED_GROUP)
    with pytest.raises(Protected, match="with its IOMMU group 20: member 0000:10:00.0 \\(eno1\\) is protected"):
        await sim.engine.bind("eno2", "vfio-pci", group=True, force=True)
    assert (sim.driver(A), sim.driver(B)) == ("i40e", "i40e")


async def test_moving_the_default_route_moves_the_protection_in_one_event(sim):
    assert ENO1 in sim.engine.protected and NIC not in sim.engine.protected
    sim.events.clear()
    sim.kernel.set_routes([Route(dev="enp175s0f0", dst="default", gateway="192.0.2.1")])
    await sim.engine.quiesce()
    assert sim.event_tuples() == [("change", "route", "")]
    protected = sim.engine.protected
    assert protected.reasons(NIC) == ("IPv4 default route 0.0.0.0/0 via 192.0.2.1: enp175s0f0",)
    assert protected.reasons(USB) == ("shares IOMMU group 40 with protected 0000:af:00.0",)
    assert ENO1 not in protected and ENO2 not in protected  # br0 keeps an address, over two live slaves
    assert sim.engine.views[NIC].protected and not sim.engine.views[ENO1].protected
    await sim.engine.bind("eno2", "vfio-pci")  # free now
    assert sim.driver(ENO2) == "vfio-pci"
    await sim.engine.quiesce()
    # eno1 is now br0's only live slave: the last way in to br0's address.
    assert "last way into the host" in sim.engine.protected.reasons(ENO1)[0]
    with pytest.raises(Protected, match="last way into the host .*br0 → bond0 → eno1"):
        await sim.engine.bind("eno1", "vfio-pci", force=True)


async def test_explain_and_check_tell_why(make_sim, sim_tools):
    sim = make_sim(SHARED_GROUP, config=sim_tools.fast_config(management_interfaces=("eth9",)))
    info = sim.engine.explain("eno2")
    assert (info.protected, info.overridable, info.allowed) == (True, True, False)
    assert sim.engine.explain("eno1").overridable is False
    findings = {finding.id: finding for finding in sim.engine.check()}
    assert findings["guard-0"].level == "warn"
    assert findings["guard-0"].message == "configured management interface eth9 does not exist"
