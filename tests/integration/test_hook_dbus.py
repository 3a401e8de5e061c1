"""The hook helper's own D-Bus client (client/hooks/nicpassd_hook.py: EXTERNAL authentication,
Hello and one method call marshalled by hand), against the real private dbus-daemon.

A dbus-fast service on the bus echoes what the helper sends and answers with what it is asked
for, so both directions are checked by an independent implementation: what the helper marshals
must parse in dbus-daemon and dbus-fast, and what dbus-fast marshals must come back equal.
"""

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dbus_fast import NameFlag, RequestNameReply, Variant
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, method
from support import REPO
from support.unprivileged import run_as_nobody

from nicpassd.transport.bus import NicpassBus

HOOKS = REPO / "client" / "hooks"
sys.path.insert(0, str(HOOKS))
import nicpassd_hook as hook  # noqa: E402

BUS_NAME = "org.nicpass.NicPass1"
ECHO_PATH = "/org/nicpass/NicPass1"  # where the hook calls the Manager
IFACE = "org.nicpass.NicPass1.Manager"  # the one interface the shipped policy lets anyone call
ALL = "ybnqiuxtdsogva(si)a{sa{sv}}asay"


class Echo(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(IFACE)
        self.calls: list[str] = []

    @method()
    def Echo(self, y: "y", b: "b", n: "n", q: "q", i: "i", u: "u", x: "x", t: "t", d: "d", s: "s", o: "o",
             g: "g", v: "v", st: "a(si)", nested: "a{sa{sv}}", strings: "as",
             raw: "ay") -> "ybnqiuxtdsogva(si)a{sa{sv}}asay":
        return [y, b, n, q, i, u, x, t, d, s, o, g, v, st, nested, strings, raw]

    @method()
    def Prepare(self, vm_name: "s", vm_uuid: "s", devices: "as", options: "a{sv}") -> "s":
        listed = sorted((key, value.signature, value.value) for key, value in options.items())
        self.calls.append(f"{vm_name} {vm_uuid} {devices} {listed}")
        return "lease-1"

    @method()
    def Big(self, size: "u") -> "s":
        return "x" * size

    @method()
    def Many(self, count: "u") -> "aa{sv}":
        return [{"index": Variant("u", index), "name": Variant("s", f"item {index}")} for index in range(count)]

    @method()
    def Fail(self, name: "s", text: "s"):
        raise DBusError(name, text)


@pytest.fixture
async def echo(private_bus):
    """A service owning org.nicpass.NicPass1 that echoes (the daemon is not running)."""
    bus = await NicpassBus(bus_address=private_bus.address).connect()
    interface = Echo()
    bus.export(ECHO_PATH, interface)
    assert await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE) == RequestNameReply.PRIMARY_OWNER
    try:
        yield interface
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()


async def call(member: str, signature: str = "", body=(), *, path: str = ECHO_PATH, timeout: float = 10,
               address: str = "") -> list:
    """One call through the helper's client, in a thread: the service runs in this loop."""
    def blocking() -> list:
        connection = hook.Connection(timeout, address)
        try:
            return connection.call(BUS_NAME, path, IFACE, member, signature, list(body))
        finally:
            connection.close()

    return await asyncio.to_thread(blocking)


async def test_every_type_round_trips_through_dbus_daemon_and_dbus_fast(echo):
    values = [
        200, True, -12345, 54321, -2_000_000_000, 4_000_000_000, -(2**62), 2**63 + 5, 2.5, "ünïcode ✓", "/a/b_c",
        "a{sv}", ("as", ["x", "y"]),
        [("one", 1), ("two", -2)],
        {"dev": {"driver": ("s", "vfio-pci"), "vfs": ("u", 8), "deep": ("v", ("ai", [1, 2, 3]))}, "empty": {}},
        [], b"\x00\x01\xff",
    ]
    result = await call("Echo", ALL, values)
    expected = [*values[:-1], [0, 1, 255]]
    expected[15] = []
    assert result == expected


async def test_the_hook_prepare_call_reaches_the_service_as_sent(echo):
    ok, error, name = await asyncio.to_thread(
        hook.bus_call, 5, "Prepare", "ssasa{sv}", "web", "uuid-1", ["0000:3b:02.0", "0000:3b:02.1"],
        {"pidfile": ("s", "/run/libvirt/qemu/web.pid"), "skip_unmanaged": ("b", True)})
    assert (ok, error, name) == (True, "", "")
    assert echo.calls == ["web uuid-1 ['0000:3b:02.0', '0000:3b:02.1'] "
                          "[('pidfile', 's', '/run/libvirt/qemu/web.pid'), ('skip_unmanaged', 'b', True)]"]


async def test_error_replies_carry_their_name_and_message(echo):
    with pytest.raises(hook.BusError) as raised:
        await call("Fail", "ss", ["org.nicpass.NicPass1.Error.Busy", "0000:3b:02.0 is leased to VM x"])
    assert (raised.value.name, raised.value.message) == ("org.nicpass.NicPass1.Error.Busy",
                                                         "0000:3b:02.0 is leased to VM x")
    with pytest.raises(hook.BusError) as raised:  # an error from the bus itself: no such method
        await call("NoSuchMethod")
    assert raised.value.name == "org.freedesktop.DBus.Error.UnknownMethod"
    assert not hook.daemon_down(raised.value.name)


