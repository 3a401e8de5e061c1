"""An in-process nicpassd (simulated kernel + engine + D-Bus service) on the private bus.

The daemon runs in the test's own event loop: a test drives it through a separate client
connection exactly as any other bus client would, and can still reach the simulated kernel to
inject faults or read what the kernel shows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from nicpassd.engine.config import Config, DaemonSettings
from nicpassd.engine.engine import Engine
from nicpassd.host.events import on_loop
from nicpassd.host.host import Host
from nicpassd.paths import HostPaths
from nicpassd.sim.kernel import SimKernel
from nicpassd.sim.topology import load_topology
from nicpassd.transport.bus import NicpassBus
from nicpassd.transport.service import start_service


@dataclass
class RunningService:
    paths: HostPaths
    kernel: SimKernel
    engine: Engine
    bus: NicpassBus
    address: str


@pytest.fixture
async def service(private_bus, polkit, tmp_path):
    paths = HostPaths(tmp_path)
    kernel = SimKernel(paths, load_topology())
    config = Config(daemon=DaemonSettings(write_timeout=2.0, bind_verify_timeout=0.5))
    engine = Engine.open(Host(paths, kernel, write_timeout=2.0), config)
    kernel.subscribe(on_loop(asyncio.get_running_loop(), engine.on_uevent))
    engine.refresh()
    bus = await start_service(engine, private_bus.address)
    try:
        yield RunningService(paths, kernel, engine, bus, private_bus.address)
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()


@pytest.fixture
async def client(private_bus):
    bus = await NicpassBus(bus_address=private_bus.address).connect()
    try:
        yield bus
    finally:
        bus.disconnect()
