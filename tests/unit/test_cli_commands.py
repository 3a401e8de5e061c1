"""Every command end to end through ``cli.main`` with the real ``Client`` over a fake bus.

The fake bus answers the exact messages the client sends, and every message crosses the wire
format both ways between two D-Bus implementations: jeepney (the client's) marshals each call and
dbus-fast (the daemon's) parses it; dbus-fast marshals each answer and jeepney parses it. Body and
signature must agree, as on a real bus, which pins the wire contract: members, signatures,
options, flags.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
from collections import deque

import pytest
from dbus_fast import Message, MessageFlag, Variant
from dbus_fast._private.unmarshaller import Unmarshaller
from jeepney.low_level import Parser
from nicpassctl import cli
from nicpassctl.commands import MONITOR_RULES
from nicpassctl.connection import Client

NP = "org.nicpass.NicPass1.Error."
FD = "org.freedesktop.DBus.Error."
DEV_IFACE = "org.nicpass.NicPass1.Device"

_SIGS = {"IommuGroup": "i", "TotalVfs": "u", "NumVfs": "u"}


def props_variants(props: dict) -> dict:
    out = {}
    for key, value in props.items():
        if isinstance(value, bool):
            out[key] = Variant("b", value)
        elif isinstance(value, int):
            out[key] = Variant(_SIGS.get(key, "u"), value)
        elif isinstance(value, list):
            out[key] = Variant("as", value)
        else:
            out[key] = Variant("s", value)
    return out


def device(address, **kw):
    props = {
        "Address": address, "VendorId": "8086", "DeviceId": "1572", "SubsystemVendorId": "8086",
        "SubsystemDeviceId": "0000", "Driver": "i40e", "IommuGroup": 30, "Interfaces": [],
        "PhysicalFunction": "", "TotalVfs": 0, "NumVfs": 0, "Protected": False, "ProtectionReasons": [],
        "LeasedTo": "", "Persisted": False, "DesiredDriver": "", "IsNetwork": True, "ClassCode": "0x020000",
        "Drift": "",
    }
    props.update(kw)
    return props


def path_of(address):
    return "/org/nicpass/NicPass1/devices/" + address.replace(":", "_").replace(".", "_")


DEVICES = [
    device("0000:3b:00.0", Interfaces=["enp59s0f0"], TotalVfs=8, NumVfs=1),
    device("0000:3b:02.0", PhysicalFunction="0000:3b:00.0", Driver="vfio-pci", IommuGroup=40,
           LeasedTo="6f1c2d3e-0000-0000-0000-000000000001"),
    device("0000:00:14.0", IsNetwork=False, Driver="xhci_hcd"),
]

EXPLAIN = {
    "address": Variant("s", "0000:3b:00.0"), "allowed": Variant("b", True),
    "verdict": Variant("s", "0000:3b:00.0 may be handed to a VM."), "protected": Variant("b", False),
    "reasons": Variant("as", []), "iommu_group": Variant("i", 30),
    "group_members": Variant("a(ss)", [["0000:3b:00.0", "i40e"]]), "group_viable": Variant("b", True),
    "leased_to": Variant("s", ""), "persisted": Variant("b", False), "desired_driver": Variant("s", ""),
    "driver": Variant("s", "i40e"), "interfaces": Variant("as", ["enp59s0f0"]),
}


class DaemonErr(Exception):
    def __init__(self, name, text):
        self.name, self.text = name, text


NO_REPLY = object()  # a responder's answer for a daemon that never answers


class FakeBus:
    """The bus end of the client's connection (``send``/``receive``, as jeepney's blocking one).

    ``responder(msg, bus)`` sees each call as a dbus-fast Message and returns ``(signature, body)``,
    raises DaemonErr, or returns NO_REPLY. Whatever the responder queues with ``emit`` (a signal)
    or ``later`` (an action, run when the client reads that far) comes after its answer.
    """

    def __init__(self, responder):
        self.responder = responder
        self.sent: list[Message] = []
        self.incoming: deque = deque()
        self.outgoing_serial = itertools.count(1)
        self._serials = itertools.count(1)
        self.closed = False

    def send(self, message, serial):
        msg = Unmarshaller(io.BytesIO(message.serialise(serial=serial))).unmarshall()
        self.sent.append(msg)
        answers, self.incoming = self.incoming, deque()  # what the responder queues comes after its answer
        try:
            result = self.responder(msg, self)
            reply = None if result is NO_REPLY else Message.new_method_return(msg, *result)
        except DaemonErr as err:
            reply = Message.new_error(msg, err.name, err.text)
        queued, self.incoming = self.incoming, answers
        if reply is not None:
            self.emit(reply)
        self.incoming.extend(queued)

    def emit(self, msg: Message):
        msg.serial = next(self._serials)
        parser = Parser()
        parser.add_data(msg._marshall(False))
        self.incoming.append(parser.get_next_message())

    def later(self, action):
        self.incoming.append(action)

    def receive(self, *, timeout=None):
        while self.incoming:
            item = self.incoming.popleft()
            if callable(item):
                item()
                continue
            return item
        if timeout is None:
            raise AssertionError("the client would wait for ever: nothing more will come")
        raise TimeoutError

    def close(self):
        self.closed = True


def drop_the_connection():
    raise ConnectionResetError(104, "Connection reset by peer")


def default_responder(msg: Message, bus: FakeBus):
    member = msg.member
    if member == "GetManagedObjects":
        objects = {path_of(d["Address"]): {DEV_IFACE: props_variants(d),
                                           "org.freedesktop.DBus.Properties": {}} for d in DEVICES}
        objects["/org/nicpass/NicPass1"] = {"org.nicpass.NicPass1.Manager": {}}
        return "a{oa{sa{sv}}}", [objects]
    if member == "Explain":
        return "a{sv}", [EXPLAIN]
    if member == "GetAll":
        for d in DEVICES:
            if msg.path == path_of(d["Address"]):
                return "a{sv}", [props_variants(d)]
        raise DaemonErr(FD + "UnknownObject", f"Unknown object '{msg.path}'.")
    if member == "Get":
        if msg.body[1] == "DesiredVfDriver":
            return "v", [Variant("s", "")]
        return "v", [Variant("s", "0.1.0")]
    if member == "Check":
        return "a(ssss)", [[["iommu", "ok", "IOMMU is on.", ""],
                            ["vfio", "warn", "vfio-pci not loaded.", "run modprobe vfio-pci."]]]
    if member == "GetProtected":
        return "a(sas)", [[["0000:01:00.0", ["carries the default route"]]]]
    if member == "GetViolations":
        return "aa{sv}", [[]]
    if member == "ListLeases":
        return "aa{sv}", [[{"lease_id": Variant("s", "l-1"), "vm_name": Variant("s", "web"),
                            "vm_uuid": Variant("s", "u-1"), "state": Variant("s", "active"),
                            "devices": Variant("as", ["0000:3b:02.0"]), "expires": Variant("t", 0),
                            "pid": Variant("u", 99)}]]
    if member == "Prepare":
        return "s", ["lease-42"]
    if member == "AddMatch":
        return "", []
    return "", []


class Harness:
    def __init__(self, responder=default_responder):
        self.responder = responder
        self.bus: FakeBus | None = None

    def factory(self, args):
        harness = self
        client = Client(bus_address=args.bus_address, timeout=args.timeout, interactive=args.interactive)

        def connect():
            harness.bus = client._conn = FakeBus(harness.responder)
            return client

        client.connect = connect
        return client

    def run(self, *argv):
        return cli.main(list(argv), client_factory=self.factory)

    @property
    def calls(self):
        return [m for m in self.bus.sent if m.member != "AddMatch"]


@pytest.fixture
def h():
    return Harness()


def fail_with(name, text, member=None):
    def responder(msg, bus):
        if member is None or msg.member == member:
            raise DaemonErr(name, text)
        return default_responder(msg, bus)
    return responder


def unwrap_opts(options):
    return {k: v.value for k, v in options.items()}


# ---------------------------------------------------------------- reads

def test_list(h, capsys):
    assert h.run("list") == 0
    out = capsys.readouterr().out
    assert "0000:3b:00.0" in out and "  0000:3b:02.0" in out and "0000:00:14.0" not in out
    assert [m.member for m in h.calls] == ["GetManagedObjects"]
    m = h.calls[0]
    assert (m.destination, m.path, m.interface) == ("org.nicpass.NicPass1", "/org/nicpass/NicPass1",
                                                    "org.freedesktop.DBus.ObjectManager")
    assert m.flags == MessageFlag.NONE  # reads never ask polkit


def test_list_json_all(h, capsys):
    assert h.run("--json", "list", "--all") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["address"] for d in doc] == ["0000:00:14.0", "0000:3b:00.0", "0000:3b:02.0"]
    assert doc[1]["interfaces"] == ["enp59s0f0"] and doc[1]["iommu_group"] == 30
    assert doc[2]["leased_to"].startswith("6f1c2d3e")


def test_show(h, capsys):
    assert h.run("show", "enp59s0f0") == 0
    out = capsys.readouterr().out
    assert out.startswith("0000:3b:00.0 may be handed to a VM.")
    explain, get_all, objects = h.calls  # a PF with VFs: their table comes from GetManagedObjects
    assert (explain.member, explain.signature, explain.body) == ("Explain", "s", ["enp59s0f0"])
    assert (get_all.path, get_all.body) == ("/org/nicpass/NicPass1/devices/0000_3b_00_0",
                                            ["org.nicpass.NicPass1.Device"])
    assert objects.member == "GetManagedObjects"
    assert "VFs of 0000:3b:00.0" in out and "0000:3b:02.0" in out.split("VFs of 0000:3b:00.0", 1)[1]


def test_show_json(h, capsys):
    assert h.run("show", "--json", "3b:00.0") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"]["address"] == "0000:3b:00.0"
    assert doc["explain"]["group_members"] == [{"address": "0000:3b:00.0", "driver": "i40e"}]
    assert doc["explain"]["allowed"] is True


def test_show_without_device_object(capsys):
    def responder(msg, bus):
        if msg.member == "Explain":
            return "a{sv}", [{**EXPLAIN, "address": Variant("s", "0000:99:00.0")}]
        return default_responder(msg, bus)

    assert Harness(responder).run("--json", "show", "0000:99:00.0") == 0
    assert json.loads(capsys.readouterr().out)["device"] is None


def test_show_not_found(capsys):
    h = Harness(fail_with(NP + "NotFound", "No PCI function matches 'eth9'; give an address or interface name."))
    assert h.run("show", "eth9") == 7
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err == "nicpassctl: No PCI function matches 'eth9'; give an address or interface name.\n"


def test_show_invalid_argument(capsys):
    h = Harness(fail_with(NP + "InvalidArgument", "'x y' is not a PCI address or interface name."))
    assert h.run("show", "x y") == 2


def test_check_exit_codes(h, capsys):
    assert h.run("check") == 0
    assert "remedy: run modprobe vfio-pci." in capsys.readouterr().out

    def failing(msg, bus):
        return "a(ssss)", [[["iommu", "fail", "No IOMMU.", "enable intel_iommu=on."]]]

    assert Harness(failing).run("--json", "check") == 8  # a finding failed; 1 would mean the check did not run
    assert json.loads(capsys.readouterr().out) == [
        {"id": "iommu", "level": "fail", "message": "No IOMMU.", "remedy": "enable intel_iommu=on."}]


def test_guard_and_leases(h, capsys):
    assert h.run("guard") == 0
    assert "carries the default route" in capsys.readouterr().out
    assert h.run("--json", "leases") == 0
    assert json.loads(capsys.readouterr().out) == [
        {"lease_id": "l-1", "vm_name": "web", "vm_uuid": "u-1", "state": "active",
         "devices": ["0000:3b:02.0"], "expires": 0, "pid": 99}]


def test_version(h, capsys):
    assert h.run("--json", "version") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["daemon"] == "0.1.0" and "client" in doc
    (m,) = h.calls
    assert (m.interface, m.member, m.body) == ("org.freedesktop.DBus.Properties", "Get",
                                               ["org.nicpass.NicPass1.Manager", "Version"])


# ---------------------------------------------------------------- changes

def test_vfs(h, capsys):
    assert h.run("vfs", "enp59s0f0", "4") == 0
    explain, get, before, m, after = h.calls
    assert (explain.member, get.member, get.body) == ("Explain", "Get", [DEV_IFACE, "DesiredVfDriver"])
    # the VFs before and after the change: what it made and what it removed
    assert before.member == after.member == "GetManagedObjects"
    assert (m.member, m.signature) == ("SetVfCount", "sua{sv}")
    assert m.body[:2] == ["enp59s0f0", 4] and unwrap_opts(m.body[2]) == {"persist": True}
    assert m.body[2]["persist"].signature == "b"
    assert m.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
    assert capsys.readouterr().out == "enp59s0f0: 4 VFs (persisted)\n  0000:3b:02.0: vfio-pci\n"


def test_vfs_says_what_persistence_it_dropped(capsys):
    """Issue 20: persisting a count without --vfio drops "VFs on vfio-pci": said, not silent."""
    def responder(msg, bus):
        if msg.member == "Get" and msg.body[1] == "DesiredVfDriver":
            return "v", [Variant("s", "vfio-pci")]
        return default_responder(msg, bus)

    assert Harness(responder).run("vfs", "enp59s0f0", "2") == 0
    assert capsys.readouterr().out == (
        "enp59s0f0: 2 VFs (persisted; its VFs are no longer persisted on vfio-pci: after a reboot they come up "
        "on their host driver (add --vfio to keep them on vfio-pci))\n  0000:3b:02.0: vfio-pci\n")
    assert Harness(responder).run("vfs", "enp59s0f0", "2", "--vfio") == 0
    assert capsys.readouterr().out == "enp59s0f0: 2 VFs on vfio-pci (persisted)\n  0000:3b:02.0: vfio-pci\n"


def test_vfs_runtime_vfio(h, capsys):
    assert h.run("--no-ask-password", "vfs", "--runtime", "--vfio", "3b:00.0", "0") == 0
    (m,) = [call for call in h.calls if call.member == "SetVfCount"]
    assert unwrap_opts(m.body[2]) == {"persist": False, "driver": "vfio-pci"}
    assert m.body[2]["driver"].signature == "s"
    assert not m.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION


@pytest.mark.parametrize(
    "name, code",
    [("Protected", 3), ("Busy", 4), ("NotSupported", 1), ("InvalidArgument", 2), ("NotFound", 7),
     ("KernelError", 1), ("Timeout", 1), ("IdentityChanged", 1)],
)
def test_vfs_errors(name, code, capsys):
    text = f"0000:3b:00.0 cannot do that ({name}); do something else."
    assert Harness(fail_with(NP + name, text)).run("vfs", "0000:3b:00.0", "4") == code
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == f"nicpassctl: {text}\n"


def test_vfs_access_denied(capsys):
    h = Harness(fail_with(FD + "AccessDenied", "Not authorized."))
    assert h.run("vfs", "0000:3b:00.0", "4") == 5
    assert capsys.readouterr().err == (
        "nicpassctl: not authorized to change the VF count of 0000:3b:00.0; run as root or ask an "
        "administrator to grant org.nicpass.NicPass1.manage\n")


OUTCOMES = {"b": (NP + "Busy", "0000:3b:02.1 is leased to VM web; stop the VM first."),
            "c": (NP + "Protected", "c is protected.")}
EXPECTED_OUT = "a: bound to vfio-pci (persisted)\nd: bound to vfio-pci (persisted)\n"
EXPECTED_ERR = ("nicpassctl: b: 0000:3b:02.1 is leased to VM web; stop the VM first.\n"
                "nicpassctl: c is protected.\n")


def test_bind_of_several_devices_is_one_batch_with_an_outcome_each(capsys):
    def responder(msg, bus):
        if msg.member == "Explain":  # read after the bind: what it did to each group
            return "a{sv}", [EXPLAIN]
        assert msg.member == "BindEach"
        return "a(sss)", [[[d, *OUTCOMES.get(d, ("", ""))] for d in msg.body[0]]]

    h = Harness(responder)
    assert h.run("bind", "a", "b", "c", "d") == 4  # the first failure's code
    (*explains, m) = h.calls  # the groups' Explains go out with the bind (their round trips overlap)
    assert [e.member for e in explains] == ["Explain"] * 4 and not any(e.flags for e in explains)
    assert (m.member, m.signature, m.body[:2]) == ("BindEach", "assa{sv}", [list("abcd"), "vfio-pci"])
    assert unwrap_opts(m.body[2]) == {"persist": True}
    assert m.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
    cap = capsys.readouterr()
    assert (cap.out, cap.err) == (EXPECTED_OUT, EXPECTED_ERR)


def test_bind_of_several_devices_falls_back_to_bind_each_with_an_older_daemon(capsys):
    def responder(msg, bus):
        if msg.member == "BindEach":
            raise DaemonErr(FD + "UnknownMethod", "No such method 'BindEach'")
        if msg.member == "Explain":
            return "a{sv}", [EXPLAIN]
        if msg.body[0] in OUTCOMES:
            raise DaemonErr(*OUTCOMES[msg.body[0]])
        return "", []

    h = Harness(responder)
    assert h.run("bind", "a", "b", "c", "d") == 4
    binds = [m for m in h.calls if m.member == "Bind"]
    assert [(m.member, m.signature, m.body[:2]) for m in binds] == [("Bind", "ssa{sv}", [d, "vfio-pci"]) for d in "abcd"]
    assert all(unwrap_opts(m.body[2]) == {"persist": True} for m in binds)
    cap = capsys.readouterr()
    assert (cap.out, cap.err) == (EXPECTED_OUT, EXPECTED_ERR)


def test_unbind_of_several_devices_is_bind_each_to_the_host_driver(capsys):
    def responder(msg, bus):
        return "a(sss)", [[[d, "", ""] for d in msg.body[0]]]

    h = Harness(responder)
    assert h.run("unbind", "a", "b", "--runtime") == 0
    (m,) = h.calls
    assert (m.member, m.body[:2], unwrap_opts(m.body[2])) == ("BindEach", [["a", "b"], ""], {"persist": False})
    assert capsys.readouterr().out.count("given back to its host driver (runtime only") == 2


def test_bind_json_results(capsys):
    h = Harness(fail_with(NP + "Protected", "0000:01:00.0 is protected: it carries the default route."))
    assert h.run("--json", "bind", "--runtime", "--driver", "", "0000:01:00.0") == 3
    cap = capsys.readouterr()
    (m,) = [call for call in h.calls if call.member != "Explain"]
    assert m.body[1] == "" and unwrap_opts(m.body[2]) == {"persist": False}
    assert json.loads(cap.out) == [{
        "device": "0000:01:00.0", "ok": False, "exit_code": 3, "error": NP + "Protected",
        "message": "0000:01:00.0 is protected: it carries the default route."}]
    assert cap.err == "nicpassctl: 0000:01:00.0 is protected: it carries the default route.\n"


def test_bind_success_json(h, capsys):
    assert h.run("bind", "--json", "x") == 0
    assert json.loads(capsys.readouterr().out) == [
        {"device": "x", "ok": True, "driver": "vfio-pci", "persist": True}]


def test_bind_access_denied_names_device(capsys):
    assert Harness(fail_with(FD + "AccessDenied", "")).run("bind", "3b:02.0") == 5
    assert "not authorized to bind 3b:02.0 to vfio-pci; " in capsys.readouterr().err


def test_unbind(h, capsys):
    assert h.run("unbind", "a", "--runtime") == 0
    (m,) = h.calls
    assert (m.member, m.signature, m.body[0]) == ("Unbind", "sa{sv}", "a")
    assert unwrap_opts(m.body[1]) == {"persist": False}
    assert m.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
    assert "given back to its host driver" in capsys.readouterr().out
    assert h.run("unbind", "a") == 0
    assert unwrap_opts(h.calls[0].body[1]) == {"persist": True}


def test_forget(h, capsys):
    assert h.run("forget", "--restore", "a") == 0
    (m,) = h.calls
    assert (m.member, m.signature, m.body[0], unwrap_opts(m.body[1])) == ("Forget", "sa{sv}", "a",
                                                                          {"restore": True})
    assert capsys.readouterr().out == "a: persisted state forgotten and given back to its host driver\n"


def test_prepare_and_release(h, capsys):
    assert h.run("prepare", "web", "u-1", "a", "b") == 0
    (m,) = h.calls
    assert (m.member, m.signature, m.body[:3]) == ("Prepare", "ssasa{sv}", ["web", "u-1", ["a", "b"]])
    assert capsys.readouterr().out == "lease-42\n"
    assert h.run("--json", "release", "u-1") == 0
    listed, m = h.calls  # what the VM holds, to say what was released
    assert listed.member == "ListLeases"
    assert (m.member, m.signature, m.body[0]) == ("Release", "sa{sv}", "u-1")
    assert json.loads(capsys.readouterr().out) == {"vm_uuid": "u-1", "released": True, "devices": ["0000:3b:02.0"]}
    assert h.run("release", "u-1") == 0
    assert capsys.readouterr().out == "VM web: released 0000:3b:02.0 (the release policy decides their driver)\n"
    assert h.run("release", "nosuch-uuid") == 0  # idempotent, and says so (issue 20)
    assert capsys.readouterr().out == "VM nosuch-uuid holds no lease; nothing to release\n"


def test_prepare_access_denied_names_lease_action(capsys):
    assert Harness(fail_with(FD + "AccessDenied", "")).run("prepare", "web", "u", "a") == 5
    assert "grant org.nicpass.NicPass1.lease" in capsys.readouterr().err


# ---------------------------------------------------------------- the daemon is gone / slow

@pytest.mark.parametrize("cmd", [["list"], ["show", "x"], ["vfs", "x", "1"], ["bind", "x", "y"], ["monitor"],
                                 ["check"], ["guard"], ["leases"], ["release", "u"], ["version"]])
def test_daemon_not_on_bus(cmd, capsys):
    h = Harness(fail_with(FD + "ServiceUnknown", "The name org.nicpass.NicPass1 was not provided by any "
                                                 ".service files"))
    assert h.run(*cmd) == 6
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err == ("nicpassctl: nicpassd is not running on the system bus; "
                       "start it with `systemctl start nicpassd`\n")
    if cmd[0] == "bind":
        assert [call.member for call in h.calls if call.member != "Explain"] == ["BindEach"]  # no retry per device


def test_no_bus_socket(capsys):
    rc = cli.main(["--bus-address", "unix:path=/nonexistent/nicpassctl-test.sock", "list"])
    assert rc == 6
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("nicpassctl: nicpassd is not running on the system bus")
    assert cap.err.count("\n") == 1


def test_bad_bus_address_is_usage(capsys):
    assert cli.main(["--bus-address", "bogus", "list"]) == 2
    assert "invalid --bus-address" in capsys.readouterr().err


def test_client_timeout(capsys):
    def slow(msg, bus):
        return NO_REPLY

    assert Harness(slow).run("--timeout", "0.05", "bind", "x") == 1
    err = capsys.readouterr().err
    assert "did not answer within 0.05 seconds" in err and "may still complete" in err


def test_no_reply(capsys):
    h = Harness(fail_with(FD + "NoReply", "Message recipient disconnected from message bus without replying"))
    assert h.run("list") == 1
    assert "nicpassd did not answer" in capsys.readouterr().err


# ---------------------------------------------------------------- monitor

def _signals():
    dev = "/org/nicpass/NicPass1/devices/0000_3b_00_0"
    return [
        Message.new_signal(dev, "org.freedesktop.DBus.Properties", "PropertiesChanged", "sa{sv}as",
                           [DEV_IFACE, {"NumVfs": Variant("u", 4), "Driver": Variant("s", "i40e")}, []]),
        Message.new_signal("/org/nicpass/NicPass1", "org.freedesktop.DBus.ObjectManager", "InterfacesAdded",
                           "oa{sa{sv}}", ["/org/nicpass/NicPass1/devices/0000_3b_02_0",
                                          {DEV_IFACE: {"Address": Variant("s", "0000:3b:02.0")}}]),
        Message.new_signal("/org/nicpass/NicPass1", "org.freedesktop.DBus.ObjectManager", "InterfacesRemoved",
                           "oas", ["/org/nicpass/NicPass1/devices/0000_3b_02_0", [DEV_IFACE]]),
        Message.new_signal("/org/nicpass/NicPass1", "org.nicpass.NicPass1.Manager", "LeaseChanged", "sss",
                           ["l-1", "u-1", "active"]),
        Message.new_signal("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
                           ["org.nicpass.NicPass1", ":1.7", ""]),
        Message.new_signal("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged", "sss",
                           ["org.nicpass.NicPass1", "", ":1.9"]),
        Message.new_signal("/org/freedesktop/DBus", "org.freedesktop.DBus", "NameAcquired", "s", [":1.3"]),
    ]


def _monitor_responder(then):
    matches = []

    def responder(msg, bus):
        if msg.member == "AddMatch":
            matches.append(msg.body[0])
            if len(matches) == len(MONITOR_RULES):
                for sig in _signals():
                    bus.emit(sig)
                bus.later(lambda: then(bus))
            return "", []
        return default_responder(msg, bus)

    return responder, matches


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_monitor_text_until_signal(capsys, signum):
    responder, matches = _monitor_responder(lambda bus: os.kill(os.getpid(), signum))
    assert Harness(responder).run("monitor") == 0
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["changed 0000:3b:00.0 NumVfs=4 Driver=i40e", "added 0000:3b:02.0", "removed 0000:3b:02.0",
                     "lease l-1 u-1 active", "daemon stopped", "daemon started"]
    assert all("sender='org.nicpass.NicPass1'" in m or "NameOwnerChanged" in m for m in matches)
    assert any("path_namespace='/org/nicpass/NicPass1'" in m for m in matches)


def test_monitor_json(capsys):
    responder, _ = _monitor_responder(lambda bus: os.kill(os.getpid(), signal.SIGINT))
    assert Harness(responder).run("--json", "monitor") == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["event"] for d in docs] == ["changed", "added", "removed", "lease", "daemon-stopped",
                                          "daemon-started"]
    assert docs[0]["address"] == "0000:3b:00.0" and docs[0]["properties"] == {"num_vfs": 4, "driver": "i40e"}


def test_monitor_bus_lost(capsys):
    responder, _ = _monitor_responder(lambda bus: drop_the_connection())
    assert Harness(responder).run("monitor") == 6
    assert "lost the connection to the system bus" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code", [
    (["--json", "show", "nosuch0"], 7),
    (["vfs", "--json", "x", "1"], 7),
    (["--json", "vf", "x", "trust", "on"], 7),
    (["--json", "release", "u-1"], 7),
])
def test_json_errors_for_every_command(argv, code, capsys):
    """Issue 20: with --json a failure is also a JSON object on stdout (only bind had one), the
    exit code and the sentence on stderr unchanged."""
    h = Harness(fail_with(NP + "NotFound", "no NIC function at nosuch0; list the devices with `nicpassctl list`"))
    assert h.run(*argv) == code
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": NP + "NotFound", "exit_code": code,
                                        "message": captured.err.removeprefix("nicpassctl: ").strip()}
    assert Harness(fail_with(NP + "NotFound", "gone")).run(*[a for a in argv if a != "--json"]) == code
    assert capsys.readouterr().out == ""  # without --json, stdout stays empty


def test_quiet_prints_nothing_on_success_and_still_says_why_it_failed(capsys):
    """Issue 20: -q for scripts that want the exit code only."""
    assert Harness().run("-q", "bind", "x") == 0
    assert capsys.readouterr() == ("", "")
    h = Harness(fail_with(NP + "Protected", "0000:01:00.0 is protected: it carries the default route."))
    assert h.run("-q", "bind", "0000:01:00.0") == 3
    cap = capsys.readouterr()
    assert cap.out == "" and "is protected" in cap.err
