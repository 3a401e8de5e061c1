#!/usr/bin/env python3
"""Writes under a read flood: 50 readers and 5 writers against `nicpassd --simulate`.

    .venv/bin/python bench/bench_load.py [--seconds 20] [--readers 50] [--writers 5]

A private system bus, the daemon on a simulated kernel under /dev/shm, 5 VFs made on the
simulated i40e PF. Each writer owns one VF and flips it between vfio-pci and its host driver
with ``Bind`` (persisted: every write is a kernel write plus a state-file write). Three phases,
same run, same daemon:

1. one writer alone (the single-write baseline);
2. the 5 writers alone (they queue behind the one mutation lock: the contention baseline);
3. while 50 readers (another process, one bus connection each) call GetManagedObjects,
   Properties.GetAll, Explain and ListLeases back to back: first the one writer, then the 5.

Prints p50/p99 of each, reads per second, the daemon's RSS and open fds sampled over phase 3, and
the ratios. Fails (exit 1, the reason printed) when a write or read gets an error answer, when
the daemon logs an error, or when a VF's final driver in the kernel is not what the last
successful write asked for. Goal (issue 19): write p50 under the flood <= 3x the same writes
without the readers (one writer against one writer alone, five against five: five writers queue
behind each other on the mutation lock whether or not anyone reads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dbus_fast import Message, MessageType, Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402

from benchlib import FAILED, GOAL_MISSED, MET, percentile  # noqa: E402
from support.bus import PrivateBus  # noqa: E402
from support.daemon import SimulatedDaemon  # noqa: E402

BUS_NAME = "org.nicpass.NicPass1"
MANAGER_PATH = "/org/nicpass/NicPass1"
MANAGER = "org.nicpass.NicPass1.Manager"
DEVICE = "org.nicpass.NicPass1.Device"
PF = "0000:3b:00.0"


def call(member: str, signature: str = "", body: list | None = None, *, path: str = MANAGER_PATH,
         interface: str = MANAGER) -> Message:
    return Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                   signature=signature, body=body or [])


def checked(reply: Message, what: str) -> Message:
    if reply.message_type != MessageType.METHOD_RETURN:
        raise SystemExit(f"FAIL: {what}: {reply.error_name}: {reply.body}")
    return reply


async def vfs_of_pf(bus: MessageBus) -> list[tuple[str, str]]:
    reply = checked(await bus.call(call("GetManagedObjects", interface="org.freedesktop.DBus.ObjectManager")),
                    "GetManagedObjects")
    vfs = []
    for interfaces in reply.body[0].values():
        props = interfaces.get(DEVICE)
        if props and props["PhysicalFunction"].value == PF:
            vfs.append((props["Address"].value, props["Driver"].value))
    return sorted(vfs)


class Writer:
    """Flips one VF between vfio-pci and its host driver; remembers the last successful target."""

    def __init__(self, bus: MessageBus, address: str, host_driver: str) -> None:
        self.bus, self.address, self.host_driver = bus, address, host_driver
        self.last_ok = host_driver
        self.samples: list[float] = []

    async def write_once(self) -> None:
        target = "vfio-pci" if self.last_ok != "vfio-pci" else self.host_driver
        start = time.perf_counter()
        # "" gives the device back to its host driver
        driver_argument = target if target == "vfio-pci" else ""
        reply = await self.bus.call(call("Bind", "ssa{sv}", [self.address, driver_argument,
                                                             {"persist": Variant("b", True)}]))
        self.samples.append(time.perf_counter() - start)
        checked(reply, f"Bind {self.address} {driver_argument!r}")
        self.last_ok = target


async def run_writers(writers: list[Writer], *, writes: int | None = None, until: float | None = None) -> None:
    async def loop(writer: Writer) -> None:
        done = 0
        while (writes is None or done < writes) and (until is None or time.monotonic() < until):
            await writer.write_once()
            done += 1
    await asyncio.gather(*(loop(w) for w in writers))


def daemon_resources(pid: int) -> tuple[int, int]:
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb, len(os.listdir(f"/proc/{pid}/fd"))


# --- the readers: a separate process, so their client-side Python does not share our GIL ----------

async def reader_main(address: str, readers: int, seconds: float, device_paths: list[str]) -> dict:
    buses = [await MessageBus(bus_address=address).connect() for _ in range(readers)]
    requests = [
        lambda i: call("GetManagedObjects", interface="org.freedesktop.DBus.ObjectManager"),
        lambda i: call("GetAll", "s", [DEVICE], path=device_paths[i % len(device_paths)],
                       interface="org.freedesktop.DBus.Properties"),
        lambda i: call("Explain", "s", [PF]),
        lambda i: call("ListLeases"),
    ]
    samples: list[float] = []
    errors: list[str] = []
    until = time.monotonic() + seconds

    async def read_loop(i: int, bus: MessageBus) -> None:
        n = i
        while time.monotonic() < until:
            message = requests[n % len(requests)](n)
            n += 1
            start = time.perf_counter()
            reply = await bus.call(message)
            samples.append(time.perf_counter() - start)
            if reply.message_type != MessageType.METHOD_RETURN and len(errors) < 5:
                errors.append(f"{message.member}: {reply.error_name}: {reply.body}")

    await asyncio.gather(*(read_loop(i, bus) for i, bus in enumerate(buses)))
    for bus in buses:
        bus.disconnect()
    return {"samples": samples, "errors": errors}


def reader_process() -> None:
    address, readers, seconds, paths = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5].split(",")
    print(json.dumps(asyncio.run(reader_main(address, readers, seconds, paths))))


# --- the run ----------------------------------------------------------------------------------------

def fmt(samples: list[float]) -> str:
    if not samples:
        return "n=    0 (none in the time given)"
    return (f"n={len(samples):5d} p50={statistics.median(samples) * 1e3:7.1f} ms "
            f"p99={percentile(samples, 0.99) * 1e3:7.1f} ms")


async def measure(address: str, daemon: SimulatedDaemon, root: Path, args) -> int:
    bus = await MessageBus(bus_address=address).connect()
    checked(await bus.call(call("SetVfCount", "sua{sv}", [PF, args.writers, {"persist": Variant("b", False)}])),
            "SetVfCount")
    vfs = (await vfs_of_pf(bus))[:args.writers]
    writers = [Writer(bus, address_, driver) for address_, driver in vfs]
    for writer in writers:  # warm-up: each VF through both drivers once
        await writer.write_once()
        await writer.write_once()
        writer.samples.clear()

    await run_writers(writers[:1], writes=args.alone_writes)
    alone = list(writers[0].samples)
    writers[0].samples.clear()
    await run_writers(writers, writes=args.alone_writes // len(writers) * 2)
    contended = [s for w in writers for s in w.samples]
    for writer in writers:
        writer.samples.clear()

    device_paths = [f"{MANAGER_PATH}/devices/{address_.replace(':', '_').replace('.', '_')}" for address_, _ in vfs]
    readers = subprocess.Popen(
        [sys.executable, __file__, "--reader", address, str(args.readers), str(2 * args.seconds),
         ",".join(device_paths)],
        stdout=subprocess.PIPE, text=True)
    await asyncio.sleep(1.0)  # the readers connected and reading
    usage: list[tuple[float, int, int]] = []

    async def sample_usage() -> None:
        start = time.monotonic()
        while readers.poll() is None:
            usage.append((time.monotonic() - start, *daemon_resources(daemon.process.pid)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_usage())
    await run_writers(writers[:1], until=time.monotonic() + args.seconds - 1.0)
    flooded_alone = list(writers[0].samples)
    writers[0].samples.clear()
    await run_writers(writers, until=time.monotonic() + args.seconds - 1.0)
    flooded = [s for w in writers for s in w.samples]
    out, _ = await asyncio.to_thread(readers.communicate)
    await sampler
    bus.disconnect()
    reads = json.loads(out)

    print(f"one writer alone         {fmt(alone)}")
    print(f"{len(writers)} writers alone          {fmt(contended)}")
    print(f"1 writer, {args.readers} readers     {fmt(flooded_alone)}")
    print(f"{len(writers)} writers, {args.readers} readers    {fmt(flooded)}")
    print(f"reads under the flood    {fmt(reads['samples'])}  ({len(reads['samples']) / (2 * args.seconds):.0f}/s)")
    ratio_alone = statistics.median(flooded_alone) / statistics.median(alone)
    ratio_contended = statistics.median(flooded) / statistics.median(contended)
    print(f"write p50 under the flood: one writer {ratio_alone:.2f}x the same writer alone (goal <= 3x); "
          f"{len(writers)} writers {ratio_contended:.2f}x the {len(writers)} writers alone (goal <= 3x)")
    rss = [kb for _, kb, _ in usage]
    fds = [n for _, _, n in usage]
    print(f"daemon RSS over the flood: first {rss[0] / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB, "
          f"last {rss[-1] / 1024:.1f} MiB; fds first {fds[0]}, max {max(fds)}, last {fds[-1]} "
          f"({len(usage)} samples)")

    failures = [f"read error: {e}" for e in reads["errors"]]
    for writer in writers:
        link = root / "sys/bus/pci/devices" / writer.address / "driver"
        found = os.path.basename(os.readlink(link)) if link.is_symlink() else ""
        if found != writer.last_ok:
            failures.append(f"{writer.address}: the kernel has {found!r}, the last successful write asked {writer.last_ok!r}")
    logged = [line for line in daemon.log_text().splitlines() if " ERROR " in line or " CRITICAL " in line]
    failures += [f"daemon logged: {line}" for line in logged[:5]]
    for failure in failures:
        print(f"FAIL: {failure}")
    if failures:
        return FAILED
    return MET if ratio_alone <= 3 and ratio_contended <= 3 else GOAL_MISSED


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        reader_process()
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--writers", type=int, default=5)
    parser.add_argument("--alone-writes", type=int, default=100)
    args = parser.parse_args()
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="nicpassd-bench-", dir=shm if os.access(shm, os.W_OK) else None))
    try:
        with PrivateBus() as bus:
            root = tmp / "host"
            with SimulatedDaemon(bus, root) as daemon:
                return asyncio.run(measure(bus.address, daemon, root, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
