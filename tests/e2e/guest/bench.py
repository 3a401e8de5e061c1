#!/usr/bin/env python3
"""The real-kernel benchmark, run inside the e2e guest (tests/e2e/test_bench_kernel.py starts it).

One boot, the same kernel, the igb PF with 7 VFs. Each kind of work is timed, in rounds, as:

- a bare loop of the same sysfs writes (what a careful shell script does), in this process;
- driverctl (Debian's package), where it does the same work;
- nicpassctl, the whole command (a process start included);
- the daemon alone: the same D-Bus calls nicpassctl makes, from a connection opened beforehand.

Work: bind 7 VFs to vfio-pci; 0 -> 7 VFs on the host driver; 0 -> 7 VFs on vfio-pci; the boot
reconcile of 7 persisted vfio-pci VFs (daemon start to all bound); the libvirt hook with 1 and 4
hostdevs (prepare begin, started begin, release end, run as libvirt runs it).

Every nicpassd run is checked: the kernel shows what was asked, and the daemon logged nothing at
error or above (else: exit 1, the reason printed). Prints one JSON object (medians in seconds,
every sample, the kernel version).

    python3 bench.py [--rounds 3] [--profile FILE]

--profile: the daemon runs under cProfile for the daemon-alone runs of the first three kinds of
work, and the profile is written to FILE (pstats); the other figures come from the daemon as
systemd runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PCI = Path("/sys/bus/pci/devices")
PF = "0000:02:00.0"
HOST_VF_DRIVER = "igbvf"
VFIO = "vfio-pci"
BUS_NAME = "org.nicpass.NicPass1"
MANAGER_PATH = "/org/nicpass/NicPass1"
MANAGER = "org.nicpass.NicPass1.Manager"
COUNT = 7


class Failed(Exception):
    pass


# --- the kernel, read and written directly ------------------------------------------------------
def write(path: Path | str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def driver(address: str) -> str:
    link = PCI / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def vfs() -> list[str]:
    links = sorted(PCI.joinpath(PF).glob("virtfn*"), key=lambda p: int(p.name[6:]))
    return [os.path.basename(os.readlink(link)) for link in links]


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode:
        raise Failed(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()[-800:]}")
    return result


def settle() -> None:
    run("udevadm", "settle", "--timeout=60")


QUIET = 1.0  # after setting up, before timing: udev and the daemon digest the setup's events


def quiesce() -> None:
    """Every measurement starts from a quiet host: the setup's uevents processed by udev, and the
    daemon (which follows every change, whoever makes it) given a moment to take them in, so that
    neither a bare loop nor nicpassd is timed while the daemon re-reads what the setup did."""
    settle()
    time.sleep(QUIET)


def expect(what: str, ok) -> None:
    deadline = time.monotonic() + 60
    while not ok():
        if time.monotonic() > deadline:
            raise Failed(f"not converged: {what}; the kernel shows "
                         f"{ {vf: (driver(vf), read(PCI / vf / 'driver_override')) for vf in vfs()} }, "
                         f"sriov_numvfs {read(PCI / PF / 'sriov_numvfs')}")
        time.sleep(0.05)


def all_on(wanted: str) -> bool:
    present = vfs()
    return len(present) == COUNT and all(driver(vf) == wanted for vf in present)


def bare_bind(addresses: list[str], target: str) -> None:
    """The bind sequence for each: driver_override, unbind from the current driver, drivers_probe."""
    for address in addresses:
        write(PCI / address / "driver_override", (target if target == VFIO else "") + "\n")
        current = driver(address)
        if current and current != target:
            write(f"/sys/bus/pci/drivers/{current}/unbind", address)
        if not driver(address):
            write("/sys/bus/pci/drivers_probe", address)


def bare_vfs(count: int, target: str) -> None:
    if read(PCI / PF / "sriov_numvfs") != "0":
        write(PCI / PF / "sriov_numvfs", "0")
    if count:
        if target == VFIO:
            write(PCI / PF / "sriov_drivers_autoprobe", "0")
        write(PCI / PF / "sriov_numvfs", str(count))
        if target == VFIO:
            bare_bind(vfs(), VFIO)
            write(PCI / PF / "sriov_drivers_autoprobe", "1")
    settle()


def clean() -> None:
    """No VFs, nothing persisted by anyone, no override: between measurements, untimed."""
    for device in [PF, *vfs()]:  # busctl: a nicpassctl process start costs a second under TCG
        run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER, "Forget", "sa{sv}", device, "0",
            check=False)
    for vf in vfs():
        if Path(f"/etc/driverctl.d/pci-{vf}").exists():
            run("driverctl", "--nosave", "unset-override", vf, check=False)
    for path in Path("/etc/driverctl.d").glob("pci-*"):
        path.unlink()
    for vf in vfs():
        write(PCI / vf / "driver_override", "\n")
    write(PCI / PF / "sriov_drivers_autoprobe", "1")
    bare_vfs(0, "")
    quiesce()


def seven_vfs_on_host_driver() -> list[str]:
    clean()
    bare_vfs(COUNT, HOST_VF_DRIVER)
    expect("7 VFs on igbvf", lambda: all_on(HOST_VF_DRIVER))
    quiesce()
    return vfs()


# --- the daemon, over D-Bus -----------------------------------------------------------------------
class Daemon:
    """One connection, opened before any timing (nicpassctl pays for its own: that is in its figure)."""

    def __init__(self) -> None:
        from dbus_fast import Message, MessageType, Variant
        from dbus_fast.aio import MessageBus
        from dbus_fast.constants import BusType

        self.Message, self.MessageType, self.Variant = Message, MessageType, Variant
        self.loop = asyncio.new_event_loop()

        async def connect():
            return await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus = self.loop.run_until_complete(connect())

    def call(self, member: str, signature: str, *body) -> None:
        reply = self.loop.run_until_complete(self.bus.call(self.Message(
            destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member=member, signature=signature,
            body=list(body))))
        if reply.message_type != self.MessageType.METHOD_RETURN:
            raise Failed(f"{member}{body}: {reply.error_name}: {reply.body}")
        if member == "BindEach" and any(error for _device, error, _message in reply.body[0]):
            raise Failed(f"BindEach: {reply.body[0]}")

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.close()


def daemon_up(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while run("busctl", "--system", "status", BUS_NAME, check=False).returncode:
        if time.monotonic() > deadline:
            raise Failed("nicpassd did not come back on the bus")
        time.sleep(0.1)


# --- the measurements ------------------------------------------------------------------------------
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_bind(rounds: int, daemon: Daemon) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"bare": [], "driverctl": [], "nicpassctl": [], "daemon": []}
    run("modprobe", "vfio-pci")
    for _ in range(rounds):
        present = seven_vfs_on_host_driver()
        samples["bare"].append(timed(lambda: bare_bind(present, VFIO)))
        expect("bare: 7 VFs on vfio-pci", lambda: all_on(VFIO))

        present = seven_vfs_on_host_driver()
        samples["driverctl"].append(timed(lambda: [run("driverctl", "set-override", vf, VFIO) for vf in present]))
        expect("driverctl: 7 VFs on vfio-pci", lambda: all_on(VFIO))

        present = seven_vfs_on_host_driver()
        samples["nicpassctl"].append(timed(lambda: run("nicpassctl", "bind", *present, "--driver", VFIO)))
        expect("nicpassctl: 7 VFs on vfio-pci", lambda: all_on(VFIO))

        present = seven_vfs_on_host_driver()
        # The call nicpassctl makes for several devices.
        samples["daemon"].append(timed(lambda: daemon.call("BindEach", "assa{sv}", present, VFIO, {})))
        expect("daemon: 7 VFs on vfio-pci", lambda: all_on(VFIO))
    return samples


def bench_vfs(rounds: int, daemon: Daemon, target: str) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"bare": [], "nicpassctl": [], "daemon": []}
    wanted = target or HOST_VF_DRIVER
    flags = ["--vfio"] if target == VFIO else []
    options = {"driver": daemon.Variant("s", VFIO)} if target == VFIO else {}
    if target == VFIO:
        run("modprobe", "vfio-pci")  # as a careful shell loop would, untimed (--only runs it first)
    for _ in range(rounds):
        clean()
        samples["bare"].append(timed(lambda: bare_vfs(COUNT, target)))
        expect(f"bare: 7 VFs on {wanted}", lambda: all_on(wanted))

        clean()
        samples["nicpassctl"].append(timed(lambda: run("nicpassctl", "vfs", PF, str(COUNT), *flags)))
        expect(f"nicpassctl: 7 VFs on {wanted}", lambda: all_on(wanted))

        clean()
        samples["daemon"].append(timed(lambda: daemon.call("SetVfCount", "sua{sv}", PF, COUNT, options)))
        expect(f"daemon: 7 VFs on {wanted}", lambda: all_on(wanted))
    return samples


def bench_boot_reconcile(rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Daemon start (systemctl start returns at READY=1) to all 7 persisted VFs bound, against the
    bare writes of the same end state."""
    samples: dict[str, list[float]] = {"bare": [], "nicpassd start to all bound": [], "nicpassd start to READY": []}
    run("modprobe", "vfio-pci")  # as a careful shell loop would, untimed (--only runs it first)
    for _ in range(rounds):
        clean()
        samples["bare"].append(timed(lambda: bare_vfs(COUNT, VFIO)))
        expect("bare: 7 VFs on vfio-pci", lambda: all_on(VFIO))

        clean()
        run("nicpassctl", "vfs", PF, str(COUNT), "--vfio")
        run("systemctl", "stop", "nicpassd")
        for vf in vfs():
            write(PCI / vf / "driver_override", "\n")
        write(PCI / PF / "sriov_numvfs", "0")
        quiesce()
        with KernelEvents() as events:
            start = time.perf_counter()
            starting = subprocess.Popen(["systemctl", "start", "nicpassd"])  # returns at READY=1
            events.wait_until(lambda: all_on(VFIO), "boot reconcile: the 7 VFs not on vfio-pci")
            samples["nicpassd start to all bound"].append(time.perf_counter() - start)
        if starting.wait(120):
            raise Failed(f"systemctl start nicpassd: exit {starting.returncode}")
        samples["nicpassd start to READY"].append(time.perf_counter() - start)
        daemon_up()
    # Where the last start's time went: the daemon's journal with monotonic stamps.
    journal = run("journalctl", "-u", "nicpassd", "-o", "short-monotonic", "--no-pager", "-n", "40",
                  check=False).stdout.splitlines()
    clean()
    return samples, journal


