"""The hook helper's D-Bus wire format, offline: byte for byte what dbus-fast marshals, and
unmarshalling of hand-built messages in both byte orders (tests/integration/test_hook_dbus.py
runs the same client against the real dbus-daemon)."""

from __future__ import annotations

import sys

import pytest
from dbus_fast import Message, Variant
from dbus_fast._private.marshaller import Marshaller
from support import REPO

sys.path.insert(0, str(REPO / "client" / "hooks"))
import nicpassd_hook as hook  # noqa: E402

CASES = [
    ("ssasa{sv}", ["web", "c7a5fdbd", ["0000:3b:02.0", "0000:3b:02.1"],
                   {"pidfile": "s:/run/x.pid", "skip_unmanaged": "b:1"}]),
    ("sa{sv}", ["uuid", {"pid": "u:4242"}]),
    ("sa{sv}", ["uuid", {}]),
    ("ybnqiuxtd", [7, False, -3, 65535, -1, 2**32 - 1, -(2**63), 2**64 - 1, -0.125]),
    ("a(yv)", [[(1, "o:/org/x"), (8, "g:a{sv}")]]),
    ("aya{sa{sv}}as", [[1, 2, 3], {"a": {"x": "t:9"}, "b": {}}, []]),
    ("(sa(ii))v", [("s", [(1, -1)]), "as:x,y"]),
]


def dbus_fast_values(signature: str, values: list) -> list:
    """Our test values with variants written "sig:value", turned into dbus-fast's Variant."""
    def convert(kind: str, value):
        if kind == "v":
            inner, _, text = value.partition(":")
            return Variant(inner, parse(inner, text))
        if kind.startswith("a{"):
            key, item = hook.split_signature(kind[2:-1])
            return {convert(key, k): convert(item, v) for k, v in value.items()}
        if kind == "ay":
            return bytes(value)
        if kind.startswith("a"):
            return [convert(kind[1:], item) for item in value]
        if kind.startswith("("):
            return [convert(sub, item) for sub, item in zip(hook.split_signature(kind[1:-1]), value)]
        return value

    return [convert(kind, value) for kind, value in zip(hook.split_signature(signature), values)]


def helper_values(signature: str, values: list) -> list:
    """The same values the way the helper takes them: a variant is (signature, value)."""
    def convert(kind: str, value):
        if kind == "v":
            inner, _, text = value.partition(":")
            return (inner, parse(inner, text))
        if kind.startswith("a{"):
            key, item = hook.split_signature(kind[2:-1])
            return {convert(key, k): convert(item, v) for k, v in value.items()}
        if kind.startswith("a"):
            return [convert(kind[1:], item) for item in value]
        if kind.startswith("("):
            return tuple(convert(sub, item) for sub, item in zip(hook.split_signature(kind[1:-1]), value))
        return value

    return [convert(kind, value) for kind, value in zip(hook.split_signature(signature), values)]


def parse(kind: str, text: str):
    if kind in ("s", "o", "g"):
        return text
    if kind == "b":
        return text == "1"
    if kind == "as":
        return text.split(",")
    return int(text)


@pytest.mark.parametrize(("signature", "values"), CASES)
def test_bodies_are_what_dbus_fast_marshals(signature, values):
    ours = bytes(hook.marshal(bytearray(), signature, helper_values(signature, values)))
    assert ours == Marshaller(signature, dbus_fast_values(signature, values)).marshall()
    assert hook.unmarshal(ours, 0, len(ours), signature) == helper_values(signature, values)


def test_a_whole_call_is_what_dbus_fast_sends():
    body = ["web", "uuid", ["0000:3b:02.0"],
            {"pidfile": ("s", "/run/libvirt/qemu/web.pid"), "skip_unmanaged": ("b", True)}]
    fields = {1: ("o", "/org/nicpass/NicPass1"), 2: ("s", "org.nicpass.NicPass1.Manager"), 3: ("s", "Prepare"),
              6: ("s", "org.nicpass.NicPass1")}
    ours = hook.message(2, hook.METHOD_CALL, fields, "ssasa{sv}", body)
    theirs = Message(destination="org.nicpass.NicPass1", path="/org/nicpass/NicPass1",
                     interface="org.nicpass.NicPass1.Manager", member="Prepare", signature="ssasa{sv}", serial=2,
                     body=[*body[:3], {key: Variant(*value) for key, value in body[3].items()}])._marshall(False)
    assert ours == theirs


def test_big_endian_messages_are_read():
    # "su" body, big-endian: "héllo" (6 bytes) + NUL, pad to 4, then 258.
    body = (6).to_bytes(4, "big") + "héllo".encode() + b"\0" + b"\0" + (258).to_bytes(4, "big")
    assert hook.unmarshal(body, 0, len(body), "su", order="big") == ["héllo", 258]
    assert hook.unmarshal((2**63).to_bytes(8, "big"), 0, 8, "t", order="big") == [2**63]


@pytest.mark.parametrize("signature", ["a", "(s", "a{s", "s)", "{sv}x)", "z", "(s}"])
def test_bad_signatures_are_refused(signature):
    with pytest.raises(ValueError):
        hook.split_signature(signature)


def test_truncated_bodies_are_refused():
    data = bytes(hook.marshal(bytearray(), "sas", ["abc", ["x", "y"]]))
    for cut in (3, 9, len(data) - 1):
        with pytest.raises((ValueError, IndexError)):
            hook.unmarshal(data, 0, cut, "sas")


def test_wrong_value_counts_are_refused():
    with pytest.raises(ValueError):
        hook.marshal(bytearray(), "ss", ["only one"])
    with pytest.raises(ValueError):
        hook.marshal(bytearray(), "(su)", [("one",)])
