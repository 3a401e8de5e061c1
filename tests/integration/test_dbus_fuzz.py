"""Property-based fuzzing of the whole D-Bus API of a running `nicpassd --simulate` process.

Hypothesis draws calls to every method the daemon's own introspection lists (so a new method is
fuzzed without touching this file), with arguments built from each method's signature: device
names good and bad, drivers, UUIDs, domain XML, long and control-character strings, and option
dicts of known and unknown names with values of every type. Two callers:

- root (whom polkit authorizes for everything, so nicpassd does not ask it): the arguments reach
  validation and the engine;
- user nobody (a real unprivileged connection, through busctl), whom polkit refuses: the
  authorization path, with fewer examples, a process each.

After every answer: it is a method return or one of the contract's typed errors (never dbus-fast's
or the daemon's "failed unexpectedly"), no answer carries traceback text, a refused call changed
nothing in the kernel or in nicpassd's files, and at the end the daemon is alive and logged no
traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Node
from dbus_fast.signature import SignatureTree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nicpassd.host.host import Host
from nicpassd.paths import HostPaths
from nicpassd.sim import kernel_server
from support.daemon import SimulatedDaemon
from support.unprivileged import busctl_as_nobody

BUS_NAME = "org.nicpass.NicPass1"
MANAGER_PATH = "/org/nicpass/NicPass1"
MANAGER_IFACE = "org.nicpass.NicPass1.Manager"
DEVICE_IFACE = "org.nicpass.NicPass1.Device"
PF_PATH = f"{MANAGER_PATH}/devices/0000_3b_00_0"

TYPED_ERRORS = {f"org.nicpass.NicPass1.Error.{name}" for name in (
    "Failed", "InvalidArgument", "NotFound", "Protected", "Busy", "NotSupported", "KernelError",
    "Timeout", "IdentityChanged", "NotPersisted")} | {
    # answered by the bus or dbus-fast before the daemon's code: typed by the D-Bus spec
    "org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.InvalidArgs",
    "org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.UnknownInterface", "org.freedesktop.DBus.Error.PropertyReadOnly",
    "org.freedesktop.DBus.Error.NotSupported",
}
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]*", line \d+|failed unexpectedly|'
                       r"An internal error occurred")

# --- what callers send ----------------------------------------------------------------------------
DEVICES = ["0000:3b:00.0", "3b:00.0", "0000:3B:00.0", "enp59s0f0", "0000:3b:02.0", "0000:3b:02.1",
           "0000:5e:00.0", "0000:01:00.0", "eno1", "br0", "0000:af:00.0", "0000:af:00.1", "0000:00:17.0",
           "0000:3b:00.0\n", " 3b:00.0", "0000:ff:1f.7", "../../../etc", "*", ""]
DRIVERS = ["vfio-pci", "pci-stub", "", "i40e", "iavf", "igb", "ahci", "xhci_hcd", "../../evil", "VFIO-PCI"]
UUIDS = [str(uuid.UUID(int=n)) for n in (1, 2, 0xdeadbeef)] + [
    "00000000-0000-0000-0000-000000000000", "../../x", "not-a-uuid", "0000000-0000-0000-0000-00000000001"]
DOMAIN_XML = """<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>{hostdevs}</devices></domain>"""
HOSTDEV = ("<hostdev mode='subsystem' type='pci' managed='{managed}'><source>"
           "<address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source></hostdev>")
OPTION_NAMES = ["persist", "driver", "force", "group", "restore", "missing_ok", "pid", "pidfile",
                "reservation", "skip_unmanaged", "bogus", ""]

TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=200)
LONG = st.builds(lambda piece, n: piece * n, st.sampled_from(["3b:00.0", "é", "\n", "<", "A"]),
                 st.integers(500, 20_000))


def domain_xml() -> st.SearchStrategy[str]:
    hostdev = st.builds(lambda bus, slot, function, managed: HOSTDEV.format(
        bus=bus, slot=slot, function=function, managed=managed),
        st.sampled_from(["3b", "5e", "01", "af", "zz"]), st.sampled_from(["00", "02", "1f"]),
        st.sampled_from(["0", "1", "9"]), st.sampled_from(["yes", "no"]))
    return st.builds(lambda name, vm_uuid, devices: DOMAIN_XML.format(name=name, uuid=vm_uuid,
                                                                      hostdevs="".join(devices)),
                     st.sampled_from(["vm1", "vm-two", "", "<x>"]), st.sampled_from(UUIDS),
                     st.lists(hostdev, max_size=5))


STRINGS = st.one_of(st.sampled_from(DEVICES), st.sampled_from(DRIVERS), st.sampled_from(UUIDS),
                    st.sampled_from(["vm1", "/run/nicpassd-test.pid", "/etc/passwd"]), domain_xml(),
                    TEXT, LONG)
UINTS = st.one_of(st.integers(0, 70), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]))
INTS = st.one_of(st.integers(-5, 70), st.sampled_from([-2**31, 2**31 - 1]))


def variant() -> st.SearchStrategy[Variant]:
    return st.one_of(
        st.booleans().map(lambda v: Variant("b", v)), STRINGS.map(lambda v: Variant("s", v)),
        UINTS.map(lambda v: Variant("u", v)), INTS.map(lambda v: Variant("i", v)),
        st.integers(-2**63, 2**63 - 1).map(lambda v: Variant("x", v)),
        st.lists(STRINGS, max_size=4).map(lambda v: Variant("as", v)),
        st.floats(allow_nan=True).map(lambda v: Variant("d", v)))


def value_for(type_) -> st.SearchStrategy:
    """Values for one D-Bus type, as dbus-fast takes them."""
    code = type_.signature
    if code == "s":
        return STRINGS
    if code == "o":
        return st.sampled_from([MANAGER_PATH, PF_PATH, "/", "/x"])
    if code == "u":
        return UINTS
    if code == "i":
        return INTS
    if code == "b":
        return st.booleans()
    if code == "v":
        return variant()
    if code == "a{sv}":
        return st.dictionaries(st.one_of(st.sampled_from(OPTION_NAMES), TEXT), variant(), max_size=4)
    if code.startswith("a{"):
        key, item = type_.children[0].children
        return st.dictionaries(value_for(key), value_for(item), max_size=3)
    if code.startswith("a"):
        return st.lists(value_for(type_.children[0]), max_size=6)
    if code.startswith("("):
        return st.tuples(*(value_for(child) for child in type_.children)).map(list)
    raise AssertionError(f"no strategy for D-Bus type {code}")


def body_for(signature: str) -> st.SearchStrategy[list]:
    types = SignatureTree(signature).types
    return st.tuples(*(value_for(t) for t in types)).map(list) if types else st.just([])


# Well-formed calls, so that the fuzzing also reaches the engine and changes the host (a refusal
# of a call that should work is as much a finding as a crash).
GOOD_DEVICES = st.sampled_from(["0000:3b:00.0", "0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2", "0000:5e:00.0",
                                "0000:5e:00.2", "0000:01:00.0", "0000:af:00.0", "enp59s0f0"])
GOOD_OPTIONS = {"persist": st.booleans().map(lambda v: Variant("b", v)),
                "force": st.booleans().map(lambda v: Variant("b", v)),
                "group": st.booleans().map(lambda v: Variant("b", v)),
                "restore": st.booleans().map(lambda v: Variant("b", v)),
                "missing_ok": st.booleans().map(lambda v: Variant("b", v)),
                "driver": st.sampled_from(["", "vfio-pci"]).map(lambda v: Variant("s", v))}


def good_options(*names: str) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional={name: GOOD_OPTIONS[name] for name in names})


PLAUSIBLE = {
    "SetVfCount": st.tuples(GOOD_DEVICES, st.integers(0, 8), good_options("persist", "driver")),
    "Bind": st.tuples(GOOD_DEVICES, st.sampled_from(["vfio-pci", "", "pci-stub"]), good_options("persist", "group")),
    "Unbind": st.tuples(GOOD_DEVICES, good_options("persist")),
    "BindEach": st.tuples(st.lists(GOOD_DEVICES, max_size=4), st.sampled_from(["vfio-pci", ""]),
                          good_options("persist", "force")),
    "Forget": st.tuples(GOOD_DEVICES, good_options("restore")),
    "Prepare": st.tuples(st.sampled_from(["vm1", "vm2"]), st.sampled_from(UUIDS[:3]),
                         st.lists(GOOD_DEVICES, min_size=1, max_size=3), st.just({})),
    "Activate": st.tuples(st.sampled_from(UUIDS[:3]), good_options("missing_ok")),
    "Release": st.tuples(st.sampled_from(UUIDS[:3]), st.just({})),
    "ReleaseProtection": st.tuples(GOOD_DEVICES, st.just({})),
    "Import": st.tuples(st.just({})),
    "SetVfSettings": st.tuples(
        st.one_of(GOOD_DEVICES, st.sampled_from(["0000:3b:00.0:0", "enp59s0f0:1", "0000:5e:00.0:9"])),
        st.dictionaries(st.sampled_from(["mac", "vlan", "qos", "trust", "spoofchk", "link_state", "max_tx_rate"]),
                        st.one_of(st.just(Variant("s", "02:00:00:00:00:01")), st.just(Variant("s", "01:00:00:00:00:01")),
                                  st.integers(0, 5000).map(lambda n: Variant("u", n)),
                                  st.booleans().map(lambda b: Variant("b", b)),
                                  st.just(Variant("s", "disable"))), max_size=3),
        good_options("persist", "force")),
    "Explain": st.tuples(GOOD_DEVICES),
    "Get": st.tuples(st.sampled_from(["org.nicpass.NicPass1.Manager", DEVICE_IFACE]),
                     st.sampled_from(["Version", "ViolationCount", "Driver", "NumVfs", "Nope"])),
    "GetAll": st.tuples(st.sampled_from(["org.nicpass.NicPass1.Manager", DEVICE_IFACE])),
}


def body_of(member: str, signature: str) -> st.SearchStrategy[list]:
    plausible = PLAUSIBLE.get(member)
    if plausible is None:
        return body_for(signature)
    return st.one_of(body_for(signature), plausible.map(list))


# --- the daemon under test ------------------------------------------------------------------------

def fingerprint(paths: HostPaths) -> dict[str, str]:
    """What a refused call must not change: every function's binding and VF count in the kernel,
    every VF's settings (what the PF's driver answers to RTM_GETLINK), and every file nicpassd keeps."""
    state = {}
    kernel = Host(paths, kernel_server.RemoteKernel(paths))
    for name in sorted(os.listdir(paths.class_net)):
        numvfs = paths.class_net / name / "device" / "sriov_numvfs"
        if numvfs.exists() and numvfs.read_text().strip() not in ("", "0"):
            state[f"{name}/vfs"] = repr(kernel.read_vf_settings(name))
    root = paths.pci_devices
    for address in sorted(os.listdir(root)):
        device = root / address
        link = device / "driver"
        state[f"{address}/driver"] = os.readlink(link) if link.is_symlink() else ""
        for attr in ("driver_override", "sriov_numvfs"):
            if (device / attr).exists():
                state[f"{address}/{attr}"] = (device / attr).read_text()
    for directory in (paths.state_dir, paths.runtime_dir):
        if directory.is_dir():
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    state[str(path)] = path.read_bytes().hex()
    return state


def settled(paths: HostPaths, timeout: float = 3.0) -> dict[str, str]:
    """The fingerprint once nothing has moved for a while (a successful call may leave the
    reconciler some work)."""
    deadline = time.monotonic() + timeout
    last = fingerprint(paths)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fingerprint(paths)
        if now == last:
            return now
        last = now
    return last


class Fuzzed:
    def __init__(self, private_bus, tmp: Path) -> None:
        self.root = tmp / "host"
        self.paths = HostPaths(self.root)
        # The kernel in a process of its own, so that the fingerprint can ask it for VF settings.
        kernel_server.spawn(self.paths, None)
        self.daemon = SimulatedDaemon(private_bus, self.root, extra_args=("--keep-kernel",))
        self.address = private_bus.address
        self.loop = asyncio.new_event_loop()
        async def connect() -> MessageBus:
            return await MessageBus(bus_address=self.address).connect()
        self.bus = self.loop.run_until_complete(connect())
        introspection = self.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                          interface="org.freedesktop.DBus.Introspectable", member="Introspect"))
        manager = next(i for i in Node.parse(introspection.body[0]).interfaces if i.name == MANAGER_IFACE)
        self.methods = {m.name: "".join(a.signature for a in m.in_args) for m in manager.methods}
        # Methods on the objects, besides the manager's own.
        self.targets = [(MANAGER_PATH, MANAGER_IFACE, name, sig) for name, sig in sorted(self.methods.items())]
        self.targets += [(path, "org.freedesktop.DBus.Properties", member, sig)
                         for path in (MANAGER_PATH, PF_PATH)
                         for member, sig in (("Get", "ss"), ("GetAll", "s"), ("Set", "ssv"))]
        self.targets += [(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "")]
        self.answers: dict[str, int] = {}

    def call(self, message: Message, timeout: float = 30.0) -> Message:
        return self.loop.run_until_complete(asyncio.wait_for(self.bus.call(message), timeout))

    def note(self, outcome: str) -> None:
        self.answers[outcome] = self.answers.get(outcome, 0) + 1

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.close()
        self.daemon.stop()
        kernel_server.stop(self.paths)


@pytest.fixture(scope="module")
def fuzzed(private_bus, polkit_mock, tmp_path_factory):
    target = Fuzzed(private_bus, tmp_path_factory.mktemp("fuzz"))
    try:
        yield target
    finally:
        target.close()


def calls(fuzzed: Fuzzed):
    return st.sampled_from(fuzzed.targets).flatmap(
        lambda target: st.tuples(st.just(target), body_of(target[2], target[3])))


def check_answer(fuzzed: Fuzzed, reply: Message, what: str) -> None:
    text = " ".join(str(part) for part in reply.body) if reply.body else ""
    assert not TRACEBACK.search(text), f"{what}: the answer leaks internals: {text[:500]}"
    if reply.message_type == MessageType.ERROR:
        assert reply.error_name in TYPED_ERRORS, f"{what}: untyped error {reply.error_name}: {text[:500]}"
    else:
        assert reply.message_type == MessageType.METHOD_RETURN, what


def fuzz_one(fuzzed: Fuzzed, target, body) -> Message:
    path, interface, member, signature = target
    before = fingerprint(fuzzed.paths)
    reply = fuzzed.call(Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                                signature=signature, body=body))
    what = f"{interface}.{member}{tuple(repr(b)[:120] for b in body)}"
    check_answer(fuzzed, reply, what)
    fuzzed.note(f"{member}: {reply.error_name or 'ok'}")
    if reply.message_type == MessageType.ERROR:
        after = fingerprint(fuzzed.paths)
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert not changed, f"{what} was refused ({reply.error_name}: {reply.body}) but changed {sorted(changed)}"
    else:
        settled(fuzzed.paths)  # let the reconciler finish before the next call's "before"
    return reply


def assert_daemon_well(fuzzed: Fuzzed) -> None:
    assert fuzzed.daemon.process.poll() is None, "nicpassd exited:\n" + fuzzed.daemon.log_text()[-3000:]
    reply = fuzzed.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface="org.freedesktop.DBus.Properties",
                                member="Get", signature="ss", body=[MANAGER_IFACE, "Version"]))
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    log = fuzzed.daemon.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:4000]


FUZZ = settings(max_examples=250, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def test_fuzz_as_root_with_polkit_authorizing(fuzzed, polkit):
    polkit.set_allowed_uids([0])

    @FUZZ
    @given(st.data())
    def run(data):
        target, body = data.draw(calls(fuzzed))
        fuzz_one(fuzzed, target, body)

    run()
    assert_daemon_well(fuzzed)
    # The fuzzing reached the engine: kernel changes were carried out, arguments were refused.
    outcomes = set(fuzzed.answers)
    assert outcomes & {"Bind: ok", "Unbind: ok", "SetVfCount: ok", "Forget: ok"}, fuzzed.answers
    assert any("InvalidArgument" in outcome for outcome in outcomes), fuzzed.answers


READS = {"Explain", "Check", "CheckDevices", "GetProtected", "ListLeases", "GetViolations", "PlanReconcile",
         "PlanImport"}  # no authorization asked


def _busctl_arguments(signature: str, body: list) -> list[str] | None:
    """busctl's textual form of a body of simple types (None when a type has no simple form)."""
    out: list[str] = []
    for type_, value in zip(SignatureTree(signature).types, body):
        if type_.signature in ("s", "u", "i"):
            out.append(str(value))
        elif type_.signature == "b":
            out.append("true" if value else "false")
        elif type_.signature == "as":
            out += [str(len(value)), *value]
        elif type_.signature == "a{sv}":
            out.append(str(len(value)))
            for key, item in value.items():
                if item.signature not in ("s", "b", "u", "i"):
                    return None
                text = ("true" if item.value else "false") if item.signature == "b" else str(item.value)
                out += [key, item.signature, text]
        else:
            return None
    if any(piece.startswith("-") or "\x00" in piece for piece in out):
        return None  # busctl would read it as an option
    return out


