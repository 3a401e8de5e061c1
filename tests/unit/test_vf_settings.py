"""Issue 14: VF settings — written through the PF's driver (rtnetlink), read back, typed errors
naming the driver, restored on a refusal, persisted by VF index in the PF's desire, applied again
by the reconciler, held with --runtime, refused by the guard."""

from __future__ import annotations

import json

import pytest

from nicpassd.errors import Busy, InvalidArgument, NotFound, NotSupported, Protected
from nicpassd.host import vf_netlink
from nicpassd.host.host import Host

PF = "0000:3b:00.0"  # i40e, enp59s0f0; VFs on iavf
IGB = "0000:01:00.1"  # igb, eno2; VFs on igbvf
MLX = "0000:5e:00.0"  # mlx5_core


LONE_IGB = """
[[functions]]
address = "0000:02:00.0"
vendor = "8086"
device = "10c9"
class = "0x020000"
driver = "igb"
netdev = "enp2s0"
carrier = true
iommu_group = 1
sriov_totalvfs = 7
vf_device = "10ca"
vf_driver = "igbvf"
"""  # an igb PF of its own, up: its VFs on igbvf


async def with_vfs(sim, pf: str, count: int) -> list[str]:
    """VFs created as an admin's `echo N > sriov_numvfs` would (not persisted, not held)."""
    sim.kernel.write(sim.dir(pf) / "sriov_numvfs", str(count))
    sim.engine.refresh()
    sim.writer.clear()
    return sim.vfs(pf)



def kernel_settings(sim, interface: str) -> dict[int, object]:
    """What `ip link show PF` would list, read straight from the simulated kernel."""
    return {vf.index: vf for vf in Host(sim.paths, sim.kernel).read_vf_settings(interface)}


def persisted(sim, pf: str) -> dict:
    return json.loads(sim.state_json().read_text())["devices"][pf]["vf_settings"]


async def test_settings_are_written_read_back_and_persisted_by_vf_index(sim):
    vfs = await with_vfs(sim, PF, 3)
    after = await sim.engine.set_vf_settings(vfs[1], {"mac": "02:AA:bb:cc:dd:01", "vlan": 10, "qos": 3,
                                                      "trust": True, "spoofchk": False})
    shown = kernel_settings(sim, "enp59s0f0")[1]
    assert (shown.mac, shown.vlan, shown.qos, shown.trust, shown.spoofchk) == ("02:aa:bb:cc:dd:01", 10, 3, True, False)
    assert after == shown
    assert persisted(sim, PF) == {"1": {"mac": "02:aa:bb:cc:dd:01", "vlan": 10, "qos": 3, "trust": True,
                                        "spoofchk": False}}
    assert [call[:2] for call in sim.writer.writes if call[0] == "netlink"] == [("netlink", "set")] * 4
    await sim.engine.set_vf_settings(f"{PF}:1", {"max_tx_rate": 1000})  # PF:index, merged with the rest
    assert persisted(sim, PF)["1"] == {"mac": "02:aa:bb:cc:dd:01", "vlan": 10, "qos": 3, "trust": True,
                                       "spoofchk": False, "max_tx_rate": 1000}
    await sim.engine.quiesce()
    assert sim.engine.view.snapshot.vf_settings_of(vfs[1]).max_tx_rate == 1000


async def test_a_mac_change_reprobes_a_vf_on_its_host_driver_so_it_takes_the_mac(sim):
    vfs = await with_vfs(sim, PF, 2)
    await sim.engine.set_vf_settings(vfs[0], {"mac": "02:00:00:00:00:aa"})
    assert [(parent, attr) for parent, attr, _ in sim.writer.writes if parent != "netlink"] == [
        ("iavf", "unbind"), ("pci", "drivers_probe")]
    assert sim.driver(vfs[0]) == "iavf"
    assert (sim.dir(vfs[0]) / "net").is_dir()
    netdev = next((sim.dir(vfs[0]) / "net").iterdir())
    assert (netdev / "address").read_text().strip() == "02:00:00:00:00:aa"


async def test_a_vf_on_vfio_is_not_reprobed(sim):
    vfs = await with_vfs(sim, PF, 1)
    await sim.engine.bind(vfs[0], "vfio-pci", persist=False)
    sim.writer.clear()
    await sim.engine.set_vf_settings(vfs[0], {"mac": "02:00:00:00:00:bb"})
    assert [parent for parent, _attr, _ in sim.writer.writes] == ["netlink"] and sim.driver(vfs[0]) == "vfio-pci"


