"""Production event source: udev's netlink monitor on the asyncio loop (no observer thread).

- ``source="udev"`` (production): events after udev ran its rules — a device is "initialized",
  its udev properties (and the early-binding helper's driver_override) are in place. On a host
  without udevd (containers, this CI) nothing arrives there; ``source="kernel"`` reads the
  kernel's own uevents (the adapter tests use it in a throwaway network namespace).
- subsystems ``pci`` and ``net`` only (filtered in the kernel socket by libudev's BPF filter);
- a 128 MiB receive buffer (``SO_RCVBUFFORCE``, needs CAP_NET_ADMIN): creating 64 VFs raises a few
  hundred events at once;
- should the buffer overflow anyway (``ENOBUFS``: events were lost), an ``overflow`` event is
  delivered: the engine then re-reads everything and reconciles (nicpassd.host.inventory).
"""

from __future__ import annotations

import asyncio
import errno
import logging

from nicpassd.host.events import UEvent, UEventCallback, pci_identity

log = logging.getLogger(__name__)
RECEIVE_BUFFER = 128 * 1024 * 1024  # VF storms emit hundreds of events at once
SUBSYSTEMS = ("pci", "net")
OVERFLOW = UEvent("overflow", "", "")


class UdevEvents:
    def __init__(self, loop: asyncio.AbstractEventLoop, callback: UEventCallback, *, source: str = "udev",
                 subsystems: tuple[str, ...] = SUBSYSTEMS) -> None:
        import pyudev  # imported here: the simulator and the tests of other layers do not need it

        self.loop = loop
        self.callback = callback
        # udev re-sends kernel events once its rules ran; wait for those (TuneD does the same).
        self.wait_initialized = source == "udev"
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        for subsystem in subsystems:
            self.monitor.filter_by(subsystem)
        try:
            self.monitor.set_receive_buffer_size(RECEIVE_BUFFER)
        except Exception as exc:  # pyudev raises its own error types; a small buffer still works
            log.warning("could not enlarge the udev receive buffer: %s", exc)
        self.monitor.start()
        self._fd = self.monitor.fileno()
        loop.add_reader(self._fd, self._drain)

    def _drain(self) -> None:
        """Everything queued now (the reader is level-triggered: what is left wakes us again)."""
        for _ in range(4096):  # bounded: a storm must not starve the rest of the loop
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    log.error("reading udev events failed: %s", exc)
                    return
                log.warning("udev events were lost (receive buffer overflow): re-reading everything")
                self.callback(OVERFLOW)
                continue
            if device is None:
                return
            action = device.action or "change"
            if self.wait_initialized and action != "remove" and not device.is_initialized:
                continue
            subsystem = device.subsystem or ""
            self.callback(UEvent(
                action=action,
                subsystem=subsystem,
                sys_name=device.sys_name,
                driver=device.driver or "",
                # A new function's ids come with its event: the inventory need not read them.
                pci_identity=pci_identity(device.properties) if action == "add" and subsystem == "pci" else (),
            ))

    def close(self) -> None:
        self.loop.remove_reader(self._fd)
