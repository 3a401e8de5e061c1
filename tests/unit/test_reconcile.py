"""The reconciler: desired state vs the simulated kernel → an explicit plan → applied, verified.

Judged by what the simulated kernel tree shows and by the writes it received. Default host
(nicpassd/sim/default-host.toml): management eno1/eno2 (01:00.0/.1) under bond0/br0; i40e PFs
3b:00.0 (enp59s0f0) and 3b:00.1; mlx5 PF 5e:00.0; e1000e af:00.0 sharing group 40 with USB af:00.1.
"""

from __future__ import annotations

import asyncio
import json

from nicpassd.engine.journal import DeviceBefore
from nicpassd.engine.plan import Plan, make_plan
from nicpassd.engine.reconcile import FIGHT_LIMIT
from nicpassd.engine.recovery import recover
from nicpassd.engine.store import DeviceDesire, identity_of


async def reconcile_rows(engine) -> list[tuple[str, str, str]]:
    """An explicit run's outcomes as the contract's (address, action, result) rows."""
    return [outcome.row for outcome in await engine.reconcile()]


PF, PF2, MLX = "0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0"
VFS = ["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2", "0000:3b:02.3"]
NIC, USB, ENO1 = "0000:af:00.0", "0000:af:00.1", "0000:01:00.0"
VM_A = "6f1c2d3e-0000-4000-8000-00000000000a"



def want(sim, address: str, **fields) -> None:
    """Persist a desire for ``address`` as the engine would record it, without applying it."""
    snapshot = sim.engine.snapshot
    identity = identity_of(snapshot.functions[address], snapshot)
    sim.engine.store.put(DeviceDesire(address=address, identity=identity, **fields))


def spec_of(sim, address: str):
    return next(f for f in sim.kernel.topology.functions if f.address == address)


def make_vfs(sim, count: int) -> None:
    """VFs made by someone else (no runtime hold of nicpassd on the PF)."""
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", str(count))
    sim.engine.refresh()
    sim.writer.clear()


def auto(sim):
    sim.engine.reconciler.auto = True
    return sim


# ------------------------------------------------------------------------------ planning
async def test_the_plan_is_explicit_and_printable(sim):
    want(sim, PF, num_vfs=4, vf_driver="vfio-pci")
    want(sim, NIC, driver="vfio-pci")
    plan = sim.engine.reconciler.plan(explicit=True)
    assert [(s.address, s.action, s.count, s.driver) for s in plan.steps] == [
        (PF, "vfs", 4, "vfio-pci"), (NIC, "bind", 0, "vfio-pci")]
    text = str(plan)
    assert text.splitlines()[0] == "reconcile plan: 2 step(s)"
    assert f"{PF}  vfs    0 → 4 VFs on vfio-pci" in text and f"{NIC}  bind   e1000e → vfio-pci" in text
    assert sim.writer.calls == []  # planning writes nothing


async def test_plan_reconcile_says_what_would_be_done_and_not_done_and_writes_nothing(sim):
    """Issue 20: `reconcile --plan`. The same plan an explicit run makes, as Reconcile rows."""
    want(sim, PF, num_vfs=4, vf_driver="vfio-pci")
    want(sim, NIC, driver="vfio-pci")
    want(sim, "0000:01:00.0", driver="vfio-pci")  # the management NIC: never
    rows = await sim.engine.plan_reconcile()
    assert rows[:2] == [(PF, "vfs", "planned: 0 → 4 VFs on vfio-pci"), (NIC, "bind", "planned: e1000e → vfio-pci")]
    assert rows[2][:2] == ("0000:01:00.0", "bind") and rows[2][2].startswith("Protected: ")
    assert sim.writer.calls == [] and sim.vfs(PF) == []
    assert [row[:2] for row in await sim.engine.plan_reconcile()] == [row[:2] for row in rows]  # still nothing done
    done = await reconcile_rows(sim.engine)
    assert [(a, action) for a, action, _ in done] == [(PF, "vfs"), (NIC, "bind"), ("0000:01:00.0", "bind")]


async def test_vf_binds_of_one_pf_are_one_batch(sim):
    make_vfs(sim, 4)
    want(sim, PF, num_vfs=4, vf_driver="vfio-pci")
    plan = sim.engine.reconciler.plan(explicit=True)
    assert [s.address for s in plan.steps] == VFS and {s.pf for s in plan.steps} == {PF}
    assert len(plan.batches()) == 1


def test_make_plan_is_pure_and_empty_for_no_desires(ksim):
    from nicpassd.engine.guard import ProtectedSet

    assert str(make_plan(ksim.snapshot(), {}, ProtectedSet(), {}, (), {})) == str(Plan())


