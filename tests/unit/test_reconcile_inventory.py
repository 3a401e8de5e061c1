"""The incremental inventory (nicpassd/host/inventory.py) the reconciler runs on: after any kernel
change, re-reading only what the uevents named gives exactly what a full ``read_snapshot`` gives."""

from __future__ import annotations

import dataclasses
import errno
import os
import random

import pytest

from nicpassd.host import sysfs, vf_netlink
from nicpassd.host.host import Host
from nicpassd.host.inventory import Inventory
from nicpassd.sim.topology import Route

PFS = ["0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0"]


def differences(a, b) -> list[str]:
    out = []
    for field in dataclasses.fields(a):
        mine, theirs = getattr(a, field.name), getattr(b, field.name)
        if mine != theirs:
            if isinstance(mine, dict):
                keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                out.append(f"{field.name}: {[(k, mine.get(k), theirs.get(k)) for k in keys[:3]]}")
            else:
                out.append(f"{field.name}: {mine!r} != {theirs!r}")
    return out


class Driver:
    """Random kernel changes, each made the way something on the host would make it."""

    def __init__(self, sim, rng: random.Random) -> None:
        self.sim, self.rng = sim, rng
        self.unplugged: dict[str, object] = {}
        self.specs = {fn.address: fn for fn in sim.kernel.topology.functions}

    def write(self, relative: str, data: str) -> None:
        try:
            self.sim.kernel.write(self.sim.paths.sys / relative, data)
        except OSError as exc:
            assert exc.errno in (errno.EBUSY, errno.ENODEV, errno.ENOENT, errno.ERANGE, errno.EINVAL), exc

    def present(self) -> list[str]:
        return self.sim.kernel.devices()

    def step(self) -> str:
        sim, rng = self.sim, self.rng
        action = rng.choice(["vfs", "vfs", "bind", "hostbind", "unbind", "unplug", "plug", "route", "carrier", "vf", "vf",
                             "override"])
        pfs = [pf for pf in PFS if pf in self.present()]
        if action == "vfs" and pfs:
            pf = rng.choice(pfs)
            self.write(f"bus/pci/devices/{pf}/sriov_numvfs", "0")
            self.write(f"bus/pci/devices/{pf}/sriov_drivers_autoprobe", rng.choice("01"))
            self.write(f"bus/pci/devices/{pf}/sriov_numvfs", str(rng.randint(0, 6)))
            return f"unannounced {pf}"  # sriov_drivers_autoprobe raises no uevent either
        elif action in ("bind", "hostbind") and self.present():
            address = rng.choice(self.present())
            driver = "vfio-pci" if action == "bind" else ""
            sim.kernel.load_module("vfio-pci")
            self.write(f"bus/pci/devices/{address}/driver_override", driver + "\n")
            current = sim.driver(address)
            if current:
                self.write(f"bus/pci/drivers/{current}/unbind", address)
            self.write("bus/pci/drivers_probe", address)
        elif action == "unbind" and self.present():
            address = rng.choice(self.present())
            if sim.driver(address):
                self.write(f"bus/pci/drivers/{sim.driver(address)}/unbind", address)
        elif action == "unplug":
            candidates = [a for a in self.present() if a in self.specs and a != "0000:01:00.0"]
            if candidates:
                address = rng.choice(candidates)
                sim.kernel.unplug(address)
                self.unplugged[address] = self.specs[address]
        elif action == "plug" and self.unplugged:
            address = rng.choice(sorted(self.unplugged))
            sim.kernel.plug(self.unplugged.pop(address))
        elif action == "route":
            routes = [Route(dev="br0", dst="default", gateway="192.0.2.1")]
            if rng.random() < 0.5:
                routes.append(Route(dev="br0", dst="198.51.100.0/24"))
            sim.kernel.set_routes(routes)
        elif action == "carrier":
            name = rng.choice(sorted(sim.netdevs()))
            try:
                sim.kernel.set_carrier(name, rng.random() < 0.5)
            except (OSError, AttributeError):
                pass
        elif action == "vf":  # `ip link set PF vf N mac M`: rtnetlink, no uevent, an RTM_NEWLINK of the PF
            names = [next(iter(sorted(os.listdir(sim.dir(pf) / "net"))), "") for pf in self.present()
                     if (sim.dir(pf) / "virtfn0").exists() and (sim.dir(pf) / "net").is_dir()]
            if names:
                name = rng.choice(names)
                vfs = Host(sim.paths, sim.kernel).read_vf_settings(name)
                change = vf_netlink.VfChange(mac=f"02:00:00:00:{rng.randint(0, 255):02x}:{rng.randint(0, 255):02x}")
                for _setting, attribute in vf_netlink.vf_attributes(rng.randrange(len(vfs)), change, vfs[0]):
                    vf_netlink.check_ack(sim.kernel.netlink(vf_netlink.encode_set(name, attribute)))
        elif action == "override" and self.present():
            address = rng.choice(self.present())
            self.write(f"bus/pci/devices/{address}/driver_override", rng.choice(["pci-stub\n", "\n"]))
            return f"unannounced {address}"  # no uevent: the caller marks it, as the engine does
        return action


