"""transport/bus.py patches two faults of dbus-fast through its private names. pyproject pins the
versions they were checked against; this fails loudly, naming what changed, if an installed
dbus-fast differs — before a daemon meets it on a full socket buffer."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from nicpassd.transport import bus


def test_the_private_names_are_as_checked():
    assert bus.private_api_problems() == [], f"dbus-fast {version('dbus-fast')} changed its private names"


@pytest.mark.bus
async def test_a_connected_bus_has_the_writer_state_the_patch_uses(private_bus):
    connection = await bus.NicpassBus(bus_address=private_bus.address).connect()
    try:
        assert bus.private_api_problems(connection) == []
        assert type(connection._writer) is bus._PatientWriter
    finally:
        connection.disconnect()


def test_a_missing_name_is_reported():
    problems = bus.private_api_problems(object())
    assert "MessageBus._writer is gone" in problems and "_MessageWriter.buf is gone" in problems
