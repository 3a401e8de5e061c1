"""Leases (nicpassd/engine/leasing.py, leases.py) through the engine, judged by the kernel tree.

Default host: PFs 3b:00.0 (enp59s0f0, VFs 3b:02.x) and 3b:00.1 (i40e), 5e:00.0 (mlx5), e1000e
af:00.0 sharing IOMMU group 40 with the USB controller af:00.1, management eno1/eno2 (protected).
Stale leases are reclaimed by a timer (reservations) and by pidfds (QEMU processes): the tests use
real short-lived processes as "QEMU".
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import pytest

from nicpassd.engine.config import ReleaseSettings
from nicpassd.engine.leases import Lease, LeaseTable
from nicpassd.engine.lease_watch import STATE_EXPIRED, STATE_VM_GONE
from nicpassd.host.procfs import process_start_time
from nicpassd.errors import Busy, InvalidArgument, KernelError, NotFound, Protected

PF, PF2, MLX = "0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0"
VFS = [f"0000:3b:02.{n}" for n in range(8)]
NIC, USB = "0000:af:00.0", "0000:af:00.1"
ENO1 = "0000:01:00.0"
VM_A, VM_B = "6f1c2d3e-0000-4000-8000-00000000000a", "6f1c2d3e-0000-4000-8000-00000000000b"


async def with_vfs(sim, count: int = 4) -> None:
    await sim.engine.set_vf_count(PF, count, persist=False)
    sim.writer.clear()


def lease_events(sim) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    sim.engine.lease_listeners.append(lambda lease, state: events.append((lease.vm_uuid, state)))
    return events


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)




WRITE_TIMEOUT = 5.0  # nothing here tests timeouts: a loaded machine must not turn writes into Timeout


@pytest.fixture
async def sim(make_sim):
    sim = make_sim(write_timeout=WRITE_TIMEOUT)
    yield sim
    sim.engine.leasing.close()


# ------------------------------------------------------------------------ the lease table
def test_lease_file_round_trips_and_tolerates_older_and_newer_formats(tmp_path):
    table = LeaseTable(tmp_path)
    lease = table.add("web", VM_A, [VFS[1], VFS[0]], expires=123.0, changes={VFS[0]: {"driver": "iavf",
                                                                                      "driver_override": ""}})
    again = LeaseTable(tmp_path)
    assert again.leases == {lease.lease_id: lease} and lease.devices == [VFS[0], VFS[1]]
    data = json.loads((tmp_path / "leases.json").read_text())
    assert data["version"] == 2
    # version 1 (no pid_start/pidfile/changes) and unknown future fields load
    data["leases"][0].pop("changes")
    data["leases"][0]["from_the_future"] = 1
    data["version"] = 1
    (tmp_path / "leases.json").write_text(json.dumps(data))
    loaded = LeaseTable(tmp_path).leases[lease.lease_id]
    assert loaded.changes == {} and loaded.devices == lease.devices


def test_a_lease_file_claiming_a_device_twice_keeps_the_first_holder(tmp_path):
    first = Lease("a", "web", VM_A, [VFS[0]])
    second = Lease("b", "db", VM_B, [VFS[0], VFS[1]])
    (tmp_path / "leases.json").write_text(json.dumps({"version": 2, "leases": [first.__dict__, second.__dict__]}))
    assert LeaseTable(tmp_path).holder() == {VFS[0]: VM_A}


def test_the_table_refuses_a_double_lease_itself(tmp_path):
    table = LeaseTable(tmp_path)
    table.add("web", VM_A, [VFS[0]], expires=0)
    with pytest.raises(ValueError, match="already leased"):
        table.add("db", VM_B, [VFS[0]], expires=0)


def test_an_unreadable_lease_file_is_ignored(tmp_path):
    (tmp_path / "leases.json").write_text("{not json")
    assert LeaseTable(tmp_path).leases == {}


# --------------------------------------------------------------------------------- prepare
async def test_prepare_is_a_reservation_that_records_what_it_changed(sim):
    await with_vfs(sim)
    lease = await sim.engine.prepare("web", VM_A, [VFS[0], "enp59s0f0v1"])
    assert lease.state == "reserved" and 110 < lease.expires - time.time() <= 120
    assert [sim.driver(vf) for vf in VFS[:2]] == ["vfio-pci"] * 2
    assert lease.changes == {VFS[0]: {"driver": "iavf", "driver_override": ""},
                             VFS[1]: {"driver": "iavf", "driver_override": ""}}
    stored = json.loads((sim.paths.runtime_dir / "leases.json").read_text())["leases"][0]
    assert stored["changes"] == lease.changes and stored["vm_uuid"] == VM_A


async def test_prepare_guard_checks_every_device_and_changes_nothing_when_one_is_protected(sim):
    await with_vfs(sim)
    with pytest.raises(Protected):
        await sim.engine.prepare("web", VM_A, [VFS[0], ENO1])
    assert sim.driver(VFS[0]) == "iavf" and sim.writer.calls == [] and sim.engine.leases.leases == {}


async def test_prepare_is_all_or_nothing_when_the_kernel_fails(sim):
    await with_vfs(sim)
    sim.kernel.fail_binds_silently(VFS[2])
    with pytest.raises(KernelError, match="no device was leased"):
        await sim.engine.prepare("web", VM_A, VFS[:3])
    assert [(sim.driver(vf), sim.override(vf)) for vf in VFS[:3]] == [("iavf", "")] * 3
    assert sim.engine.leases.leases == {}


async def test_a_device_leased_to_one_vm_is_busy_for_every_other(sim):
    await with_vfs(sim)
    await sim.engine.prepare("web", VM_A, [VFS[0]])
    sim.writer.clear()
    with pytest.raises(Busy, match=VM_A):
        await sim.engine.prepare("db", VM_B, [VFS[1], VFS[0]])
    assert sim.writer.calls == [] and sim.driver(VFS[1]) == "iavf"
    assert sim.engine.views[VFS[0]].leased_to == VM_A and sim.engine.views[VFS[1]].leased_to == ""


async def test_an_iommu_group_belongs_to_one_vm(sim):
    # af:00.0 and af:00.1 share group 40: a VM taking the NIC and another taking the USB controller
    # could never both run (VFIO attaches a group to one container).
    await sim.engine.prepare("web", VM_A, [NIC, USB])
    await sim.engine.release(VM_A)  # both stay on vfio-pci ("keep")
    await sim.engine.prepare("web", VM_A, [NIC])
    with pytest.raises(Busy, match=f"IOMMU group of {USB}.*in use by VM {VM_A}"):
        await sim.engine.prepare("db", VM_B, [USB])


async def test_a_multifunction_card_with_a_shared_group_is_viable_when_passed_whole(sim):
    with pytest.raises(Protected, match="not viable"):
        await sim.engine.prepare("web", VM_A, [NIC])
    lease = await sim.engine.prepare("web", VM_A, [NIC, USB])
    assert lease.devices == [NIC, USB] and (sim.driver(NIC), sim.driver(USB)) == ("vfio-pci", "vfio-pci")


async def test_group_takes_the_unprotected_group_mates_along(sim):
    lease = await sim.engine.prepare("router", VM_A, [NIC], group=True)
    assert lease.devices == [NIC, USB] and (sim.driver(NIC), sim.driver(USB)) == ("vfio-pci", "vfio-pci")
    await sim.engine.release(VM_A)
    with pytest.raises(Protected, match="IOMMU group 14: member 0000:01:00.0 .*protected"):  # eno2 -> eno1
        await sim.engine.prepare("oops", VM_B, ["0000:01:00.1"], group=True)
    assert sim.driver(ENO1) == "igb" and sim.engine.leases.holder() == {}


async def test_prepare_rereads_what_it_decides_on_not_the_whole_host(sim, monkeypatch):
    """The named devices and their IOMMU group come fresh from the kernel, even with their uevent
    still in flight; every other function is known from events (no full re-read per Prepare)."""
    await with_vfs(sim)
    await sim.engine.prepare("warm", VM_B, [VFS[0]])  # loads vfio-pci (an event that re-reads all)
    await until(lambda: not sim.engine.view.inventory.dirty)

    def full():
        raise AssertionError("Prepare re-read every PCI function")

    monkeypatch.setattr(sim.engine.view.inventory, "full", full)
    sim.kernel.write(sim.paths.pci_drivers / "xhci_hcd" / "unbind", USB)  # its uevent is not handled yet
    assert sim.engine.views[USB].driver == "xhci_hcd"
    lease = await sim.engine.prepare("router", VM_A, [NIC])  # the group is viable now: USB has no driver
    assert lease.devices == [NIC] and sim.driver(NIC) == "vfio-pci" and sim.driver(USB) == ""
    assert sim.engine.views[USB].driver == ""


async def test_skip_unmanaged_leaves_out_what_nicpassd_does_not_manage(sim):
    await with_vfs(sim)
    lease = await sim.engine.prepare("web", VM_A, ["0000:65:00.0", VFS[0]], skip_unmanaged=True)  # 65:00.0: a GPU
    assert lease.devices == [VFS[0]]
    with pytest.raises(NotFound):
        await sim.engine.prepare("web", VM_A, ["0000:65:00.0", VFS[0]])
    assert await sim.engine.prepare("gpu-only", VM_B, ["0000:65:00.0"], skip_unmanaged=True) is None
    with pytest.raises(InvalidArgument):  # a malformed name is still an error
        await sim.engine.prepare("web", VM_A, ["garbage!"], skip_unmanaged=True)
    with pytest.raises(NotFound):  # and so is an interface that is not there: only addresses are skipped
        await sim.engine.prepare("web", VM_A, ["eth99"], skip_unmanaged=True)


async def test_preparing_the_same_vm_again_replaces_its_lease_and_keeps_what_to_restore(make_sim):
    sim = make_sim(release_policy="restore", write_timeout=WRITE_TIMEOUT)
    await with_vfs(sim)
    await sim.engine.prepare("web", VM_A, VFS[:2])
    lease = await sim.engine.prepare("web", VM_A, VFS[1:3])  # a retried start with another set
    assert list(sim.engine.leases.leases) == [lease.lease_id]
    assert lease.changes[VFS[1]] == {"driver": "iavf", "driver_override": ""}  # carried over
    assert sim.driver(VFS[0]) == "iavf"  # dropped from the set: released with the policy
    await sim.engine.release(VM_A)
    assert [sim.driver(vf) for vf in VFS[:3]] == ["iavf"] * 3


async def test_vf_count_of_a_pf_with_a_leased_vf_cannot_change(sim):
    await with_vfs(sim)
    await sim.engine.prepare("web", VM_A, [VFS[3]])
    with pytest.raises(Busy):
        await sim.engine.set_vf_count(PF, 0)
    assert sim.numvfs(PF) == 4


async def test_fifty_concurrent_prepares_never_double_lease(sim):
    await with_vfs(sim, 8)
    rng = random.Random(6)
    requests = [(f"vm{i}", f"00000000-0000-4000-8000-{i:012d}", rng.sample(VFS, rng.randint(1, 3)))
                for i in range(50)]
    results = await asyncio.gather(*(sim.engine.prepare(*request) for request in requests), return_exceptions=True)
    granted = [(request, result) for request, result in zip(requests, results) if isinstance(result, Lease)]
    assert all(isinstance(result, (Lease, Busy)) for result in results), results
    owners: dict[str, str] = {}
    for (_, vm_uuid, devices), lease in granted:
        assert sorted(devices) == lease.devices
        for device in devices:
            assert device not in owners, f"{device} leased to {owners[device]} and {vm_uuid}"
            owners[device] = vm_uuid
    assert sim.engine.leases.holder() == owners and owners
    assert all(sim.driver(device) == "vfio-pci" for device in owners)


# --------------------------------------------------------------------------------- activate
async def test_activate_ties_the_lease_to_the_qemu_process(sim, qemu):
    await with_vfs(sim)
    events = lease_events(sim)
    process = qemu()
    await sim.engine.prepare("web", VM_A, [VFS[0]])
    lease = await sim.engine.activate(VM_A, pid=process.pid)
    assert (lease.state, lease.expires, lease.pid) == ("active", 0.0, process.pid)
    assert lease.pid_start == process_start_time(process.pid) > 0
    assert events == [(VM_A, "reserved"), (VM_A, "active")]
    assert sim.engine.leasing.watch._timer is None  # no reservation left to time out


async def test_activate_without_a_lease_or_with_a_dead_pid_is_refused(sim, qemu):
    with pytest.raises(NotFound, match="holds no lease"):
        await sim.engine.activate(VM_A, pid=os.getpid())
    await with_vfs(sim)
    await sim.engine.prepare("web", VM_A, [VFS[0]])
    process = qemu()
    process.kill()
    process.wait()
    with pytest.raises(InvalidArgument, match="not running"):
        await sim.engine.activate(VM_A, pid=process.pid)


async def test_activate_reads_the_pidfile_given_at_prepare(sim, qemu):
    await with_vfs(sim)
    process = qemu()
    pidfile = sim.paths.under("/run/libvirt/qemu/web.pid")
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{process.pid}\n")
    await sim.engine.prepare("web", VM_A, [VFS[0]], pidfile="/run/libvirt/qemu/web.pid")
    assert (await sim.engine.activate(VM_A)).pid == process.pid


async def test_the_exit_of_qemu_ends_the_lease_through_its_pidfd(make_sim, qemu):
    sim = make_sim(release_policy="restore", write_timeout=WRITE_TIMEOUT)
    await with_vfs(sim)
    events = lease_events(sim)
    process = qemu()
    await sim.engine.prepare("web", VM_A, [VFS[0]], pid=process.pid)  # pid at prepare: active at once
    assert sim.engine.leases.of_vm(VM_A)[0].state == "active"
    process.kill()
    process.wait()
    await until(lambda: events[-1] == (VM_A, STATE_VM_GONE))
    assert sim.engine.leases.leases == {} and sim.driver(VFS[0]) == "iavf"
    assert sim.engine.leasing.watch._watches == {}
    await sim.engine.release(VM_A)  # libvirt's release end comes afterwards: harmless


# ---------------------------------------------------------------------------- expiry
async def test_an_unused_reservation_expires_on_one_timer(sim):
    await with_vfs(sim)
    events = lease_events(sim)
    loop = asyncio.get_running_loop()
    await sim.engine.prepare("web", VM_A, [VFS[0]], reservation=0.3)
    await sim.engine.prepare("db", VM_B, [VFS[1]], reservation=5)
    leasing = sim.engine.leasing
    assert leasing.watch._timer is not None and leasing.watch._timer_at == sim.engine.leases.leases[
        next(iter(sim.engine.leases.leases))].expires  # armed for the earliest expiry only
    assert [handle for handle in loop._scheduled if not handle.cancelled()].count(leasing.watch._timer) == 1
    await until(lambda: (VM_A, STATE_EXPIRED) in events)
    assert sim.engine.leases.holder() == {VFS[1]: VM_B}
    assert leasing.watch._timer is not None and abs(leasing.watch._timer_at - sim.engine.leases.of_vm(VM_B)[0].expires) < 1e-6
    await sim.engine.release(VM_B)
    assert leasing.watch._timer is None  # nothing left to expire: no wakeups at all


async def test_an_expired_reservation_whose_qemu_runs_is_adopted_not_pulled(sim, qemu):
    await with_vfs(sim)
    process = qemu()
    pidfile = sim.paths.under("/run/libvirt/qemu/web.pid")
    pidfile.parent.mkdir(parents=True)
    await sim.engine.prepare("web", VM_A, [VFS[0]], pidfile="/run/libvirt/qemu/web.pid", reservation=0.3)
    pidfile.write_text(f"{process.pid}\n")  # QEMU started, but the started hook never reached us
    await until(lambda: sim.engine.leases.of_vm(VM_A)[0].state == "active")
    assert sim.engine.leases.of_vm(VM_A)[0].pid == process.pid and sim.driver(VFS[0]) == "vfio-pci"


# ------------------------------------------------------------------------ release policy
async def test_release_keeps_devices_on_vfio_by_default_and_is_idempotent(sim):
    await with_vfs(sim)
    await sim.engine.prepare("web", VM_A, [VFS[0]])
    assert [lease.vm_uuid for lease in await sim.engine.release(VM_A)] == [VM_A]
    assert sim.driver(VFS[0]) == "vfio-pci" and sim.engine.views[VFS[0]].leased_to == ""
    assert await sim.engine.release(VM_A) == []


async def test_restore_gives_back_only_what_nicpassd_changed(make_sim):
    sim = make_sim(release_policy="restore", write_timeout=WRITE_TIMEOUT)
    await with_vfs(sim)
    await sim.engine.bind(VFS[1], "vfio-pci", persist=False)  # on vfio-pci before the VM came
    sim.writer.clear()
    await sim.engine.prepare("web", VM_A, VFS[:2])
    await sim.engine.release(VM_A)
    assert (sim.driver(VFS[0]), sim.override(VFS[0])) == ("iavf", "")
    assert (sim.driver(VFS[1]), sim.override(VFS[1])) == ("vfio-pci", "vfio-pci")  # untouched


async def test_per_device_policy_overrides_and_persisted_vfio_devices_are_kept(make_sim):
    sim = make_sim(write_timeout=WRITE_TIMEOUT)
    sim.engine.config = sim.config.model_copy(update={"release": ReleaseSettings(
        policy="restore", devices={"3b:02.2": "keep"})})
    await with_vfs(sim)
    await sim.engine.bind(VFS[1], "vfio-pci")  # persisted for vfio
    await sim.engine.bind(VFS[1], "", persist=False)  # ... but on its host driver right now
    await sim.engine.prepare("web", VM_A, VFS[:3])
    assert [sim.engine.leasing.policy_for(vf) for vf in VFS[:3]] == ["restore", "keep", "keep"]
    await sim.engine.release(VM_A)
    assert [sim.driver(vf) for vf in VFS[:3]] == ["iavf", "vfio-pci", "vfio-pci"]

    sim.engine.config = sim.config.model_copy(update={"release": ReleaseSettings(
        policy="keep", devices={"0000:3b:02.3": "restore"})})
    await sim.engine.prepare("web", VM_A, [VFS[3]])
    await sim.engine.release(VM_A)
    assert sim.driver(VFS[3]) == "iavf"


async def test_a_failed_restore_is_logged_and_the_lease_still_ends(make_sim, caplog):
    sim = make_sim(release_policy="restore", write_timeout=WRITE_TIMEOUT)
    await with_vfs(sim)
    await sim.engine.prepare("web", VM_A, [VFS[0]])
    sim.kernel.fail_binds_silently(VFS[0])
    await sim.engine.release(VM_A)
    assert sim.engine.leases.leases == {}
    assert "release of 0000:3b:02.0" in caplog.text


# ------------------------------------------------------------------------ daemon restart
async def test_leases_survive_a_daemon_restart_and_timers_and_pidfds_are_rearmed(sim, qemu):
    await with_vfs(sim)
    running, dying = qemu(), qemu()
    await sim.engine.prepare("web", VM_A, [VFS[0]], pid=running.pid)
    await sim.engine.prepare("db", VM_B, [VFS[1]], pid=dying.pid)
    await sim.engine.prepare("new", "00000000-0000-4000-8000-00000000000c", [VFS[2]], reservation=30)
    sim.engine.leasing.close()
    dying.kill()
    dying.wait()  # the VM died while nicpassd was down

    engine = sim.restart()
    events = lease_events(sim)
    assert engine.views[VFS[1]].leased_to == VM_B  # as loaded
    engine.leasing.start()
    await until(lambda: VM_B not in engine.leases.holder().values())
    assert events == [(VM_B, STATE_VM_GONE)]
    assert engine.leases.holder() == {VFS[0]: VM_A, VFS[2]: "00000000-0000-4000-8000-00000000000c"}
    assert list(engine.leasing.watch._watches) == [engine.leases.of_vm(VM_A)[0].lease_id]
    assert engine.leasing.watch._timer is not None
    running.kill()
    running.wait()
    await until(lambda: VM_A not in engine.leases.holder().values())


async def test_a_reused_pid_is_not_mistaken_for_the_vm(sim, qemu):
    await with_vfs(sim)
    process = qemu()
    await sim.engine.prepare("web", VM_A, [VFS[0]], pid=process.pid)
    lease = sim.engine.leases.of_vm(VM_A)[0]
    lease.pid_start -= 1  # as if the PID now belonged to a younger process
    sim.engine.leases.update(lease)
    engine = sim.restart()
    engine.leasing.start()
    await until(lambda: not engine.leases.leases)


async def test_a_reservation_that_expired_while_the_daemon_was_down_is_reclaimed_at_start(sim):
    await with_vfs(sim)
    await sim.engine.prepare("web", VM_A, [VFS[0]], reservation=0.05)
    sim.engine.leasing.close()
    await asyncio.sleep(0.1)
    engine = sim.restart()
    events = lease_events(sim)
    engine.leasing.start()
    await until(lambda: events == [(VM_A, STATE_EXPIRED)])


# ------------------------------------------------------------------------ undo journal
async def test_prepare_is_journaled_until_its_lease_is_written(sim, monkeypatch):
    await with_vfs(sim)
    seen = []
    add = sim.engine.leases.add

    def add_and_look(*args, **kwargs):
        (entry,) = sim.engine.journal.pending()  # still open while the lease is written
        seen.append((entry.kind, entry.vm_uuid, sorted(entry.devices), entry.devices[VFS[0]].function.driver))
        return add(*args, **kwargs)

    monkeypatch.setattr(sim.engine.leases, "add", add_and_look)
    await sim.engine.prepare("web", VM_A, VFS[:2])
    assert seen == [("prepare", VM_A, VFS[:2], "iavf")]
    assert sim.engine.journal.pending() == []


@pytest.mark.parametrize("lease_written", [False, True])
async def test_a_crash_during_prepare_is_undone_or_finished_at_the_next_start(sim, monkeypatch, lease_written):
    from nicpassd.engine.recovery import recover

    await with_vfs(sim)
    async def dies(entry) -> None:  # the process dies: the entry is never finished
        return None

    monkeypatch.setattr(sim.engine.journal, "finish", dies)
    if not lease_written:
        def crash(*args, **kwargs):
            raise RuntimeError("killed before the lease was written")
        monkeypatch.setattr(sim.engine.leases, "add", crash)
        with pytest.raises(RuntimeError):
            await sim.engine.prepare("web", VM_A, VFS[:2])
    else:
        await sim.engine.prepare("web", VM_A, VFS[:2])
    assert [entry.kind for entry in sim.engine.journal.pending()] == ["prepare"]
    assert [sim.driver(vf) for vf in VFS[:2]] == ["vfio-pci"] * 2

    engine = sim.restart()
    await recover(engine.view, engine.ops)
    assert engine.journal.pending() == []
    if lease_written:  # finished: the VM keeps its devices
        assert engine.leases.holder() == {VFS[0]: VM_A, VFS[1]: VM_A}
        assert [sim.driver(vf) for vf in VFS[:2]] == ["vfio-pci"] * 2
    else:  # rolled back to the host driver
        assert engine.leases.holder() == {}
        assert [(sim.driver(vf), sim.override(vf)) for vf in VFS[:2]] == [("iavf", "")] * 2


# ------------------------------------------------------------------ a lease file that is lost
@pytest.mark.parametrize("damage", ["truncated", "wrong type", "bad state", "bad device"])
async def test_an_unreadable_lease_file_fails_closed(sim, damage):
    """Issue 19: a corrupt lease file handed a VM's device to a second VM. Now the file is kept
    aside, every device it names stays held by UNKNOWN_VM (also across a restart), a second VM is
    refused, and an admin's release frees them."""
    from nicpassd.engine.leases import UNKNOWN_VM

    await with_vfs(sim)
    await sim.engine.prepare("vm1", VM_A, [VFS[0]])
    path = sim.paths.runtime_dir / "leases.json"
    text = path.read_text()
    damaged = {"truncated": text[: len(text) // 2],
               "wrong type": text.replace('"expires": ', '"expires": "soon", "x": '),
               "bad state": text.replace('"reserved"', '"borrowed"'),
               "bad device": text.replace(VFS[0], VFS[0] + "/../x")}[damage]
    path.write_text(damaged)
    engine = sim.restart()
    broken = [p for p in sim.paths.runtime_dir.iterdir() if p.name.startswith("leases.json.broken-")]
    assert len(broken) == 1 and broken[0].read_text() == damaged  # kept, never overwritten
    assert engine.leases.holder() == {VFS[0]: UNKNOWN_VM}
    with pytest.raises(Busy, match=f"leased to VM .*{UNKNOWN_VM}"):
        await engine.prepare("vm2", VM_B, [VFS[0]])
    assert sim.restart().leases.holder() == {VFS[0]: UNKNOWN_VM}  # the hold was written: still there
    await sim.engine.release(UNKNOWN_VM)
    await sim.engine.prepare("vm2", VM_B, [VFS[0]])
    assert sim.engine.leases.holder() == {VFS[0]: VM_B}


@pytest.mark.parametrize("vm_uuid", ["../../x", "a/b", "", " ", "x" * 200, "pve-1..2"])
async def test_prepare_takes_only_vm_ids(sim, vm_uuid):
    """Issue 19: PrepareDomain leased under a <uuid> of ../../x. A VM id is a UUID or letters,
    digits and . _ : - (Proxmox's pve-VMID); nothing is changed for anything else."""
    await with_vfs(sim)
    with pytest.raises(InvalidArgument):
        await sim.engine.prepare("web", vm_uuid, [VFS[0]])
    assert sim.driver(VFS[0]) == "iavf" and sim.engine.leases.leases == {}
    lease = await sim.engine.prepare("web", "pve-101", [VFS[0]])
    assert lease.vm_uuid == "pve-101"