# ------------------------------------------------------------------------------- applying
async def test_reconcile_applies_the_persisted_state_with_the_kernel_rules(sim):
    want(sim, PF, num_vfs=4, vf_driver="vfio-pci")
    want(sim, NIC, driver="vfio-pci")
    results = await reconcile_rows(sim.engine)
    assert results == [(PF, "vfs", "ok"), (NIC, "bind", "ok")]
    writes = sim.writer.writes
    assert writes.index((PF, "sriov_drivers_autoprobe", "0")) < writes.index((PF, "sriov_numvfs", "4"))
    assert sim.vfs(PF) == VFS and {sim.driver(vf) for vf in VFS} == {"vfio-pci"}
    assert (sim.driver(NIC), sim.override(NIC)) == ("vfio-pci", "vfio-pci")
    assert not [e for e in sim.events if e.action == "bind" and e.driver == "iavf"]  # never on the host driver
    assert all(sim.engine.views[a].drift == "" for a in (PF, NIC, *VFS))


async def test_reconcile_is_idempotent(sim):
    want(sim, PF, num_vfs=4, vf_driver="vfio-pci")
    want(sim, NIC, driver="vfio-pci")
    await reconcile_rows(sim.engine)
    sim.writer.clear()
    sim.events.clear()
    assert await reconcile_rows(sim.engine) == []
    assert sim.writer.calls == [] and sim.events == []


async def test_a_vf_count_change_goes_through_zero(sim):
    make_vfs(sim, 2)
    want(sim, PF, num_vfs=4)
    assert await reconcile_rows(sim.engine) == [(PF, "vfs", "ok")]
    assert [d for _, a, d in sim.writer.writes if a == "sriov_numvfs"] == ["0", "4"]


async def test_a_vf_desire_of_its_own_is_applied_once_the_vf_exists(sim):
    want(sim, PF, num_vfs=2)
    await reconcile_rows(sim.engine)
    want(sim, VFS[1], driver="vfio-pci")
    assert await reconcile_rows(sim.engine) == [(VFS[1], "bind", "ok")]
    assert [sim.driver(vf) for vf in VFS[:2]] == ["iavf", "vfio-pci"]


async def test_a_failed_step_is_reported_and_the_device_restored(sim):
    want(sim, NIC, driver="vfio-pci")
    sim.kernel.fail_binds_silently(NIC)
    [(address, action, result)] = await reconcile_rows(sim.engine)
    assert (address, action) == (NIC, "bind") and result.startswith("KernelError: ") and "did not bind" in result
    assert (sim.driver(NIC), sim.override(NIC)) == ("e1000e", "")
    assert sim.engine.store.get(NIC).driver == "vfio-pci"  # the desire is kept


# ------------------------------------------------------------------ refused, and kept
async def test_a_protected_desire_is_not_applied_but_reported_and_kept(sim):
    want(sim, ENO1, driver="vfio-pci")  # the management NIC: e.g. persisted before br0 moved onto it
    results = await reconcile_rows(sim.engine)
    [(address, action, result)] = [r for r in results if r[0] == ENO1]
    assert action == "bind" and result.startswith("Protected: ") and "br0 → bond0 → eno1" in result
    assert sim.writer.calls == [] and sim.driver(ENO1) == "igb"
    assert sim.engine.store.get(ENO1).driver == "vfio-pci"
    assert "not applied: Protected" in sim.engine.views[ENO1].drift
    finding = next(f for f in sim.engine.check() if f.id == f"drift-{ENO1}")
    assert "not applied" in finding.message


async def test_a_device_that_is_not_the_persisted_one_is_refused(sim):
    snapshot = sim.engine.snapshot
    other = identity_of(snapshot.functions[PF2], snapshot).model_copy(update={"serial": "00-00-00-00-00-00-00-01"})
    sim.engine.store.put(DeviceDesire(address=PF2, identity=other, num_vfs=4, vf_driver="vfio-pci"))
    sim.engine.refresh()
    [(address, action, result)] = await reconcile_rows(sim.engine)
    assert (address, action) == (PF2, "check") and result.startswith("IdentityChanged: ")
    assert "serial was 00-00-00-00-00-00-00-01" in result
    assert sim.writer.calls == [] and sim.numvfs(PF2) == 0
    assert sim.engine.views[PF2].drift.startswith("identity changed")
    assert next(f for f in sim.engine.check() if f.id == f"drift-{PF2}").level == "fail"


