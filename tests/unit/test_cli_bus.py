"""nicpassctl over a real private system bus against a throwaway fake nicpassd.

The fake service declares the contract's signatures with dbus-fast, so a client call with a
wrong member, signature or option type fails here the way it would against the real daemon
(``InvalidArgs``/``UnknownMethod``). The bus is the session's ``private_bus`` (Debian's default
system policy plus the project's ``dbus/org.nicpass.NicPass1.conf``): the calls the client makes
must be allowed by the shipped policy.
(The lead's integration tests run the same CLI against the real daemon.)
"""

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated

import pytest
from dbus_fast import BusType, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool as Bool
from dbus_fast.annotations import DBusDict as Options
from dbus_fast.annotations import DBusInt32 as Int32
from dbus_fast.annotations import DBusSignature
from dbus_fast.annotations import DBusStr as Str
from dbus_fast.annotations import DBusUInt32 as UInt32
from dbus_fast.constants import PropertyAccess
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

StrList = Annotated[list[str], DBusSignature("as")]
Findings = Annotated[list, DBusSignature("a(ssss)")]
ProtectedSet = Annotated[list, DBusSignature("a(sas)")]
LeaseList = Annotated[list, DBusSignature("aa{sv}")]
LeaseSignal = Annotated[list, DBusSignature("sss")]

pytestmark = [
    pytest.mark.bus,
    pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon"),
]

REPO = Path(__file__).resolve().parents[2]
NAME = "org.nicpass.NicPass1"
NP = "org.nicpass.NicPass1.Error."
MANAGER = "/org/nicpass/NicPass1"


@pytest.fixture
def bus_address(private_bus):
    """The session's private system bus (tests/conftest.py), shipped policy enforced."""
    return private_bus.address


# ---------------------------------------------------------------- the fake daemon

def dev_path(address):
    return f"{MANAGER}/devices/" + address.replace(":", "_").replace(".", "_")


class FakeDevice(ServiceInterface):
    def __init__(self, address, **kw):
        super().__init__("org.nicpass.NicPass1.Device")
        self.p = {
            "Address": address, "VendorId": "8086", "DeviceId": "1572", "SubsystemVendorId": "8086",
            "SubsystemDeviceId": "0000", "Driver": "i40e", "IommuGroup": 30, "Interfaces": ["enp59s0f0"],
            "PhysicalFunction": "", "TotalVfs": 8, "NumVfs": 0, "Protected": False, "ProtectionReasons": [],
            "LeasedTo": "", "Persisted": False, "DesiredDriver": "", "IsNetwork": True, "ClassCode": "0x020000",
            "Drift": "",
        }
        self.p.update(kw)

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> Str: return self.p["Address"]
    @dbus_property(access=PropertyAccess.READ)
    def VendorId(self) -> Str: return self.p["VendorId"]
    @dbus_property(access=PropertyAccess.READ)
    def DeviceId(self) -> Str: return self.p["DeviceId"]
    @dbus_property(access=PropertyAccess.READ)
    def SubsystemVendorId(self) -> Str: return self.p["SubsystemVendorId"]
    @dbus_property(access=PropertyAccess.READ)
    def SubsystemDeviceId(self) -> Str: return self.p["SubsystemDeviceId"]
    @dbus_property(access=PropertyAccess.READ)
    def Driver(self) -> Str: return self.p["Driver"]
    @dbus_property(access=PropertyAccess.READ)
    def IommuGroup(self) -> Int32: return self.p["IommuGroup"]
    @dbus_property(access=PropertyAccess.READ)
    def Interfaces(self) -> StrList: return self.p["Interfaces"]
    @dbus_property(access=PropertyAccess.READ)
    def PhysicalFunction(self) -> Str: return self.p["PhysicalFunction"]
    @dbus_property(access=PropertyAccess.READ)
    def TotalVfs(self) -> UInt32: return self.p["TotalVfs"]
    @dbus_property(access=PropertyAccess.READ)
    def NumVfs(self) -> UInt32: return self.p["NumVfs"]
    @dbus_property(access=PropertyAccess.READ)
    def Protected(self) -> Bool: return self.p["Protected"]
    @dbus_property(access=PropertyAccess.READ)
    def ProtectionReasons(self) -> StrList: return self.p["ProtectionReasons"]
    @dbus_property(access=PropertyAccess.READ)
    def LeasedTo(self) -> Str: return self.p["LeasedTo"]
    @dbus_property(access=PropertyAccess.READ)
    def Persisted(self) -> Bool: return self.p["Persisted"]
    @dbus_property(access=PropertyAccess.READ)
    def DesiredDriver(self) -> Str: return self.p["DesiredDriver"]
    @dbus_property(access=PropertyAccess.READ)
    def IsNetwork(self) -> Bool: return self.p["IsNetwork"]
    @dbus_property(access=PropertyAccess.READ)
    def ClassCode(self) -> Str: return self.p["ClassCode"]
    @dbus_property(access=PropertyAccess.READ)
    def Drift(self) -> Str: return self.p["Drift"]


