"""Persistence across simulated reboots, identity checks, hotplug: real `nicpassd --simulate` processes
(and an in-process one for hotplug) on the private bus, driven with nicpassctl, judged by the tree.

A simulated reboot is a second `nicpassd --simulate [TOPOLOGY] --root DIR` on the same DIR: etc/ and
var/lib/ are kept, the kernel tree and /run start fresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from dbus_fast import Message, MessageType

from nicpassd.transport.service import BUS_NAME, DEVICE_IFACE, MANAGER_IFACE, MANAGER_PATH, device_path
from support.daemon import SimulatedDaemon
from support.unprivileged import busctl_async

PF, PF2, MLX, NIC = "0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0", "0000:af:00.0"
DEFAULT_HOST = resources.files("nicpassd.sim").joinpath("default-host.toml").read_text()


def nicpassctl(bus, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    return subprocess.run([sys.executable, "-m", "nicpassctl", *args], capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)


def ok(bus, *args: str) -> subprocess.CompletedProcess:
    result = nicpassctl(bus, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def tree(root: Path, address: str, attr: str) -> str:
    return (root / "sys/bus/pci/devices" / address / attr).read_text().strip()


def driver(root: Path, address: str) -> str:
    link = root / "sys/bus/pci/devices" / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def vfs(root: Path, pf: str) -> list[str]:
    directory = root / "sys/bus/pci/devices" / pf
    links = sorted((e for e in os.listdir(directory) if e.startswith("virtfn")), key=lambda n: int(n[6:]))
    return [os.path.basename(os.readlink(directory / link)) for link in links]


def listing(bus) -> dict[str, dict]:
    return {entry["address"]: entry for entry in json.loads(ok(bus, "--json", "list").stdout)}


def variant(tmp_path: Path, name: str, *replacements: tuple[str, str]) -> str:
    """The built-in host with some text replaced: another card, a moved card."""
    text = DEFAULT_HOST
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------ simulated reboot
def test_vf_counts_and_bindings_come_back_after_a_reboot_runtime_changes_do_not(private_bus, polkit, tmp_path):
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root):
        ok(private_bus, "vfs", "enp59s0f0", "4", "--vfio")
        ok(private_bus, "vfs", "3b:00.1", "2")
        ok(private_bus, "bind", "af:00.0")
        ok(private_bus, "vfs", "5e:00.0", "2", "--runtime")
    with SimulatedDaemon(private_bus, root) as rebooted:
        assert tree(root, PF, "sriov_numvfs") == "4" and {driver(root, vf) for vf in vfs(root, PF)} == {"vfio-pci"}
        assert tree(root, PF2, "sriov_numvfs") == "2" and {driver(root, vf) for vf in vfs(root, PF2)} == {"iavf"}
        assert driver(root, NIC) == "vfio-pci"
        assert tree(root, MLX, "sriov_numvfs") == "0"  # --runtime: gone with the reboot
        devices = listing(private_bus)
        assert devices[PF]["persisted"] and devices[PF]["desired_vfs"] == 4 and devices[PF]["drift"] is None
        assert devices[vfs(root, PF)[0]]["desired_driver"] == "vfio-pci"
        assert devices[NIC]["persisted"] and devices[NIC]["drift"] is None
        assert not devices[MLX]["persisted"]
        again = ok(private_bus, "reconcile")
        assert again.stdout.startswith("Nothing to do")
        log = rebooted.log_text()
        # The VF counts were written before the engine started (nicpassd/host/early_vfs.py), the
        # NIC's override by the udev helper: the boot reconcile found nothing left to do.
        assert f"VFs at start, before the engine: {PF}: 4 VFs created on vfio-pci" in log
        assert f"VFs at start, before the engine: {PF2}: 2 VFs created" in log
        assert "boot reconcile" not in log


def test_a_persisted_nic_never_meets_its_host_driver_at_boot(private_bus, polkit, tmp_path):
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root):
        ok(private_bus, "bind", "enp175s0f0")
    with SimulatedDaemon(private_bus, root) as rebooted:
        assert driver(root, NIC) == "vfio-pci"
        # The udev helper set driver_override before the probe: the simulator bound vfio-pci while
        # building the tree, and the daemon's boot reconcile found nothing to do for it.
        assert f"{NIC}  bind" not in rebooted.log_text()
        assert not (root / "sys/class/net/enp175s0f0").exists()


def test_forget_drops_the_persisted_state(private_bus, polkit, tmp_path):
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root):
        ok(private_bus, "bind", "af:00.0")
        ok(private_bus, "forget", "af:00.0", "--restore")
        assert driver(root, NIC) == "e1000e" and not listing(private_bus)[NIC]["persisted"]
    with SimulatedDaemon(private_bus, root):
        assert driver(root, NIC) == "e1000e"


# ------------------------------------------------------------------------------ identity
def test_a_different_card_at_the_address_is_refused_with_identity_changed(private_bus, polkit, tmp_path):
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root):
        ok(private_bus, "vfs", "5e:00.0", "2", "--vfio")
    # Same slot, another ConnectX: a different serial number (and device id).
    replaced = variant(tmp_path, "replaced",
                       ('serial = "b8-ce-f6-03-00-00-00-10"', 'serial = "b8-ce-f6-03-00-00-99-99"'),
                       ('device = "1017"', 'device = "1019"'))
    with SimulatedDaemon(private_bus, root, replaced):
        assert tree(root, MLX, "sriov_numvfs") == "0"  # nothing applied to the new card
        devices = listing(private_bus)
        assert devices[MLX]["persisted"] and devices[MLX]["drift"].startswith("identity changed")
        check = nicpassctl(private_bus, "--json", "check")
        finding = next(f for f in json.loads(check.stdout) if f["id"] == f"drift-{MLX}")
        assert check.returncode == 8 and finding["level"] == "fail" and "device_id was 1017" in finding["message"]
        result = nicpassctl(private_bus, "--json", "reconcile")
        assert result.returncode == 1
        [row] = json.loads(result.stdout)
        assert (row["address"], row["action"]) == (MLX, "check") and row["result"].startswith("IdentityChanged: ")
        assert json.loads((root / "var/lib/nicpassd/state.json").read_text())["devices"][MLX]["num_vfs"] == 2  # kept


def test_a_moved_card_is_followed_to_its_new_address(private_bus, polkit, tmp_path):
    root = tmp_path / "host"
    with SimulatedDaemon(private_bus, root):
        ok(private_bus, "vfs", "5e:00.0", "3", "--vfio")
    # The ConnectX moved from 5e:00.0 to d8:00.0 (same serial number and MAC).
    moved = variant(tmp_path, "moved", ('address = "0000:5e:00.0"', 'address = "0000:d8:00.0"'),
                    ('netdev = "enp94s0f0np0"', 'netdev = "enp216s0f0np0"'))
    with SimulatedDaemon(private_bus, root, moved) as daemon:
        new = "0000:d8:00.0"
        assert tree(root, new, "sriov_numvfs") == "3" and {driver(root, vf) for vf in vfs(root, new)} == {"vfio-pci"}
        state = json.loads((root / "var/lib/nicpassd/state.json").read_text())
        assert list(state["devices"]) == [new]
        assert "is now at 0000:d8:00.0" in daemon.log_text()
        assert listing(private_bus)[new]["drift"] is None


# ------------------------------------------------------------------------------- hotplug
async def call(bus, member: str, signature: str = "", body: list | None = None) -> Message:
    return await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member=member,
                                  signature=signature, body=body or []))


async def until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_hot_unplug_and_replug_of_a_persisted_pf_recreates_its_vfs(service, client):
    service.engine.reconciler.auto = True
    reply = await call(client, "SetVfCount", "sua{sv}", [PF, 8, {"driver": _variant("s", "vfio-pci")}])
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    added: list[str] = []
    client.add_message_handler(lambda m: added.append(m.body[0]) if m.member == "InterfacesAdded" else None)
    await client.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                              interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                              body=[f"type='signal',sender='{BUS_NAME}',interface='org.freedesktop.DBus.ObjectManager'"]))
    spec = next(f for f in service.kernel.topology.functions if f.address == PF)
    service.kernel.unplug(PF)
    await until(lambda: PF not in service.engine.views)
    events = []
    service.kernel.subscribe(events.append)
    service.kernel.plug(spec)
    root = service.paths.root
    await until(lambda: len(vfs(root, PF)) == 8 and {driver(root, vf) for vf in vfs(root, PF)} == {"vfio-pci"})
    await until(lambda: {device_path(vf) for vf in vfs(root, PF)} <= set(added))
    assert not [e for e in events if e.action == "bind" and e.driver == "iavf"]  # autoprobe was off
    reply = await call(client, "Reconcile")
    assert reply.message_type == MessageType.METHOD_RETURN and reply.body == [[]]


def _variant(signature: str, value):
    from dbus_fast import Variant

    return Variant(signature, value)


async def test_reconcile_needs_the_manage_authorization(service, private_bus, polkit):
    denied = await busctl_async(private_bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Reconcile",
                                nobody=True)
    assert denied.returncode != 0 and "Access denied" in denied.stderr
    assert ("org.nicpass.NicPass1.manage", 65534) in [(action, uid) for action, uid, *_ in polkit.checks()]
    allowed = await busctl_async(private_bus.address, "--json=short", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                                 "Reconcile")
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["data"] == [[]]


async def test_drift_is_a_device_property(service, client):
    await call(client, "Bind", "ssa{sv}", [NIC, "vfio-pci", {}])
    for relative, data in [(f"bus/pci/devices/{NIC}/driver_override", "\n"),
                           ("bus/pci/drivers/vfio-pci/unbind", NIC), ("bus/pci/drivers_probe", NIC)]:
        service.kernel.write(service.paths.sys / relative, data)  # someone else gave it back
    await until(lambda: service.engine.views[NIC].drift != "")
    reply = await client.call(Message(destination=BUS_NAME, path=device_path(NIC),
                                      interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
                                      body=[DEVICE_IFACE, "Drift"]))
    assert reply.body[0].value == "persisted on vfio-pci, bound to e1000e"