@pytest.mark.parametrize("values, error, words", [
    ({"mac": "01:00:5e:00:00:01"}, InvalidArgument, "multicast"),
    ({"mac": "00:00:00:00:00:00"}, InvalidArgument, "not an address"),
    ({"mac": "02:00:00:00:00"}, InvalidArgument, "six hex pairs"),
    ({"vlan": 4096}, InvalidArgument, "0 to 4095"),
    ({"qos": 3}, InvalidArgument, "needs a VLAN id"),
    ({"vlan_proto": "802.1x"}, InvalidArgument, "not one of"),
    ({"trust": "yes"}, InvalidArgument, "on or off"),
    ({"link_state": "up"}, InvalidArgument, "auto, enable, disable"),
    ({"min_tx_rate": 500, "max_tx_rate": 100}, InvalidArgument, "above"),
    ({"colour": "red"}, InvalidArgument, "unknown VF setting"),
    ({}, InvalidArgument, "no VF setting"),
])
async def test_bad_input_is_a_typed_error_and_nothing_is_written(sim, values, error, words):
    vfs = await with_vfs(sim, PF, 1)
    with pytest.raises(error, match=words):
        await sim.engine.set_vf_settings(vfs[0], values)
    assert sim.writer.calls == []


@pytest.mark.parametrize("pf, interface, values, error, words", [
    (IGB, "eno2", {"link_state": "disable"}, NotSupported, "igb driver .* does not support the link state"),
    (PF, "enp59s0f0", {"vlan": 5, "vlan_proto": "802.1ad"}, NotSupported, "i40e driver .* vlan .*802.1Q only"),
    (PF, "enp59s0f0", {"min_tx_rate": 100}, InvalidArgument, "i40e driver .* refused the rate of VF 0"),
])
async def test_what_the_driver_refuses_names_the_driver_and_puts_back_what_was_applied(sim, pf, interface, values,
                                                                                     error, words):
    vfs = await with_vfs(sim, pf, 1)
    before = kernel_settings(sim, interface)[0]
    with pytest.raises(error, match=words) as refused:
        await sim.engine.set_vf_settings(vfs[0], {"mac": "02:00:00:00:00:cc", **values})
    assert "put back" in str(refused.value)
    assert kernel_settings(sim, interface)[0] == before  # the MAC written before the refusal is undone
    assert not sim.state_json().exists() or pf not in json.loads(sim.state_json().read_text())["devices"]


async def test_mlx5_takes_802_1ad_and_a_minimum_rate(sim):
    vfs = await with_vfs(sim, MLX, 1)
    await sim.engine.set_vf_settings(vfs[0], {"vlan": 100, "vlan_proto": "802.1ad", "min_tx_rate": 10,
                                              "max_tx_rate": 200})
    shown = kernel_settings(sim, "enp94s0f0np0")[0]
    assert (shown.vlan, shown.vlan_proto, shown.min_tx_rate, shown.max_tx_rate) == (100, "802.1ad", 10, 200)


async def test_not_a_vf_or_no_such_vf_is_refused(sim):
    await with_vfs(sim, PF, 1)
    with pytest.raises(InvalidArgument, match="not a VF"):
        await sim.engine.set_vf_settings(PF, {"trust": True})
    with pytest.raises(NotFound, match="there is no VF 5"):
        await sim.engine.set_vf_settings(f"{PF}:5", {"trust": True})
    with pytest.raises(InvalidArgument, match="is a VF"):
        await sim.engine.set_vf_settings(f"{sim.vfs(PF)[0]}:0", {"trust": True})
    assert sim.writer.calls == []


async def test_a_vf_on_the_management_path_is_protected(make_sim, sim_tools):
    sim = make_sim(config=sim_tools.fast_config(management_interfaces=["eno1", "enp59s0f0v0"]))
    vfs = await with_vfs(sim, PF, 1)
    sim.engine.refresh()
    with pytest.raises(Protected):
        await sim.engine.set_vf_settings(vfs[0], {"mac": "02:00:00:00:00:dd"})
    assert sim.writer.calls == []