async def test_a_vf_count_change_is_refused_while_a_vf_is_leased(sim):
    make_vfs(sim, 2)
    await sim.engine.prepare("vm-a", VM_A, [VFS[0]])
    want(sim, PF, num_vfs=4)
    sim.writer.clear()
    [(address, action, result)] = await reconcile_rows(sim.engine)
    assert (address, action) == (PF, "vfs") and result.startswith("Busy: ") and VM_A in result
    assert sim.writer.calls == [] and sim.vfs(PF) == VFS[:2]


async def test_an_absent_persisted_device_is_reported(sim):
    want(sim, NIC, driver="vfio-pci")
    sim.kernel.unplug(NIC)
    await sim.engine.quiesce()
    assert await reconcile_rows(sim.engine) == [(NIC, "check", f"NotFound: persisted device {NIC} is not present")]


# ---------------------------------------------------------------------- automatic runs
async def test_hot_replug_recreates_and_binds_the_vfs_from_the_add_event(sim):
    auto(sim)
    await sim.engine.set_vf_count(PF, 8, driver="vfio-pci")
    await sim.engine.quiesce()
    sim.kernel.unplug(PF)
    await sim.engine.quiesce()
    assert PF not in sim.engine.views
    sim.events.clear()
    sim.kernel.plug(spec_of(sim, PF))
    await sim.engine.quiesce()
    assert sim.numvfs(PF) == 8 and {sim.driver(vf) for vf in sim.vfs(PF)} == {"vfio-pci"}
    assert not [e for e in sim.events if e.action == "bind" and e.driver == "iavf"]
    assert all(sim.engine.views[vf].driver == "vfio-pci" for vf in sim.vfs(PF))


async def test_a_storm_of_events_is_one_run(sim):
    auto(sim)
    await sim.engine.set_vf_count(PF, 16, driver="vfio-pci")
    await sim.engine.quiesce()
    sim.kernel.unplug(PF)
    await sim.engine.quiesce()
    before = sim.engine.reconciler.runs
    sim.kernel.plug(spec_of(sim, PF))  # then 16 VF adds, binds, a change...: ~35 uevents
    await sim.engine.quiesce()
    assert sim.numvfs(PF) == 16
    assert sim.engine.reconciler.runs - before <= 2  # the one that applied, the one its uevents queued


async def test_runs_wait_for_an_api_change_in_progress(sim):
    auto(sim)
    want(sim, NIC, driver="vfio-pci")
    async with sim.engine.ops.lock:  # an API change holds the mutation lock
        sim.engine.reconciler.poke()
        for _ in range(20):
            await asyncio.sleep(0)
        assert sim.writer.calls == []
    await sim.engine.quiesce()
    assert sim.driver(NIC) == "vfio-pci"


async def test_a_runtime_change_is_not_undone_until_the_device_is_replugged(sim):
    auto(sim)
    await sim.engine.bind(NIC, "vfio-pci")
    await sim.engine.unbind(NIC, persist=False)  # back to e1000e for now, vfio-pci stays persisted
    await sim.engine.quiesce()
    assert sim.driver(NIC) == "e1000e" and sim.engine.store.get(NIC).driver == "vfio-pci"
    [(address, action, result)] = await reconcile_rows(sim.engine)  # not even on demand
    assert (address, action) == (NIC, "check") and result.startswith("skipped: ") and "--runtime" in result
    assert sim.driver(NIC) == "e1000e"
    sim.kernel.unplug(NIC)
    await sim.engine.quiesce()
    sim.kernel.plug(spec_of(sim, NIC))
    await sim.engine.quiesce()
    assert sim.driver(NIC) == "vfio-pci"  # a new device instance: the runtime change ended with the old


async def test_a_failed_step_is_not_retried_by_every_event(sim):
    auto(sim)
    want(sim, NIC, driver="vfio-pci")
    sim.kernel.fail_binds_silently(NIC)  # once: the restore to e1000e works
    sim.engine.reconciler.poke()
    await sim.engine.quiesce()
    assert sim.driver(NIC) == "e1000e"
    assert "not retried automatically" in sim.engine.views[NIC].drift
    sim.writer.clear()
    await sim.engine.set_vf_count(MLX, 2, persist=False)  # unrelated uevents
    await sim.engine.quiesce()
    assert not [w for w in sim.writer.writes if NIC in w]  # it would have worked this time: not tried
    assert await reconcile_rows(sim.engine) == [(NIC, "bind", "ok")]  # explicit: retried


