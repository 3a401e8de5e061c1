"""The engine: inventory, guarded and verified operations, leases. No D-Bus in here.

Every mutation takes the one mutation lock, passes the guard, and talks to the kernel through the
host model following the kernel rules: skip if equal, 0 then N, verify by reading back, restore
the previous state when anything fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from nicpassd.engine.config import Config
from nicpassd.engine.guard import ProtectedSet, compute_protected, refuse_if_protected
from nicpassd.engine.leases import Lease, LeaseTable
from nicpassd.engine.store import DeviceDesire, StateStore, identity_of
from nicpassd.engine.views import DeviceView, build_views, label, resolve_device
from nicpassd.errors import Busy, InvalidArgument, KernelError, NicpassError, NotFound, NotSupported, Protected
from nicpassd.host.events import UEvent
from nicpassd.host.host import Host
from nicpassd.host.model import HostSnapshot, PciFunction

log = logging.getLogger(__name__)

VFIO = "vfio-pci"
PASSTHROUGH_DRIVERS = ("vfio-pci", "pci-stub")
RESERVATION_SECONDS = 120.0


@dataclass
class InventoryDelta:
    added: list[DeviceView] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[DeviceView, dict[str, object]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclass(frozen=True)
class Finding:
    id: str
    level: str  # ok, warn, fail
    message: str
    remedy: str = ""


class Engine:
    def __init__(self, host: Host, config: Config, store: StateStore, leases: LeaseTable) -> None:
        self.host = host
        self.config = config
        self.store = store
        self.leases = leases
        self.snapshot = HostSnapshot()
        self.protected = ProtectedSet()
        self.views: dict[str, DeviceView] = {}
        self.inventory_listeners: list[Callable[[InventoryDelta], None]] = []
        self.lease_listeners: list[Callable[[Lease, str], None]] = []
        self._lock = asyncio.Lock()
        self._refresh_pending = False

    # ------------------------------------------------------------ inventory
    def refresh(self) -> InventoryDelta:
        """Re-read the kernel's view, recompute the guard and the views, announce differences."""
        self._refresh_pending = False
        self.snapshot = self.host.snapshot()
        self.protected = compute_protected(self.snapshot, self.config.guard)
        views = build_views(self.snapshot, self.protected, self.store, self.leases.holder())
        delta = InventoryDelta()
        for address, view in views.items():
            old = self.views.get(address)
            if old is None:
                delta.added.append(view)
            elif old != view:
                delta.changed.append((view, old.changed_fields(view)))
        delta.removed = [address for address in self.views if address not in views]
        self.views = views
        if delta:
            for listener in list(self.inventory_listeners):
                listener(delta)
        return delta

    def on_uevent(self, event: UEvent) -> None:
        """Coalesce a burst of events into one refresh on the next loop iteration."""
        if self._refresh_pending:
            return
        self._refresh_pending = True
        asyncio.get_running_loop().call_soon(self.refresh)

    def resolve(self, device: str) -> str:
        return resolve_device(self.snapshot, device)

    def _present(self, address: str) -> PciFunction:
        """The function in the fresh snapshot; it may have gone since the request was resolved."""
        function = self.snapshot.functions.get(address)
        if function is None:
            raise NotFound(f"{address} is no longer present", "list the devices with `nicpassctl list`")
        return function

    def _function(self, address: str) -> PciFunction:
        function = self.host.function(address)
        if function is None:
            raise KernelError(f"{address} disappeared from the kernel while being changed")
        return function

    def _label(self, address: str) -> str:
        function = self.snapshot.functions.get(address)
        return label(function) if function else address

    def _refuse_if_leased(self, addresses: list[str], action: str, *, allow_vm: str = "") -> None:
        holder = self.leases.holder()
        for address in addresses:
            vm = holder.get(address, "")
            if vm and vm != allow_vm:
                raise Busy(f"cannot {action} {self._label(address)}: it is leased to VM {vm}",
                           "stop that VM first (its lease ends when it stops)")

    # -------------------------------------------------------------- VF count
    async def set_vf_count(self, device: str, count: int, *, persist: bool = True, driver: str = "") -> None:
        address = self.resolve(device)
        function = self.snapshot.functions[address]
        if not function.sriov_capable:
            raise NotSupported(f"{self._label(address)} is not an SR-IOV physical function",
                               "create VFs on a PF (a device with TotalVfs > 0)")
        if count < 0 or count > function.total_vfs:
            raise InvalidArgument(f"{self._label(address)} supports at most {function.total_vfs} VFs; {count} requested",
                                  f"ask for 0 to {function.total_vfs}")
        if driver not in ("", VFIO):
            raise InvalidArgument(f"VF driver {driver!r} is not supported; use \"vfio-pci\" or leave it empty")
        async with self._lock:
            self.refresh()
            refuse_if_protected(self.protected, address, f"change the VF count of {self._label(address)}")
            self._refuse_if_leased([address, *self._present(address).virtfns], "change the VFs of")
            await self._apply_vf_count(address, count, driver)
            log.info("%s now has %d VFs%s%s", self._label(address), count, f" on {driver}" if driver else "",
                     "" if persist else " (runtime only)", extra={"device": address, "action": "vfs"})
            if persist:
                self._persist(address, num_vfs=count, vf_driver=driver if count else "")
            self.refresh()

    async def _apply_vf_count(self, address: str, count: int, driver: str) -> None:
        before = self._function(address)
        previous_drivers = [self._function(vf).driver for vf in before.virtfns]
        want_autoprobe = driver != VFIO
        try:
            if before.num_vfs != count:
                if driver == VFIO:
                    await self.host.load_module("vfio-pci")
                if count and before.autoprobe != want_autoprobe:
                    await self.host.set_autoprobe(address, want_autoprobe)
                if before.num_vfs:
                    await self.host.set_num_vfs(address, 0)
                if count:
                    await self.host.set_num_vfs(address, count)
                    await self._verify_vf_count(address, count)
            if driver == VFIO:
                for vf in self._function(address).virtfns:
                    await self._bind_verified(vf, VFIO)
        except NicpassError as exc:
            note = await self._restore_vfs(address, before, previous_drivers)
            if note:
                exc.message += f"; {note}"
            raise

    async def _verify_vf_count(self, address: str, count: int) -> None:
        """A successful write does not mean N VFs (kernel rules §2): read back, wait for links."""
        def settled() -> PciFunction | None:
            function = self.host.function(address)
            return function if function and len(function.virtfns) >= function.num_vfs else None

        function = await self._poll(settled, self.config.daemon.write_timeout)
        enabled = function.num_vfs if function else 0
        if enabled != count:
            raise KernelError(f"the kernel enabled only {enabled} of {count} VFs on {self._label(address)}",
                              "check the kernel log (journalctl -k) for the driver's reason")

    async def _restore_vfs(self, address: str, before: PciFunction, drivers: list[str]) -> str:
        """Best effort back to ``before``; returns what could not be restored ("" = all)."""
        try:
            now = self._function(address)
            if now.num_vfs != before.num_vfs:
                if now.num_vfs:
                    await self.host.set_num_vfs(address, 0)
                if now.autoprobe != before.autoprobe:
                    await self.host.set_autoprobe(address, before.autoprobe)
                if before.num_vfs:
                    await self.host.set_num_vfs(address, before.num_vfs)
            elif now.autoprobe != before.autoprobe:
                await self.host.set_autoprobe(address, before.autoprobe)
            for vf, driver in zip(self._function(address).virtfns, drivers):
                current = self._function(vf).driver
                if current != driver:
                    await self._bind_verified(vf, driver, restore_on_failure=False)
        except NicpassError as exc:
            log.error("restoring %s failed: %s", address, exc)
            return f"restoring the previous state also failed: {exc.message}"
        log.info("restored %s to %d VFs after a failed change", address, before.num_vfs)
        return f"{self._label(address)} was restored to {before.num_vfs} VFs"

    # ---------------------------------------------------------------- binding
    async def bind(self, device: str, driver: str, *, persist: bool = True) -> None:
        address = self.resolve(device)
        if driver not in ("", VFIO, "pci-stub") and driver not in self.snapshot.loaded_drivers:
            raise InvalidArgument(f"driver {driver!r} is not a loaded PCI driver",
                                  "use \"vfio-pci\", or \"\" for the device's host driver")
        async with self._lock:
            self.refresh()
            function = self._present(address)
            target = driver or "its host driver"
            refuse_if_protected(self.protected, address, f"bind {self._label(address)} to {target}")
            self._refuse_if_leased([address], "rebind")
            if function.num_vfs and driver in PASSTHROUGH_DRIVERS:
                raise InvalidArgument(f"{self._label(address)} has {function.num_vfs} VFs; unbinding its PF driver would orphan them",
                                      f"remove them first with `nicpassctl vfs {address} 0`")
            await self._bind_verified(address, driver)
            log.info("%s bound to %s%s", self._label(address), driver or "its host driver",
                     "" if persist else " (runtime only)", extra={"device": address, "action": "bind"})
            if persist:
                if driver in PASSTHROUGH_DRIVERS:
                    self._persist(address, driver=driver)
                else:
                    self._persist(address, driver="")
            self.refresh()

    async def unbind(self, device: str, *, persist: bool = True) -> None:
        """Give the device back to its host driver; forget the persisted binding too."""
        await self.bind(device, "", persist=persist)

    async def forget(self, device: str, *, restore: bool = False) -> None:
        address = self.resolve(device)
        if restore:
            await self.bind(address, "", persist=False)
        async with self._lock:
            self.store.remove(address)
            self.refresh()

    async def _bind_verified(self, address: str, driver: str, *, restore_on_failure: bool = True) -> None:
        """driver_override, unbind, drivers_probe, then verify (kernel rules §8).

        ``driver`` "" means the host driver: clear the override and let the kernel pick.
        """
        before = self._function(address)
        if before.driver and self._satisfies(before.driver, driver) and before.driver_override == (
                driver if driver in PASSTHROUGH_DRIVERS else ""):
            return
        if driver == VFIO:
            await self.host.load_module("vfio-pci")
        override = driver if driver in PASSTHROUGH_DRIVERS else ""
        try:
            await self.host.set_driver_override(address, override)
            if before.driver and not self._satisfies(before.driver, driver):
                await self.host.unbind(address, before.driver)
            after = self._function(address)
            if not after.driver:
                await self.host.probe(address)
            await self._verify_driver(address, driver)
        except NicpassError as exc:
            if restore_on_failure:
                exc.message += f"; {await self._restore_binding(address, before)}"
            raise

    @staticmethod
    def _satisfies(current: str, wanted: str) -> bool:
        if wanted:
            return current == wanted
        return bool(current) and current not in PASSTHROUGH_DRIVERS

    async def _verify_driver(self, address: str, driver: str) -> None:
        def bound() -> PciFunction | None:
            function = self.host.function(address)
            return function if function and self._satisfies(function.driver, driver) else None

        if await self._poll(bound, self.config.daemon.bind_verify_timeout) is None:
            now = self.host.function(address)
            found = now.driver if now and now.driver else "no driver"
            wanted = driver or "its host driver"
            raise KernelError(f"{address} did not bind to {wanted}: the kernel shows {found} after drivers_probe",
                              "check the kernel log (journalctl -k) for the probe failure")

    async def _restore_binding(self, address: str, before: PciFunction) -> str:
        try:
            now = self._function(address)
            await self.host.set_driver_override(address, before.driver_override)
            if now.driver and now.driver != before.driver:
                await self.host.unbind(address, now.driver)
            if before.driver and not self._function(address).driver:
                await self.host.probe(address)
            restored = self._function(address).driver
        except NicpassError as exc:
            return f"restoring the previous driver also failed: {exc.message}"
        if restored != before.driver:
            return f"the previous driver {before.driver or 'none'} could not be restored (now {restored or 'none'})"
        return f"restored {before.driver or 'no driver'}"

    # ------------------------------------------------------------ persistence
    def _persist(self, address: str, **changes: object) -> None:
        function = self.host.function(address) or self.snapshot.functions[address]
        current = self.store.get(address)
        base = current.model_dump() if current else {"address": address}
        base.update(changes)
        base["identity"] = identity_of(function, self.snapshot)
        desire = DeviceDesire.model_validate(base)
        if not desire.driver and not desire.num_vfs and not desire.vf_driver:
            self.store.remove(address)
        else:
            self.store.put(desire)

    # ----------------------------------------------------------------- leases
    async def prepare(self, vm_name: str, vm_uuid: str, devices: list[str]) -> Lease:
        if not vm_uuid:
            raise InvalidArgument("a VM uuid is required")
        if not devices:
            raise InvalidArgument("no devices given to prepare")
        addresses = [self.resolve(device) for device in devices]
        async with self._lock:
            self.refresh()
            for address in addresses:
                refuse_if_protected(self.protected, address, f"hand {self._label(address)} to VM {vm_name}")
            self._refuse_if_leased(addresses, "lease", allow_vm=vm_uuid)
            for address in addresses:
                function = self._present(address)
                if function.num_vfs:
                    self._refuse_if_leased(list(function.virtfns), "hand the PF of", allow_vm=vm_uuid)
                    raise InvalidArgument(
                        f"{self._label(address)} has {function.num_vfs} VFs; passing the PF through would orphan them",
                        f"pass a VF instead, or remove the VFs first with `nicpassctl vfs {address} 0`")
                self._require_viable_group(address, set(addresses))
            done: list[tuple[str, PciFunction]] = []
            try:
                for address in addresses:
                    before = self._function(address)
                    await self._bind_verified(address, VFIO)
                    done.append((address, before))
            except NicpassError as exc:
                for address, before in reversed(done):
                    await self._restore_binding(address, before)
                exc.message += "; no device was leased"
                raise
            for lease in self.leases.of_vm(vm_uuid):
                self.leases.drop(lease.lease_id)
            lease = self.leases.add(vm_name, vm_uuid, addresses, expires=time.time() + RESERVATION_SECONDS)
            self.refresh()
        self._announce_lease(lease, lease.state)
        return lease

    def _require_viable_group(self, address: str, leasing: set[str]) -> None:
        blockers = []
        for mate in self.snapshot.group_members(address):
            function = self.snapshot.functions.get(mate)
            if mate == address or mate in leasing or function is None or function.is_bridge:
                continue
            if function.driver and function.driver not in PASSTHROUGH_DRIVERS:
                blockers.append(f"{label(function)} on {function.driver}")
        if blockers:
            group = self.snapshot.functions[address].iommu_group
            raise Protected(f"IOMMU group {group} of {self._label(address)} is not viable: {', '.join(blockers)}",
                       "pass the whole group to the VM, or move the card to a slot with its own group")

    async def release(self, vm_uuid: str) -> list[Lease]:
        async with self._lock:
            released = [lease for lease in self.leases.of_vm(vm_uuid)]
            for lease in released:
                self.leases.drop(lease.lease_id)
                if self.config.release.policy == "restore":
                    for address in lease.devices:
                        if not self.store.get(address) and self.host.function(address) is not None:
                            try:
                                await self._bind_verified(address, "")
                            except NicpassError as exc:
                                log.error("release of %s: %s", address, exc)
            self.refresh()
        for lease in released:
            self._announce_lease(lease, "released")
        return released

    def _announce_lease(self, lease: Lease, state: str) -> None:
        for listener in list(self.lease_listeners):
            listener(lease, state)

    # ---------------------------------------------------------- check/explain
    def explain(self, device: str) -> dict[str, object]:
        address = self.resolve(device)
        view = self.views[address]
        members = [(mate, self.snapshot.functions[mate].driver if mate in self.snapshot.functions else "")
                   for mate in self.snapshot.group_members(address)]
        blockers = [f"{mate} on {drv}" for mate, drv in members
                    if mate != address and drv and drv not in PASSTHROUGH_DRIVERS
                    and not (mate in self.snapshot.functions and self.snapshot.functions[mate].is_bridge)]
        viable = not blockers and view.iommu_group >= 0
        if view.protected:
            verdict = f"{self._label(address)} is protected: {'; '.join(view.protection_reasons)}"
        elif view.leased_to:
            verdict = f"{self._label(address)} is leased to VM {view.leased_to}"
        elif view.iommu_group < 0:
            verdict = f"{self._label(address)} has no IOMMU group: the IOMMU is off or the device is not behind it"
        elif not viable:
            verdict = f"{self._label(address)} can be bound, but its IOMMU group is not viable: {', '.join(blockers)}"
        else:
            verdict = f"{self._label(address)} may be passed through"
        return {
            "address": address, "allowed": not view.protected and not view.leased_to and viable,
            "verdict": verdict, "protected": view.protected, "reasons": list(view.protection_reasons),
            "iommu_group": view.iommu_group, "group_members": members, "group_viable": viable,
            "leased_to": view.leased_to, "persisted": view.persisted, "desired_driver": view.desired_driver,
            "driver": view.driver, "interfaces": list(view.interfaces), "drift": view.drift,
        }

    def check(self) -> list[Finding]:
        snapshot, findings = self.snapshot, []
        if snapshot.iommu_present:
            findings.append(Finding("iommu", "ok", "an IOMMU is active"))
        else:
            findings.append(Finding("iommu", "fail", "no IOMMU is active (/sys/class/iommu is empty)",
                                    "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (Intel)"))
        words = snapshot.cmdline.split()
        risky = {
            "pcie_acs_override": "pcie_acs_override fakes IOMMU isolation (out-of-tree patch)",
            "vfio_iommu_type1.allow_unsafe_interrupts": "allow_unsafe_interrupts lets a VM inject interrupts",
            "vfio.enable_unsafe_noiommu_mode": "vfio no-IOMMU mode gives VMs unrestricted DMA",
            "vfio-pci.ids": "vfio-pci.ids= captures every device of those IDs, possibly the management NIC",
        }
        for word in words:
            key = word.split("=", 1)[0].replace("-", "_")  # the kernel treats - and _ alike
            key = next((name for name in risky if name.replace("-", "_") == key), "")
            if key:
                findings.append(Finding(f"cmdline-{key}", "warn", f"kernel command line has {word}: {risky[key]}",
                                        f"remove {key} from the kernel command line"))
        default_routes = [route for route in snapshot.routes if route.is_default]
        if not default_routes and not self.config.guard.management_interfaces:
            findings.append(Finding("management", "warn", "no default route and no configured management interface: "
                                    "the guard cannot tell which NIC keeps the host reachable",
                                    "set guard.management_interfaces in /etc/nicpassd/nicpassd.toml"))
        else:
            protected = ", ".join(sorted(self.protected.entries)) or "none"
            findings.append(Finding("management", "ok", f"management path protected: {protected}"))
        for address, view in sorted(self.views.items()):
            if view.drift:
                level = "fail" if view.drift.startswith("identity") else "warn"
                findings.append(Finding(f"drift-{address}", level, f"{address}: {view.drift}",
                                        f"re-apply with nicpassctl, or drop it with `nicpassctl forget {address}`"))
        for address, desire in sorted(self.store.state.devices.items()):
            if address not in snapshot.functions:
                findings.append(Finding(f"missing-{address}", "warn", f"persisted device {address} is not present",
                                        f"`nicpassctl forget {address}` if the card was removed for good"))
        return findings

    # ------------------------------------------------------------------ misc
    @staticmethod
    async def _poll(probe: Callable[[], PciFunction | None], timeout: float,
                    interval: float = 0.005) -> PciFunction | None:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result is not None or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.1)