async def test_a_leased_vf_is_busy(sim):
    vfs = await with_vfs(sim, PF, 1)
    await sim.engine.prepare("web01", "6f1c2a8e-0000-4000-8000-000000000001", [vfs[0]])
    sim.writer.clear()
    with pytest.raises(Busy, match="leased to VM"):
        await sim.engine.set_vf_settings(vfs[0], {"trust": True})
    assert sim.writer.calls == []


async def test_persisted_settings_come_back_after_a_reboot_and_runtime_ones_are_left_alone(sim):
    await sim.engine.set_vf_count(PF, 2)
    vfs = sim.vfs(PF)
    await sim.engine.set_vf_settings(vfs[0], {"mac": "02:00:00:00:01:00", "trust": True})
    await sim.engine.set_vf_settings(vfs[1], {"vlan": 7}, persist=False)
    # What a reboot does to the kernel: the VFs go, and with them every setting their PF held.
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "0")
    sim.restart()
    await sim.engine.reconcile()
    await sim.engine.reconcile()  # the VFs' own events: their settings in the next pass
    shown = kernel_settings(sim, "enp59s0f0")
    assert (shown[0].mac, shown[0].trust) == ("02:00:00:00:01:00", True)
    assert shown[1].vlan == 0  # a --runtime setting is not persisted
    # Changed behind nicpassd's back: the reconciler puts the persisted one back.
    request = vf_netlink.encode_set("enp59s0f0", vf_netlink.vf_attributes(
        0, vf_netlink.VfChange(trust=False), shown[0])[0][1])
    vf_netlink.check_ack(sim.kernel.netlink(request))
    await sim.engine.quiesce()  # the kernel's RTM_NEWLINK of the PF reaches the engine
    outcomes = await sim.engine.reconcile()
    assert [(o.address, o.action.value, o.result.value) for o in outcomes] == [(vfs[0], "vf", "ok")]
    assert kernel_settings(sim, "enp59s0f0")[0].trust is True


async def test_a_runtime_change_holds_the_vf_against_its_persisted_settings(sim):
    vfs = await with_vfs(sim, PF, 1)
    await sim.engine.set_vf_settings(vfs[0], {"trust": True})
    await sim.engine.set_vf_settings(vfs[0], {"trust": False}, persist=False)
    outcomes = await sim.engine.reconcile()
    assert [(o.address, o.result.value) for o in outcomes] == [(vfs[0], "not-applied")]
    assert kernel_settings(sim, "enp59s0f0")[0].trust is False


async def test_a_change_behind_nicpassd_s_back_is_put_back_by_the_automatic_run(sim):
    """`ip link set PF vf 0 trust off` by someone else: the kernel's RTM_NEWLINK of the PF starts
    a reconcile run, which puts the persisted setting back."""
    vfs = await with_vfs(sim, PF, 1)
    await sim.engine.set_vf_settings(vfs[0], {"trust": True})
    sim.engine.reconciler.auto = True
    sim.engine.reconciler.poke()  # whatever earlier events asked for, done first
    await sim.engine.quiesce()
    current = kernel_settings(sim, "enp59s0f0")[0]
    request = vf_netlink.encode_set("enp59s0f0", vf_netlink.vf_attributes(0, vf_netlink.VfChange(trust=False),
                                                                          current)[0][1])
    vf_netlink.check_ack(sim.kernel.netlink(request))
    await sim.engine.quiesce()
    assert kernel_settings(sim, "enp59s0f0")[0].trust is True


async def test_stable_macs_are_derived_from_the_pf_and_the_index_and_survive_a_reboot(sim):
    """Issue 14, item 4: locally administered unicast MACs, the same after every re-creation;
    a VF's own persisted MAC wins; the two ports of one card never share a VF MAC."""
    from nicpassd.engine.vf_settings import stable_mac

    await sim.engine.set_vf_count(PF, 3, stable_macs=True)
    await sim.engine.set_vf_settings(f"{PF}:2", {"mac": "02:00:00:00:00:99"})
    await sim.engine.reconcile()
    macs = [vf.mac for vf in kernel_settings(sim, "enp59s0f0").values()]
    assert macs[:2] == [stable_mac("3c:fd:fe:a0:00:00", 0), stable_mac("3c:fd:fe:a0:00:00", 1)]
    assert macs[2] == "02:00:00:00:00:99"
    assert all(int(mac[:2], 16) & 0x3 == 0x2 for mac in macs)  # locally administered, unicast
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "0")  # a reboot's worth: the VFs and their MACs gone
    sim.restart()
    await sim.engine.reconcile()
    await sim.engine.reconcile()
    assert [vf.mac for vf in kernel_settings(sim, "enp59s0f0").values()] == macs
    other_port = {stable_mac("3c:fd:fe:a0:00:01", index) for index in range(64)}
    assert not other_port & {stable_mac("3c:fd:fe:a0:00:00", index) for index in range(64)}
    with pytest.raises(InvalidArgument, match="persisted setting"):
        await sim.engine.set_vf_count(PF, 3, persist=False, stable_macs=True)
    await sim.engine.set_vf_count(PF, 3, stable_macs=False)
    assert "stable_macs" not in json.loads(sim.state_json().read_text())["devices"][PF] or \
        json.loads(sim.state_json().read_text())["devices"][PF]["stable_macs"] is False