async def test_the_reconciler_stops_fighting_another_agent(sim):
    auto(sim)
    await sim.engine.bind(NIC, "vfio-pci")
    for _ in range(FIGHT_LIMIT + 2):  # someone keeps giving it back to e1000e
        for relative, data in [(f"bus/pci/devices/{NIC}/driver_override", "\n"),
                               ("bus/pci/drivers/vfio-pci/unbind", NIC), ("bus/pci/drivers_probe", NIC)]:
            try:
                sim.kernel.write(sim.paths.sys / relative, data)
            except OSError:
                pass
        await sim.engine.quiesce()
    assert sim.driver(NIC) == "e1000e"
    assert "something else keeps changing it" in sim.engine.views[NIC].drift
    assert (await reconcile_rows(sim.engine)) == [(NIC, "bind", "ok")]  # on demand it applies again


# ------------------------------------------------------------------------ moved cards
MOVED_FROM = """
format = 1
[[functions]]
address = "0000:01:00.0"
vendor = "8086"
device = "1521"
driver = "igb"
netdev = "eno1"
mac = "ac:1f:6b:10:00:01"
[[functions]]
address = "{x710}"
vendor = "8086"
device = "1572"
subsystem_vendor = "8086"
subsystem_device = "0006"
driver = "i40e"
netdev = "enp{bus}s0f0"
mac = "3c:fd:fe:a0:00:00"
serial = "3c-fd-fe-ff-ff-a0-00-00"
sriov_totalvfs = 64
vf_device = "154c"
vf_driver = "iavf"
vf_offset = 16
[[functions]]
address = "{e1000e}"
vendor = "8086"
device = "10d3"
driver = "e1000e"
netdev = "enp{bus2}s0"
mac = "00:1b:21:00:00:af"
[[routes]]
dev = "eno1"
gateway = "192.0.2.1"
"""


def topology(x710: str, e1000e: str) -> str:
    return MOVED_FROM.format(x710=x710, e1000e=e1000e, bus=int(x710[5:7], 16), bus2=int(e1000e[5:7], 16))


async def reboot_into(make_sim, old, topology_text: str):
    new = make_sim(topology_text)
    new.paths.state_dir.mkdir(parents=True, exist_ok=True)
    (new.paths.state_dir / "state.json").write_bytes((old.paths.state_dir / "state.json").read_bytes())
    new.engine.store = type(new.engine.store)(new.paths.state_dir)
    new.engine.refresh()
    return new


async def test_a_moved_card_is_followed_with_its_vfs(make_sim):
    before = make_sim(topology("0000:3b:00.0", "0000:af:00.0"))
    await before.engine.set_vf_count("0000:3b:00.0", 3, driver="vfio-pci")
    await before.engine.bind("0000:3b:02.1", "pci-stub")  # a VF desire of its own
    await before.engine.bind("0000:af:00.0", "vfio-pci")  # no serial, MAC only while on e1000e
    after = await reboot_into(make_sim, before, topology("0000:d8:00.0", "0000:af:00.0"))
    results = await reconcile_rows(after.engine)
    assert ("0000:3b:00.0", "follow", "ok: now at 0000:d8:00.0") in results
    assert ("0000:3b:02.1", "follow", "ok: now at 0000:d8:02.1") in results
    assert after.numvfs("0000:d8:00.0") == 3
    assert [after.driver(vf) for vf in after.vfs("0000:d8:00.0")] == ["vfio-pci", "pci-stub", "vfio-pci"]
    devices = json.loads(after.state_json().read_text())["devices"]
    assert set(devices) == {"0000:d8:00.0", "0000:d8:02.1", "0000:af:00.0"}
    assert devices["0000:d8:02.1"]["identity"]["physfn"] == "0000:d8:00.0"
    assert await reconcile_rows(after.engine) == []


async def test_a_different_card_at_the_address_is_refused_and_the_old_one_followed_if_found(make_sim):
    before = make_sim(topology("0000:3b:00.0", "0000:af:00.0"))
    await before.engine.set_vf_count("0000:3b:00.0", 2, driver="vfio-pci")
    # The X710 and the e1000e swapped slots: neither desire is at home, both are followed.
    after = await reboot_into(make_sim, before, topology("0000:af:00.0", "0000:3b:00.0"))
    results = await reconcile_rows(after.engine)
    assert ("0000:3b:00.0", "follow", "ok: now at 0000:af:00.0") in results
    assert after.numvfs("0000:af:00.0") == 2 and after.driver("0000:3b:00.0") == "e1000e"


