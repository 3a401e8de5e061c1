"""Production event source: udev's netlink monitor on the asyncio loop (no observer thread)."""

from __future__ import annotations

import asyncio
import logging

from nicpassd.host.events import UEvent, UEventCallback

log = logging.getLogger(__name__)
RECEIVE_BUFFER = 128 * 1024 * 1024  # VF storms emit hundreds of events at once


class UdevEvents:
    def __init__(self, loop: asyncio.AbstractEventLoop, callback: UEventCallback, *, source: str = "udev") -> None:
        import pyudev  # imported here: the simulator and the tests of other layers do not need it

        self.loop = loop
        self.callback = callback
        # udev re-sends kernel events once its rules ran; wait for those (TuneD does the same).
        self.wait_initialized = source == "udev"
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        for subsystem in ("pci", "net"):
            self.monitor.filter_by(subsystem)
        try:
            self.monitor.set_receive_buffer_size(RECEIVE_BUFFER)
        except Exception as exc:  # pyudev raises its own error types; a small buffer still works
            log.warning("could not enlarge the udev receive buffer: %s", exc)
        self.monitor.start()
        loop.add_reader(self.monitor.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            device = self.monitor.poll(timeout=0)
            if device is None:
                return
            if self.wait_initialized and not device.is_initialized:
                continue
            self.callback(UEvent(
                action=device.action or "change",
                subsystem=device.subsystem or "",
                sys_name=device.sys_name,
                driver=device.driver or "",
            ))

    def close(self) -> None:
        self.loop.remove_reader(self.monitor.fileno())
