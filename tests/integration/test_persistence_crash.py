"""Crash test: nicpassd is SIGKILLed at random points of VF count changes and binds; after every
restart the state file parses and every device is in its pre-change state or the requested one —
never half-way — and every persisted device is in its persisted state.

The simulated kernel runs in a process of its own (`python -m nicpassd.sim.kernel_server`), so it
survives the daemon like the real kernel does; each daemon is `nicpassd --simulate --root DIR
--keep-kernel` and attaches to it (a restart, not a reboot: /run/nicpassd and its undo journal stay).

Two ways to kill, chosen at random per operation:
- "write": the kernel kills the daemon right after carrying out its Nth next write (N random within
  the operation's writes) — before the daemon learns the write succeeded;
- "timer": SIGKILL after a random delay while the call is in flight (anywhere: between writes, in a
  journal or state commit, while verifying).
Some operations run to the end unharmed. NICPASSD_CRASH_OPS sets the number of operations (default
30; the acceptance run is 500), NICPASSD_CRASH_SEED the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant

from nicpassd.engine.store import StateStore
from nicpassd.paths import HostPaths
from nicpassd.sim import kernel_server
from nicpassd.sim.topology import load_topology
from nicpassd.transport.bus import NicpassBus
from nicpassd.transport.service import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from support.daemon import SimulatedDaemon

OPERATIONS = int(os.environ.get("NICPASSD_CRASH_OPS", "30"))
SEED = int(os.environ.get("NICPASSD_CRASH_SEED", "20240601"))
PFS = ["0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0"]
NIC = "0000:af:00.0"
TOPOLOGY = load_topology()
SPECS = {fn.address: fn for fn in TOPOLOGY.functions}


def driver(root: Path, address: str) -> str:
    link = root / "sys/bus/pci/devices" / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def override(root: Path, address: str) -> str:
    value = (root / "sys/bus/pci/devices" / address / "driver_override").read_text().strip()
    return "" if value == "(null)" else value


def vfs(root: Path, pf: str) -> list[str]:
    directory = root / "sys/bus/pci/devices" / pf
    links = sorted((e for e in os.listdir(directory) if e.startswith("virtfn")), key=lambda n: int(n[6:]))
    return [os.path.basename(os.readlink(directory / link)) for link in links]


def state_of(root: Path, address: str) -> tuple:
    """What "the device's state" means here: a PF's VF count and each VF's binding; a function's binding."""
    if address in PFS:
        return (len(vfs(root, address)), tuple((driver(root, vf), override(root, vf)) for vf in vfs(root, address)))
    return (driver(root, address), override(root, address))


@dataclass
class Operation:
    member: str
    signature: str
    body: list
    device: str
    target: tuple
    persist: bool
    writes: int  # about how many kernel writes it makes (where a "write" kill may land)
    text: str = ""


def pick(rng: random.Random, root: Path) -> Operation:
    persist = rng.random() < 0.6
    if rng.random() < 0.6:
        pf = rng.choice(PFS)
        count = rng.choice([0, 1, 2, 3, 4, 6])
        vfio = rng.random() < 0.6
        host = SPECS[pf].vf_driver
        target = (count, tuple(("vfio-pci", "vfio-pci") if vfio else (host, "") for _ in range(count)))
        if not vfio and count == len(vfs(root, pf)):
            target = state_of(root, pf)  # same count: skipped (docs/kernel-rules.md §1), the VFs keep their drivers
        options = {"persist": Variant("b", persist), **({"driver": Variant("s", "vfio-pci")} if vfio else {})}
        current = len(vfs(root, pf))
        writes = (count != current) * (1 + bool(current) + bool(count)) + (2 * count if vfio else 0)
        return Operation("SetVfCount", "sua{sv}", [pf, count, options], pf, target, persist, max(1, writes),
                         f"vfs {pf} {count}{' --vfio' if vfio else ''}{'' if persist else ' --runtime'}")
    to_vfio = rng.random() < 0.5
    target = ("vfio-pci", "vfio-pci") if to_vfio else ("e1000e", "")
    options = {"persist": Variant("b", persist)}
    return Operation("Bind", "ssa{sv}", [NIC, "vfio-pci" if to_vfio else "", options], NIC, target, persist, 3,
                     f"bind {NIC} {'vfio-pci' if to_vfio else 'host'}{'' if persist else ' --runtime'}")


def check_state_file(root: Path) -> dict:
    path = root / "var/lib/nicpassd/state.json"
    if path.exists():
        json.loads(path.read_text())  # parses
        StateStore(path.parent)  # and validates
        return json.loads(path.read_text())["devices"]
    return {}


def persisted_state_holds(root: Path, devices: dict, holds: set[str]) -> list[str]:
    """Every persisted device not changed at runtime is in its persisted state."""
    problems = []
    for address, desire in devices.items():
        if address in holds:
            continue
        if desire.get("num_vfs") is not None and address in PFS:
            count, wanted = desire["num_vfs"], desire.get("vf_driver", "")  # "": VF drivers left alone
            now = state_of(root, address)
            if now[0] != count or (wanted and any(d != wanted for d, _ in now[1])):
                problems.append(f"{address}: persisted {count} VFs on {wanted or 'any driver'}, kernel shows {now}")
        if desire.get("driver") and driver(root, address) != desire["driver"]:
            problems.append(f"{address}: persisted on {desire['driver']}, bound to {driver(root, address)}")
    return problems


def runtime_holds(root: Path) -> set[str]:
    path = root / "run/nicpassd/runtime.json"
    return set(json.loads(path.read_text())["holds"]) if path.exists() else set()


@dataclass
class Tally:
    killed_by_write: int = 0
    killed_by_timer: int = 0
    completed: int = 0
    refused: int = 0
    outcome_pre: int = 0
    outcome_target: int = 0
    restarts: list[float] = field(default_factory=list)


