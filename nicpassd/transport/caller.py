"""Who is calling: dbus-fast does not hand a method its message, so a message handler that runs
before dispatch records it in a context variable that the method's task inherits."""

from __future__ import annotations

import contextvars

from dbus_fast import Message
from dbus_fast.constants import MessageFlag, MessageType

current_message: contextvars.ContextVar[Message | None] = contextvars.ContextVar("current_message", default=None)


def record_caller(message: Message) -> None:
    if message.message_type == MessageType.METHOD_CALL:
        current_message.set(message)
    return None  # never handles the message itself


def caller() -> tuple[str, bool]:
    """(unique bus name of the caller, whether it allows interactive authorization)."""
    message = current_message.get()
    if message is None:
        return "", False
    return message.sender or "", bool(message.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
