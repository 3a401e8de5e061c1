"""The system bus connection, with two fixes to dbus-fast.

1. EAGAIN: when a write meets a full socket buffer, dbus-fast tears the whole connection down
   (test-infrastructure.md). Here EAGAIN means "0 bytes sent, retry when writable".
2. ObjectManager signals: dbus-fast emits InterfacesAdded/Removed from the object's own path; the
   D-Bus spec (and every ObjectManager client) expects them from the manager's path.

Both reach into dbus-fast's private names (``PRIVATE_NAMES``), checked against the versions
pyproject.toml allows (``>=5.2,<5.3``). ``private_api_problems`` lists what a dbus-fast release
changed of them; tests/unit/test_dbus_fast_private.py fails loudly on it, and ``connect`` falls
back to dbus-fast's own writer (logged) instead of patching something it does not know.
"""

from __future__ import annotations

import inspect
import logging
import socket

from dbus_fast import Message
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.constants import BusType
from dbus_fast.service import ServiceInterface

log = logging.getLogger(__name__)
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
# What this module relies on: the writer's state, its callback, the bus's teardown and its
# ObjectManager hooks (and their parameters).
WRITER_ATTRIBUTES = ("messages", "negotiate_unix_fd", "bus", "sock", "loop", "buf", "fd", "offset", "unix_fds", "fut")
PRIVATE_NAMES = {
    (_MessageWriter, "write_callback"): ("self", "remove_writer"),
    (MessageBus, "_finalize"): ("self", "err"),
    (MessageBus, "_emit_interface_added"): ("self", "path", "interface"),
    (MessageBus, "_emit_interface_removed"): ("self", "path", "removed_interfaces"),
    (ServiceInterface, "_get_all_property_values"): ("interface", "callback", "user_data"),
}
BUS_ATTRIBUTES = ("_writer", "_user_disconnect", "_disconnected")


def private_api_problems(bus: MessageBus | None = None) -> list[str]:
    """What of ``PRIVATE_NAMES`` the installed dbus-fast does not have as expected ([] = all)."""
    problems = []
    for (owner, name), parameters in PRIVATE_NAMES.items():
        member = getattr(owner, name, None)
        if member is None:
            problems.append(f"{owner.__name__}.{name} is gone")
            continue
        try:
            found = tuple(inspect.signature(member).parameters)
        except (TypeError, ValueError):  # compiled (Cython) without a signature: names unknown
            continue
        if found[:len(parameters)] != parameters:
            problems.append(f"{owner.__name__}.{name} takes {found}, expected {parameters}")
    if bus is not None:
        problems += [f"MessageBus.{name} is gone" for name in BUS_ATTRIBUTES if not hasattr(bus, name)]
        writer = getattr(bus, "_writer", None)
        problems += [f"_MessageWriter.{name} is gone" for name in WRITER_ATTRIBUTES if not hasattr(writer, name)]
    return problems


class _PatientWriter(_MessageWriter):
    def write_callback(self, remove_writer: bool = True) -> None:
        sock = self.sock
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds, self.buf, self.offset, self.fut = unix_fds, memoryview(buf), 0, fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(self.unix_fds))]
                        self.offset += sock.sendmsg([self.buf[self.offset:]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += sock.send(self.buf[self.offset:])
                except BlockingIOError:
                    self.loop.add_writer(self.fd, self.write_callback)
                    return
                if self.offset < len(self.buf):
                    self.loop.add_writer(self.fd, self.write_callback)
                    return
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except Exception as exc:  # a real socket error: the connection is gone
            if self.fut is not None and not self.fut.done():
                if self.bus._user_disconnect:
                    self.fut.set_result(None)
                else:
                    self.fut.set_exception(exc)
            self.bus._finalize(exc)


def _fd_array(fds: list[int]):
    import array

    return array.array("i", fds)


class NicpassBus(MessageBus):
    def __init__(self, *, bus_address: str | None = None, object_manager_path: str = "/") -> None:
        super().__init__(bus_address=bus_address, bus_type=BusType.SYSTEM)
        self.object_manager_path = object_manager_path

    async def connect(self) -> "NicpassBus":
        await super().connect()
        problems = private_api_problems(self)
        if problems:
            log.error("this dbus-fast differs from the versions nicpassd was checked against (%s); writing "
                      "with its own writer, which drops the connection on a full socket buffer",
                      "; ".join(problems))
        else:
            self._writer.__class__ = _PatientWriter
        return self

    def _emit_interface_added(self, path, interface) -> None:
        if self._disconnected or path == self.object_manager_path:
            return

        def send(iface, result, _user_data, error) -> None:
            self.send(Message.new_signal(
                path=self.object_manager_path, interface=OBJECT_MANAGER, member="InterfacesAdded",
                signature="oa{sa{sv}}", body=[path, {iface.name: result or {}}]))

        all_properties = getattr(interface, "all_properties", None)
        if all_properties is not None:
            # A hot-added PF brings dozens of VFs at once: the properties built directly, not
            # each getter called through dbus-fast's property machinery (half the export's cost).
            send(interface, all_properties(), None, None)
            return
        ServiceInterface._get_all_property_values(interface, send)

    def _emit_interface_removed(self, path, removed_interfaces) -> None:
        if self._disconnected or path == self.object_manager_path:
            return
        self.send(Message.new_signal(
            path=self.object_manager_path, interface=OBJECT_MANAGER, member="InterfacesRemoved",
            signature="oas", body=[path, removed_interfaces]))