@pytest.fixture
def kernel(tmp_path):
    root = tmp_path / "host"
    root.mkdir()
    paths = HostPaths(root)
    kernel_server.spawn(paths, None)
    try:
        yield paths
    finally:
        kernel_server.stop(paths)


async def test_sigkill_at_random_points_never_leaves_a_device_half_changed(private_bus, polkit, kernel):
    root = kernel.root
    rng = random.Random(SEED)
    tally = Tally()
    daemon = SimulatedDaemon(private_bus, root, extra_args=("--keep-kernel",))
    client = await NicpassBus(bus_address=private_bus.address).connect()
    try:
        for number in range(OPERATIONS):
            operation = pick(rng, root)
            before = state_of(root, operation.device)
            mode = rng.choices(["write", "timer", "none"], weights=[0.45, 0.4, 0.15])[0]
            if mode == "write":
                kernel_server.control(kernel, "arm_kill", count=rng.randint(1, operation.writes))
            call = asyncio.ensure_future(client.call(Message(
                destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member=operation.member,
                signature=operation.signature, body=operation.body)))
            if mode == "timer":
                done, _ = await asyncio.wait({call}, timeout=rng.uniform(0.0, 0.06))
                if not done:
                    daemon.process.send_signal(signal.SIGKILL)
            reply = await asyncio.wait_for(call, 60)
            kernel_server.control(kernel, "arm_kill", count=0)
            if reply.message_type == MessageType.ERROR and reply.error_name == "org.freedesktop.DBus.Error.NoReply":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.process.wait(timeout=5)  # it went away without replying: killed
            killed = daemon.process.poll() is not None
            if killed:
                tally.killed_by_write += mode == "write"
                tally.killed_by_timer += mode == "timer"
                started = time.monotonic()
                daemon = SimulatedDaemon(private_bus, root, extra_args=("--keep-kernel",))
                tally.restarts.append(time.monotonic() - started)
            else:
                assert reply.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR), reply
                if reply.message_type == MessageType.ERROR:
                    tally.refused += 1
                    assert reply.error_name.startswith("org.nicpass.NicPass1.Error."), (operation.text, reply.body)
                else:
                    tally.completed += 1
            devices = check_state_file(root)
            after = state_of(root, operation.device)
            context = (number, operation.text, mode, killed, reply.error_name, before, operation.target, after)
            if not killed and reply.message_type == MessageType.METHOD_RETURN:
                assert after == operation.target, context
            elif not killed:
                assert after == before, context
            else:
                assert after in (before, operation.target), context
            if killed and before != operation.target:
                tally.outcome_pre += after == before
                tally.outcome_target += after == operation.target
            assert persisted_state_holds(root, devices, runtime_holds(root)) == [], context
            journal = root / "run/nicpassd/journal.json"
            assert not journal.exists() or json.loads(journal.read_text())["entries"] == [], context
    finally:
        client.disconnect()
        daemon.stop()
    kills = tally.killed_by_write + tally.killed_by_timer
    print(f"\n{OPERATIONS} operations: {kills} killed ({tally.killed_by_write} right after a kernel write, "
          f"{tally.killed_by_timer} by timer), {tally.completed} completed, {tally.refused} refused; "
          f"killed ones ended pre-change {tally.outcome_pre}, as requested {tally.outcome_target}; "
          f"restart {sum(tally.restarts) / max(1, len(tally.restarts)):.2f} s on average")
    assert kills >= OPERATIONS // 4  # the test did crash the daemon, often


async def test_sigkill_between_two_vf_settings_puts_the_first_back_at_restart(private_bus, polkit, kernel):
    """A VF's settings are one netlink request each (issue 14): the daemon killed right after the
    kernel applied the first of three finds, when it starts again, the undo journal's record of
    what they were, and puts that back before it serves anyone."""
    from nicpassd.host.host import Host

    pf, interface = PFS[0], "enp59s0f0"
    daemon = SimulatedDaemon(private_bus, kernel.root, extra_args=("--keep-kernel",))
    client = await NicpassBus(bus_address=private_bus.address).connect()
    kernel_view = Host(kernel, kernel_server.RemoteKernel(kernel))
    try:
        reply = await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE,
                                          member="SetVfCount", signature="sua{sv}",
                                          body=[pf, 1, {"persist": Variant("b", False)}]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        before = kernel_view.read_vf_setting(interface, 0)
        kernel_server.control(kernel, "arm_kill", count=1)
        settings = {"mac": Variant("s", "02:00:00:00:04:01"), "vlan": Variant("u", 9), "trust": Variant("b", True)}
        reply = await asyncio.wait_for(client.call(Message(
            destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member="SetVfSettings",
            signature="sa{sv}a{sv}", body=[f"{pf}:0", settings, {"persist": Variant("b", False)}])), 30)
        daemon.process.wait(timeout=10)
        assert daemon.process.returncode == -signal.SIGKILL, (reply.message_type, reply.body)
        half = kernel_view.read_vf_setting(interface, 0)
        assert half.mac == "02:00:00:00:04:01" and (half.vlan, half.trust) == (before.vlan, before.trust)
        journal = json.loads((kernel.root / "run/nicpassd/journal.json").read_text())["entries"]
        assert [entry["kind"] for entry in journal] == ["vf-settings"]

        daemon = SimulatedDaemon(private_bus, kernel.root, extra_args=("--keep-kernel",))
        assert kernel_view.read_vf_setting(interface, 0) == before
        assert json.loads((kernel.root / "run/nicpassd/journal.json").read_text())["entries"] == []
        assert "undo journal: rolled back vf-settings" in daemon.log_text()
    finally:
        client.disconnect()
        daemon.stop()
