"""systemd integration: sd_notify (READY, WATCHDOG, STOPPING, STATUS) and journald logging.

systemd-python does the work when installed; the daemon still runs (with stderr logging and a
plain-socket notify) where it is not, e.g. a developer's checkout without libsystemd.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import logging.handlers
import os
import queue
import socket
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _notify(message: str) -> None:
    try:
        from systemd import daemon

        daemon.notify(message)
        return
    except ImportError:
        pass
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)


class Notifier:
    def ready(self, status: str) -> None:
        _notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        _notify(f"STATUS={status}")

    def stopping(self) -> None:
        _notify("STOPPING=1")

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task | None:
        """Ping at half the interval systemd asked for; only while the event loop is alive."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        interval = int(usec) / 2_000_000

        async def ping() -> None:
            while True:
                _notify("WATCHDOG=1")
                await asyncio.sleep(interval)

        return loop.create_task(ping())


class _StructuredFields(logging.Filter):
    """Turns ``extra={"device": ...}`` into journal fields (NICPASSD_DEVICE=...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in ("device", "vm_uuid", "action", "interface", "old_driver", "new_driver", "culprit",
                    "culprit_pid", "guest", "reasons", "outcome"):
            value = getattr(record, key, None)
            if value is not None:
                setattr(record, f"NICPASSD_{key.upper()}", value)
        return True


def setup_logging(level: str) -> None:
    """The journal (structured fields) under systemd, else stderr — written by a thread of its
    own: a record handed to journald is a blocking sendmsg, which waits whenever journald is
    behind (under a hypervisor: 10 ms and more a line), and the event loop must not wait it out
    (the asyncio documentation's advice). Order is kept; what is queued is written at exit."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, _QueueToThread):
            handler.stop()
    handler: logging.Handler | None = None
    if os.path.exists(JOURNAL_SOCKET) and not sys.stderr.isatty():
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="nicpassd")
            handler.addFilter(_StructuredFields())
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s nicpassd[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(_QueueToThread(handler))


class _QueueToThread(logging.handlers.QueueHandler):
    def __init__(self, handler: logging.Handler) -> None:
        records: queue.SimpleQueue = queue.SimpleQueue()
        super().__init__(records)
        self.listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
        self.listener.start()
        self._running = True
        atexit.register(self.stop)

    def stop(self) -> None:
        """Write what is queued and end the thread (once: at a new setup or at exit)."""
        if self._running:
            self._running = False
            self.listener.stop()
