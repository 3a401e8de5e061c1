#!/usr/bin/env python3
"""Wall time of the libvirt hook, the way libvirt runs it (fork, exec, domain XML on stdin, wait).

    .venv/bin/python bench/bench_hooks.py [--runs N]

Starts a private system bus and `nicpassd --simulate` on it, its root on tmpfs (/dev/shm) like /run
and /sys, release policy "restore" (so every prepare really binds its devices to vfio-pci and every
release gives them back), then times:

- /bin/true, the floor of starting any process from here (the baseline, same run, same spawner);
- the hook for a domain without PCI devices: `prepare begin` (reads the XML) and `start begin`
  (a phase it ignores) — goal p50 <= 5 ms;
- the hook `prepare begin` for a domain with 4 PCI devices (VFs of the simulated i40e PF), then
  `started begin` and `release end` — goal p50 <= 30 ms for prepare;
- for reference, the same Prepare through busctl directly (the daemon's share of it).

Nothing touches the real /sys: the daemon runs on a simulated kernel under a temporary root.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.bus import PrivateBus  # the tests' private dbus-daemon

HOOK = REPO / "client" / "hooks" / "libvirt-qemu"
BUS_NAME = "org.nicpass.NicPass1"
PF = "0000:3b:00.0"
VFS = ["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2", "0000:3b:02.3"]
UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"


def domain(devices: list[str]) -> bytes:
    hostdevs = "".join(
        f"""    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x{d[:4]}' bus='0x{d[5:7]}' slot='0x{d[8:10]}' function='0x{d[11]}'/></source>
      <address type='pci' domain='0x0000' bus='0x{6 + i:02x}' slot='0x00' function='0x0'/>
    </hostdev>
""" for i, d in enumerate(devices))
    return f"""<domain type='kvm' id='3'>
  <name>bench</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>4194304</memory>
  <vcpu placement='static'>4</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/bench.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/><source network='default'/><model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
{hostdevs}    <graphics type='spice' autoport='yes'/>
    <memballoon model='virtio'/>
  </devices>
</domain>
""".encode()


CPU: dict[str, list[float]] = {}  # argv key -> CPU ms of the process and its children (load-independent)


def timed(argv: list[str], stdin: bytes, env: dict[str, str], key: str = "") -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if key:
        CPU.setdefault(key, []).append(1000 * (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime))
    if result.returncode != 0 or result.stdout:
        raise SystemExit(f"{argv[0]} {argv[1:]} failed ({result.returncode}): {result.stderr.decode()}"
                         f"{' stdout: ' + result.stdout.decode() if result.stdout else ''}")
    return elapsed


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
    return f"p50 {statistics.median(samples):6.2f} ms   p90 {p90:6.2f} ms   min {samples[0]:6.2f} ms   n={len(samples)}"


def busctl(env: dict[str, str], *args: str) -> None:
    subprocess.run(["busctl", "--system", "--quiet", "call", BUS_NAME, "/org/nicpass/NicPass1",
                    "org.nicpass.NicPass1.Manager", *args], env=env, check=True, capture_output=True)


def start_daemon(bus: PrivateBus, root: Path) -> subprocess.Popen:
    (root / "etc/nicpassd").mkdir(parents=True)
    (root / "etc/nicpassd/nicpassd.toml").write_text('[release]\npolicy = "restore"\n[daemon]\nlog_level = "warning"\n')
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    process = subprocess.Popen([sys.executable, "-m", "nicpassd", "--simulate", "--root", str(root)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    bus.wait_for_name(BUS_NAME, 30, process=process)
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per case (default 200)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("note: without polkit on the private bus nicpassd authorizes root only; run as root", file=sys.stderr)
    # On tmpfs, as /run (leases, undo journal) and /sys are on a real host; /tmp may be a disk,
    # where every fsync of the journal would cost a millisecond that production never pays.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="nicpassd-bench-", dir=shm if os.access(shm, os.W_OK) else None))
    with PrivateBus() as bus:
        daemon = start_daemon(bus, root / "host")
        try:
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, NICPASSD_ROOT=str(root / "host"))
            busctl(env, "SetVfCount", "sua{sv}", PF, "8", "1", "persist", "b", "false")
            plain, four = domain([]), domain(VFS)
            hook = [str(HOOK), "bench"]
            cases: dict[str, list[float]] = {name: [] for name in (
                "/bin/true (baseline)", "hook, no PCI device: prepare begin", "hook, no PCI device: start begin",
                "hook, 4 devices: prepare begin", "hook, 4 devices: started begin", "hook, 4 devices: release end",
                "busctl Prepare of 4 devices (no hook)")}
            names = list(cases)
            for warm in range(5):  # first runs load page cache, the vfio-pci module, thread pools
                timed(["/bin/true"], plain, env)
                timed([*hook, "prepare", "begin", "-"], four, env)
                timed([*hook, "release", "end", "-"], four, env)
            for _ in range(args.runs):  # interleaved, so that load changes hit every case alike
                cases[names[0]].append(timed(["/bin/true"], plain, env, names[0]))
                cases[names[1]].append(timed([*hook, "prepare", "begin", "-"], plain, env, names[1]))
                cases[names[2]].append(timed([*hook, "start", "begin", "-"], plain, env, names[2]))
                cases[names[3]].append(timed([*hook, "prepare", "begin", "-"], four, env, names[3]))
                cases[names[4]].append(timed([*hook, "started", "begin", "-"], four, env, names[4]))
                cases[names[5]].append(timed([*hook, "release", "end", "-"], four, env, names[5]))
                if len(cases[names[6]]) < args.runs // 4:
                    start = time.perf_counter()
                    busctl(env, "Prepare", "ssasa{sv}", "bench", UUID, "4", *VFS, "0")
                    cases[names[6]].append((time.perf_counter() - start) * 1000)
                    busctl(env, "Release", "sa{sv}", UUID, "0")
        finally:
            daemon.terminate()
            daemon.wait(10)
            shutil.rmtree(root, ignore_errors=True)
    baseline = statistics.median(cases[names[0]])
    print(f"libvirt hook wall time ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"simulated kernel under {root.parent}, release policy restore)")
    print("  wall time (fork to exit, as libvirt waits for it):")
    for name, samples in cases.items():
        extra = "" if name == names[0] else f"   (+{statistics.median(samples) - baseline:5.2f} over /bin/true)"
        print(f"  {name:42s} {summary(samples)}{extra}")
    print("  CPU time of the hook and its children (user+sys; the daemon's share is not in it):")
    for name, samples in CPU.items():
        print(f"  {name:42s} p50 {statistics.median(samples):6.2f} ms")
    no_pci = statistics.median(cases[names[1]])
    prepare = statistics.median(cases[names[3]])
    print(f"goals: no PCI device p50 <= 5 ms: {no_pci:.2f} ms ({'met' if no_pci <= 5 else 'MISSED'}); "
          f"prepare of 4 devices p50 <= 30 ms: {prepare:.2f} ms ({'met' if prepare <= 30 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