def vf_reader(ksim):
    return Host(ksim.paths, ksim.kernel).read_vf_settings


@pytest.mark.parametrize("seed", range(6))
def test_incremental_inventory_equals_a_full_read(ksim, seed):
    inventory = Inventory(ksim.paths, vf_settings=vf_reader(ksim))
    inventory.full()
    ksim.kernel.subscribe(inventory.note)  # synchronously, in the order the kernel raises them
    driver = Driver(ksim, random.Random(seed))
    for number in range(40):
        done = driver.step()
        if done.startswith("unannounced "):
            inventory.mark([done.split()[1]])
        incremental = inventory.update()
        full = Inventory(ksim.paths, vf_settings=vf_reader(ksim)).full()
        assert incremental == full, (number, done, differences(incremental, full))


def test_nothing_dirty_reads_nothing(ksim, monkeypatch):
    inventory = Inventory(ksim.paths)
    first = inventory.full()
    calls = []
    monkeypatch.setattr(sysfs, "read_function", lambda *a: calls.append(a))
    assert inventory.update() == first and calls == []


def test_an_unknown_kind_of_event_means_a_full_read(ksim):
    from nicpassd.host.events import UEvent

    inventory = Inventory(ksim.paths)
    inventory.full()
    inventory.note(UEvent("change", "block", "sda"))
    assert inventory.dirty
    ksim.kernel.write(ksim.dir("0000:3b:00.0") / "sriov_numvfs", "2")  # its events were not noted
    assert inventory.update() == Inventory(ksim.paths).full()


def test_identity_is_read_once_while_the_function_stays(ksim):
    """Issue 22: what cannot change while a function exists (ids, class, PF, IOMMU group, serial)
    is not read again at every event for it; a function that came or went is read in full."""
    from nicpassd.host.events import UEvent

    nic = "0000:af:00.0"
    inventory = Inventory(ksim.paths)
    inventory.full()
    # Behind the inventory's back (no kernel does this: it is how the test sees what is read).
    (ksim.dir(nic) / "subsystem_device").write_text("0xbeef\n")
    ksim.kernel.write(ksim.dir(nic) / "driver_override", "pci-stub\n")
    inventory.mark([nic])
    function = inventory.update().functions[nic]
    assert (function.subsystem_device_id, function.driver_override) == ("a01f", "pci-stub")  # ids kept
    inventory.note(UEvent("remove", "pci", nic))
    inventory.note(UEvent("add", "pci", nic))
    assert inventory.update().functions[nic].subsystem_device_id == "beef"  # a new device: read in full


def test_a_new_function_s_ids_come_from_its_add_event(ksim):
    """The ids of a function that came are those its "add" uevent carried (the kernel's
    PCI_ID, PCI_SUBSYS_ID and PCI_CLASS), not read from five sysfs files; without them, or for a
    function that went again, they are read."""
    from nicpassd.host.events import UEvent, pci_identity

    nic = "0000:af:00.0"
    inventory = Inventory(ksim.paths)
    inventory.full()
    # Behind the inventory's back (no kernel does this: it is how the test sees what is read).
    (ksim.dir(nic) / "subsystem_device").write_text("0xbeef\n")
    announced = pci_identity({"PCI_ID": "8086:10D3", "PCI_SUBSYS_ID": "8086:A01F", "PCI_CLASS": "20000"})
    assert announced == ("8086", "10d3", "8086", "a01f", "020000")
    inventory.note(UEvent("remove", "pci", nic))
    inventory.note(UEvent("add", "pci", nic, pci_identity=announced))
    function = inventory.update().functions[nic]
    assert (function.vendor_id, function.device_id, function.subsystem_vendor_id, function.subsystem_device_id,
            function.class_code) == announced
    inventory.note(UEvent("add", "pci", nic, pci_identity=announced))
    inventory.note(UEvent("remove", "pci", nic))  # went again before the refresh (and came back unannounced)
    inventory.note(UEvent("add", "pci", nic))
    assert inventory.update().functions[nic].subsystem_device_id == "beef"