async def test_a_mac_for_a_vf_of_a_pf_that_is_down_is_set_and_the_vf_left_alone(make_sim, caplog):
    """igb serves a probing VF's mailbox only while the PF is up ("PF still in reset state. Is the
    PF interface up?"): a reprobe would only give the VF another random MAC. The MAC is set in
    the PF's driver, the VF is not reprobed, and the log says what takes it."""
    sim = make_sim(LONE_IGB.replace("carrier = true", "carrier = false"))
    vfs = await with_vfs(sim, "0000:02:00.0", 1)
    await sim.engine.set_vf_settings(vfs[0], {"mac": "02:00:00:00:00:61"})
    assert kernel_settings(sim, "enp2s0")[0].mac == "02:00:00:00:00:61"
    assert [parent for parent, _attr, _ in sim.writer.writes] == ["netlink"]  # no unbind, no probe
    assert "enp2s0 is down: igbvf takes it when enp2s0 is up" in caplog.text


async def test_a_lease_records_the_vf_s_settings_and_release_puts_exactly_those_back(sim):
    """Issue 14, item 5: what the VM's side sets while it runs (libvirt for an <interface
    type='hostdev'>, or anyone) is left alone; at release the VF's settings go back to what they
    were before the lease, whatever driver the release policy picks."""
    vfs = await with_vfs(sim, PF, 2)
    await sim.engine.set_vf_settings(vfs[0], {"mac": "02:00:00:00:00:71", "vlan": 5}, persist=False)
    before = kernel_settings(sim, "enp59s0f0")[0]
    uuid = "6f1c2a8e-0000-4000-8000-000000000071"
    await sim.engine.prepare("web01", uuid, [vfs[0]])
    # libvirt sets the domain's <mac> and <vlan> through the PF, as it does for interface hostdevs
    for change in (vf_netlink.VfChange(mac="52:54:00:aa:bb:cc"), vf_netlink.VfChange(vlan=42)):
        for _setting, attribute in vf_netlink.vf_attributes(0, change, kernel_settings(sim, "enp59s0f0")[0]):
            vf_netlink.check_ack(sim.kernel.netlink(vf_netlink.encode_set("enp59s0f0", attribute)))
    await sim.engine.quiesce()
    await sim.engine.reconcile()  # the reconciler leaves a leased VF alone
    assert kernel_settings(sim, "enp59s0f0")[0].mac == "52:54:00:aa:bb:cc"
    await sim.engine.release(uuid)
    assert kernel_settings(sim, "enp59s0f0")[0] == before


def vf_netdev_mac(sim, vf: str) -> str:
    """The MAC the VF's own driver took (its netdev's address), "" without a netdev."""
    net = sim.dir(vf) / "net"
    names = list(net.iterdir()) if net.is_dir() else []
    return (names[0] / "address").read_text().strip() if names else ""


