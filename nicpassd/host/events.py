"""Device events as the host model hands them to the engine, whatever produced them.

Production events come from udev (pyudev), simulated ones from the simulated kernel; both are
turned into ``UEvent`` so the engine has one input.
"""

from __future__ import annotations

from dataclasses import dataclass
import asyncio
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
    def deliver(event: UEvent) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(callback, event)

    return deliver
