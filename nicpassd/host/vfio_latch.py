"""nicpassd holds a device's VFIO group while it takes the device off vfio-pci (docs/kernel-rules.md §21).

The kernel lets one process at a time open a VFIO group (``/dev/vfio/N``; any other open gets
EBUSY, and a device opened through its VFIO cdev blocks its group the same way). nicpassd opens
the group around every unbind from vfio-pci, for two reasons:

- A VM that holds the device is found *before* the unbind is written. vfio-pci's remove waits for
  the user to let go: it relays the kernel's request to QEMU, which asks its guest to unplug the
  device. It waits with the device's lock held, for ever when the guest is paused or does not
  answer. Every reader of the device's ``uevent`` waits behind that lock: journald (it reads the
  file to tag the kernel's "Relaying device request to user" line) stops logging, udevd's
  workers stop, and every service that logs stops behind journald. Seen in the e2e guest: a heal
  of the management NIC written after QEMU had opened it (``virsh attach-device --live`` to a
  paused domain) silenced the whole guest.
- While nicpassd holds the group, no VM can open the device: the race with a VM starting is closed.

Where the group cannot be opened for another reason (no group node, a node owned by the VM's
user), nicpassd falls back to naming a holder from /proc and libvirt's status files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import Callable, Iterable, Iterator

from nicpassd.errors import Busy
from nicpassd.host import kernelio
from nicpassd.host.writer import KernelWriter
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)

Holder = Callable[[str, int], "tuple[str, int, str]"]  # (address, group) → (who, pid, guest)
NOBODY = "unknown writer"


class VfioLatches:
    """The VFIO groups nicpassd holds right now, nested: the bind sequence holds the group and
    its unbind, deeper down, finds it held by nicpassd itself (a second open would be EBUSY)."""

    def __init__(self, paths: HostPaths, writer: KernelWriter, holder: Holder) -> None:
        self._paths = paths
        self._writer = writer
        self._holder = holder
        self._held: dict[int, list] = {}  # group → [depth, release]

    @contextlib.contextmanager
    def held(self, addresses: Iterable[str]) -> Iterator[dict[str, Busy]]:
        """Hold the groups of ``addresses`` for the block. Yields {address: Busy} of the devices
        a process holds: those must not be unbound (the others are safe while the block runs)."""
        busy: dict[str, Busy] = {}
        taken: list[int] = []
        try:
            for address in addresses:
                group = self._group_of(address)
                if group < 0:
                    continue
                if group in self._held:
                    self._held[group][0] += 1
                    taken.append(group)
                    continue
                release = self._take(address, group, busy)
                if release is not None:
                    self._held[group] = [1, release]
                    taken.append(group)
            yield busy
        finally:
            for group in taken:
                entry = self._held[group]
                entry[0] -= 1
                if entry[0] == 0:
                    del self._held[group]
                    entry[1]()

    def busy(self, address: str) -> Busy | None:
        """Busy naming who holds the device through VFIO now, or None (one open and close of its group)."""
        with self.held([address]) as busy:
            return busy.get(address)

    def _take(self, address: str, group: int, busy: dict[str, Busy]) -> Callable[[], None] | None:
        try:
            return self._writer.hold_vfio_group(self._paths.dev_vfio / str(group))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                busy[address] = self._busy(address, group)
            elif exc.errno in (errno.EACCES, errno.EPERM):
                # Not ours to open (libvirt gives the node to the VM's user): name a holder instead.
                who, pid, _guest = self._holder(address, group)
                if who != NOBODY:
                    busy[address] = self._busy(address, group, (who, pid))
            else:
                log.debug("VFIO group %d of %s not held: %s", group, address, exc)
            return None

    def _busy(self, address: str, group: int, found: tuple[str, int] | None = None) -> Busy:
        who = (found or self._holder(address, group))[0]
        who = "a process nicpassd cannot name" if who == NOBODY else who
        return Busy(f"{address} is in use through VFIO (group {group}) by {who}: taking it off vfio-pci now would "
                    "block in the kernel, with the device locked, until that lets go",
                    "stop the VM or detach the device from it (virsh detach-device), then try again")

    def _group_of(self, address: str) -> int:
        name = kernelio.link_name(os.path.join(os.fspath(self._paths.pci_device(address)), "iommu_group"))
        return int(name) if name.isdigit() else -1
