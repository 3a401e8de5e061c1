"""The only module that talks D-Bus: one blocking system-bus connection (jeepney), raw calls.

Blocking on purpose: a command is a few calls in a row, and an event loop is not free to start.
``import asyncio`` alone costs ~0.4 s of CPU under TCG (a hypervisor's guest), dbus-fast imports
it, and jeepney does not. Calls can still overlap: ``begin`` sends one and hands back a
:class:`Pending` whose reply is read when asked for (replies to other calls are kept aside).

Replies come back as plain Python data (variants unwrapped, structs as lists), so the rest of
the client (and its tests) never sees a jeepney type.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

from jeepney import DBusAddress, HeaderFields, MessageFlag, MessageType, new_method_call
from jeepney.bus import get_connectable_addresses
from jeepney.io.blocking import DBusConnection, prep_socket

from .errors import DaemonError, timed_out
from .names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, OM_IFACE, PROPS_IFACE

READ_TIMEOUT = 25.0
MUTATE_TIMEOUT = 300.0  # VF creation and verified binds can take a while on real hardware
AUTH_TIMEOUT = 5.0
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"


class Variant(NamedTuple):
    """A D-Bus variant to send: jeepney marshals any (signature, value) pair as one."""

    signature: str
    value: Any


class InvalidAddressError(ValueError):
    """A bus address this client cannot connect to (not a unix: address, or malformed)."""


def _complete_type(signature: str, at: int) -> int:
    """The index just past the single complete type that starts at ``signature[at]``."""
    code = signature[at]
    if code == "a":
        return _complete_type(signature, at + 1)
    if code in "({":
        close, depth = {"(": ")", "{": "}"}[code], 1
        at += 1
        while depth:
            depth += {code: 1, close: -1}.get(signature[at], 0)
            at += 1
        return at
    return at + 1


def _types(signature: str) -> list[str]:
    """'sa{sv}(ii)' → ['s', 'a{sv}', '(ii)']."""
    out, at = [], 0
    while at < len(signature):
        end = _complete_type(signature, at)
        out.append(signature[at:end])
        at = end
    return out


def unwrap(signature: str, value: Any) -> Any:
    """A value of one complete type → plain data: variants → their value, structs → lists."""
    code = signature[0]
    if code == "v":
        inner, data = value
        return unwrap(inner, data)
    if signature.startswith("a{"):
        key, item = _types(signature[2:-1])
        return {unwrap(key, k): unwrap(item, v) for k, v in value.items()}
    if code == "a" and signature != "ay":
        return [unwrap(signature[1:], v) for v in value]
    if code == "(":
        return [unwrap(t, v) for t, v in zip(_types(signature[1:-1]), value)]
    return value


def unwrap_body(signature: str, body: tuple) -> list[Any]:
    return [unwrap(t, v) for t, v in zip(_types(signature), body)]


def variant_options(options: dict[str, Any]) -> dict[str, Variant]:
    """a{sv} from plain Python values (bool → b, str → s, int → u; a Variant as it is)."""
    out = {}
    for key, value in options.items():
        if isinstance(value, Variant):
            out[key] = value
        elif isinstance(value, bool):
            out[key] = Variant("b", value)
        elif isinstance(value, str):
            out[key] = Variant("s", value)
        elif isinstance(value, int):
            out[key] = Variant("u", value)
        else:
            raise TypeError(f"unsupported option type for {key!r}: {type(value).__name__}")
    return out


def socket_path(address: str | None) -> str:
    """The socket of a D-Bus address; DBUS_SYSTEM_BUS_ADDRESS, then the standard one, by default."""
    address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS
    try:
        return next(get_connectable_addresses(address))
    except (ValueError, RuntimeError, StopIteration) as exc:
        raise InvalidAddressError(f"not a unix: D-Bus address ({exc})") from None


class Pending:
    """A call that was sent; ``result()`` waits for its reply."""

    def __init__(self, client: "Client", serial: int, member: str, mutate: bool) -> None:
        self.client, self.serial, self.member, self.mutate = client, serial, member, mutate

    def result(self) -> list[Any]:
        return self.client._reply_to(self)


class Client:
    """A thin, stateless caller of the nicpassd D-Bus API."""

    def __init__(
        self,
        bus_address: str | None = None,
        timeout: float | None = None,
        interactive: bool = True,
    ) -> None:
        self.bus_address = bus_address
        self.timeout = timeout
        self.interactive = interactive
        self._conn: DBusConnection | None = None
        self._replies: dict[int, Any] = {}  # replies that came while waiting for another one
        self._on_signal: Callable[[str, str, str, str, list[Any]], None] | None = None

    def connect(self) -> "Client":
        sock = prep_socket(socket_path(self.bus_address), timeout=AUTH_TIMEOUT)
        self._conn = DBusConnection(sock)  # says Hello
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def begin(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        mutate: bool = False,
        destination: str = BUS_NAME,
    ) -> Pending:
        assert self._conn is not None, "not connected"
        msg = new_method_call(DBusAddress(path, bus_name=destination, interface=interface), member,
                              signature or None, tuple(body or ()))
        if mutate and self.interactive:
            msg.header.flags |= MessageFlag.allow_interactive_authorization
        serial = next(self._conn.outgoing_serial)
        self._conn.send(msg, serial=serial)
        return Pending(self, serial, member, mutate)

    def call(self, path: str, interface: str, member: str, signature: str = "",
             body: list[Any] | None = None, *, mutate: bool = False, destination: str = BUS_NAME) -> list[Any]:
        return self.begin(path, interface, member, signature, body, mutate=mutate,
                          destination=destination).result()

    def _reply_to(self, call: Pending) -> list[Any]:
        timeout = self.timeout or (MUTATE_TIMEOUT if call.mutate else READ_TIMEOUT)
        deadline = time.monotonic() + timeout
        while call.serial not in self._replies:
            try:
                self._take(self._conn.receive(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                raise timed_out(timeout, call.mutate) from None
        reply = self._replies.pop(call.serial)
        fields = reply.header.fields
        signature = fields.get(HeaderFields.signature, "")
        if reply.header.message_type == MessageType.error:
            text = reply.body[0] if signature.startswith("s") else ""
            raise DaemonError(str(fields.get(HeaderFields.error_name, "")), text, call.member)
        return unwrap_body(signature, reply.body)

    def _take(self, msg: Any) -> None:
        """File a reply under its call's serial; hand a signal to the subscriber."""
        kind, fields = msg.header.message_type, msg.header.fields
        if kind in (MessageType.method_return, MessageType.error):
            self._replies[fields.get(HeaderFields.reply_serial, -1)] = msg
        elif kind == MessageType.signal and self._on_signal is not None:
            self._on_signal(fields.get(HeaderFields.sender, ""), fields.get(HeaderFields.path, ""),
                            fields.get(HeaderFields.interface, ""), fields.get(HeaderFields.member, ""),
                            unwrap_body(fields.get(HeaderFields.signature, ""), msg.body))

    def manager(self, member: str, signature: str = "", body: list[Any] | None = None,
                *, options: dict[str, Any] | None = None, mutate: bool = False) -> list[Any]:
        """Call a Manager method; ``options`` (if given) is appended as the a{sv} argument."""
        return self.begin_manager(member, signature, body, options=options, mutate=mutate).result()

    def begin_manager(self, member: str, signature: str = "", body: list[Any] | None = None,
                      *, options: dict[str, Any] | None = None, mutate: bool = False) -> Pending:
        body = list(body or [])
        if options is not None:
            body.append(variant_options(options))
        return self.begin(MANAGER_PATH, MANAGER_IFACE, member, signature, body, mutate=mutate)

    def get_all(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = self.call(path, PROPS_IFACE, "GetAll", "s", [interface])
        return props

    def get(self, path: str, interface: str, name: str) -> Any:
        (value,) = self.call(path, PROPS_IFACE, "Get", "ss", [interface, name])
        return value

    def managed_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        (objects,) = self.call(MANAGER_PATH, OM_IFACE, "GetManagedObjects")
        return objects

    def subscribe(self, rules: list[str], handler: Callable[[str, str, str, str, list[Any]], None]) -> None:
        """AddMatch every rule; ``handler(sender, path, interface, member, body)`` gets each signal."""
        self._on_signal = handler
        added = [self.begin("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule],
                            destination="org.freedesktop.DBus") for rule in rules]
        for call in added:
            call.result()

    def listen(self) -> None:
        """Hand signals to the subscriber until the connection ends (ConnectionResetError)."""
        assert self._conn is not None, "not connected"
        while True:
            self._take(self._conn.receive())