def _codec():
    """nicpassd's rtnetlink codec (stdlib only) from the installed package, for the bare loop: the
    same netlink writes, without the daemon."""
    import glob
    sys.path.append(glob.glob("/usr/lib/nicpassd/venv/lib/python3*/site-packages")[0])
    from nicpassd.host import vf_netlink
    return vf_netlink


def pf_interface() -> str:
    return sorted(os.listdir(PCI / PF / "net"))[0]


def vf_wanted(index: int) -> dict[str, object]:
    return {"mac": f"02:00:00:00:01:{index:02x}", "vlan": 10 + index, "trust": True}


def vf_settings_shown(wire, interface: str) -> bool:
    shown = wire.parse_link(wire.exchange(wire.encode_get(interface), timeout=5))
    return len(shown) == COUNT and all(
        (vf.mac, vf.vlan, vf.trust) == tuple(vf_wanted(vf.index).values()) for vf in shown)


def bare_vf_settings(wire, interface: str) -> None:
    """The bare loop: read the PF's VFs once, then every wanted setting, one RTM_SETLINK each."""
    for vf in wire.parse_link(wire.exchange(wire.encode_get(interface), timeout=5)):
        for _setting, attribute in wire.vf_attributes(vf.index, wire.VfChange(**vf_wanted(vf.index)), vf):
            wire.check_ack(wire.exchange(wire.encode_set(interface, attribute), timeout=5))


