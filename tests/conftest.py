import os
import subprocess

import pytest

# ---------------------------------------------------------------------------------------------
# Bus and polkit processes (tests/support). Session-wide processes, sync fixtures: bus
# *connections* belong in each test (pytest-asyncio 1.x loops are per test).
# ---------------------------------------------------------------------------------------------
from support.bus import PrivateBus
from support.polkit import PolkitMock


@pytest.fixture(scope="session")
def private_bus():
    """A private system-type dbus-daemon enforcing dbus/org.nicpass.NicPass1.conf.

    DBUS_SYSTEM_BUS_ADDRESS points at it for the whole session, so BusType.SYSTEM clients and
    spawned daemons use it.
    """
    saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    with PrivateBus() as bus:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        try:
            yield bus
        finally:
            if saved is None:
                os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = saved


@pytest.fixture(scope="session")
def polkit_mock(private_bus):
    """polkit on the private bus, authorizing uid 0 only; polkit_mock.checks() lists its answers."""
    with PolkitMock(private_bus, allowed_uids=[0]) as mock:
        yield mock


@pytest.fixture
def polkit(polkit_mock):
    """The session's polkit mock, reset for this test: uid 0 allowed for every action, no checks recorded."""
    polkit_mock.set_allowed_uids([0])
    polkit_mock.clear_action_uids()
    polkit_mock.clear()
    return polkit_mock


# --- end of bus and polkit fixtures ----------------------------------------------------------


# --- shared stand-ins -------------------------------------------------------------------------
@pytest.fixture
def qemu():
    """Start stand-in QEMU processes (sleep); all are killed at the end."""
    processes: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()
