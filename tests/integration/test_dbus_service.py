"""The D-Bus API through a real dbus-daemon enforcing the shipped policy, polkit asked per action."""

from __future__ import annotations

import asyncio
import socket
import os

from dbus_fast import Message, MessageType, Variant

from nicpassd.transport.service import BUS_NAME, DEVICE_IFACE, MANAGER_IFACE, MANAGER_PATH, device_path
from support.unprivileged import NOBODY, busctl_async

SPEC_PROPERTIES = {
    "Address": "s", "VendorId": "s", "DeviceId": "s", "SubsystemVendorId": "s", "SubsystemDeviceId": "s",
    "Driver": "s", "IommuGroup": "i", "Interfaces": "as", "PhysicalFunction": "s", "TotalVfs": "u",
    "NumVfs": "u", "Protected": "b", "ProtectionReasons": "as", "LeasedTo": "s", "Persisted": "b",
    "DesiredDriver": "s",
}


async def call(bus, member: str, signature: str = "", body: list | None = None, *,
               path: str = MANAGER_PATH, interface: str = MANAGER_IFACE) -> Message:
    return await bus.call(Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                                  signature=signature, body=body or []))


async def managed_objects(bus) -> dict:
    reply = await call(bus, "GetManagedObjects", interface="org.freedesktop.DBus.ObjectManager")
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body[0]


def sysfs(service, address: str, attr: str) -> str:
    return (service.paths.pci_device(address) / attr).read_text().strip()


def driver_of(service, address: str) -> str:
    link = service.paths.pci_device(address) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


async def test_managed_objects_carry_every_spec_property(service, client):
    objects = await managed_objects(client)
    assert set(objects) == {device_path(a) for a in service.kernel.devices() if a != "0000:00:17.0"}
    for path, interfaces in objects.items():
        properties = interfaces[DEVICE_IFACE]
        for name, signature in SPEC_PROPERTIES.items():
            assert properties[name].signature == signature, (path, name)
    pf = objects[device_path("0000:3b:00.0")][DEVICE_IFACE]
    assert (pf["Driver"].value, pf["TotalVfs"].value, pf["Interfaces"].value) == ("i40e", 64, ["enp59s0f0"])
    mgmt = objects[device_path("0000:01:00.0")][DEVICE_IFACE]
    assert mgmt["Protected"].value is True
    assert any("br0 → bond0 → eno1" in reason for reason in mgmt["ProtectionReasons"].value)


async def get_all_of_every_device(client, paths) -> dict:
    answers = {}
    for path in paths:
        reply = await call(client, "GetAll", "s", [DEVICE_IFACE], path=path,
                           interface="org.freedesktop.DBus.Properties")
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        answers[path] = {DEVICE_IFACE: reply.body[0]}
    return answers