async def test_big_replies_are_read_whole(echo):
    (text,) = await call("Big", "u", [6 << 20])  # 6 MiB: many reads, larger than any socket buffer
    assert len(text) == 6 << 20 and set(text) == {"x"}
    (items,) = await call("Many", "u", [20000])
    assert len(items) == 20000 and items[19999] == {"index": ("u", 19999), "name": ("s", "item 19999")}


async def test_the_bus_driver_answers_and_gives_a_unique_name(private_bus):
    connection = hook.Connection(5, private_bus.address)
    try:
        (names,) = connection.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                   "ListNames")
        assert connection.unique_name.startswith(":") and connection.unique_name in names
    finally:
        connection.close()


async def test_nicpassd_not_on_the_bus_is_daemon_down(private_bus):
    ok, error, name = await asyncio.to_thread(hook.bus_call, 5, "Release", "sa{sv}", "uuid", {})
    assert not ok and hook.daemon_down(name), (error, name)
    assert name == "org.freedesktop.DBus.Error.ServiceUnknown" and "org.nicpass.NicPass1" in error


def test_a_bus_that_is_down(tmp_path, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus-here")
    ok, error, name = hook.bus_call(5, "Release", "sa{sv}", "uuid", {})
    assert (ok, name) == (False, "") and hook.daemon_down(name)
    assert error == f"cannot connect to the system bus at unix:path={tmp_path}/no-bus-here: No such file or directory"


def _fake_bus(tmp_path: Path, behaviour: str) -> tuple[str, threading.Thread]:
    """A unix socket that accepts one connection and hangs up without a word, or says nothing."""
    import socket

    path = tmp_path / f"{behaviour}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        if behaviour == "silent":
            done.wait(10)
        else:  # read what the client sent (handshake, Hello, call), then hang up
            conn.settimeout(0.5)
            try:
                while conn.recv(65536):
                    pass
            except TimeoutError:
                pass
        conn.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.done = done  # type: ignore[attr-defined]
    return f"unix:path={path}", thread


def test_a_bus_that_hangs_up_or_never_answers(tmp_path, monkeypatch):
    address, thread = _fake_bus(tmp_path, "hangup")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    ok, error, name = hook.bus_call(5, "Release", "sa{sv}", "uuid", {})
    assert (ok, name, error) == (False, "", "the system bus closed the connection")
    thread.join(5)

    address, thread = _fake_bus(tmp_path, "silent")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    ok, error, name = hook.bus_call(0.3, "Release", "sa{sv}", "uuid", {})
    assert (ok, name, error) == (False, "org.freedesktop.DBus.Error.Timeout", "no reply within 0.3 s")
    assert not hook.daemon_down(name)  # a daemon that hangs is not a daemon that is down
    thread.done.set()
    thread.join(5)


async def test_address_lists_and_escapes(private_bus, tmp_path):
    socket_path = private_bus.address.split("path=", 1)[1].split(",")[0]
    escaped = "".join(f"%{byte:02x}" if chr(byte) in "/_-" else chr(byte) for byte in socket_path.encode())
    listed = f"unix:path={tmp_path}/absent;tcp:host=localhost,port=1;unix:guid=x,path={escaped}"
    assert hook.bus_addresses(listed) == [f"{tmp_path}/absent", socket_path]
    assert hook.bus_addresses("unix:abstract=/tmp/dbus-x,guid=1") == ["\0/tmp/dbus-x"]
    connection = hook.Connection(5, listed)  # the first path is absent: the next one is used
    try:
        assert connection.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                               "GetId") != []
    finally:
        connection.close()


def test_an_unprivileged_caller_authenticates_as_itself(private_bus):
    """EXTERNAL with uid 65534 (not root), run with the system python the hook uses: the bus
    knows the connection as nobody's."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nicpassd_hook as h; "
            "bus = ('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus'); "
            "me = h.Connection(5, sys.argv[2]); me.call(*bus, 'ListNames'); "
            "print(me.unique_name, h.Connection(5, sys.argv[2]).call(*bus, 'GetConnectionUnixUser', 's', "
            "[me.unique_name])[0])")
    # nobody must be able to read the helper: a clone may sit in a directory only root can enter
    # (mktemp -d makes it 0700), as the installed helper never does (/usr/lib/nicpassd is 0755).
    import shutil
    import tempfile

    readable = Path(tempfile.mkdtemp(prefix="nicpassd-hook-", dir="/tmp"))
    try:
        readable.chmod(0o755)
        shutil.copy(HOOKS / "nicpassd_hook.py", readable / "nicpassd_hook.py")
        (readable / "nicpassd_hook.py").chmod(0o644)
        ran = run_as_nobody("/usr/bin/python3", "-S", "-I", "-B", "-c", code, str(readable), private_bus.address)
    finally:
        shutil.rmtree(readable, ignore_errors=True)
    assert ran.returncode == 0, ran.stderr
    name, uid = ran.stdout.split()
    assert name.startswith(":") and uid == "65534"


def test_the_helper_imports_nothing_costly():
    """Standard library only, and not socket/os/struct/re/json/subprocess (each costs at every VM start)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); import nicpassd_hook; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    ran = subprocess.run(["/usr/bin/python3", "-S", "-I", "-B", "-c", code, str(HOOKS)], capture_output=True,
                         text=True, check=True)
    assert set(ran.stdout.split()) <= {"nicpassd_hook"}, ran.stdout