def persist_vf_settings() -> None:
    """Untimed setup: 7 VFs and their settings persisted through nicpassctl."""
    run("nicpassctl", "vfs", PF, str(COUNT))
    for index in range(COUNT):
        settings = vf_wanted(index)
        run("nicpassctl", "vf", f"{PF}:{index}", "mac", str(settings["mac"]), "vlan", str(settings["vlan"]),
            "trust", "on")


class KernelEvents:
    """The kernel's uevents as they are sent (NETLINK_KOBJECT_UEVENT): a timed wait for a state
    the kernel announces (a bind is sent once the driver link is there) wakes at the event, not at
    the next tick of a poll, which would add half a tick to the figure on average."""

    NETLINK_KOBJECT_UEVENT = 15

    def __enter__(self) -> "KernelEvents":
        import socket

        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK,
                                  self.NETLINK_KOBJECT_UEVENT)
        self.sock.bind((0, 1))  # the kernel's multicast group
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def wait_until(self, ok, failure: str, timeout: float = 60) -> None:
        import select

        deadline = time.monotonic() + timeout
        while not ok():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failed(f"not converged: {failure}")
            # Looked at again every 0.1 s too: events are lost when the socket's buffer overflows.
            select.select([self.sock], [], [], min(remaining, 0.1))
            while True:
                try:
                    self.sock.recv(65536)
                except OSError:  # drained (EAGAIN), or overflowed (ENOBUFS): ok() reads the kernel
                    break