class FakeManager(ServiceInterface):
    """Records calls; devices named in ``refuse`` fail with the given D-Bus error name."""

    def __init__(self):
        super().__init__("org.nicpass.NicPass1.Manager")
        self.calls = []
        self.refuse = {}

    def _record(self, member, *args):
        self.calls.append((member, *args))
        for arg in args:
            if isinstance(arg, str) and arg in self.refuse:
                name = self.refuse[arg]
                raise DBusError(name, f"{arg} is refused ({name.rsplit('.', 1)[-1]}); try another device.")

    @dbus_method()
    def SetVfCount(self, device: Str, count: UInt32, options: Options):
        self._record("SetVfCount", device, count, options)

    @dbus_method()
    def Bind(self, device: Str, driver: Str, options: Options):
        self._record("Bind", device, driver, options)

    @dbus_method()
    def Unbind(self, device: Str, options: Options):
        self._record("Unbind", device, options)

    @dbus_method()
    def Forget(self, device: Str, options: Options):
        self._record("Forget", device, options)

    @dbus_method()
    def Prepare(self, vm_name: Str, vm_uuid: Str, devices: StrList, options: Options) -> Str:
        self._record("Prepare", vm_name, vm_uuid, *devices, options)
        return "lease-1"

    @dbus_method()
    def Release(self, vm_uuid: Str, options: Options):
        self._record("Release", vm_uuid, options)

    @dbus_method()
    def Check(self) -> Findings:
        return [["iommu", "ok", "IOMMU is enabled.", ""], ["vfio", "fail", "vfio-pci is missing.", "install it."]]

    @dbus_method()
    def Explain(self, device: Str) -> Options:
        self._record("Explain", device)
        return {
            "address": Variant("s", "0000:3b:00.0"), "allowed": Variant("b", True),
            "verdict": Variant("s", "0000:3b:00.0 may be handed to a VM."), "protected": Variant("b", False),
            "reasons": Variant("as", []), "iommu_group": Variant("i", 30),
            "group_members": Variant("a(ss)", [["0000:3b:00.0", "i40e"]]), "group_viable": Variant("b", True),
            "leased_to": Variant("s", ""), "persisted": Variant("b", False), "desired_driver": Variant("s", ""),
            "driver": Variant("s", "i40e"), "interfaces": Variant("as", ["enp59s0f0"]),
        }

    @dbus_method()
    def GetProtected(self) -> ProtectedSet:
        return [["0000:01:00.0", ["carries the IPv4 default route"]]]

    @dbus_method()
    def ListLeases(self) -> LeaseList:
        return [{"lease_id": Variant("s", "lease-1"), "vm_name": Variant("s", "web"),
                 "vm_uuid": Variant("s", "u-1"), "state": Variant("s", "active"),
                 "devices": Variant("as", ["0000:3b:02.0"]), "expires": Variant("t", 0), "pid": Variant("u", 7)}]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> Str:
        return "9.9.9"

    @dbus_signal()
    def LeaseChanged(self, lease_id, vm_uuid, state) -> LeaseSignal:
        return [lease_id, vm_uuid, state]


