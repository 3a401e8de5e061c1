"""D-Bus round trips to `nicpassd --simulate` (default topology) through a private dbus-daemon.

Sequential calls from one dbus-fast connection: the mean is what a client like nicpassctl waits
per call. Run: .venv/bin/python bench/bench_dbus.py [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dbus_fast import Message, MessageType  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402

from support.bus import PrivateBus  # noqa: E402
from support.daemon import SimulatedDaemon  # noqa: E402

BUS_NAME = "org.nicpass.NicPass1"


async def measure(address: str, calls: int) -> dict[str, list[float]]:
    bus = await MessageBus(bus_address=address).connect()

    def get_property() -> Message:
        return Message(destination=BUS_NAME, path="/org/nicpass/NicPass1/devices/0000_3b_00_0",
                       interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
                       body=["org.nicpass.NicPass1.Device", "NumVfs"])

    def managed_objects() -> Message:
        return Message(destination=BUS_NAME, path="/org/nicpass/NicPass1",
                       interface="org.freedesktop.DBus.ObjectManager", member="GetManagedObjects")

    results: dict[str, list[float]] = {}
    for name, make in (("property Get", get_property), ("GetManagedObjects", managed_objects)):
        for _ in range(50):  # warm-up
            await bus.call(make())
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            reply = await bus.call(make())
            samples.append(time.perf_counter() - start)
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        results[name] = samples
    bus.disconnect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with PrivateBus() as bus, tempfile.TemporaryDirectory() as tmp:
        with SimulatedDaemon(bus, Path(tmp) / "host"):
            results = asyncio.run(measure(bus.address, args.calls))
    for name, samples in results.items():
        samples_us = sorted(s * 1e6 for s in samples)
        p99 = samples_us[int(len(samples_us) * 0.99) - 1]
        print(f"{name:18s} n={len(samples_us)} mean={statistics.mean(samples_us):7.0f} µs "
              f"p50={statistics.median(samples_us):7.0f} µs p99={p99:7.0f} µs")


if __name__ == "__main__":
    main()
