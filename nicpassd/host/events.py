"""Device events as the host model hands them to the engine, whatever produced them.

Production events come from udev (pyudev), simulated ones from the simulated kernel; both are
turned into ``UEvent`` so the engine has one input.
"""

from __future__ import annotations

from dataclasses import dataclass
import asyncio
import threading
from typing import Callable, Mapping


@dataclass(frozen=True)
class UEvent:
    action: str  # add, remove, change, bind, unbind, move
    subsystem: str  # pci, net, or "route" for routing/address changes
    sys_name: str  # PCI address or interface name
    driver: str = ""
    # A PCI "add": the function's ids as its uevent carries them (``pci_identity``), as the sysfs
    # files vendor, device, subsystem_vendor, subsystem_device and class read. () when not known.
    pci_identity: tuple[str, ...] = ()


UEventCallback = Callable[[UEvent], None]


def pci_identity(properties: Mapping[str, str]) -> tuple[str, ...]:
    """(vendor, device, subsystem vendor, subsystem device, class) from a PCI uevent's properties,
    as ``nicpassd.host.sysfs.read_function`` shows them ("8086", "154c", ..., "020000"). The kernel
    sends them with every PCI uevent (pci_uevent(): ``PCI_ID=%04X:%04X``, ``PCI_SUBSYS_ID=%04X:%04X``,
    ``PCI_CLASS=%04X``), from the same struct pci_dev the sysfs files show. () when one is missing
    or not what the kernel writes."""
    try:
        vendor, device = properties["PCI_ID"].lower().split(":")
        subsystem_vendor, subsystem_device = properties["PCI_SUBSYS_ID"].lower().split(":")
        class_code = properties["PCI_CLASS"].lower()
    except (KeyError, ValueError, AttributeError):
        return ()
    ids = (vendor, device, subsystem_vendor, subsystem_device)
    if not all(len(part) == 4 and _hex(part) for part in ids) or not (len(class_code) <= 6 and _hex(class_code)):
        return ()
    return (*ids, class_code.rjust(6, "0"))


def _hex(text: str) -> bool:
    return bool(text) and all(ch in "0123456789abcdef" for ch in text)


def on_loop(loop: "asyncio.AbstractEventLoop", callback: UEventCallback) -> UEventCallback:
    """Wrap ``callback`` so events raised on any thread are handled on ``loop``.

    The simulated kernel raises events from the kernel-write worker threads, like the real
    kernel raises them outside our control; the engine only runs on its event loop.
    """
    # One wakeup of the loop per burst, not per event: a VF storm raises thousands of events from
    # the kernel-write threads, and every call_soon_threadsafe wakes the loop (and takes the GIL).
    lock = threading.Lock()
    queue: list[UEvent] = []
    scheduled = False

    def drain() -> None:
        nonlocal scheduled
        with lock:
            batch = queue[:]
            queue.clear()
            scheduled = False
        for event in batch:
            callback(event)

    def deliver(event: UEvent) -> None:
        nonlocal scheduled
        with lock:
            queue.append(event)
            if scheduled:
                return
            scheduled = True
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(drain)
            except RuntimeError:  # closed meanwhile
                pass

    return deliver