class FakeDaemon:
    def __init__(self, bus):
        self.bus = bus
        self.manager = FakeManager()
        self.devices = {}
        self.flags = {}  # member -> MessageFlag of the last call
        bus.add_message_handler(self._see)
        bus.export(MANAGER, self.manager)
        for d in (FakeDevice("0000:3b:00.0", NumVfs=1),
                  FakeDevice("0000:3b:02.0", PhysicalFunction="0000:3b:00.0", TotalVfs=0, Interfaces=[],
                             Driver="vfio-pci", IommuGroup=40),
                  FakeDevice("0000:00:14.0", IsNetwork=False, Driver="xhci_hcd", TotalVfs=0, Interfaces=[])):
            self.add(d)

    def _see(self, msg):
        if msg.message_type == MessageType.METHOD_CALL:
            self.flags[msg.member] = msg.flags
        return None

    def add(self, dev):
        self.devices[dev.p["Address"]] = dev
        self.bus.export(dev_path(dev.p["Address"]), dev)

    def remove(self, address):
        self.bus.unexport(dev_path(address), self.devices.pop(address))


@pytest.fixture
async def daemon(bus_address):
    bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
    fake = FakeDaemon(bus)
    await bus.request_name(NAME)
    yield fake
    bus.disconnect()
    await bus.wait_for_disconnect()


