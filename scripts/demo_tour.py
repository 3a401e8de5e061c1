"""The guided tour behind scripts/demo: a private system bus, `nicpassd --simulate`, nicpassctl."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.bus import PrivateBus  # noqa: E402
from support.daemon import SimulatedDaemon  # noqa: E402
from support.unprivileged import busctl_as_nobody  # noqa: E402

from nicpassd.paths import HostPaths  # noqa: E402
from nicpassd.sim import kernel_server  # noqa: E402

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}# {text}{RESET}", flush=True)


def run(bus: PrivateBus, *args: str) -> int:
    print(f"{DIM}$ nicpassctl {' '.join(args)}{RESET}", flush=True)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    result = subprocess.run([str(REPO / ".venv/bin/nicpassctl"), *args], env=env, stdin=subprocess.DEVNULL)
    if result.returncode:
        print(f"{DIM}(exit {result.returncode}){RESET}", flush=True)
    return result.returncode


def someone_else(root: Path, *steps: tuple[str, str]) -> None:
    """Writes into the simulated kernel by another writer, shown as the shell commands they are."""
    for attribute, value in steps:
        if attribute == "modprobe":
            print(f"{DIM}$ modprobe {value}{RESET}", flush=True)
            argv = ["--modprobe", value]
        else:
            print(f"{DIM}$ echo {value} > /{attribute}{RESET}", flush=True)
            argv = ["--write", attribute, value]
        subprocess.run([sys.executable, "-m", "nicpassd.sim.kernel_server", "--root", str(root), *argv], check=True)


def tour(bus: PrivateBus, root: Path) -> None:
    say("The simulated hypervisor: every NIC function, its driver, IOMMU group and SR-IOV state")
    run(bus, "list")
    say("The guard: what the host needs to stay reachable, and why")
    run(bus, "guard")
    say("Create 4 VFs on an X710 port (by interface name), then look again")
    run(bus, "vfs", "enp59s0f0", "4")
    run(bus, "list")
    say("Ask for 2 instead: the kernel only allows 0->N, so nicpassd goes through 0")
    run(bus, "vfs", "enp59s0f0", "2")
    say("Hand a VF to vfio-pci (verified by reading the kernel back) and explain it")
    run(bus, "bind", "3b:02.0")
    run(bus, "show", "3b:02.0")
    say("Dangerous requests are refused with the reason and the exit code scripts can test")
    run(bus, "bind", "eno2")
    run(bus, "vfs", "3b:00.0", "65")
    say("Someone else takes the management NIC behind nicpassd's back, as `virsh nodedev-detach` or\n"
        "# driverctl would: nicpassd sees it at the first uevent, reports it (journal: crit) and gives it back")
    eno1 = "sys/bus/pci/devices/0000:01:00.0"
    someone_else(root, ("modprobe", "vfio-pci"), (f"{eno1}/driver_override", "vfio-pci"),
                 (f"{eno1}/driver/unbind", "0000:01:00.0"), ("sys/bus/pci/drivers_probe", "0000:01:00.0"))
    time.sleep(1)
    run(bus, "guard")
    say("A NIC whose IOMMU group holds a USB controller: bindable, but not viable for a VM")
    run(bus, "show", "af:00.0")
    say("An unprivileged user may read, but not change anything (polkit; here: root only)")
    reply = busctl_as_nobody(bus.address, "call", "org.nicpass.NicPass1", "/org/nicpass/NicPass1",
                             "org.nicpass.NicPass1.Manager", "SetVfCount", "sua{sv}", "3b:00.1", "2", "0")
    print(f"{DIM}$ setpriv --reuid=nobody busctl call ... SetVfCount 3b:00.1 2{RESET}\n{reply.stderr.strip()}")
    say("Preflight checks, like virt-host-validate")
    run(bus, "check")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the bus and the daemon running")
    parser.add_argument("--topology", help="a topology file instead of the built-in default host")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nicpassd-demo-"))
    bus = PrivateBus()
    try:
        say(f"Starting a private system bus and `nicpassd --simulate --root {workdir}/host --keep-kernel`\n"
            "# (the simulated kernel runs in a process of its own, so that others can write to it too)")
        daemon = SimulatedDaemon(bus, workdir / "host", args.topology, extra_args=("--keep-kernel",))
        tour(bus, workdir / "host")
        say("Reboot the simulated host: the kernel starts fresh, /var/lib/nicpassd is kept")
        daemon.stop()
        kernel_server.stop(HostPaths(workdir / "host"))
        daemon = SimulatedDaemon(bus, workdir / "host", args.topology, extra_args=("--keep-kernel",))
        run(bus, "list")
        if args.keep:
            say("Still running. In another shell:")
            print(f"export DBUS_SYSTEM_BUS_ADDRESS='{bus.address}'\n{REPO}/.venv/bin/nicpassctl monitor")
            print(f"{REPO}/.venv/bin/python -m nicpassd.sim.kernel_server --root {workdir}/host "
                  "--write sys/bus/pci/devices/0000:01:00.0/driver/unbind 0000:01:00.0   # take eno1 again")
            print(f"daemon log: {daemon.log}   (Ctrl-C here stops everything)")
            try:
                while daemon.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        daemon.stop()
        return 0
    finally:
        kernel_server.stop(HostPaths(workdir / "host"))
        bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