async def test_persisted_settings_are_written_before_the_re_created_vfs_probe(sim):
    """Issue 14, item 3: the VFs a boot (or a PF reset) re-creates get their persisted settings
    while they have no driver yet, so iavf takes the persisted MAC when it probes: one pass, no
    random MAC first, no reprobe."""
    await sim.engine.set_vf_count(PF, 2)
    vfs = sim.vfs(PF)
    await sim.engine.set_vf_settings(vfs[1], {"mac": "02:00:00:00:02:01", "trust": True})
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "0")
    sim.restart()
    sim.writer.clear()
    outcomes = await sim.engine.reconcile()  # one pass
    assert [(o.address, o.action.value, o.result.value) for o in outcomes] == [(PF, "vfs", "ok")]
    shown = kernel_settings(sim, "enp59s0f0")[1]
    assert (shown.mac, shown.trust) == ("02:00:00:00:02:01", True)
    assert vf_netdev_mac(sim, vfs[1]) == "02:00:00:00:02:01"
    writes = sim.writer.writes
    settings = [i for i, call in enumerate(writes) if call[0] == "netlink"]
    probes = [i for i, call in enumerate(writes) if call[:2] == ("pci", "drivers_probe")]
    assert settings and probes and max(settings) < min(probes), writes
    assert not [call for call in writes if call[1] == "unbind"], writes  # nobody reprobed
    assert (await sim.engine.reconcile()) == []  # nothing left for a second pass


async def test_stable_macs_are_the_vfs_own_macs_from_their_first_probe(sim):
    """`vfs PF N --stable-macs` through the API: each iavf comes up with its stable MAC."""
    from nicpassd.engine.vf_settings import stable_mac

    await sim.engine.set_vf_count(PF, 2, stable_macs=True)
    assert [vf_netdev_mac(sim, vf) for vf in sim.vfs(PF)] == [stable_mac("3c:fd:fe:a0:00:00", i) for i in range(2)]
    assert not [call for call in sim.writer.writes if call[1] == "unbind"]





async def test_a_setting_the_driver_refuses_at_creation_leaves_the_vfs_and_is_reported(make_sim):
    """A persisted setting the driver no longer takes (a firmware update, another card in the
    slot) does not cost the VFs: they are created, the rest applied, the refusal reported."""
    IGB = "0000:02:00.0"
    sim = make_sim(LONE_IGB)
    vfs = await with_vfs(sim, IGB, 1)
    await sim.engine.set_vf_settings(vfs[0], {"trust": True})
    desires = json.loads(sim.state_json().read_text())
    desires["devices"][IGB] = {**desires["devices"][IGB], "num_vfs": 1}
    desires["devices"][IGB]["vf_settings"]["0"]["link_state"] = "disable"  # igb has no ndo_set_vf_link_state
    sim.state_json().write_text(json.dumps(desires))
    sim.kernel.write(sim.dir(IGB) / "sriov_numvfs", "0")
    sim.restart()
    outcomes = await sim.engine.reconcile()
    assert [(o.address, o.action.value, o.result.value, o.error) for o in outcomes] == [
        (IGB, "vfs", "ok", ""), (vfs[0], "vf", "failed", "NotSupported")]
    assert "igb" in outcomes[1].message and "link state" in outcomes[1].message
    assert sim.vfs(IGB) == vfs and sim.state(vfs[0])[0] == "igbvf"



VM = "6f1c2a8e-0000-4000-8000-0000000000a1"


async def test_a_vm_s_settings_the_driver_refuses_lease_nothing_and_change_nothing(sim):
    """Prepare with ``vf_settings`` is all or nothing: i40e refuses a minimum rate (EINVAL), so
    the VM's MAC written before it is put back, the VFs go back to iavf, and no lease is made."""
    vfs = await with_vfs(sim, PF, 2)
    before = kernel_settings(sim, "enp59s0f0")
    with pytest.raises(InvalidArgument, match="i40e"):
        await sim.engine.prepare("web01", VM, vfs, vf_settings={
            vfs[0]: {"mac": "52:54:00:00:00:a1"}, vfs[1]: {"vlan": 4, "min_tx_rate": 100}})
    assert kernel_settings(sim, "enp59s0f0") == before
    assert [sim.state(vf)[0] for vf in vfs] == ["iavf", "iavf"]
    assert sim.engine.leases.holder() == {}
    sim.writer.clear()
    for settings, words in (({vfs[0]: {"colour": 1}}, "unknown VF setting"),
                            ({PF: {"trust": True}}, "not a VF"),
                            ({vfs[1]: {"trust": True}}, "does not lease")):
        with pytest.raises(InvalidArgument, match=words):
            await sim.engine.prepare("web01", VM, [vfs[0]], vf_settings=settings)
    assert sim.writer.writes == []  # bad input: nothing written