async def test_managed_objects_answer_kept_between_changes_is_never_stale(service, client):
    """GetManagedObjects is answered from a copy kept until the inventory changes (issue 19: reads
    must not starve writes): after every change it equals what each object answers itself."""
    before = await managed_objects(client)
    assert before == await get_all_of_every_device(client, before)
    reply = await call(client, "SetVfCount", "sua{sv}", ["0000:3b:00.0", 2, {}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    grown = await managed_objects(client)
    vfs = {path for path, ifaces in grown.items() if ifaces[DEVICE_IFACE]["PhysicalFunction"].value == "0000:3b:00.0"}
    assert len(vfs) == 2 and set(before) < set(grown)
    assert grown == await get_all_of_every_device(client, grown)
    vf = sorted(vfs)[0]
    reply = await call(client, "Bind", "ssa{sv}", [grown[vf][DEVICE_IFACE]["Address"].value, "vfio-pci", {}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    bound = await managed_objects(client)
    assert bound[vf][DEVICE_IFACE]["Driver"].value == "vfio-pci"
    assert bound == await get_all_of_every_device(client, bound)
    reply = await call(client, "GetManagedObjects", "s", ["x"], interface="org.freedesktop.DBus.ObjectManager")
    assert reply.message_type == MessageType.ERROR and reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"


async def test_set_vf_count_creates_vf_objects_and_signals(service, client):
    added, changed, announced = [], [], {}

    def on_message(message: Message) -> None:
        if message.member == "InterfacesAdded":
            added.append((message.path, message.body[0]))
            announced[message.body[0]] = message.body[1]
        elif message.member == "PropertiesChanged" and message.path == device_path("0000:3b:00.0"):
            changed.append(message.body[1])

    client.add_message_handler(on_message)
    for rule in (f"type='signal',sender='{BUS_NAME}',interface='org.freedesktop.DBus.ObjectManager'",
                 f"type='signal',sender='{BUS_NAME}',interface='org.freedesktop.DBus.Properties'"):
        await client.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                  interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))

    reply = await call(client, "SetVfCount", "sua{sv}", ["enp59s0f0", 4, {}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    assert sysfs(service, "0000:3b:00.0", "sriov_numvfs") == "4"
    for _ in range(100):
        if len(added) >= 4 and changed:
            break
        await asyncio.sleep(0.01)
    vf_paths = {path for _, path in added}
    assert {device_path(f"0000:3b:02.{i}") for i in range(4)} <= vf_paths
    assert all(path == MANAGER_PATH for path, _ in added)  # ObjectManager signals come from the manager
    # A new object is announced with its properties built directly (not through dbus-fast's
    # getters): the same names and types as the object's own GetAll.
    answers = await get_all_of_every_device(client, sorted(vf_paths))
    for path in vf_paths:
        assert {name: value.signature for name, value in announced[path][DEVICE_IFACE].items()} == {
            name: value.signature for name, value in answers[path][DEVICE_IFACE].items()}
    assert any(change.get("NumVfs") == Variant("u", 4) for change in changed)
    objects = await managed_objects(client)
    vf = objects[device_path("0000:3b:02.0")][DEVICE_IFACE]
    assert vf["PhysicalFunction"].value == "0000:3b:00.0"
    assert vf["IommuGroup"].value not in (-1, objects[device_path("0000:3b:00.0")][DEVICE_IFACE]["IommuGroup"].value)


async def test_bind_vf_to_vfio_is_verified_and_persisted(service, client):
    assert (await call(client, "SetVfCount", "sua{sv}", ["3b:00.0", 2, {}])).message_type == MessageType.METHOD_RETURN
    reply = await call(client, "Bind", "ssa{sv}", ["0000:3b:02.1", "vfio-pci", {}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    assert driver_of(service, "0000:3b:02.1") == "vfio-pci"
    assert sysfs(service, "0000:3b:02.1", "driver_override") == "vfio-pci"
    prop = await call(client, "Get", "ss", [DEVICE_IFACE, "DesiredDriver"], path=device_path("0000:3b:02.1"),
                      interface="org.freedesktop.DBus.Properties")
    assert prop.body[0].value == "vfio-pci"


async def test_a_property_read_right_after_a_change_shows_the_change(service, client):
    """A change answers before the re-read of what it did (the reconcile run it pokes does that);
    a device's Properties.Get/GetAll read in what it marked first, whether or not that run came.
    Here it never comes: automatic runs are off."""
    service.engine.reconciler.auto = False
    path = device_path("0000:af:00.0")
    assert (await call(client, "Bind", "ssa{sv}", ["0000:af:00.0", "vfio-pci", {}])).message_type == \
        MessageType.METHOD_RETURN
    got = await call(client, "Get", "ss", [DEVICE_IFACE, "DesiredDriver"], path=path,
                     interface="org.freedesktop.DBus.Properties")
    assert got.body[0].value == "vfio-pci"
    assert (await call(client, "Unbind", "sa{sv}", ["0000:af:00.0", {}])).message_type == MessageType.METHOD_RETURN
    every = await call(client, "GetAll", "s", [DEVICE_IFACE], path=path, interface="org.freedesktop.DBus.Properties")
    assert (every.body[0]["Driver"].value, every.body[0]["DesiredDriver"].value) == ("e1000e", "")


async def test_errors_are_typed(service, client):
    cases = [
        ("SetVfCount", "sua{sv}", ["3b:00.0", 65, {}], "InvalidArgument"),
        ("SetVfCount", "sua{sv}", ["af:00.0", 2, {}], "NotSupported"),
        ("SetVfCount", "sua{sv}", ["eno1", 2, {}], "Protected"),
        ("Bind", "ssa{sv}", ["eno2", "vfio-pci", {}], "Protected"),
        ("Bind", "ssa{sv}", ["0000:99:00.0", "vfio-pci", {}], "NotFound"),
        ("Bind", "ssa{sv}", ["not-a-device", "vfio-pci", {}], "NotFound"),  # no interface of that name
        ("Bind", "ssa{sv}", ["not/a/device", "vfio-pci", {}], "InvalidArgument"),  # no name at all
        ("Bind", "ssa{sv}", ["3b:00.1", "vfio-pci", {"persist": Variant("s", "yes")}], "InvalidArgument"),
        ("Bind", "ssa{sv}", ["3b:00.1", "vfio-pci", {"bogus": Variant("b", True)}], "InvalidArgument"),
        ("Explain", "s", ["bond0"], "InvalidArgument"),
    ]
    for member, signature, body, error in cases:
        reply = await call(client, member, signature, body)
        assert reply.message_type == MessageType.ERROR, (member, body)
        assert reply.error_name == f"org.nicpass.NicPass1.Error.{error}", (member, body, reply.body)
        assert reply.body and len(reply.body[0]) > 20  # a sentence, not a bare code
    assert sysfs(service, "0000:3b:00.0", "sriov_numvfs") == "0"
    assert driver_of(service, "0000:01:00.1") == "igb"


async def test_kernel_fault_reaches_the_caller_typed_with_state_restored(service, client):
    service.kernel.fail_binds_silently("0000:5e:00.0")
    reply = await call(client, "Bind", "ssa{sv}", ["5e:00.0", "vfio-pci", {}])
    assert reply.error_name == "org.nicpass.NicPass1.Error.KernelError"
    assert "restored mlx5_core" in reply.body[0]
    assert driver_of(service, "0000:5e:00.0") == "mlx5_core"
    assert sysfs(service, "0000:5e:00.0", "driver_override") == "(null)"


async def test_polkit_is_asked_per_action(service, client, polkit):
    """About a caller other than root, for the action each method needs: manage, lease, none."""
    polkit.set_allowed_uids([NOBODY])
    for member, signature, *args in [("SetVfCount", "sua{sv}", "3b:00.0", "1", "0"),
                                     ("Prepare", "ssasa{sv}", "vm1", "uuid-1", "1", "3b:02.0", "0"),
                                     ("Release", "sa{sv}", "uuid-1", "0"), ("GetProtected", "")]:
        result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member,
                                    *([signature, *args] if signature else []), nobody=True)
        assert result.returncode == 0, (member, result.stderr)
    checks = [(action, uid) for action, uid, _flags, _authorized in polkit.checks()]
    assert checks == [("org.nicpass.NicPass1.manage", NOBODY), ("org.nicpass.NicPass1.lease", NOBODY),
                      ("org.nicpass.NicPass1.lease", NOBODY)]


async def test_root_is_authorized_without_asking_polkit(service, client, polkit):
    """polkitd authorizes uid 0 for every action before any rule: nicpassd does not ask it about
    root, so this mock, which would refuse root, is never asked, and root's change is made."""
    polkit.set_allowed_uids([])
    reply = await call(client, "SetVfCount", "sua{sv}", ["3b:00.0", 2, {"persist": Variant("b", False)}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    assert sysfs(service, "0000:3b:00.0", "sriov_numvfs") == "2"
    reply = await call(client, "SetVfCount", "sua{sv}", ["3b:00.0", 0, {"persist": Variant("b", False)}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    assert polkit.checks() == []


async def test_polkit_denial_is_access_denied_and_changes_nothing(service, polkit):
    polkit.set_allowed_uids([])
    result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "SetVfCount",
                                "sua{sv}", "3b:00.0", "2", "0", nobody=True)
    assert result.returncode != 0 and "Access denied" in result.stderr, result.stderr
    assert [(action, uid, authorized) for action, uid, _flags, authorized in polkit.checks()] == [
        ("org.nicpass.NicPass1.manage", NOBODY, False)]
    assert sysfs(service, "0000:3b:00.0", "sriov_numvfs") == "0"


MUTATIONS = [
    ("SetVfCount", "sua{sv}", "3b:00.0", "2", "0"),
    ("Bind", "ssa{sv}", "3b:00.1", "vfio-pci", "0"),
    ("Unbind", "sa{sv}", "3b:00.1", "0"),
    ("Forget", "sa{sv}", "3b:00.1", "0"),
    ("Prepare", "ssasa{sv}", "vm", "uuid-x", "1", "3b:00.1", "0"),
    ("Release", "sa{sv}", "uuid-x", "0"),
    ("ReleaseProtection", "sa{sv}", "01:00.0", "0"),
    ("Import", "a{sv}", "0"),
]
READS = [
    ("Check", ""), ("Explain", "s", "3b:00.0"), ("GetProtected", ""), ("ListLeases", ""), ("GetViolations", ""),
    ("PlanReconcile", ""), ("CheckDevices", "as", "0"), ("PlanImport", ""),
]


async def test_nobody_is_denied_every_mutation_but_may_read(service, polkit):
    for member, signature, *args in MUTATIONS:
        result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member,
                                    signature, *args, nobody=True)
        assert result.returncode != 0, member
        assert "Access denied" in result.stderr or "not authorized" in result.stderr, (member, result.stderr)
    assert sysfs(service, "0000:3b:00.0", "sriov_numvfs") == "0"
    assert driver_of(service, "0000:3b:00.1") == "i40e"
    for member, signature, *args in READS:
        argv = ["call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, *([signature, *args] if signature else [])]
        result = await busctl_async(service.address, *argv, nobody=True)
        assert result.returncode == 0, (member, result.stderr)
    result = await busctl_async(service.address, "get-property", BUS_NAME, device_path("0000:3b:00.0"),
                                DEVICE_IFACE, "NumVfs", nobody=True)
    assert result.stdout.strip() == "u 0"
    result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH,
                                "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", nobody=True)
    assert result.returncode == 0 and "0000:3b:00.0" in result.stdout
    uids = {check[1] for check in polkit.checks()}
    assert uids == {65534}


async def test_a_burst_that_fills_the_socket_does_not_kill_the_connection(service, client):
    """dbus-fast tore a connection down when a write met a full socket buffer (EAGAIN).

    The daemon's connection queues 4,000 signals of 2 kB in one loop tick, as a VF storm's
    PropertiesChanged burst would, into a socket buffer shrunk to 4 kB so that the burst meets a
    full buffer for certain; then the daemon must still answer.
    """
    service.bus._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    padding = "x" * 2000
    sends = [service.bus.send(Message.new_signal(MANAGER_PATH, "org.nicpass.Test", "Burst", "s", [padding]))
             for _ in range(4000)]
    await asyncio.gather(*sends)
    assert service.bus.connected
    reply = await call(client, "GetProtected")
    assert reply.message_type == MessageType.METHOD_RETURN
    assert service.bus.connected and client.connected


async def test_bind_each_answers_per_device_and_binds_in_one_batch(service, client, polkit):
    reply = await call(client, "SetVfCount", "sua{sv}", ["0000:3b:00.0", 3, {"persist": Variant("b", False)}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    vfs = sorted(a for a in service.kernel.devices() if a.startswith("0000:3b:02."))
    reply = await call(client, "BindEach", "assa{sv}", [[*vfs, "0000:01:00.0", "bogus"], "vfio-pci", {}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    answer = reply.body[0]
    assert [(d, e.rsplit(".", 1)[-1] if e else "") for d, e, _m in answer] == [
        *[(vf, "") for vf in vfs], ("0000:01:00.0", "Protected"), ("bogus", "NotFound")]
    assert "protected" in answer[3][2]
    assert [driver_of(service, vf) for vf in vfs] == ["vfio-pci"] * 3
    reply = await call(client, "BindEach", "assa{sv}", [vfs, "", {"persist": Variant("b", True)}])
    assert [e for _d, e, _m in reply.body[0]] == ["", "", ""]
    assert [driver_of(service, vf) for vf in vfs] == ["iavf"] * 3
    reply = await call(client, "BindEach", "assa{sv}", [[], "vfio-pci", {}])
    assert reply.error_name == "org.nicpass.NicPass1.Error.InvalidArgument"
    polkit.set_allowed_uids([])
    result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "BindEach",
                                "assa{sv}", str(len(vfs)), *vfs, "vfio-pci", "0", nobody=True)
    assert result.returncode != 0 and "Access denied" in result.stderr, result.stderr
    assert [driver_of(service, vf) for vf in vfs] == ["iavf"] * 3


async def test_a_change_answers_before_the_re_read_of_what_it_did_and_readers_never_see_it_stale(service, client):
    """Issue 22: the re-read of the functions a change bound (a dozen sysfs reads each, that
    trap under a hypervisor) is not on the caller's path: the answer comes first, then the
    PropertiesChanged of the re-read, on the same connection, in that order. A reader asking
    the moment the answer came is answered after the re-read."""
    service.engine.reconciler.auto = True  # as the daemon runs it: events during a change poke a run
    reply = await call(client, "SetVfCount", "sua{sv}", ["0000:3b:00.0", 3, {"persist": Variant("b", False)}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    vfs = sorted(a for a in service.kernel.devices() if a.startswith("0000:3b:02."))
    await client.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                              interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                              body=[f"type='signal',sender='{BUS_NAME}',interface='org.freedesktop.DBus.Properties'"]))
    arrivals: list[str] = []

    def on_message(message: Message) -> None:
        if message.member == "PropertiesChanged" and "Driver" in message.body[1]:
            arrivals.append(f"Driver of {message.path}")
        elif message.message_type == MessageType.METHOD_RETURN and message.signature == "a(sss)":
            arrivals.append("answer")

    client.add_message_handler(on_message)
    reply = await call(client, "BindEach", "assa{sv}", [vfs, "vfio-pci", {}])
    assert [e for _d, e, _m in reply.body[0]] == ["", "", ""]
    objects = await managed_objects(client)  # asked the moment the answer came
    assert {objects[device_path(vf)][DEVICE_IFACE]["Driver"].value for vf in vfs} == {"vfio-pci"}
    for _ in range(100):
        if len(arrivals) >= 4:
            break
        await asyncio.sleep(0.01)
    assert arrivals == ["answer", *(f"Driver of {device_path(vf)}" for vf in vfs)]


async def test_vf_settings_through_the_bus_typed_errors_and_the_vf_object_s_properties(service, client):
    """Issue 14: SetVfSettings answers what the kernel shows; the VF's object carries VfSettings
    and DesiredVfSettings; a setting the driver does not implement is NotSupported, naming it."""
    reply = await call(client, "SetVfCount", "sua{sv}", ["0000:3b:00.0", 2, {}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    settings = {"mac": Variant("s", "02:00:00:00:00:42"), "vlan": Variant("u", 12), "trust": Variant("b", True)}
    reply = await call(client, "SetVfSettings", "sa{sv}a{sv}", ["enp59s0f0:1", settings, {}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    answer = {name: variant.value for name, variant in reply.body[0].items()}
    assert (answer["mac"], answer["vlan"], answer["trust"]) == ("02:00:00:00:00:42", 12, True)
    vf = (await managed_objects(client))[device_path("0000:3b:02.1")][DEVICE_IFACE]
    assert {k: v.value for k, v in vf["VfSettings"].value.items()}["mac"] == "02:00:00:00:00:42"
    assert {k: v.value for k, v in vf["DesiredVfSettings"].value.items()} == {"mac": "02:00:00:00:00:42",
                                                                               "vlan": 12, "trust": True}
    reply = await call(client, "SetVfSettings", "sa{sv}a{sv}",
                       ["0000:3b:02.0", {"vlan": Variant("u", 5), "vlan_proto": Variant("s", "802.1ad")}, {}])
    assert reply.error_name == "org.nicpass.NicPass1.Error.NotSupported"
    assert "i40e" in reply.body[0] and "vlan" in reply.body[0]
    reply = await call(client, "SetVfSettings", "sa{sv}a{sv}", ["0000:3b:02.0", {"vlan": Variant("s", "5")}, {}])
    assert reply.error_name == "org.nicpass.NicPass1.Error.InvalidArgument" and "type 'u'" in reply.body[0]


async def test_plan_reconcile_is_a_read_that_changes_nothing(service, client, polkit):
    """Issue 20: PlanReconcile answers what Reconcile would do, to anyone (nobody included, no
    polkit question), and writes nothing; Reconcile then does those steps."""
    from nicpassd.engine.store import DeviceDesire, identity_of

    snapshot = service.engine.snapshot
    for address, fields in (("0000:3b:00.0", {"num_vfs": 2}), ("0000:af:00.0", {"driver": "vfio-pci"})):
        identity = identity_of(snapshot.functions[address], snapshot)
        service.engine.store.put(DeviceDesire(address=address, identity=identity, **fields))
    result = await busctl_async(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "PlanReconcile",
                                nobody=True)
    assert result.returncode == 0, result.stderr
    arrow = "\\342\\206\\222"  # busctl escapes the → of "0 → 2 VFs"
    assert f'"0000:3b:00.0" "vfs" "planned: 0 {arrow} 2 VFs"' in result.stdout, result.stdout
    assert f'"0000:af:00.0" "bind" "planned: e1000e {arrow} vfio-pci"' in result.stdout, result.stdout
    assert polkit.checks() == []
    assert sysfs(service, "0000:3b:00.0", "sriov_numvfs") == "0" and driver_of(service, "0000:af:00.0") == "e1000e"
    reply = await call(client, "Reconcile")
    assert [tuple(row[:2]) for row in reply.body[0]] == [("0000:3b:00.0", "vfs"), ("0000:af:00.0", "bind")]
    assert sysfs(service, "0000:3b:00.0", "sriov_numvfs") == "2"
