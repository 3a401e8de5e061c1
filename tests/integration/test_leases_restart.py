"""Leases across a daemon crash and restart: `nicpassd --simulate --root DIR --keep-kernel` (the
simulated kernel outlives the daemon, so a restart is not a reboot), driven by the libvirt hook."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO

from nicpassd.paths import HostPaths
from nicpassd.sim import kernel_server

HOOK = REPO / "client" / "hooks" / "libvirt-qemu"
BUS_NAME = "org.nicpass.NicPass1"
VFS = [f"0000:3b:02.{n}" for n in range(4)]


def domain(name: str, uuid: str, address: str) -> str:
    bus, slot_fn = address.split(":")[1:]
    slot, fn = slot_fn.split(".")
    return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>"
            f"<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            f"<address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source></hostdev>"
            f"</devices></domain>")


WEB = ("web", "00000000-0000-4000-8000-000000000001", VFS[0])
DB = ("db", "00000000-0000-4000-8000-000000000002", VFS[1])


class Host:
    def __init__(self, bus, root: Path) -> None:
        self.bus, self.root = bus, root
        self.env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, NICPASSD_ROOT=str(root))
        self.daemon: subprocess.Popen | None = None
        self.log = root.parent / "nicpassd.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "nicpassd", "--simulate", "--root", str(self.root), "--keep-kernel"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        try:
            self.bus.wait_for_name(BUS_NAME, 30, process=self.daemon)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()[-3000:]}") from None

    def crash(self) -> None:
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()
        deadline = time.monotonic() + 10
        while self.bus.name_has_owner(BUS_NAME):  # the bus notices the dead connection
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(10)
        kernel_server.stop(HostPaths(self.root))

    def busctl(self, *args: str) -> str:
        result = subprocess.run(["busctl", "--system", "--json=short", "call", BUS_NAME, "/org/nicpass/NicPass1",
                                 "org.nicpass.NicPass1.Manager", *args], env=self.env, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def leases(self) -> dict[str, tuple[str, int]]:
        """vm name -> (state, pid)"""
        data = json.loads(self.busctl("ListLeases"))["data"][0]
        return {lease["vm_name"]["data"]: (lease["state"]["data"], lease["pid"]["data"]) for lease in data}

    def hook(self, vm: tuple[str, str, str], op: str, subop: str) -> str:
        """Run the libvirt hook; it must succeed with nothing on stdout. Returns its stderr."""
        name, uuid, address = vm
        result = subprocess.run([str(HOOK), name, op, subop, "-"], input=domain(name, uuid, address), text=True,
                                capture_output=True, env=self.env, timeout=60)
        assert (result.returncode, result.stdout) == (0, ""), result
        return result.stderr

    def until(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"not reached; leases now {self.leases()}"
            time.sleep(0.05)


@pytest.fixture
def host(private_bus, polkit, tmp_path):
    host = Host(private_bus, tmp_path / "host")
    try:
        yield host
    finally:
        host.stop()


def test_leases_survive_a_daemon_crash_and_vms_gone_meanwhile_are_reclaimed(host):
    host.start()
    host.busctl("SetVfCount", "sua{sv}", "0000:3b:00.0", "4", "1", "persist", "b", "false")
    qemu = {vm[0]: subprocess.Popen(["sleep", "120"]) for vm in (WEB, DB)}
    try:
        for vm in (WEB, DB):
            pidfile = host.root / "run/libvirt/qemu" / f"{vm[0]}.pid"
            pidfile.parent.mkdir(parents=True, exist_ok=True)
            pidfile.write_text(f"{qemu[vm[0]].pid}\n")
            assert host.hook(vm, "prepare", "begin") == ""
            assert host.hook(vm, "started", "begin") == ""
        host.busctl("Prepare", "ssasa{sv}", "later", "00000000-0000-4000-8000-000000000003", "1", VFS[2],
                    "1", "reservation", "u", "3")
        assert host.leases() == {"web": ("active", qemu["web"].pid), "db": ("active", qemu["db"].pid),
                                 "later": ("reserved", 0)}

        host.crash()
        qemu["db"].kill()  # the db VM dies while nicpassd is down; its release hook fails
        qemu["db"].wait()
        assert "could not release" in host.hook(DB, "release", "end")  # daemon down: a warning, exit 0
        host.start()

        host.until(lambda: "db" not in host.leases())  # reclaimed at start: its QEMU is gone
        assert host.leases()["web"] == ("active", qemu["web"].pid)
        host.until(lambda: "later" not in host.leases())  # the reservation timer was re-armed
        qemu["web"].kill()
        qemu["web"].wait()
        host.until(lambda: host.leases() == {})  # and so was the pidfd of web's QEMU
        # The file follows (written by a worker after the release; a crash before it would
        # reclaim the lease of the gone QEMU at the next start all the same).
        host.until(lambda: json.loads((host.root / "run/nicpassd/leases.json").read_text())["leases"] == [])
    finally:
        for process in qemu.values():
            process.kill()
            process.wait()