@pytest.mark.parametrize("properties", [
    {}, {"PCI_ID": "8086:10D3", "PCI_SUBSYS_ID": "8086:A01F"}, {"PCI_ID": "8086", "PCI_SUBSYS_ID": "8086:A01F",
                                                                 "PCI_CLASS": "20000"},
    {"PCI_ID": "8086:10D3", "PCI_SUBSYS_ID": "8086:A01F", "PCI_CLASS": "2000000"},
    {"PCI_ID": "80 6:10D3", "PCI_SUBSYS_ID": "8086:A01F", "PCI_CLASS": "20000"},
    {"PCI_ID": "8086:10D3x", "PCI_SUBSYS_ID": "8086:A01F", "PCI_CLASS": "20000"}])
def test_ids_an_event_does_not_carry_as_the_kernel_writes_them_are_read_instead(properties):
    from nicpassd.host.events import pci_identity

    assert pci_identity(properties) == ()


def test_the_simulated_kernel_s_add_events_carry_the_ids_of_its_files(ksim):
    from nicpassd.host.events import UEvent

    events: list[UEvent] = []
    ksim.kernel.subscribe(events.append)
    ksim.kernel.write(ksim.dir(PFS[0]) / "sriov_numvfs", "2")
    added = [event for event in events if event.action == "add" and event.subsystem == "pci"]
    assert len(added) == 2
    for event in added:
        assert event.pci_identity == tuple(
            (ksim.dir(event.sys_name) / name).read_text().strip().removeprefix("0x")
            for name in ("vendor", "device", "subsystem_vendor", "subsystem_device", "class"))


def test_an_event_the_snapshot_already_shows_reads_nothing(ksim):
    """A bind or unbind nicpassd read back itself (its own change, under its lock) is not read
    again when udev announces it; any other driver, or an unknown function, is."""
    from nicpassd.host.events import UEvent

    inventory = Inventory(ksim.paths)
    inventory.full()
    inventory.note(UEvent("bind", "pci", "0000:af:00.0", "e1000e"))  # what the snapshot shows
    assert not inventory.dirty
    inventory.note(UEvent("bind", "pci", "0000:af:00.0", "vfio-pci"))  # not what it shows
    assert inventory.dirty
    inventory.update()
    inventory.note(UEvent("unbind", "pci", "0000:af:00.0", "e1000e"))  # it shows a driver
    assert inventory.dirty
    inventory.update()
    inventory.note(UEvent("bind", "pci", "0000:99:00.0", "igb"))  # unknown
    assert inventory.dirty


@pytest.mark.parametrize("seed", range(4))
def test_views_kept_between_refreshes_equal_views_built_afresh(ksim, tmp_path, seed):
    """``ViewBuilder`` keeps the view of a function whose inputs did not change: after random
    kernel changes and random changes of what is persisted, leased, noted and protected, its views
    are those a build from nothing gives."""
    from nicpassd.engine.config import GuardSettings
    from nicpassd.engine.guard import compute_protected
    from nicpassd.engine.store import DeviceDesire, StateStore, VfDesire, identity_of
    from nicpassd.engine.views import ViewBuilder, build_views

    rng = random.Random(seed)
    inventory = Inventory(ksim.paths, vf_settings=vf_reader(ksim))
    snapshot = inventory.full()
    ksim.kernel.subscribe(inventory.note)
    driver = Driver(ksim, rng)
    store = StateStore(tmp_path / "state")
    builder = ViewBuilder()
    leases: dict[str, str] = {}
    notes: dict[str, str] = {}
    kept, views = 0, {}
    for number in range(60):
        done = driver.step()
        if done.startswith("unannounced "):
            inventory.mark([done.split()[1]])
        snapshot = inventory.update()
        addresses = sorted(snapshot.functions)
        address = rng.choice(addresses)
        function = snapshot.functions[address]
        change = rng.choice(["persist", "persist", "forget", "lease", "note", "nothing"])
        if change == "persist":
            extra = {"num_vfs": rng.randint(0, 4), "vf_driver": rng.choice(["", "vfio-pci"]),
                     "vf_settings": {"0": VfDesire(mac="02:00:00:00:00:01", vlan=rng.randint(0, 9))}} \
                if function.sriov_capable else {}
            store.apply({address: DeviceDesire(address=address, identity=identity_of(function, snapshot),
                                               driver=rng.choice(["", "vfio-pci"]), **extra)})
        elif change == "forget":
            store.apply({address: None})
        elif change == "lease":
            leases = {address: f"vm{number}"} if rng.random() < 0.7 else {}
        elif change == "note":
            notes = {address: f"not applied: reason {number}"} if rng.random() < 0.7 else {}
        settings = GuardSettings(management_interfaces=tuple(rng.sample(sorted(snapshot.links), k=1)))
        protected = compute_protected(snapshot, settings)
        before, views = views, builder.build(snapshot, protected, store, leases, notes)
        kept += sum(1 for a, view in views.items() if before.get(a) is view)
        assert views == build_views(snapshot, protected, store, leases, notes), (number, done, change)
    assert kept  # the check above compared views that were kept, not only views built again
