"""What the engine knows of the host right now, and the questions every operation asks of it.

One ``HostView`` holds the last snapshot of the kernel, the guard's protected set computed from
it, and one ``DeviceView`` per function; ``refresh`` (everything) and ``refresh_changed`` (what
uevents or ``mark`` named) bring them up to date and tell the listeners (the D-Bus exporter) what
changed. The API, the reconciler and the lease keeper resolve names, ask the guard and check
leases here, so the answers are the same whichever door a request came through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from nicpassd.engine.config import Config
from nicpassd.engine.guard import ProtectedSet, compute_protected
from nicpassd.engine.guard_memory import GuardMemory
from nicpassd.engine.leases import LeaseTable
from nicpassd.engine.store import StateStore
from nicpassd.engine.views import DeviceView, ViewBuilder, full_address, label, resolve_device
from nicpassd.errors import Busy, InvalidArgument, NotFound, Protected
from nicpassd.host.events import UEvent
from nicpassd.host.host import Host
from nicpassd.host.inventory import Inventory
from nicpassd.host.model import HostSnapshot, PciFunction
from nicpassd.stopwatch import lap


@dataclass
class InventoryDelta:
    added: list[DeviceView] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[DeviceView, dict[str, object]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class HostView:
    def __init__(self, host: Host, config: Config, store: StateStore, leases: LeaseTable) -> None:
        self.host = host
        self.config = config
        self.store = store
        self.leases = leases
        self.snapshot = HostSnapshot()
        self.protected = ProtectedSet()
        self.views: dict[str, DeviceView] = {}
        self._view_builder = ViewBuilder()
        self.listeners: list[Callable[[InventoryDelta], None]] = []
        # Per device, why the reconciler does not apply its persisted state (shown in Drift).
        self.notes: dict[str, str] = {}
        # The management path as it was: loaded before the first publish (guard_memory.py).
        self.memory = GuardMemory.load(host.paths.state_dir)
        self.inventory = Inventory(host.paths, host.snapshot, host.read_vf_settings)  # incremental re-reads on uevents
        # Events noted since the last refresh, whoever refreshes (the API, a reconcile run, the
        # coalescing callback of ``Engine.on_uevent``).
        self.refresh_pending = False

    # ----------------------------------------------------------------- refresh
    def refresh(self) -> InventoryDelta:
        """Re-read the kernel's view, recompute the guard and the views, announce differences."""
        self.refresh_pending = False
        self.snapshot = self.inventory.full()
        return self.publish()

    def refresh_changed(self) -> InventoryDelta:
        """``refresh``, re-reading only what uevents (or ``mark``) said changed."""
        self.refresh_pending = False
        self.snapshot = self.inventory.update()
        return self.publish()

    def refresh_for(self, addresses: Iterable[str]) -> InventoryDelta:
        """``refresh`` for a change to ``addresses``: those functions, the routing the guard
        builds the management path from, and whatever events named — not every PCI function
        (on a real kernel each is a dozen sysfs reads, and under a hypervisor each read traps).
        The uevents keep the rest current."""
        self.inventory.mark(addresses)
        self.inventory.mark_routing()
        return self.refresh_changed()

    def note(self, event: UEvent) -> None:
        self.inventory.note(event)

    def mark(self, addresses: Iterable[str]) -> None:
        """Functions to read again at the next refresh: changed without a uevent (a
        driver_override or autoprobe write), or changed by an API call that answers before
        reading them (``Engine.read_in_marked`` keeps readers from seeing them stale)."""
        self.inventory.mark(addresses)

    @property
    def dirty(self) -> bool:
        return self.inventory.dirty

    def publish(self) -> InventoryDelta:
        """Recompute the guard and the views of the snapshot; announce the differences."""
        self.protected = compute_protected(self.snapshot, self.config.guard, remember=self._remember)
        lap("refresh: guard")
        views = self._view_builder.build(self.snapshot, self.protected, self.store, self.leases.holder(), self.notes)
        delta = InventoryDelta()
        for address, view in views.items():
            old = self.views.get(address)
            if old is None:
                delta.added.append(view)
            elif old is not view and old != view:
                delta.changed.append((view, old.changed_fields(view)))
        delta.removed = [address for address in self.views if address not in views]
        self.views = views
        lap("refresh: views")
        if delta:
            for listener in list(self.listeners):
                listener(delta)
            lap("refresh: publish")
        return delta

    def _remember(self, live):
        if not self.snapshot.functions:
            return {}  # nothing read yet: no judgement on what is gone
        return self.memory.observe(self.snapshot, live)

    # ----------------------------------------------------------------- lookups
    def resolve(self, device: str) -> str:
        return resolve_device(self.snapshot, device)

    def memory_address(self, device: str) -> str:
        """``resolve`` that also knows remembered devices whose function or netdev is gone (a PCI
        address, or an interface name they had)."""
        try:
            return self.resolve(device)
        except (NotFound, InvalidArgument):
            text = device.strip().lower()
            address = full_address(text)
            if address in self.memory.entries:
                return address
            for entry in self.memory.entries.values():
                if device.strip() in entry.interfaces:
                    return entry.address
            raise

    def present(self, address: str) -> PciFunction:
        """The function in the fresh snapshot; it may have gone since the request was resolved."""
        function = self.snapshot.functions.get(address)
        if function is None:
            raise NotFound(f"{address} is no longer present", "list the devices with `nicpassctl list`")
        return function

    def label(self, address: str) -> str:
        function = self.snapshot.functions.get(address)
        return label(function) if function else address

    # ------------------------------------------------------------------- guard
    def guard_check(self, address: str, action: str, *, force: bool = False):
        """The one guard check of every mutation (and of persisted desires applied at boot or
        hotplug, which pass no ``force``), on the protected set of the last refresh: callers
        refresh under the mutation lock first. Raises ``Protected``; returns the entry a
        ``force`` overrode (the caller logs it, with who asked), else None."""
        return self.protected.check(address, action, force=force)

    def group_mates(self, address: str, action: str) -> list[str]:
        """The non-bridge IOMMU group mates to take along with ``address`` (option ``group``).
        Refused (``Protected``) if any is protected, with or without force: nicpassd never takes
        a device the host needs along with a group, and never binds mates unasked."""
        mates = []
        for mate in self.snapshot.group_members(address):
            function = self.snapshot.functions.get(mate)
            if mate == address or function is None or function.is_bridge:
                continue
            entry = self.protected.entries.get(mate)
            if entry is not None:
                group = self.snapshot.functions[address].iommu_group
                raise Protected(f"refusing to {action} with its IOMMU group {group}: member {self.label(mate)} is "
                                f"protected ({'; '.join(entry.reasons)})",
                                "move the card to a slot with its own IOMMU group")
            mates.append(mate)
        return mates

    # ------------------------------------------------------------------ leases
    def refuse_if_leased(self, addresses: Iterable[str], action: str, *, allow_vm: str = "") -> None:
        holder = self.leases.holder()
        for address in addresses:
            vm = holder.get(address, "")
            if vm and vm != allow_vm:
                raise Busy(f"cannot {action} {self.label(address)}: it is leased to VM {self.vm_label(vm)}",
                           "stop that VM first (its lease ends when it stops)")

    def refuse_if_vf_leased(self, pf: str, action: str) -> None:
        """A change of a PF's VFs while one of them is leased: the PF is what was asked about."""
        holder = self.leases.holder()
        for vf in self.present(pf).virtfns:
            if vf in holder:
                raise Busy(f"cannot {action} {self.label(pf)}: its VF {vf} is leased to VM "
                           f"{self.vm_label(holder[vf])}", "stop that VM first (its lease ends when it stops)")
        self.refuse_if_leased([pf], action)

    def vm_label(self, vm_uuid: str) -> str:
        """"web01 (6f1c2a8e-…)": a VM by the name its lease knows, and its uuid."""
        name = next((lease.vm_name for lease in self.leases.of_vm(vm_uuid) if lease.vm_name), "")
        return f"{name} ({vm_uuid})" if name and name != vm_uuid else vm_uuid

    def refuse_if_mate_leased(self, address: str, target: str) -> None:
        """A host driver on a group mate of a device in a VM would take DMA ownership of its group."""
        holder = self.leases.holder()
        for mate in self.snapshot.group_members(address):
            if mate != address and holder.get(mate):
                group = self.snapshot.functions[address].iommu_group
                raise Busy(f"cannot bind {self.label(address)} to {target}: it shares IOMMU group {group} with "
                           f"{self.label(mate)}, leased to VM {holder[mate]}", "stop that VM first")
