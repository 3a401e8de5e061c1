"""An incremental ``HostSnapshot``: re-read only what uevents said changed.

``sysfs.read_snapshot`` reads every PCI function (≈0.1 ms each): fine for 70 functions, ~150 ms
on a host with 16 PFs × 64 VFs, on every burst of events. ``Inventory.update`` gives the same
snapshot ``read_snapshot`` would (that equivalence is what tests/unit/test_reconcile_inventory.py
checks after random kernel changes) from the previous one plus the devices named by events:

- a PCI event (add, remove, bind, unbind, change) re-reads that function, the PF of a VF that
  came or went (its ``virtfnN`` links and ``sriov_numvfs``), and the IOMMU group it is in;
- a net event re-reads that interface, the interfaces stacked with it, and the PCI function under
  it (its ``interfaces`` and permanent MAC); routes and addresses are re-read on net and route
  events;
- anything the events cannot vouch for (``mark_all``: a lost-event overflow, a write that emits no
  uevent) falls back to the full read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable

from nicpassd.host import sysfs
from nicpassd.host.sessions import read_sessions
from nicpassd.host.cluster import read_cluster
from nicpassd.host.storage import read_network_storage
from nicpassd.host.tunnels import read_tunnels
from nicpassd.host.events import UEvent
from nicpassd.host.model import HostSnapshot, NetLink, PciFunction, VfSettings
from nicpassd.paths import HostPaths
from nicpassd.stopwatch import lap

PCI_ACTIONS = ("add", "remove", "bind", "unbind", "change", "move")


def _network(class_code: str) -> bool:
    return class_code.lower().removeprefix("0x").startswith("02")


class Inventory:
    def __init__(self, paths: HostPaths, full: Callable[[], HostSnapshot] | None = None,
                 vf_settings: Callable[[str], tuple[VfSettings, ...]] | None = None) -> None:
        self.paths = paths
        self._read_full = full or (lambda: sysfs.read_snapshot(paths))
        self._read_vf_settings = vf_settings or (lambda interface: ())
        self.snapshot = HostSnapshot()
        self._classes: dict[str, str] = {}  # every PCI function present -> class (raw text)
        self._dirty_pci: set[str] = set()
        self._dirty_net: set[str] = set()
        self._network_changed = False
        self._devices_changed = False  # a PCI function came or went (root storage may have moved)
        self._replugged: set[str] = set()  # functions that came or went: their serial is read anew
        # The ids the "add" of a function that came carried (UEvent.pci_identity): not read again.
        self._announced: dict[str, tuple[str, ...]] = {}
        self._everything = True  # nothing read yet

    # ------------------------------------------------------------------ what changed
    def note(self, event: UEvent) -> None:
        if event.subsystem == "pci" and event.sys_name:
            if self._confirms(event):
                return
            self._dirty_pci.add(event.sys_name)
            if event.action in ("add", "remove"):
                self._devices_changed = True
                self._replugged.add(event.sys_name)
                if event.action == "add" and event.pci_identity:
                    self._announced[event.sys_name] = event.pci_identity
                else:
                    self._announced.pop(event.sys_name, None)
        elif event.subsystem == "net" and event.sys_name:
            self._dirty_net.add(event.sys_name)
            self._network_changed = True
        elif event.subsystem == "route":
            self._network_changed = True
            if event.sys_name:
                self._dirty_net.add(event.sys_name)
        else:
            self._everything = True

    def _confirms(self, event: UEvent) -> bool:
        """A bind or unbind that the snapshot already shows (read after it: the change that caused
        it was nicpassd's own, read back under its lock). Re-reading the function would read what
        is known, and on a real kernel each read of it may wait for the device's lock while its
        driver probes. Anything else (an unknown function, another driver) is read again."""
        if event.action not in ("bind", "unbind") or self._everything or event.sys_name in self._dirty_pci:
            return False
        function = self.snapshot.functions.get(event.sys_name)
        if function is None:
            return False
        return function.driver == (event.driver if event.action == "bind" else "")

    def mark(self, addresses: Iterable[str]) -> None:
        """Functions changed without a uevent (a driver_override or autoprobe write)."""
        self._dirty_pci.update(addresses)

    def mark_all(self) -> None:
        self._everything = True

    def mark_routing(self) -> None:
        """Routes, rules, addresses, tunnels and network storage re-read at the next ``update``:
        a few netlink dumps and /proc reads, what the guard's management path is built from."""
        self._network_changed = True

    @property
    def dirty(self) -> bool:
        return bool(self._everything or self._dirty_pci or self._dirty_net or self._network_changed)

    # ----------------------------------------------------------------------- reading
    def full(self) -> HostSnapshot:
        self._replugged.clear()
        self._announced.clear()
        self._dirty_pci.clear()
        self._dirty_net.clear()
        self._network_changed = self._devices_changed = False
        self._everything = False
        root = os.fspath(self.paths.pci_devices)
        addresses = os.listdir(root) if os.path.isdir(root) else []
        self._classes = {address: sysfs._read_str(f"{root}/{address}/class") for address in addresses}
        snapshot = self._read_full()
        self.snapshot = dataclasses.replace(snapshot, vf_settings=self._vf_settings(snapshot.functions, {}, set()))
        return self.snapshot

    def _vf_settings(self, functions: dict[str, PciFunction], previous: dict[str, tuple[VfSettings, ...]],
                     stale: set[str]) -> dict[str, tuple[VfSettings, ...]]:
        """The VF settings of each PF with VFs and a netdev (one RTM_GETLINK each): read for the
        PFs in ``stale`` (and those not read before), kept for the others. The kernel announces a
        change of them as a link change of the PF (RTM_NEWLINK), which marks it stale."""
        found: dict[str, tuple[VfSettings, ...]] = {}
        for address, function in functions.items():
            if not function.num_vfs or not function.interfaces:
                continue
            if address in previous and address not in stale:
                found[address] = previous[address]
            else:
                found[address] = self._read_vf_settings(function.interfaces[0])
        return found

    def update(self) -> HostSnapshot:
        if self._everything:
            return self.full()
        previous = self.snapshot
        dirty_pci, dirty_net = set(self._dirty_pci), set(self._dirty_net)
        network_changed, devices_changed = self._network_changed, self._devices_changed
        replugged = set(self._replugged)
        self._replugged.clear()
        announced, self._announced = self._announced, {}
        self._dirty_pci.clear()
        self._dirty_net.clear()
        self._network_changed = self._devices_changed = False

        # Interfaces first: a net event dirties the PCI function under the interface (its netdevs
        # and driver link only, unless something else named it: ``sysfs.reread_interfaces``).
        full = set(dirty_pci)  # read whole (what can change): named by pci events or marked
        links = dict(previous.links)
        if dirty_net:
            todo = set(dirty_net)
            for name in dirty_net:
                old = links.get(name)
                if old is not None:
                    todo.update(old.lowers)
                    todo.update(old.uppers)
                    if old.device:
                        dirty_pci.add(old.device)
            fresh: dict[str, NetLink | None] = {name: sysfs.read_link(self.paths, name) for name in todo}
            for link in [link for link in fresh.values() if link is not None]:
                for neighbour in (*link.lowers, *link.uppers):
                    if neighbour not in fresh:
                        fresh[neighbour] = sysfs.read_link(self.paths, neighbour)
            for name, link in fresh.items():
                if link is None:
                    links.pop(name, None)
                else:
                    links[name] = link
                    if link.device:
                        dirty_pci.add(link.device)

        groups = dict(previous.groups)
        functions = dict(previous.functions)
        fresh_functions: dict[str, PciFunction | None] = {}
        group_root = os.fspath(self.paths.iommu_groups)

        group_of = {member: number for number, members in groups.items() for member in members}

        def reread_group(number: int) -> None:
            try:
                members = tuple(sorted(os.listdir(f"{group_root}/{number}/devices")))
            except OSError:
                members = ()
            for member in groups.get(number, ()):
                if group_of.get(member) == number:
                    del group_of[member]
            if members:
                groups[number] = members
                group_of.update(dict.fromkeys(members, number))
            else:
                groups.pop(number, None)

        pending = set(dirty_pci)
        seen: set[str] = set()
        light: set[str] = set()  # read for a net event only (reread_interfaces)
        while pending:
            address = pending.pop()
            if address in seen and not (address in full and address in light):
                continue
            seen.add(address)
            light.discard(address)
            old = functions.get(address)
            # While a function stays, its identity (ids, class, PF, group, serial) stays: only what
            # can change is read again. A function that came or went is read in full.
            known = old if old is not None and address not in replugged else None
            if known is not None and address not in full:
                function = sysfs.reread_interfaces(self.paths, address, known)
                light.add(address)
            else:
                function = sysfs.read_function(self.paths, address, known=known,
                                               announced=announced.get(address) if known is None else None)
            fresh_functions[address] = function
            if old is not None and old.physfn and (known is None or function is None):
                pending.add(old.physfn)  # its PF lost or changed a virtfnN link
                full.add(old.physfn)
            if function is None:  # gone
                self._classes.pop(address, None)
                if address in group_of:
                    reread_group(group_of[address])
                continue
            self._classes[address] = function.class_code
            if function.physfn and known is None:
                pending.add(function.physfn)  # a VF that came: its PF has a new virtfnN link
                full.add(function.physfn)
            if address in group_of and group_of[address] != function.iommu_group:
                reread_group(group_of[address])  # it left that group
            if function.iommu_group >= 0:
                reread_group(function.iommu_group)

        # Which functions belong in the snapshot: NICs, their group mates, the PF of each VF.
        wanted = {address for address, text in self._classes.items() if _network(text)}
        for address in list(wanted):
            number = group_of.get(address)
            if number is not None:
                wanted.update(groups[number])
        result: dict[str, PciFunction] = {}
        for address in sorted(wanted):
            if address in fresh_functions:
                function = fresh_functions[address]
            elif address in functions:
                function = functions[address]
            else:
                function = sysfs.read_function(self.paths, address)
                fresh_functions[address] = function
            if function is not None:
                result[address] = function
        for function in list(result.values()):
            parent_address = function.physfn
            if parent_address and parent_address not in result:
                if parent_address in fresh_functions:
                    parent = fresh_functions[parent_address]
                elif parent_address in functions:
                    parent = functions[parent_address]
                else:
                    parent = sysfs.read_function(self.paths, parent_address)
                if parent is not None:
                    result[parent.address] = parent

        # A PF re-read is one whose VF settings may have changed: its link change (RTM_NEWLINK,
        # what the kernel sends after `ip link set PF vf N ...`) dirties it above.
        stale = {address for address, function in fresh_functions.items() if function is not None}
        vf_settings = self._vf_settings(result, previous.vf_settings, stale)
        lap("refresh: functions")
        changes: dict[str, object] = {"functions": result, "groups": groups, "links": links,
                                      "vf_settings": vf_settings}
        drivers = self.paths.pci_drivers
        changes["loaded_drivers"] = frozenset(os.listdir(drivers)) if drivers.is_dir() else frozenset()
        # Sessions come and go without an event of their own (only a closed one is announced):
        # one sock_diag dump per refresh keeps the admin's way in current for every guard check.
        changes["sessions"] = read_sessions(self.paths)
        lap("refresh: sessions")
        if network_changed:
            changes["routes"], changes["rules"] = sysfs.read_routing(self.paths)
            changes["tunnels"] = read_tunnels(self.paths)
            changes["network_storage"] = read_network_storage(self.paths)
            changes["cluster"] = read_cluster(self.paths)
            if hasattr(previous, "addresses") and hasattr(sysfs, "read_addresses"):
                changes["addresses"] = sysfs.read_addresses(self.paths)
        if devices_changed and hasattr(previous, "root_storage") and hasattr(sysfs, "read_root_storage"):
            changes["root_storage"] = sysfs.read_root_storage(self.paths)
        lap("refresh: routing")
        self.snapshot = dataclasses.replace(previous, **changes)
        return self.snapshot