def env_for(address):
    pythonpath = os.pathsep.join(filter(None, [str(REPO / "client"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address, "PYTHONPATH": pythonpath}


async def ctl(address, *argv):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nicpassctl", *argv, env=env_for(address),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


def opts(options):
    return {k: (v.signature, v.value) for k, v in options.items()}


# ---------------------------------------------------------------- tests

async def test_list_over_the_real_object_manager(daemon, bus_address):
    rc, out, err = await ctl(bus_address, "--json", "list")
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert [d["address"] for d in doc] == ["0000:3b:00.0", "0000:3b:02.0"]
    assert doc[0]["num_vfs"] == 1 and doc[0]["iommu_group"] == 30 and doc[0]["interfaces"] == ["enp59s0f0"]
    assert len(doc[0]) == 19
    rc, out, err = await ctl(bus_address, "list", "--all")
    assert rc == 0 and "0000:00:14.0" in out and "  0000:3b:02.0" in out


async def test_show(daemon, bus_address):
    rc, out, err = await ctl(bus_address, "--json", "show", "enp59s0f0")
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["device"]["address"] == "0000:3b:00.0" and doc["explain"]["allowed"] is True
    assert daemon.manager.calls == [("Explain", "enp59s0f0")]


async def test_reads(daemon, bus_address):
    rc, out, _ = await ctl(bus_address, "check")
    assert rc == 8 and "[fail] vfio" in out  # 8: a finding failed (not 1: the check itself worked)
    rc, out, _ = await ctl(bus_address, "guard")
    assert rc == 0 and "carries the IPv4 default route" in out
    rc, out, _ = await ctl(bus_address, "--json", "leases")
    assert rc == 0 and json.loads(out)[0]["lease_id"] == "lease-1"
    rc, out, _ = await ctl(bus_address, "version")
    assert rc == 0 and "nicpassd 9.9.9" in out
    assert not any(f & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION for f in daemon.flags.values())


async def test_mutations_reach_the_daemon_with_the_contract_signatures(daemon, bus_address):
    assert (await ctl(bus_address, "vfs", "--vfio", "enp59s0f0", "4"))[0] == 0
    assert (await ctl(bus_address, "bind", "--runtime", "3b:02.0"))[0] == 0
    assert (await ctl(bus_address, "unbind", "3b:02.0"))[0] == 0
    assert (await ctl(bus_address, "forget", "--restore", "3b:02.0"))[0] == 0
    rc, out, _ = await ctl(bus_address, "prepare", "web", "u-1", "3b:02.0")
    assert (rc, out) == (0, "lease-1\n")
    assert (await ctl(bus_address, "release", "u-1"))[0] == 0
    # Reads around the mutations: vfs asks what the PF's VFs are persisted on, bind what it did to the group.
    assert [c[0] for c in daemon.manager.calls if c[0] == "Explain"] == ["Explain", "Explain"]
    calls = [(c[0], *c[1:-1], opts(c[-1])) for c in daemon.manager.calls if c[0] != "Explain"]
    assert calls == [
        ("SetVfCount", "enp59s0f0", 4, {"persist": ("b", True), "driver": ("s", "vfio-pci")}),
        ("Bind", "3b:02.0", "vfio-pci", {"persist": ("b", False)}),
        ("Unbind", "3b:02.0", {"persist": ("b", True)}),
        ("Forget", "3b:02.0", {"restore": ("b", True)}),
        ("Prepare", "web", "u-1", "3b:02.0", {}),
        ("Release", "u-1", {}),
    ]
    for member in ("SetVfCount", "Bind", "Unbind", "Forget", "Prepare", "Release"):
        assert daemon.flags[member] & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION, member


async def test_no_ask_password(daemon, bus_address):
    assert (await ctl(bus_address, "--no-ask-password", "vfs", "x", "0"))[0] == 0
    assert not daemon.flags["SetVfCount"] & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION


@pytest.mark.parametrize(
    "name, code",
    [(NP + "Protected", 3), (NP + "Busy", 4), (NP + "NotFound", 7), (NP + "InvalidArgument", 2),
     (NP + "KernelError", 1), ("org.freedesktop.DBus.Error.AccessDenied", 5)],
)
async def test_errors_over_the_wire(daemon, bus_address, name, code):
    daemon.manager.refuse["bad"] = name
    rc, out, err = await ctl(bus_address, "bind", "good", "bad", "good2")
    assert rc == code
    assert out.splitlines() == ["good: bound to vfio-pci (persisted)", "good2: bound to vfio-pci (persisted)"]
    if code == 5:
        assert err == ("nicpassctl: not authorized to bind bad to vfio-pci; run as root or ask an administrator "
                       "to grant org.nicpass.NicPass1.manage\n")
    else:
        assert err == f"nicpassctl: bad is refused ({name.rsplit('.', 1)[-1]}); try another device.\n"


async def _line(stream, timeout=10):
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "monitor ended early"
    return line.decode().rstrip("\n").split(" ", 1)[1]


async def test_monitor(daemon, bus_address):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nicpassctl", "monitor", env=env_for(bus_address),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        pf = daemon.devices["0000:3b:00.0"]
        # poke until the monitor has subscribed and prints
        first = asyncio.ensure_future(proc.stdout.readline())
        for _ in range(200):
            pf.emit_properties_changed({"NumVfs": 2})
            done, _ = await asyncio.wait([first], timeout=0.05)
            if done:
                break
        assert first.result().decode().split(" ", 1)[1] == "changed 0000:3b:00.0 NumVfs=2\n"
        while True:  # drain the pokes that were already in flight
            try:
                await asyncio.wait_for(proc.stdout.readline(), 0.3)
            except asyncio.TimeoutError:
                break
        pf.emit_properties_changed({"NumVfs": 4, "Driver": "i40e"})
        line = await _line(proc.stdout)
        assert line.startswith("changed 0000:3b:00.0 ")
        assert sorted(line.split()[2:]) == ["Driver=i40e", "NumVfs=4"]  # in the order the daemon sent them
        daemon.add(FakeDevice("0000:3b:02.1", PhysicalFunction="0000:3b:00.0", TotalVfs=0))
        assert await _line(proc.stdout) == "added 0000:3b:02.1"
        daemon.remove("0000:3b:02.1")
        assert await _line(proc.stdout) == "removed 0000:3b:02.1"
        daemon.manager.LeaseChanged("lease-1", "u-1", "active")
        assert await _line(proc.stdout) == "lease lease-1 u-1 active"
        await daemon.bus.release_name(NAME)
        assert await _line(proc.stdout) == "daemon stopped"
        await daemon.bus.request_name(NAME)
        assert await _line(proc.stdout) == "daemon started"
        pf.emit_properties_changed({"Protected": True})
        assert await _line(proc.stdout) == "changed 0000:3b:00.0 Protected=yes"
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert (proc.returncode, out, err) == (0, b"", b"")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