async def test_a_crash_after_the_vm_s_settings_are_written_is_rolled_back(sim, monkeypatch):
    """The prepare's journal entry holds the VF settings it writes as they were: a daemon killed
    before the lease is written finds the VF back on iavf with the host's settings."""
    from nicpassd.engine.recovery import recover

    vfs = await with_vfs(sim, PF, 1)
    before = kernel_settings(sim, "enp59s0f0")[0]

    async def dies(entry) -> None:  # the process dies: the entry is never finished
        return None

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the lease was written")

    monkeypatch.setattr(sim.engine.journal, "finish", dies)
    monkeypatch.setattr(sim.engine.leases, "add", crash)
    with pytest.raises(RuntimeError):
        await sim.engine.prepare("web01", VM, vfs, vf_settings={vfs[0]: {"mac": "52:54:00:00:00:a2", "trust": True}})
    assert kernel_settings(sim, "enp59s0f0")[0].mac == "52:54:00:00:00:a2"
    engine = sim.restart()
    done = await recover(engine.view, engine.ops)
    assert done and done[0].startswith("rolled back prepare")
    assert kernel_settings(sim, "enp59s0f0")[0] == before
    assert sim.state(vfs[0])[0] == "iavf"


async def test_the_settings_of_one_pf_s_vfs_are_one_batch_and_each_vf_succeeds_or_fails_alone(make_sim, monkeypatch):
    """The reconciler puts back the settings of a PF's VFs in one undo-journal entry; a VF whose
    persisted setting the driver refuses fails alone, the others are put back."""
    pf = "0000:02:00.0"
    sim = make_sim(LONE_IGB)
    vfs = await with_vfs(sim, pf, 2)
    for vf in vfs:
        await sim.engine.set_vf_settings(vf, {"trust": True})
    desires = json.loads(sim.state_json().read_text())
    desires["devices"][pf]["vf_settings"]["1"]["link_state"] = "disable"  # igb has no ndo_set_vf_link_state
    sim.state_json().write_text(json.dumps(desires))
    engine = sim.restart()
    for index in (0, 1):  # trust off behind nicpassd's back
        current = kernel_settings(sim, "enp2s0")[index]
        attribute = vf_netlink.vf_attributes(index, vf_netlink.VfChange(trust=False), current)[0][1]
        vf_netlink.check_ack(sim.kernel.netlink(vf_netlink.encode_set("enp2s0", attribute)))
    await sim.engine.quiesce()  # the kernel's RTM_NEWLINKs of the PF reach the engine
    entries = []
    record = engine.journal.record

    async def recorded(kind, devices, **kwargs):
        entries.append((kind, {address: sorted(before.vf_settings) for address, before in devices.items()}))
        return await record(kind, devices, **kwargs)

    monkeypatch.setattr(engine.journal, "record", recorded)
    outcomes = await engine.reconcile()
    assert sorted((o.address, o.action.value, o.result.value, o.error) for o in outcomes) == [
        (vfs[0], "vf", "ok", ""), (vfs[1], "vf", "failed", "NotSupported")]
    assert entries == [("vf-settings", {pf: [0, 1]})]
    assert [vf.trust for vf in kernel_settings(sim, "enp2s0").values()] == [True, False]


async def test_the_persisted_settings_of_a_pf_s_vfs_are_worked_out_once_per_view_build(sim, monkeypatch):
    """Each VF's view shows its persisted settings, out of its PF's: worked out for every VF in
    turn, a PF with 64 VFs and stable MACs cost 64 x 64 (0.29 s per build of 1,024 VFs)."""
    from nicpassd.engine import views

    await sim.engine.set_vf_count(PF, 6, stable_macs=True)
    await sim.engine.set_vf_settings(f"{PF}:2", {"vlan": 12})
    worked_out = []
    real = views.desired_settings
    monkeypatch.setattr(views, "desired_settings", lambda *args: worked_out.append(args[0].address) or real(*args))
    built = views.build_views(sim.engine.view.snapshot, sim.engine.view.protected, sim.engine.view.store, {}, {})
    assert worked_out == [PF]
    assert dict(built[sim.vfs(PF)[2]].desired_vf_settings)["vlan"] == 12
    assert [dict(built[vf].desired_vf_settings)["mac"] for vf in sim.vfs(PF)] == [
        views.desired_settings(sim.engine.view.store.get(PF), "3c:fd:fe:a0:00:00", 6)[index]["mac"]
        for index in range(6)]
