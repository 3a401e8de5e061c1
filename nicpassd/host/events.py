"""Device events as the host model hands them to the engine, whatever produced them.

Production events come from udev (pyudev), simulated ones from the simulated kernel; both are
turned into ``UEvent`` so the engine has one input.
"""

from __future__ import annotations

from dataclasses import dataclass
import asyncio
import threading
from typing import Callable


@dataclass(frozen=True)
class UEvent:
    action: str  # add, remove, change, bind, unbind, move
    subsystem: str  # pci, net, or "route" for routing/address changes
    sys_name: str  # PCI address or interface name
    driver: str = ""


UEventCallback = Callable[[UEvent], None]


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
