"""The shipped bus policy (dbus/org.nicpass.NicPass1.conf) and the polkit mock, on a real dbus-daemon.

A stand-in service (dbus-fast, in the test's loop, as root) owns org.nicpass.NicPass1, answers
whatever reaches it and records every method call it receives; callers are busctl as root or as
nobody. busctl prints any AccessDenied as "Access denied" (it hides the message), so the record
tells who refused: a call the bus rejected never reaches the service.
"""

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from support.unprivileged import NOBODY, SETPRIV, busctl_async, run_as_nobody

BUS_NAME = "org.nicpass.NicPass1"
MANAGER_PATH = "/org/nicpass/NicPass1"
MANAGER_IFACE = "org.nicpass.NicPass1.Manager"
DEVICE_PATH = "/org/nicpass/NicPass1/devices/0000_3b_00_0"
DEVICE_IFACE = "org.nicpass.NicPass1.Device"
INTERNAL_IFACE = "org.nicpass.NicPass1.Internal"  # deliberately not in the policy
MANAGE = "org.nicpass.NicPass1.manage"


class Manager(ServiceInterface):
    def __init__(self):
        super().__init__(MANAGER_IFACE)
        self.label = "initial"

    # Writable at the service on purpose: only the bus policy stands between a caller and Set.
    @dbus_property()
    def Label(self) -> "s":
        return self.label

    @Label.setter
    def Label(self, value: "s"):
        self.label = value

    @method()
    def Check(self) -> "a(ssss)":
        return [["stand-in", "ok", "reached the service", ""]]


class Device(ServiceInterface):
    def __init__(self):
        super().__init__(DEVICE_IFACE)

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> "s":
        return "0000:3b:00.0"

    @method()
    def Describe(self) -> "s":
        return "device reached"


class Internal(ServiceInterface):
    def __init__(self):
        super().__init__(INTERNAL_IFACE)
        self.calls = 0

    @method()
    def Poke(self) -> "s":
        self.calls += 1
        return "internal reached"


