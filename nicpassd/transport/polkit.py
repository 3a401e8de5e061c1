"""polkit authorization per action, asked over the bus for the calling connection.

A caller of uid 0 is authorized without asking: polkitd authorizes root for every action before
it looks at any rule ("special case: uid 0, root, is _always_ authorized for anything",
check_authorization_sync), so the answer is the same, without polkitd's round trip and rules
engine (16 ms of a 487 ms bind of 7 VFs in the e2e guest) on every call of the hooks and of an
admin's nicpassctl. systemd's services do the same (bus_verify_polkit_async asks the bus for the
sender's privilege first). The uid comes from the bus (GetConnectionUnixUser), once per
connection: a unique name is never given to another connection while the bus runs.
"""

from __future__ import annotations

import asyncio
import logging

from dbus_fast import Message, MessageType, Variant
from dbus_fast.errors import DBusError

log = logging.getLogger(__name__)

POLKIT = "org.freedesktop.PolicyKit1"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
NO_POLKIT_ERRORS = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")
ALLOW_USER_INTERACTION = 0x1


UIDS_KEPT = 1024  # callers' uids remembered (a connection lives as long as its process, usually seconds)


class Authorizer:
    def __init__(self, bus, *, max_in_flight: int = 64) -> None:
        self.bus = bus
        # The system bus limits pending replies per connection (128): never exceed it.
        self._slots = asyncio.Semaphore(max_in_flight)
        self._warned_no_polkit = False
        self._uids: dict[str, int] = {}

    async def require(self, sender: str, action: str, *, interactive: bool = False) -> None:
        if not sender:
            raise DBusError(ACCESS_DENIED, "caller unknown")
        if await self.uid_of(sender) == 0:
            log.debug("polkit: %s for %s: uid 0, authorized without asking", action, sender)
            return
        if not await self._authorized(sender, action, interactive):
            raise DBusError(ACCESS_DENIED, f"not authorized for {action}")

    async def uid_of(self, sender: str) -> int | None:
        """The uid of the connection ``sender`` as the bus knows it (None when the bus does not
        answer: the caller is then asked about like any other)."""
        uid = self._uids.get(sender)
        if uid is not None:
            return uid
        reply = await self._call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionUnixUser", signature="s", body=[sender]))
        if reply.message_type != MessageType.METHOD_RETURN:
            return None
        if len(self._uids) >= UIDS_KEPT:
            del self._uids[next(iter(self._uids))]
        self._uids[sender] = uid = int(reply.body[0])
        return uid

    async def _call(self, message: Message) -> Message:
        async with self._slots:
            return await self.bus.call(message)

    async def _authorized(self, sender: str, action: str, interactive: bool) -> bool:
        reply = await self._call(Message(
            destination=POLKIT, path="/org/freedesktop/PolicyKit1/Authority",
            interface="org.freedesktop.PolicyKit1.Authority", member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[("system-bus-name", {"name": Variant("s", sender)}), action, {},
                  ALLOW_USER_INTERACTION if interactive else 0, ""],
        ))
        if reply.message_type == MessageType.METHOD_RETURN:
            authorized, challenge, _details = reply.body[0]
            log.debug("polkit: %s for %s: authorized=%s challenge=%s", action, sender, authorized, challenge)
            return bool(authorized)
        if reply.error_name in NO_POLKIT_ERRORS:
            return await self._root_only(sender, action)
        log.error("polkit CheckAuthorization failed: %s %s", reply.error_name, reply.body)
        return False

    async def _root_only(self, sender: str, action: str) -> bool:
        """Without polkit on the bus, only root is authorized (a logged, conservative fallback)."""
        if not self._warned_no_polkit:
            log.warning("polkit is not available on the bus: only root may call mutating methods")
            self._warned_no_polkit = True
        return await self.uid_of(sender) == 0
