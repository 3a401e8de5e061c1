"""VM leases: Prepare, Activate, Release and the reclaiming of stale leases.

A lease is all-or-nothing per VM. ``prepare`` guard-checks every device, checks that its IOMMU
group is viable and not used by another VM, binds it to vfio-pci (verified) and records a
*reservation* that expires after ``reservation`` seconds unless the VM starts. ``activate``
ties it to the running VM (its QEMU PID when known). ``release`` ends it and applies the
release policy. Stale leases are reclaimed without polling:

- reservations: one ``loop.call_at`` for the earliest expiry, re-armed after every change;
- running VMs: a pidfd per QEMU process (``os.pidfd_open``) watched with ``loop.add_reader``,
  so the exit of the process wakes the daemon.

Leases live in /run/nicpassd/leases.json; ``start()`` re-arms timers and pidfds after a daemon
restart (a PID is trusted only when its process start time still matches). The reclaiming lives
in lease_watch.py.

Every mutation runs under the one mutation lock (``Operations.lock``), so concurrent prepares are
serialized and a device can never be leased twice; devices change only through the operations
layer, and QEMU processes are seen only through the host layer (``Host.open_pidfd``,
``Host.process_start_time``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Callable

from nicpassd.engine.config import Config
from nicpassd.engine.hostview import HostView
from nicpassd.engine.lease_watch import LeaseWatch
from nicpassd.engine.leases import ACTIVE, Lease, LeaseTable
from nicpassd.engine.operations import Operations
from nicpassd.engine.journal import DeviceBefore
from nicpassd.engine.vf_settings import SETTINGS as SETTABLE, parse_change, put_back
from nicpassd.engine.views import FULL_ADDRESS, SHORT_ADDRESS, full_address, label, resolve_device
from nicpassd.errors import Busy, InvalidArgument, KernelError, NicpassError, NotFound, NotSupported, Protected
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS, VFIO
from nicpassd.host.procfs import valid_pid as _valid_pid
from nicpassd.host.vf_netlink import VfChange

log = logging.getLogger(__name__)

# A VM's id as hooks pass it: libvirt's <uuid>, Proxmox's smbios uuid or "pve-VMID". It names
# leases and appears in logs and files: letters, digits and . _ : - only, never "..".
VM_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.:-]{0,127}$")
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAX_VM_NAME = 256


def check_vm(vm_name: str, vm_uuid: str) -> None:
    if not vm_uuid:
        raise InvalidArgument("a VM uuid is required")
    if not VM_ID.match(vm_uuid) or ".." in vm_uuid:
        raise InvalidArgument(f"{vm_uuid[:40]!r} is not a VM id (a UUID, or letters, digits and . _ : -)")
    if len(vm_name) > MAX_VM_NAME or any(not ch.isprintable() for ch in vm_name):
        raise InvalidArgument(f"VM name {vm_name[:40]!r} is longer than {MAX_VM_NAME} characters or holds control "
                              "characters")


RESERVATION_SECONDS = 120.0
MAX_RESERVATION_SECONDS = 3600.0

# LeaseChanged states (and STATE_EXPIRED, STATE_VM_GONE of lease_watch.py)
STATE_RELEASED = "released"  # Release() by the hook or an admin


@dataclass(frozen=True)
class _Before:
    """What a device was on before nicpassd changed it (the shape Operations.restore_binding reads)."""

    driver: str
    driver_override: str


class LeaseKeeper:
    def __init__(self, view: HostView, ops: Operations, config: Callable[[], Config]) -> None:
        self.view = view
        self.ops = ops
        self.host = view.host
        self.table: LeaseTable = view.leases
        self._config = config  # the current configuration (a reload replaces it)
        self.listeners: list[Callable[[Lease, str], None]] = []
        self.watch = LeaseWatch(self)  # reclaims stale leases: expiry timer, QEMU pidfds
        self.reservation_seconds = RESERVATION_SECONDS

    def start(self) -> None:
        self.watch.start()

    def arm(self) -> None:
        self.watch.arm()

    def close(self) -> None:
        self.watch.close()

    def announce(self, lease: Lease, state: str) -> None:
        for listener in list(self.listeners):
            listener(lease, state)

    # ------------------------------------------------------------------ API
    async def prepare(self, vm_name: str, vm_uuid: str, devices: list[str], *, pid: int = 0,
                      pidfile: str = "", reservation: float = 0.0, skip_unmanaged: bool = False,
                      group: bool = False, vf_settings: dict[str, dict[str, object]] | None = None) -> Lease | None:
        """Lease ``devices`` to the VM, ready for passthrough; None when ``skip_unmanaged`` left none.
        ``group``: take every non-bridge IOMMU group mate of the devices along (``HostView.group_mates``:
        refused when a mate is protected, force or not) instead of requiring the group viable.
        ``vf_settings``: {VF: settings} for this VM only (a MAC, a VLAN the NIC enforces, trust...),
        written once the VFs are on vfio-pci; release puts back what they were before."""
        check_vm(vm_name, vm_uuid)
        changes = {device: parse_change(dict(values)) for device, values in (vf_settings or {}).items()}
        if not devices:
            raise InvalidArgument("no devices given to prepare")
        if pid and not _valid_pid(pid):
            raise InvalidArgument(f"pid {pid} is not a process id")
        if pid and not self.host.process_start_time(pid):
            raise InvalidArgument(f"process {pid} is not running", "pass the PID of the VM's QEMU process")
        if pidfile and (not pidfile.startswith("/") or "/../" in f"{pidfile}/" or not pidfile.endswith(".pid")):
            raise InvalidArgument(f"pidfile {pidfile!r} must be an absolute path to a .pid file",
                                  "e.g. /run/libvirt/qemu/NAME.pid")
        if reservation < 0 or reservation > MAX_RESERVATION_SECONDS:
            raise InvalidArgument(f"reservation must be 1 to {int(MAX_RESERVATION_SECONDS)} seconds")
        vm_name = vm_name or vm_uuid
        async with self.ops.lock:
            addresses = self._refresh_for(devices, skip_unmanaged)
            if group:
                addresses = self._with_group_mates(vm_name, addresses)
            previous = self.table.of_vm(vm_uuid)
            if not addresses:
                log.info("VM %s: none of %s is managed by nicpassd; nothing to lease", vm_name, ", ".join(devices))
                released = await self._end_all(previous) if previous else []
                lease = None
            else:
                self._check_leasable(vm_name, vm_uuid, addresses)
                settings = self._vm_settings(changes, addresses)
                lease, released = await self._make_ready_and_lease(
                    vm_name, vm_uuid, addresses, previous, pidfile=pidfile,
                    expires=time.time() + (reservation or self.reservation_seconds), settings=settings)
                if pid:
                    await self._tie(lease, pid)
            self._settle(addresses, *(old.devices for old in released))
        for old in released:
            self.announce(old, STATE_RELEASED)
        if lease is not None:
            log.info("VM %s (%s): leased %s (%s)", vm_name, vm_uuid, ", ".join(lease.devices), lease.state)
            self.announce(lease, lease.state)
        self.arm()
        return lease

    async def activate(self, vm_uuid: str, *, pid: int = 0, missing_ok: bool = False) -> Lease | None:
        """Tie the VM's reservation to the running VM: its QEMU process when ``pid`` (or the
        pidfile given at prepare) names one, else its uuid alone. Ends the reservation timer.
        A VM without a lease is ``NotFound``, or None with ``missing_ok``."""
        if pid and not _valid_pid(pid):
            raise InvalidArgument(f"pid {pid} is not a process id")
        async with self.ops.lock:
            leases = self.table.of_vm(vm_uuid)
            if not leases and missing_ok:
                return None
            if not leases:
                raise NotFound(f"VM {vm_uuid} holds no lease", "prepare its devices first (the hook does at start)")
            lease = leases[0]
            if not pid and lease.pidfile:
                pid = self.host.read_pidfile(lease.pidfile)
            if pid and not self.host.process_start_time(pid):
                raise InvalidArgument(f"process {pid} is not running", "pass the PID of the VM's QEMU process")
            await self._tie(lease, pid)
        log.info("VM %s (%s): lease active%s", lease.vm_name, vm_uuid, f", QEMU pid {pid}" if pid else "")
        self.announce(lease, lease.state)
        self.arm()
        return lease

    async def release(self, vm_uuid: str) -> list[Lease]:
        """End every lease of the VM and apply the release policy. Idempotent."""
        async with self.ops.lock:
            released = await self._end_all(self.table.of_vm(vm_uuid))
            if released:
                self._settle(*(lease.devices for lease in released))
        for lease in released:
            log.info("VM %s (%s): released %s", lease.vm_name, vm_uuid, ", ".join(lease.devices))
            self.announce(lease, STATE_RELEASED)
        self.arm()
        return released

    def _settle(self, *device_lists) -> None:
        """Publish the outcome: re-read the devices this changed (and whatever uevents named) and
        update the views — not a full re-read of every function (the operation began with one)."""
        self.view.mark({address for devices in device_lists for address in devices})
        self.view.refresh_changed()

    # ------------------------------------------------------------- prepare
    def _refresh_for(self, devices: list[str], skip_unmanaged: bool) -> list[str]:
        """Bring the inventory up to date for a prepare of ``devices`` and resolve them.

        Not a re-read of every function and interface (``HostView.refresh``, ~5 ms on the default
        host, far more on a big one): what uevents and netlink said changed — the guard is
        recomputed from that, as for every event — plus a fresh read from the kernel of what this
        prepare decides on: the named functions and their IOMMU group mates (a VF's PF comes
        with it). A name that resolves to a function not read yet (an interface renamed
        meanwhile) is read in a second pass."""
        read: set[str] = set()
        wanted = self._related(devices)
        while True:
            self.view.mark(wanted - read)
            read |= wanted
            self.view.refresh_changed()
            addresses = self._resolve(devices, skip_unmanaged)
            wanted = self._related(addresses)
            if wanted <= read:
                return addresses

    def _related(self, devices: list[str]) -> set[str]:
        """The functions a prepare of ``devices`` depends on, as far as the snapshot knows them:
        each device (also an address the snapshot does not know yet) and its IOMMU group."""
        snapshot = self.view.snapshot
        related: set[str] = set()
        for device in devices:
            try:
                address = resolve_device(snapshot, device)
            except NicpassError:
                text = device.strip().lower()
                if FULL_ADDRESS.match(text) or SHORT_ADDRESS.match(text):
                    related.add(full_address(text))
                continue
            related.add(address)
            related.update(snapshot.group_members(address))
        return related

    def _with_group_mates(self, vm_name: str, addresses: list[str]) -> list[str]:
        """``addresses`` followed by their IOMMU group mates, once each (option ``group``)."""
        view = self.view
        result = list(addresses)
        for address in addresses:
            action = f"hand {view.label(address)} to VM {vm_name}"
            for mate in view.group_mates(address, action):
                if mate not in result:
                    log.info("VM %s: %s comes with the IOMMU group of %s", vm_name, view.label(mate), address)
                    result.append(mate)
        return result

    def _resolve(self, devices: list[str], skip_unmanaged: bool) -> list[str]:
        """Addresses in order, without duplicates. With ``skip_unmanaged`` a device nicpassd does
        not manage (no NIC function, nor an IOMMU-group mate of one: a GPU, a disk controller) is
        skipped instead of being NotFound, so a hook can hand over a domain's whole PCI list."""
        addresses: list[str] = []
        for device in devices:
            try:
                address = self.view.resolve(device)
            except NotFound:
                # Only a PCI address names a device nicpassd may not manage; a missing interface
                # is the caller's mistake, skip or not.
                if not skip_unmanaged or not (FULL_ADDRESS.match(device) or SHORT_ADDRESS.match(device)):
                    raise
                log.debug("skipping %s: not a device nicpassd manages", device)
                continue
            if address not in addresses:
                addresses.append(address)
        return addresses

    def _check_leasable(self, vm_name: str, vm_uuid: str, addresses: list[str]) -> None:
        view = self.view
        for address in addresses:  # the guard never yields to a lease: no force here
            view.guard_check(address, f"hand {view.label(address)} to VM {vm_name}")
        view.refuse_if_leased(addresses, "lease", allow_vm=vm_uuid)
        if self.table.recovered:  # the lease file was lost: a device a VM has open is in use all the same
            for address in addresses:
                users = self.host.vfio_users(view.present(address).iommu_group)
                if users:
                    pid, program, guest = users[0]
                    raise Busy(f"{view.label(address)} is open through /dev/vfio by {program or 'a process'} (pid "
                               f"{pid}{f', guest {guest}' if guest else ''}), a VM nicpassd has no lease for",
                               "stop that VM first")
        for address in addresses:
            function = view.present(address)
            if function.num_vfs:
                # Rule 9: a PF is never unbound while it has VFs (let alone leased ones).
                view.refuse_if_leased(list(function.virtfns), "hand the PF of", allow_vm=vm_uuid)
                raise InvalidArgument(
                    f"{view.label(address)} has {function.num_vfs} VFs; passing the PF through would orphan them",
                    f"pass a VF instead, or remove the VFs first with `nicpassctl vfs {address} 0`")
            self._require_viable_group(address, set(addresses), vm_uuid)

    def _require_viable_group(self, address: str, leasing: set[str], vm_uuid: str) -> None:
        """Rule 10: every other non-bridge member is on vfio-pci/pci-stub or driverless; and an
        IOMMU group belongs to one VM at a time (VFIO attaches a group to one container)."""
        snapshot, holder = self.view.snapshot, self.table.holder()
        blockers = []
        for mate in snapshot.group_members(address):
            function = snapshot.functions.get(mate)
            if mate == address or function is None or function.is_bridge:
                continue
            other = holder.get(mate, "")
            if other and other != vm_uuid:
                raise Busy(f"the IOMMU group of {self.view.label(address)} is in use by VM {other} "
                           f"(through {label(function)})", "stop that VM first, or use a device in another group")
            if mate in leasing:
                continue
            if function.driver and function.driver not in PASSTHROUGH_DRIVERS:
                blockers.append(f"{label(function)} on {function.driver}")
        if blockers:
            group = snapshot.functions[address].iommu_group
            raise Protected(f"IOMMU group {group} of {self.view.label(address)} is not viable: {', '.join(blockers)}",
                            "pass the whole group to the VM, or move the card to a slot with its own group")

    def _vm_settings(self, changes: dict[str, VfChange], addresses: list[str]) -> dict[str, tuple[str, int, VfChange]]:
        """{VF address: (PF, VF index, settings)} of a prepare's ``vf_settings``: each a VF it leases."""
        snapshot, settings = self.view.snapshot, {}
        for device, change in changes.items():
            address = self.view.resolve(device)
            function = snapshot.functions[address]
            pf = snapshot.functions.get(function.physfn) if function.physfn else None
            if pf is None or address not in pf.virtfns:
                raise InvalidArgument(f"{self.view.label(address)} is not a VF; VF settings are set on a VF")
            if address not in addresses:
                raise InvalidArgument(f"VF settings for {self.view.label(address)}, which this prepare does not lease",
                                      "list it among the devices")
            if not pf.interfaces:
                raise NotSupported(f"the VF settings of {self.view.label(pf.address)} are held by its driver, and it "
                                   f"has none bound with a netdev (driver: {pf.driver or 'none'})")
            settings[address] = (pf.address, pf.virtfns.index(address), change)
        return settings

    async def _make_ready_and_lease(self, vm_name: str, vm_uuid: str, addresses: list[str], previous: list[Lease],
                                    *, pidfile: str, expires: float,
                                    settings: dict[str, tuple[str, int, VfChange]]) -> tuple[Lease, list[Lease]]:
        """Bind every device to vfio-pci (verified), all or nothing, then record the lease.

        The binds go as one batch (all driver_overrides, then the unbinds, then the probes, then
        one verification pass), under one undo-journal entry of kind "prepare" that ends only once
        the lease is written: a crash in between is rolled back at the next start, a crash after
        it is recognised as finished (recovery.recover).

        A repeated prepare of the same VM replaces its lease: records of what nicpassd changed
        carry over (the device is on vfio-pci because of us), and devices no longer wanted are
        released with the policy."""
        ops = self.ops
        carried = {address: change for lease in previous for address, change in lease.changes.items()}
        # A VF's settings as they are now (its VM or libvirt may set others); a re-prepare keeps
        # the first record: that is what the host had before the VM.
        vf_before = {address: settings for lease in previous for address, settings in lease.vf_settings.items()}
        for address in addresses:
            shown = self.view.snapshot.vf_settings_of(address)
            if shown is not None and address not in vf_before:
                vf_before[address] = {name: value for name, value in vars(shown).items()
                                      if name in SETTABLE and value is not None}
        # Driver and driver_override: what the journal and the lease's changes record (cheap reads).
        befores = {address: ops.binding(address) for address in addresses}
        changed = [address for address, before in befores.items()
                   if before.driver != VFIO or before.driver_override != VFIO]
        # The journal also holds the VF settings this prepare writes, as they were.
        devices = {address: DeviceBefore(before, vf_settings={settings[address][1]: {
                       name: vf_before.get(address, {}).get(name) for name in settings[address][2].asked()}}
                       if address in settings else {}) for address, before in befores.items()}
        async with ops.journaled("prepare", addresses, target={"driver": VFIO}, vm_uuid=vm_uuid, devices=devices):
            errors = await ops.bind_each(addresses, VFIO)  # failures come back restored
            if not errors and settings:
                errors = await self._write_vm_settings(settings, vf_before)
            if errors:
                for address in changed:
                    if address not in errors or settings:
                        await ops.restore_binding(address, befores[address])
                error = next(iter(errors.values()))
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise error.extended(f"{more}; no device was leased") from error
            changes = {address: {"driver": befores[address].driver,
                                 "driver_override": befores[address].driver_override} for address in changed}
            changes.update({address: carried[address] for address in addresses
                            if address not in changes and address in carried})
            wanted = set(addresses)
            dropped = [address for lease in previous for address in lease.devices if address not in wanted]
            for lease in previous:
                self.table.drop(lease.lease_id, save=False)
            if dropped:  # the lease file stops naming them before the policy touches them
                await self.table.save_async()
                await self._apply_policies([(address, carried.get(address)) for address in dropped])
            # Otherwise the replaced leases go in the same atomic write as the new one.
            lease = self.table.add(vm_name, vm_uuid, addresses, expires=expires, changes=changes, pidfile=pidfile,
                                   save=False, vf_settings={a: s for a, s in vf_before.items() if a in addresses})
            await self.table.save_async()
        return lease, previous

    async def _write_vm_settings(self, settings: dict[str, tuple[str, int, VfChange]],
                                 vf_before: dict[str, dict[str, object]]) -> dict[str, NicpassError]:
        """The VM's VF settings, each read back; on a refusal the ones written are put back and
        {VF: error} returned (the caller gives the bindings back)."""
        written: list[str] = []
        for address, (pf, index, change) in settings.items():
            current = self.view.snapshot.vf_settings_of(address)
            try:
                if current is None:
                    raise NotFound(f"{self.view.label(pf)} reports no settings for VF {index} ({address})")
                await self.ops.set_vf_settings(pf, index, change, current)
            except NicpassError as exc:
                await self._restore_vf_settings([(vf, vf_before[vf]) for vf in written if vf in vf_before])
                return {address: exc}
            written.append(address)
        return {}

    # ------------------------------------------------------------- activate
    async def _tie(self, lease: Lease, pid: int) -> None:
        lease.state = ACTIVE
        lease.expires = 0.0
        lease.pid = pid
        lease.pid_start = self.host.process_start_time(pid) if pid else 0
        self.table.update(lease, save=False)
        await self.table.save_async()

    # -------------------------------------------------------------- release
    async def _end_all(self, leases: list[Lease]) -> list[Lease]:
        """Drop the leases and apply the release policy to their devices (under the lock)."""
        for lease in leases:
            self.table.drop(lease.lease_id, save=False)
        if leases:
            await self.table.save_async()  # one write for all of them
        # Settings first: a VF given back to its host driver then probes with its own MAC again.
        await self._restore_vf_settings([(address, settings) for lease in leases
                                         for address, settings in lease.vf_settings.items()])
        await self._apply_policies([(address, lease.changes.get(address))
                                    for lease in leases for address in lease.devices])
        return leases

    async def _restore_vf_settings(self, items: list[tuple[str, dict[str, object]]]) -> None:
        """Each VF's settings back to what they were before its lease (only what differs now;
        libvirt, which restores an <interface type='hostdev'>'s MAC and VLAN itself, leaves
        nothing to do here)."""
        for address, before in items:
            function = self.view.snapshot.functions.get(address)
            parent = self.view.snapshot.functions.get(function.physfn) if function is not None else None
            if parent is None or address not in parent.virtfns:
                log.info("release of %s: the VF or its PF is gone, no settings to restore", address)
                continue
            try:
                written = await put_back(self.ops, parent.address, parent.virtfns.index(address), before)
            except NicpassError as exc:
                log.error("release of %s: restoring its VF settings failed: %s", address, exc)
            else:
                if written:
                    log.info("release of %s: VF settings back as before the lease", address,
                             extra={"device": address, "action": "release"})

    def policy_for(self, address: str) -> str:
        """Per-device override, else "keep" for a device persisted for vfio-pci, else the policy."""
        settings = self._config().release
        override = settings.devices.get(address, "")
        if override:
            return override
        view = self.view.views.get(address)
        if view is not None and view.desired_driver in PASSTHROUGH_DRIVERS:
            return "keep"
        return settings.policy

    async def _apply_policies(self, items: list[tuple[str, dict[str, str] | None]]) -> None:
        """``restore`` gives back exactly what nicpassd changed; nothing when it changed nothing.
        The common case — back to a host driver, no driver_override before — goes as one verified
        batch for all the devices (``Operations.bind_each``: one journal entry, one thread per
        phase); anything else is restored device by device."""
        ops = self.ops
        holder = self.table.holder()
        batch: list[tuple[str, _Before]] = []
        for address, change in items:
            if self.policy_for(address) != "restore" or not change:
                continue
            if address in holder:  # leased again meanwhile (cannot happen under the lock)
                continue
            try:
                now = ops.binding(address)
            except KernelError:
                log.info("release of %s: the device is gone, nothing to restore", address)
                continue
            if now.driver not in PASSTHROUGH_DRIVERS and now.driver_override not in PASSTHROUGH_DRIVERS:
                continue  # someone already gave it back
            before = _Before(change.get("driver", ""), change.get("driver_override", ""))
            if before.driver and before.driver not in PASSTHROUGH_DRIVERS and not before.driver_override:
                batch.append((address, before))
                continue
            try:
                note = await ops.restore_binding(address, before)
            except NicpassError as exc:
                log.error("release of %s: restoring %s failed: %s", address, before.driver or "no driver", exc)
            else:
                log.info("release of %s: %s", address, note)
        if not batch:
            return
        try:
            errors = await ops.bind_each([address for address, _ in batch], "")  # verified
        except NicpassError as exc:
            errors = {address: exc for address, _ in batch}
        for address, before in batch:
            if address in errors:
                log.error("release of %s: restoring %s failed: %s", address, before.driver, errors[address])
            else:
                log.info("release of %s: back on %s", address, before.driver)