def wait_for(ok, failure: str) -> None:
    """Poll tightly (a timed wait), up to 60 s."""
    deadline = time.monotonic() + 60
    while not ok():
        if time.monotonic() > deadline:
            raise Failed(failure)
        time.sleep(0.01)


def bench_vf_settings(rounds: int) -> dict[str, list[float]]:
    """7 VFs created again out of band (what a PF reset or its driver's reload does: every VF
    setting gone) with 3 settings each persisted: from `echo 0; echo 7 > sriov_numvfs` to every
    setting shown, against the bare loop of the same 21 RTM_SETLINKs after the same writes."""
    wire = _codec()
    samples: dict[str, list[float]] = {"bare": [], "nicpassd": []}
    interface = pf_interface()
    for _ in range(rounds):
        clean()
        write(PCI / PF / "sriov_numvfs", str(COUNT))
        settle()
        quiesce()
        start = time.perf_counter()
        write(PCI / PF / "sriov_numvfs", "0")
        write(PCI / PF / "sriov_numvfs", str(COUNT))
        bare_vf_settings(wire, interface)
        samples["bare"].append(time.perf_counter() - start)
        expect("bare: the VF settings shown", lambda: vf_settings_shown(wire, interface))

        clean()
        persist_vf_settings()
        expect("nicpassd: the VF settings shown", lambda: vf_settings_shown(wire, interface))
        quiesce()
        start = time.perf_counter()
        # Back-to-back, before nicpassd hears of the 0: the count it persisted is there again, and
        # what it has to do is the settings (its VF count step, if it planned one, finds 7 and skips).
        write(PCI / PF / "sriov_numvfs", "0")
        write(PCI / PF / "sriov_numvfs", str(COUNT))
        wait_for(lambda: vf_settings_shown(wire, interface), "nicpassd did not put the VF settings back on the "
                 "re-created VFs")
        samples["nicpassd"].append(time.perf_counter() - start)
    clean()
    return samples


def vfs_probed_with_settings(wire, interface: str) -> bool:
    return vf_settings_shown(wire, interface) and all_on(HOST_VF_DRIVER)


def bench_vf_settings_at_creation(rounds: int) -> dict[str, list[float]]:
    """The boot path: the VFs gone (`echo 0 > sriov_numvfs`, what a reboot leaves) and nicpassd
    creating its persisted 7 again with their settings written before they probe, until every
    setting is shown and every VF is on igbvf; against the bare sequence of the same writes
    (0 VFs, autoprobe off, 7 VFs, 21 RTM_SETLINKs, autoprobe on, 7 drivers_probe). Both are timed
    from the write of 0, which alone takes the kernel seconds under TCG."""
    wire = _codec()
    samples: dict[str, list[float]] = {"bare": [], "nicpassd": []}
    interface = pf_interface()
    for _ in range(rounds):
        clean()
        write(PCI / PF / "sriov_numvfs", str(COUNT))
        quiesce()
        start = time.perf_counter()
        write(PCI / PF / "sriov_numvfs", "0")
        write(PCI / PF / "sriov_drivers_autoprobe", "0")
        write(PCI / PF / "sriov_numvfs", str(COUNT))
        bare_vf_settings(wire, interface)
        write(PCI / PF / "sriov_drivers_autoprobe", "1")
        for vf in vfs():
            write("/sys/bus/pci/drivers_probe", vf)
        expect("bare: 7 VFs on igbvf with their settings", lambda: vfs_probed_with_settings(wire, interface))
        samples["bare"].append(time.perf_counter() - start)

        clean()
        persist_vf_settings()
        expect("nicpassd: 7 VFs on igbvf with their settings", lambda: vfs_probed_with_settings(wire, interface))
        quiesce()
        start = time.perf_counter()
        write(PCI / PF / "sriov_numvfs", "0")  # nicpassd creates the persisted 7 again
        wait_for(lambda: vfs_probed_with_settings(wire, interface),
                 "nicpassd did not create the VFs again with their settings")
        samples["nicpassd"].append(time.perf_counter() - start)
    clean()
    return samples


