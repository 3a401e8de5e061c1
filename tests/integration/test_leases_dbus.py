"""Leases through the D-Bus API and nicpassctl: Prepare/Activate/Release, ListLeases, LeasedTo,
LeaseChanged, `nicpassctl leases` and `nicpassctl monitor`, against the in-process daemon."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys

import pytest
from dbus_fast import Message, MessageType, Variant

from nicpassd.transport.service import BUS_NAME, MANAGER_IFACE, MANAGER_PATH

PF = "0000:3b:00.0"
VFS = [f"0000:3b:02.{n}" for n in range(8)]
VM_A = "6f1c2d3e-0000-4000-8000-00000000000a"
BUSY = "org.nicpass.NicPass1.Error.Busy"


async def call(bus, member: str, signature: str = "", body: list | None = None) -> Message:
    return await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member=member,
                                  signature=signature, body=body or []))


async def ok(bus, member: str, signature: str = "", body: list | None = None) -> list:
    reply = await call(bus, member, signature, body)
    assert reply.message_type == MessageType.METHOD_RETURN, (member, reply.error_name, reply.body)
    return reply.body


@pytest.fixture
async def vfs(service):
    await service.engine.set_vf_count(PF, 8, persist=False)
    yield VFS
    service.engine.leasing.close()


async def nicpassctl(service, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=service.address)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "nicpassctl", *args, env=env,
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


async def test_fifty_concurrent_prepares_over_the_bus_never_double_lease(service, client, vfs):
    rng = random.Random(50)
    requests = [(f"vm{i}", f"00000000-0000-4000-8000-{i:012d}", rng.sample(vfs, rng.randint(1, 4)))
                for i in range(50)]
    replies = await asyncio.gather(*(call(client, "Prepare", "ssasa{sv}", [name, uuid, devices, {}])
                                     for name, uuid, devices in requests))
    owners: dict[str, str] = {}
    granted = 0
    for (_, uuid, devices), reply in zip(requests, replies):
        if reply.message_type == MessageType.ERROR:
            assert reply.error_name == BUSY, reply.body
            continue
        granted += 1
        for device in devices:
            assert device not in owners, f"{device} leased to {owners[device]} and {uuid}"
            owners[device] = uuid
    assert granted >= 2 and granted < 50  # the sets overlap: some were refused
    (listed,) = await ok(client, "ListLeases")
    assert {device: lease["vm_uuid"].value for lease in listed for device in lease["devices"].value} == owners
    assert json.loads((service.paths.runtime_dir / "leases.json").read_text())["leases"].__len__() == granted


async def test_prepare_options_and_activate(service, client, vfs):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (lease_id,) = await ok(client, "Prepare", "ssasa{sv}", ["web", VM_A, [vfs[0]], {
            "pidfile": Variant("s", "/run/libvirt/qemu/web.pid"), "reservation": Variant("u", 300),
            "skip_unmanaged": Variant("b", True)}])
        (listed,) = await ok(client, "ListLeases")
        assert listed[0]["lease_id"].value == lease_id and listed[0]["state"].value == "reserved"
        await ok(client, "Activate", "sa{sv}", [VM_A, {"pid": Variant("u", sleeper.pid)}])
        (listed,) = await ok(client, "ListLeases")
        assert (listed[0]["state"].value, listed[0]["pid"].value, listed[0]["expires"].value) == (
            "active", sleeper.pid, 0)
        # nothing of ours in the list: an empty lease id, not an error
        (none,) = await ok(client, "Prepare", "ssasa{sv}", ["gpu", "00000000-0000-4000-8000-0000000000ff",
                                                            ["0000:65:00.0"], {"skip_unmanaged": Variant("b", True)}])
        assert none == ""
        for member, signature, body, error in [
            ("Activate", "sa{sv}", ["nobody-here", {}], "NotFound"),
            ("Activate", "sa{sv}", [VM_A, {"pid": Variant("s", "12")}], "InvalidArgument"),
            ("Activate", "sa{sv}", [VM_A, {"when": Variant("u", 1)}], "InvalidArgument"),
            ("Prepare", "ssasa{sv}", ["x", "u-1", [vfs[1]], {"pidfile": Variant("s", "relative.pid")}],
             "InvalidArgument"),
            ("Prepare", "ssasa{sv}", ["x", "u-1", [vfs[1]], {"reservation": Variant("u", 99999)}], "InvalidArgument"),
            ("Prepare", "ssasa{sv}", ["x", "u-1", [vfs[1]], {"pidfile": Variant("s", "/run/../etc/shadow")}],
             "InvalidArgument"),
            ("Prepare", "ssasa{sv}", ["x", "u-1", [vfs[1]], {"pid": Variant("u", 2**22)}], "InvalidArgument"),
        ]:
            reply = await call(client, member, signature, body)
            assert reply.error_name == f"org.nicpass.NicPass1.Error.{error}", (member, body, reply.body)
    finally:
        sleeper.kill()
        sleeper.wait()
    await asyncio.sleep(0.2)
    assert service.engine.leases.leases == {}  # QEMU gone: reclaimed


async def test_nicpassctl_leases_and_monitor_show_the_lifecycle(service, client, vfs):
    monitor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nicpassctl", "--json", "monitor",
        env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=service.address),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await asyncio.sleep(1.0)  # let it subscribe (python start + AddMatch)
        await ok(client, "Prepare", "ssasa{sv}", ["web", VM_A, [vfs[0], vfs[1]], {}])
        listed = await nicpassctl(service, "--json", "leases")
        assert listed.returncode == 0, listed.stderr
        (lease,) = json.loads(listed.stdout)
        assert (lease["vm_name"], lease["vm_uuid"], lease["state"], lease["devices"]) == (
            "web", VM_A, "reserved", vfs[:2])
        table = await nicpassctl(service, "leases")
        assert "web" in table.stdout and VM_A in table.stdout and "reserved" in table.stdout
        shown = json.loads((await nicpassctl(service, "--json", "show", vfs[0])).stdout)
        assert shown["device"]["leased_to"] == VM_A and shown["explain"]["leased_to"] == VM_A
        listing = {d["address"]: d for d in json.loads((await nicpassctl(service, "--json", "list")).stdout)}
        assert listing[vfs[0]]["leased_to"] == VM_A and listing[vfs[2]]["leased_to"] is None
        activated = await nicpassctl(service, "activate", VM_A)
        assert (activated.returncode, activated.stdout) == (0, f"{VM_A}: lease active\n"), activated.stderr
        missing = await nicpassctl(service, "activate", "no-such-vm")
        assert missing.returncode == 7 and "holds no lease" in missing.stderr  # NotFound
        await ok(client, "Release", "sa{sv}", [VM_A, {}])

        events, leased = [], []
        async def read() -> None:
            while not ({"reserved", "active", "released"} <= {e.get("state") for e in events}
                       and leased.count(VM_A) >= 1 and "" in leased):
                line = await monitor.stdout.readline()
                assert line, (await monitor.stderr.read()).decode()
                event = json.loads(line)
                events.append(event)
                if event["event"] == "changed" and "leased_to" in event.get("properties", {}):
                    leased.append(event["properties"]["leased_to"])
        try:
            await asyncio.wait_for(read(), 20)
        except TimeoutError:
            raise AssertionError(events)
        lease_events = [(e["vm_uuid"], e["state"]) for e in events if e["event"] == "lease"]
        assert lease_events == [(VM_A, "reserved"), (VM_A, "active"), (VM_A, "released")]
    finally:
        monitor.terminate()
        await monitor.wait()
    assert json.loads((await nicpassctl(service, "--json", "leases")).stdout) == []


async def test_prepare_with_group_leases_the_unprotected_group_mates(service, client):
    """The e1000e (af:00.0) shares IOMMU group 40 with a USB controller (af:00.1, xhci_hcd): alone
    it is refused (group not viable); with ``group`` both go to the VM; a protected mate refuses."""
    from nicpassd.engine.config import GuardSettings

    nic, usb, router = "0000:af:00.0", "0000:af:00.1", "0b8e7a8e-3a52-4d43-9e4f-3f6c2a7d9a11"

    def driver(address: str) -> str:
        return os.path.basename(os.readlink(service.paths.pci_device(address) / "driver"))

    reply = await call(client, "Prepare", "ssasa{sv}", ["router", router, [nic], {}])
    assert reply.error_name == "org.nicpass.NicPass1.Error.Protected" and "not viable" in reply.body[0]
    assert (driver(nic), driver(usb)) == ("e1000e", "xhci_hcd")

    (lease_id,) = await ok(client, "Prepare", "ssasa{sv}", ["router", router, ["enp175s0f0"],
                                                           {"group": Variant("b", True)}])
    (listed,) = await ok(client, "ListLeases")
    assert [(item["lease_id"].value, item["devices"].value) for item in listed] == [(lease_id, [nic, usb])]
    assert (driver(nic), driver(usb)) == ("vfio-pci", "vfio-pci")
    (explained,) = await ok(client, "Explain", "s", [usb])
    assert explained["leased_to"].value == router
    await ok(client, "Release", "sa{sv}", [router, {}])
    assert service.engine.leases.leases == {}
    service.engine.leasing.close()

    # A group mate the guard protects is never taken along, and nothing is changed.
    await ok(client, "Bind", "ssa{sv}", [nic, "", {"persist": Variant("b", False)}])
    await ok(client, "Bind", "ssa{sv}", [usb, "", {"persist": Variant("b", False)}])
    service.engine.config = service.engine.config.model_copy(update={"guard": GuardSettings(never_touch=[usb])})
    service.engine.refresh()
    reply = await call(client, "Prepare", "ssasa{sv}", ["router", router, [nic], {"group": Variant("b", True)}])
    assert reply.error_name == "org.nicpass.NicPass1.Error.Protected", reply.body
    assert f"member {usb}" in reply.body[0] and "never_touch" in reply.body[0]
    assert (driver(nic), driver(usb)) == ("e1000e", "xhci_hcd") and service.engine.leases.leases == {}
    reply = await call(client, "Prepare", "ssasa{sv}", ["router", router, [nic], {"group": Variant("s", "yes")}])
    assert reply.error_name == "org.nicpass.NicPass1.Error.InvalidArgument"


async def test_prepare_domain_reads_the_libvirt_xml_in_the_daemon(service, client, vfs, polkit):
    """PrepareDomain(s domain_xml, s pidfile): what the libvirt hook sends through dbus-send."""
    def xml(devices: str, head: str = f"<name>web</name><uuid>{VM_A}</uuid>") -> str:
        return f"<domain type='kvm'>{head}<devices>{devices}</devices></domain>"

    def hostdev(address: str, mode: str = "subsystem", kind: str = "pci") -> str:
        bus, slot_fn = address.split(":")[1:]
        slot, fn = slot_fn.split(".")
        return (f"<hostdev mode='{mode}' type='{kind}' managed='yes'><source><address domain='0x0000' "
                f"bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source></hostdev>")

    domain = xml(hostdev(vfs[0]) + hostdev(vfs[1]) + hostdev("0000:65:00.0"))  # 65:00.0: not nicpassd's
    (lease_id,) = await ok(client, "PrepareDomain", "ss", [domain, "/run/libvirt/qemu/web.pid"])
    (lease,) = service.engine.leases.of_vm(VM_A)
    assert (lease.lease_id, lease.vm_name, lease.devices, lease.pidfile) == (
        lease_id, "web", vfs[:2], "/run/libvirt/qemu/web.pid")
    await ok(client, "Release", "sa{sv}", [VM_A, {}])

    assert await ok(client, "PrepareDomain", "ss", [xml(hostdev(vfs[2], kind="usb")), ""]) == [""]
    for domain, error, text in [
        (xml(hostdev(vfs[2]), head="<name>x</name>"), "InvalidArgument", "has no <uuid>"),
        ("<domain><devices><hostdev>", "InvalidArgument", "its domain XML cannot be read"),
        (xml(hostdev("0000:01:00.0")), "Protected", "protected"),
        (xml(hostdev(vfs[3])).replace("<domain", "<!DOCTYPE domain><domain"), "InvalidArgument", "DOCTYPE"),
        (xml(hostdev(vfs[2]), head="<name>x</name><uuid>../../x</uuid>"), "InvalidArgument", "is not a UUID"),
    ]:
        reply = await call(client, "PrepareDomain", "ss", [domain, ""])
        assert reply.error_name == f"org.nicpass.NicPass1.Error.{error}" and text in reply.body[0], reply.body
    assert service.engine.leases.leases == {}

    # Authorized as Prepare is (polkit's lease action): nobody is refused before the XML is read.
    from support.unprivileged import busctl_async

    denied = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "PrepareDomain",
                                "ss", xml(hostdev(vfs[4])), "", nobody=True)
    assert denied.returncode != 0 and "Access denied" in denied.stderr, denied.stderr
    assert service.engine.leases.leases == {} and {uid for _, uid, *_ in polkit.checks()} >= {65534}
