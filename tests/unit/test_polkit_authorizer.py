"""The Authorizer's decisions, over a stand-in bus that records what it is asked (the real bus and
polkit mock: tests/integration/test_dbus_service.py, test_polkit_actions.py)."""

from __future__ import annotations

import pytest
from dbus_fast import Message
from dbus_fast.errors import DBusError

from nicpassd.transport.polkit import UIDS_KEPT, Authorizer


class Bus:
    """Answers GetConnectionUnixUser from ``uids`` and CheckAuthorization with ``polkit_says``."""

    def __init__(self, uids: dict[str, int], polkit_says: bool = True) -> None:
        self.uids, self.polkit_says, self.asked = uids, polkit_says, []

    async def call(self, message: Message) -> Message:
        message.serial = len(self.asked) + 1  # as the bus numbers what is sent
        self.asked.append(message.member if message.member != "GetConnectionUnixUser" else
                          f"uid of {message.body[0]}")
        if message.member == "GetConnectionUnixUser":
            if message.body[0] not in self.uids:
                return Message.new_error(message, "org.freedesktop.DBus.Error.NameHasNoOwner", "gone")
            return Message.new_method_return(message, "u", [self.uids[message.body[0]]])
        return Message.new_method_return(message, "(bba{ss})", [[self.polkit_says, False, {}]])


async def test_root_is_authorized_without_polkit_and_its_uid_is_asked_once_per_connection():
    bus = Bus({":1.5": 0}, polkit_says=False)
    authorizer = Authorizer(bus)
    await authorizer.require(":1.5", "org.nicpass.NicPass1.manage")
    await authorizer.require(":1.5", "org.nicpass.NicPass1.force")
    assert bus.asked == ["uid of :1.5"]


async def test_another_user_is_asked_about_every_time():
    bus = Bus({":1.6": 1000}, polkit_says=True)
    authorizer = Authorizer(bus)
    await authorizer.require(":1.6", "org.nicpass.NicPass1.manage")
    await authorizer.require(":1.6", "org.nicpass.NicPass1.manage")
    assert bus.asked == ["uid of :1.6", "CheckAuthorization", "CheckAuthorization"]
    bus.polkit_says = False  # polkit's answer may change (a rule, a session gone idle): never kept
    with pytest.raises(DBusError) as refused:
        await authorizer.require(":1.6", "org.nicpass.NicPass1.manage")
    assert refused.value.type == "org.freedesktop.DBus.Error.AccessDenied"


async def test_a_caller_the_bus_cannot_name_is_asked_about_like_any_other():
    bus = Bus({}, polkit_says=False)
    with pytest.raises(DBusError):
        await Authorizer(bus).require(":1.7", "org.nicpass.NicPass1.manage")
    assert bus.asked == ["uid of :1.7", "CheckAuthorization"]


async def test_the_uids_kept_are_bounded():
    bus = Bus({f":1.{n}": 1000 for n in range(UIDS_KEPT + 10)})
    authorizer = Authorizer(bus)
    for n in range(UIDS_KEPT + 10):
        assert await authorizer.uid_of(f":1.{n}") == 1000
    assert len(authorizer._uids) == UIDS_KEPT
