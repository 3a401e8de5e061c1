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
        say(f"Starting a private system bus and `nicpassd --simulate --root {workdir}/host`")
        daemon = SimulatedDaemon(bus, workdir / "host", args.topology)
        tour(bus, workdir / "host")
        say("Reboot the simulated host: the kernel starts fresh, /var/lib/nicpassd is kept")
        daemon.stop()
        daemon = SimulatedDaemon(bus, workdir / "host", args.topology)
        run(bus, "list")
        if args.keep:
            say("Still running. In another shell:")
            print(f"export DBUS_SYSTEM_BUS_ADDRESS='{bus.address}'\n{REPO}/.venv/bin/nicpassctl monitor")
            print(f"daemon log: {daemon.log}   (Ctrl-C here stops everything)")
            try:
                while daemon.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        daemon.stop()
        return 0
    finally:
        bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