DOMAIN = ("<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><devices>{hostdevs}"
          "</devices></domain>")
HOSTDEV = ("<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x{bus}' "
           "slot='0x{slot}' function='0x{function}'/></source></hostdev>")
HOOK = "/etc/libvirt/hooks/qemu.d/50-nicpassd"


def bench_hook(rounds: int, devices: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"prepare begin": [], "started begin": [], "release end": [], "/bin/true": []}
    present = seven_vfs_on_host_driver()[:devices]
    hostdevs = "".join(HOSTDEV.format(bus=a[5:7], slot=a[8:10], function=a[11]) for a in present)
    name, uuid = f"bench{devices}", f"00000000-0000-4000-8000-{devices:012d}"
    xml = DOMAIN.format(name=name, uuid=uuid, hostdevs=hostdevs)
    pidfile = Path(f"/run/libvirt/qemu/{name}.pid")
    pidfile.parent.mkdir(parents=True, exist_ok=True)

    def hook(op: str, sub: str) -> None:
        result = subprocess.run([HOOK, name, op, sub, "-"], input=xml, capture_output=True, text=True)
        if result.returncode:
            raise Failed(f"hook {op} {sub}: exit {result.returncode}: {result.stderr.strip()[-800:]}")

    for _ in range(rounds):
        quiesce()
        samples["/bin/true"].append(timed(lambda: run("/bin/true")))
        samples["prepare begin"].append(timed(lambda: hook("prepare", "begin")))
        expect(f"hook: {devices} VFs on vfio-pci", lambda: all(driver(vf) == VFIO for vf in present))
        qemu = subprocess.Popen(["sleep", "600"])  # the VM's process, as libvirt's pidfile names it
        pidfile.write_text(f"{qemu.pid}\n")
        samples["started begin"].append(timed(lambda: hook("started", "begin")))
        qemu.kill()
        qemu.wait()
        samples["release end"].append(timed(lambda: hook("release", "end")))
        pidfile.unlink()
    clean()
    return samples


def bench_client(rounds: int) -> dict[str, list[float]]:
    """nicpassctl's own start-up: --version (no bus) and list (one GetManagedObjects) against a
    bare interpreter start of the same Python."""
    python = "/usr/lib/nicpassd/venv/bin/python"
    samples: dict[str, list[float]] = {"python -c pass": [], "nicpassctl --version": [], "nicpassctl list": []}
    for _ in range(max(rounds, 5)):
        samples["python -c pass"].append(timed(lambda: run(python, "-c", "pass")))
        samples["nicpassctl --version"].append(timed(lambda: run("nicpassctl", "--version")))
        samples["nicpassctl list"].append(timed(lambda: run("nicpassctl", "list")))
    return samples


CONFIG = Path("/etc/nicpassd/nicpassd.toml")


def debug_logging(on: bool, saved: list[str | None]) -> None:
    """The daemon's log level to debug (its per-call phase timings) and back, by SIGHUP."""
    if on:
        saved[:] = [CONFIG.read_text() if CONFIG.exists() else None]
        text = saved[0] or ""
        line = 'log_level = "debug"'
        if re.search(r"^log_level\s*=", text, re.M):
            text = re.sub(r"^log_level\s*=.*$", line, text, count=1, flags=re.M)
        elif "[daemon]\n" in text:
            text = text.replace("[daemon]\n", f"[daemon]\n{line}\n", 1)
        else:
            text = f"{text}\n[daemon]\n{line}\n"
        CONFIG.parent.mkdir(parents=True, exist_ok=True)
        CONFIG.write_text(text)
    elif saved[0] is None:
        CONFIG.unlink(missing_ok=True)
    else:
        CONFIG.write_text(saved[0])
    run("systemctl", "reload", "nicpassd")
    time.sleep(1)  # the reload is asynchronous: let the daemon read the file


