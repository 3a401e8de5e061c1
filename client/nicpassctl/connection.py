"""The only module that touches dbus-fast: one system-bus connection, raw Message calls.

Replies come back as plain Python data (Variants unwrapped, structs as lists), so the rest of
the client (and its tests) never sees a dbus-fast type.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import DaemonError, timed_out
from .names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, OM_IFACE, PROPS_IFACE

READ_TIMEOUT = 25.0
MUTATE_TIMEOUT = 300.0  # VF creation and verified binds can take a while on real hardware


def unwrap(value: Any) -> Any:
    """Variants → their value, structs → lists, recursively."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unwrap(v) for v in value]
    return value


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
        self._bus: MessageBus | None = None

    async def connect(self) -> "Client":
        # DBUS_SYSTEM_BUS_ADDRESS is honoured by BusType.SYSTEM when no address is given.
        bus = MessageBus(bus_address=self.bus_address or None, bus_type=BusType.SYSTEM)
        await bus.connect()
        self._bus = bus
        return self

    async def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def _call(self, msg: Message, mutate: bool) -> list[Any]:
        assert self._bus is not None, "not connected"
        timeout = self.timeout or (MUTATE_TIMEOUT if mutate else READ_TIMEOUT)
        try:
            reply = await asyncio.wait_for(self._bus.call(msg), timeout)
        except asyncio.TimeoutError:
            raise timed_out(timeout, mutate) from None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise DaemonError(str(reply.error_name), text, msg.member or "")
        return unwrap(list(reply.body))

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        mutate: bool = False,
        destination: str = BUS_NAME,
    ) -> list[Any]:
        flags = MessageFlag.NONE
        if mutate and self.interactive:
            flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body or []),
            flags=flags,
        )
        return await self._call(msg, mutate)

    async def manager(self, member: str, signature: str = "", body: list[Any] | None = None,
                      *, options: dict[str, Any] | None = None, mutate: bool = False) -> list[Any]:
        """Call a Manager method; ``options`` (if given) is appended as the a{sv} argument."""
        body = list(body or [])
        if options is not None:
            body.append(variant_options(options))
        return await self.call(MANAGER_PATH, MANAGER_IFACE, member, signature, body, mutate=mutate)

    async def get_all(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = await self.call(path, PROPS_IFACE, "GetAll", "s", [interface])
        return props

    async def get(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self.call(path, PROPS_IFACE, "Get", "ss", [interface, name])
        return value

    async def managed_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        (objects,) = await self.call(MANAGER_PATH, OM_IFACE, "GetManagedObjects")
        return objects

    async def subscribe(self, rules: list[str], handler: Callable[[str, str, str, str, list[Any]], None]) -> None:
        """AddMatch every rule; ``handler(sender, path, interface, member, body)`` gets each signal."""
        assert self._bus is not None, "not connected"

        def on_message(msg: Message) -> None:
            if msg.message_type == MessageType.SIGNAL:
                handler(msg.sender or "", msg.path or "", msg.interface or "", msg.member or "",
                        unwrap(list(msg.body)))

        self._bus.add_message_handler(on_message)
        for rule in rules:
            await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule],
                            destination="org.freedesktop.DBus")

    async def wait_for_disconnect(self) -> None:
        assert self._bus is not None, "not connected"
        await self._bus.wait_for_disconnect()