# ------------------------------------------------------------------- the undo journal
async def test_changes_leave_no_journal_entry(sim):
    await sim.engine.set_vf_count(PF, 2, driver="vfio-pci")
    await sim.engine.bind(NIC, "vfio-pci")
    assert json.loads((sim.paths.runtime_dir / "journal.json").read_text())["entries"] == []


async def test_recovery_rolls_back_an_interrupted_vf_count_change(make_sim):
    sim = make_sim(write_timeout=5.0)  # re-creating 4 VFs on a loaded machine can take 0.2 s
    await sim.engine.set_vf_count(PF, 4, persist=False)
    engine = sim.engine
    before = engine.host.function(PF)
    engine.journal.begin("vf-count", {PF: DeviceBefore(before, ["iavf"] * 4)}, target={"num_vfs": 8})
    sim.kernel.write(sim.dir(PF) / "sriov_numvfs", "0")  # ... and the daemon died here
    sim.kernel.write(sim.dir(PF) / "sriov_drivers_autoprobe", "0")
    await sim.engine.quiesce()
    lines = await recover(engine.view, engine.ops)
    assert len(lines) == 1 and lines[0].startswith("rolled back vf-count of 0000:3b:00.0")
    assert sim.vfs(PF) == VFS and [sim.driver(vf) for vf in VFS] == ["iavf"] * 4 and sim.autoprobe(PF) == "1"
    assert engine.journal.pending() == []


async def test_recovery_rolls_back_an_interrupted_bind(sim):
    before = sim.engine.host.function(NIC)
    sim.engine.journal.begin("bind", {NIC: DeviceBefore(before)}, target={"driver": "vfio-pci"})
    sim.kernel.write(sim.dir(NIC) / "driver_override", "vfio-pci\n")
    sim.kernel.write(sim.paths.sys / "bus/pci/drivers/e1000e/unbind", NIC)  # died before drivers_probe
    assert sim.driver(NIC) == ""
    await recover(sim.engine.view, sim.engine.ops)
    assert (sim.driver(NIC), sim.override(NIC)) == ("e1000e", "")


async def test_a_prepare_whose_lease_was_written_is_finished_not_rolled_back(sim):
    before = sim.engine.host.function(PF2)
    lease = await sim.engine.prepare("vm-a", VM_A, [PF2])
    assert lease is not None
    sim.engine.journal.begin("prepare", {PF2: DeviceBefore(before)}, vm_uuid=VM_A)
    [line] = await recover(sim.engine.view, sim.engine.ops)
    assert line.startswith("finished prepare") and sim.driver(PF2) == "vfio-pci"


async def test_an_unreadable_journal_is_set_aside(sim):
    path = sim.paths.runtime_dir / "journal.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{garbage")
    from nicpassd.engine.journal import Journal

    assert Journal(sim.paths.runtime_dir).pending() == []
    # kept under a name of its own (issue 19: a second broken journal must not overwrite the first)
    assert [p.read_text() for p in sim.paths.runtime_dir.glob("journal.json.broken-*")] == ["{garbage"]


async def test_an_unreadable_journal_leaves_the_devices_it_names_alone(make_sim):
    """Issue 19: fail closed. A device an unreadable journal names may be half-way through a
    change: the reconciler leaves it alone (its Drift says why) until an admin gives it a state."""
    sim = make_sim()
    want(sim, NIC, driver="vfio-pci")
    path = sim.paths.runtime_dir / "journal.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"version": 1, "entries": [{"id": "x", "kind": "bind", "devices": {"' + NIC + '": {')
    engine = sim.restart()
    rows = [outcome.row for outcome in await engine.reconcile()]
    assert rows == [(NIC, "check", "skipped: 0000:af:00.0 (enp175s0f0) is left as it is: the undo journal was "
                     f"unreadable (kept as {engine.journal.broken_as}); it may be half-way through a change")]
    assert sim.driver(NIC) == "e1000e"
    await engine.bind(NIC, "vfio-pci")  # the admin gives it its state: that ends the hold
    assert sim.driver(NIC) == "vfio-pci" and NIC not in engine.holds


async def test_recovery_takes_back_an_override_written_just_before_the_crash(sim):
    
    make_vfs(sim, 3)  # on iavf
    sim.engine.journal.begin("vf-count", sim.engine.ops.before_of([PF]), target={"num_vfs": 3, "vf_driver": "vfio-pci"})
    sim.kernel.write(sim.dir(VFS[0]) / "driver_override", "vfio-pci\n")  # killed right after this write
    await recover(sim.engine.view, sim.engine.ops)
    assert [(sim.driver(vf), sim.override(vf)) for vf in VFS[:3]] == [("iavf", "")] * 3