def bench_phases(daemon: Daemon) -> list[str]:
    """One call of each kind of work with the daemon at debug level, outside the timed rounds
    (debug logging costs): its own line per call says which phase took the time."""
    saved: list[str | None] = []
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    debug_logging(True, saved)
    try:
        present = seven_vfs_on_host_driver()
        quiesce()
        daemon.call("BindEach", "assa{sv}", present, VFIO, {})
        expect("phases: 7 VFs on vfio-pci", lambda: all_on(VFIO))
        for options, wanted in (({}, HOST_VF_DRIVER), ({"driver": daemon.Variant("s", VFIO)}, VFIO)):
            clean()
            daemon.call("SetVfCount", "sua{sv}", PF, COUNT, options)
            expect(f"phases: 7 VFs on {wanted}", lambda: all_on(wanted))
    finally:
        debug_logging(False, saved)
    out = run("journalctl", "-u", "nicpassd", "--since", since, "-o", "cat", "--no-pager", check=False).stdout
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in ("BindEach", "SetVfCount")
            and " ms: " in line]


def errors_logged_since(cursor_time: str) -> list[str]:
    out = run("journalctl", "-u", "nicpassd", "-p", "err", "--since", cursor_time, "-o", "cat", "--no-pager",
              check=False).stdout
    return [line for line in out.splitlines() if line.strip() and not line.startswith("-- ")]


def profile_daemon(path: str) -> None:
    """Stop the unit; run the same daemon under cProfile (its own main, its own environment)."""
    run("systemctl", "stop", "nicpassd")
    python = "/usr/lib/nicpassd/venv/bin/python"
    subprocess.Popen([python, "-m", "cProfile", "-o", path, "-m", "nicpassd"], stdin=subprocess.DEVNULL,
                     stdout=open("/tmp/nicpassd-profiled.log", "wb"), stderr=subprocess.STDOUT,
                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
    daemon_up()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="")
    parser.add_argument("--only", default="", help="comma-separated: bind,vfs,vfs-vfio,phases,vf-settings,boot,client,hook")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    results: dict[str, object] = {"kernel": os.uname().release, "rounds": args.rounds}
    try:
        if args.profile:
            profile_daemon(args.profile)
        daemon = Daemon()
        try:
            if not only or "bind" in only:
                results["bind 7 VFs to vfio-pci"] = bench_bind(args.rounds, daemon)
            if not only or "vfs" in only:
                results["0 -> 7 VFs on the host driver"] = bench_vfs(args.rounds, daemon, "")
            if not only or "vfs-vfio" in only:
                results["0 -> 7 VFs on vfio-pci"] = bench_vfs(args.rounds, daemon, VFIO)
            if not args.profile and (not only or "phases" in only):
                results["phases (daemon at debug level, one call each)"] = bench_phases(daemon)
        finally:
            daemon.close()
        if args.profile:
            run("pkill", "-TERM", "-f", "cProfile -o")
            for _ in range(100):
                if run("pgrep", "-f", "cProfile -o", check=False).returncode:
                    break
                time.sleep(0.1)
            run("systemctl", "start", "nicpassd")
            daemon_up()
        if not args.profile and (not only or "vf-settings" in only):
            results["VF settings of 7 VFs re-created out of band"] = bench_vf_settings(args.rounds)
            results["7 VFs created with their settings (the boot path)"] = bench_vf_settings_at_creation(args.rounds)
        if not args.profile and (not only or "boot" in only):
            results["boot reconcile of 7 persisted vfio-pci VFs"], results["boot journal"] = \
                bench_boot_reconcile(args.rounds)
        if not args.profile and (not only or "client" in only):
            results["client start-up"] = bench_client(args.rounds)
        if not args.profile and (not only or "hook" in only):
            results["libvirt hook, 1 hostdev"] = bench_hook(args.rounds, 1)
            results["libvirt hook, 4 hostdevs"] = bench_hook(args.rounds, 4)
        clean()
    except Failed as exc:
        results["failed"] = str(exc)
    logged = errors_logged_since(since)
    if logged:
        results["daemon errors"] = logged[:20]
    print(json.dumps(results))
    return 1 if "failed" in results or logged else 0


if __name__ == "__main__":
    sys.exit(main())