class StandIn:
    """Owns the name; Manager.SetVfCount asks polkit about the caller, as the daemon must."""

    def __init__(self, bus: MessageBus):
        self.bus = bus
        self.manager, self.device, self.internal = Manager(), Device(), Internal()
        self.vf_counts: dict[str, int] = {}
        self.received: list[tuple[str, str]] = []  # (interface, member) of each method call
        self._tasks: set[asyncio.Task] = set()
        bus.export(MANAGER_PATH, self.manager)
        bus.export(MANAGER_PATH, self.internal)
        bus.export(DEVICE_PATH, self.device)
        # dbus-fast hands a @method no sender; a message handler sees the whole message.
        bus.add_message_handler(self._on_message)

    def _on_message(self, msg: Message):
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        self.received.append((msg.interface, msg.member))
        if msg.path == MANAGER_PATH and msg.interface == MANAGER_IFACE and msg.member == "SetVfCount":
            task = asyncio.get_running_loop().create_task(self._set_vf_count(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return True
        return None

    async def _set_vf_count(self, msg: Message):
        reply = await self.bus.call(Message(
            destination="org.freedesktop.PolicyKit1", path="/org/freedesktop/PolicyKit1/Authority",
            interface="org.freedesktop.PolicyKit1.Authority", member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[["system-bus-name", {"name": Variant("s", msg.sender)}], MANAGE, {}, 1, ""]))
        if reply.message_type is MessageType.ERROR:
            self.bus.send(Message.new_error(msg, "org.freedesktop.DBus.Error.Failed", str(reply.body)))
        elif not reply.body[0][0]:
            self.bus.send(Message.new_error(
                msg, "org.freedesktop.DBus.Error.AccessDenied", "stand-in: polkit said no"))
        else:
            device, count, _options = msg.body
            self.vf_counts[device] = count
            self.bus.send(Message.new_method_return(msg))


@pytest.fixture
async def standin(private_bus, polkit):
    # BusType.SYSTEM resolves to the private bus through DBUS_SYSTEM_BUS_ADDRESS (set by private_bus).
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    service = StandIn(bus)
    reply = await bus.request_name(BUS_NAME)
    assert reply == RequestNameReply.PRIMARY_OWNER, f"root could not own {BUS_NAME}: {reply}"
    yield service
    await bus.release_name(BUS_NAME)
    bus.disconnect()
    await bus.wait_for_disconnect()


def call(*args: str) -> list[str]:
    """busctl arguments for a method call on the service."""
    return ["--json=short", "call", BUS_NAME, *args]


# --- ownership -----------------------------------------------------------------------------------

# Asks the bus for the name with Debian's dbus-python (runs as nobody; the venv cannot).
REQUEST_NAME = """
import sys, dbus
bus = dbus.bus.BusConnection(sys.argv[1])
try:
    print(bus.request_name(sys.argv[2], dbus.bus.NAME_FLAG_DO_NOT_QUEUE))
except dbus.exceptions.DBusException as e:
    print(e.get_dbus_name(), e.get_dbus_message())
"""


def test_only_root_may_own_the_name(private_bus):
    nobody = run_as_nobody("/usr/bin/python3", "-I", "-c", REQUEST_NAME,
                           private_bus.address, BUS_NAME)
    assert nobody.returncode == 0, nobody.stderr
    assert nobody.stdout.startswith("org.freedesktop.DBus.Error.AccessDenied"), nobody.stdout
    assert f'not allowed to own the service "{BUS_NAME}"' in nobody.stdout

    # Same script as root: DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER (1). The difference is the uid.
    root = subprocess.run(["/usr/bin/python3", "-I", "-c", REQUEST_NAME, private_bus.address,
                           BUS_NAME], capture_output=True, text=True, timeout=30, cwd="/")
    assert root.stdout.strip() == "1", root.stdout + root.stderr


async def test_root_owns_the_name_and_serves_calls(standin, private_bus):
    owner = await busctl_async(private_bus.address, "--json=short", "call", "org.freedesktop.DBus",
                               "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner",
                               "s", BUS_NAME)
    assert json.loads(owner.stdout)["data"] == [standin.bus.unique_name]
    result = await busctl_async(private_bus.address, *call(MANAGER_PATH, MANAGER_IFACE, "Check"))
    assert result.returncode == 0, result.stderr
    assert "reached the service" in result.stdout


# --- what anyone may send ------------------------------------------------------------------------

READ_CALLS = {
    "introspect": (call(MANAGER_PATH, "org.freedesktop.DBus.Introspectable", "Introspect"),
                   MANAGER_IFACE),
    "get": (call(MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get", "ss",
                 MANAGER_IFACE, "Label"), "initial"),
    "get-all-manager": (call(MANAGER_PATH, "org.freedesktop.DBus.Properties", "GetAll", "s",
                             MANAGER_IFACE), "initial"),
    "get-all-device": (call(DEVICE_PATH, "org.freedesktop.DBus.Properties", "GetAll", "s",
                            DEVICE_IFACE), "0000:3b:00.0"),
    "manager-method": (call(MANAGER_PATH, MANAGER_IFACE, "Check"), "reached the service"),
    "device-method": (call(DEVICE_PATH, DEVICE_IFACE, "Describe"), "device reached"),
    "object-manager": (call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager",
                            "GetManagedObjects"), DEVICE_PATH),
    # Not GetMachineId: dbus-fast forwards it to the bus driver, whose Peer interface Debian's
    # system policy does not open, so it fails for everyone.
    "peer": (call(MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping"), ""),
}


@pytest.mark.parametrize("name", READ_CALLS)
async def test_nobody_reaches_the_service(standin, private_bus, name):
    args, expected = READ_CALLS[name]
    result = await busctl_async(private_bus.address, *args, nobody=True)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert standin.received == [(args[4], args[5])]


@pytest.mark.parametrize("nobody", [True, False], ids=["nobody", "root"])
async def test_no_one_may_set_properties(standin, private_bus, nobody):
    result = await busctl_async(private_bus.address, "set-property", BUS_NAME, MANAGER_PATH,
                                MANAGER_IFACE, "Label", "s", "changed", nobody=nobody)
    assert "Access denied" in result.stderr, result.stderr
    assert standin.received == [], "the bus let Properties.Set through"
    assert standin.manager.label == "initial"


async def test_nobody_cannot_call_interfaces_outside_the_policy(standin, private_bus):
    result = await busctl_async(private_bus.address, *call(MANAGER_PATH, INTERNAL_IFACE, "Poke"),
                                nobody=True)
    assert "Access denied" in result.stderr, result.stderr
    assert standin.received == []
    assert standin.internal.calls == 0


# --- polkit: the service asks about its caller ---------------------------------------------------

SET_VF_COUNT = call(MANAGER_PATH, MANAGER_IFACE, "SetVfCount", "sua{sv}", "0000:3b:00.0", "4", "0")


async def test_polkit_authorizes_root(standin, private_bus, polkit):
    result = await busctl_async(private_bus.address, *SET_VF_COUNT)
    assert result.returncode == 0, result.stderr
    assert standin.vf_counts == {"0000:3b:00.0": 4}
    assert polkit.checks() == [(MANAGE, 0, 1, True)]


async def test_polkit_denies_nobody(standin, private_bus, polkit):
    result = await busctl_async(private_bus.address, *SET_VF_COUNT, nobody=True)
    assert "Access denied" in result.stderr, result.stderr
    # The service, not the bus, refused: the call got through and polkit was asked about nobody.
    assert standin.received == [(MANAGER_IFACE, "SetVfCount")]
    assert standin.vf_counts == {}
    assert polkit.checks() == [(MANAGE, NOBODY, 1, False)]


async def test_polkit_allowed_uids_can_change(standin, private_bus, polkit):
    polkit.set_allowed_uids([NOBODY])
    nobody = await busctl_async(private_bus.address, *SET_VF_COUNT, nobody=True)
    root = await busctl_async(private_bus.address, *SET_VF_COUNT)
    assert nobody.returncode == 0, nobody.stderr
    assert root.returncode != 0
    assert polkit.checks() == [(MANAGE, NOBODY, 1, True), (MANAGE, 0, 1, False)]


def check_authorization(address: str, kind: str, *details: str) -> subprocess.CompletedProcess:
    """CheckAuthorization for MANAGE on subject (kind, details), asked by root with busctl."""
    return subprocess.run(
        ["busctl", f"--address={address}", "--json=short", "call", "org.freedesktop.PolicyKit1",
         "/org/freedesktop/PolicyKit1/Authority", "org.freedesktop.PolicyKit1.Authority",
         "CheckAuthorization", "(sa{sv})sa{ss}us", kind, str(len(details) // 3), *details,
         MANAGE, "0", "0", ""], capture_output=True, text=True, timeout=30)


def test_polkit_resolves_unix_process_subjects(private_bus, polkit):
    sleeper = subprocess.Popen([*SETPRIV, "sleep", "60"])
    try:
        # The uid is read from /proc: wait until setpriv has become nobody.
        deadline = time.monotonic() + 5
        while Path(f"/proc/{sleeper.pid}").stat().st_uid != NOBODY:
            assert time.monotonic() < deadline, "setpriv did not switch to nobody"
            time.sleep(0.01)
        nobody = check_authorization(private_bus.address, "unix-process",
                                     "pid", "u", str(sleeper.pid), "start-time", "t", "0")
    finally:
        sleeper.kill()
        sleeper.wait()
    me = check_authorization(private_bus.address, "unix-process",
                             "pid", "u", str(os.getpid()), "start-time", "t", "0")
    assert json.loads(nobody.stdout)["data"][0][:2] == [False, False], nobody.stderr
    assert json.loads(me.stdout)["data"][0][:2] == [True, False], me.stderr
    assert polkit.checks() == [(MANAGE, NOBODY, 0, False), (MANAGE, 0, 0, True)]


def test_polkit_rejects_unknown_subject_kinds(private_bus, polkit):
    result = check_authorization(private_bus.address, "unix-session", "session-id", "s", "c1")
    assert result.returncode != 0
    assert "unsupported subject kind" in result.stderr
    assert polkit.checks() == []