def test_fuzz_as_nobody_changes_nothing(fuzzed, polkit):
    """A real unprivileged connection: every mutating method is AccessDenied whatever its arguments
    (polkit authorizes uid 0 only), the reads answer typed, nothing changes."""
    polkit.set_allowed_uids([0])
    if not shutil.which("busctl"):
        pytest.fail("busctl (systemd) is needed to call as nobody; scripts/setup installs it")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        name = data.draw(st.sampled_from(sorted(fuzzed.methods)))
        signature = fuzzed.methods[name]
        body = data.draw(body_of(name, signature))
        arguments = _busctl_arguments(signature, body)
        if arguments is None or len(" ".join(arguments)) > 100_000:
            return
        before = fingerprint(fuzzed.paths)
        result = busctl_as_nobody(fuzzed.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, name,
                                  *([signature] if signature else []), *arguments)
        text = result.stdout + result.stderr
        assert not TRACEBACK.search(text), text
        if name not in READS:
            assert result.returncode != 0 and ("not authorized" in text or "Access denied" in text), (
                name, arguments[:6], text[:300])
            assert fingerprint(fuzzed.paths) == before, (name, arguments[:6])
        fuzzed.note(f"nobody {name}: {'ok' if result.returncode == 0 else text.strip()[:40]}")

    run()
    assert_daemon_well(fuzzed)

