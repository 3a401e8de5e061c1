"""A simulated host for unit tests: a SimKernel tree under a temporary root, optionally an Engine on top.

Assertions should read what the *kernel tree* shows (``Sim.driver``/``override``/``numvfs``/
``vfs``, or ``Sim.snapshot()``), not only what the engine believes. Every write the host model
makes goes through ``RecordingWriter``, so a test can assert on the exact write sequence.
Nothing here touches the real /sys: all paths live under a temporary root.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from nicpassd.engine.config import Config, DaemonSettings, GuardSettings, ReleaseSettings
from nicpassd.engine.engine import Engine
from nicpassd.host import sysfs, vf_netlink
from nicpassd.host.events import UEvent, on_loop
from nicpassd.host.host import Host
from nicpassd.host.model import HostSnapshot
from nicpassd.paths import HostPaths
from nicpassd.sim.kernel import SimKernel
from nicpassd.sim.topology import Topology, load_topology, parse_topology

WRITE_TIMEOUT = 0.2  # a hung sysfs write becomes Timeout after this long
VERIFY_TIMEOUT = 0.1  # how long a bind is polled for before it is declared failed


def describe_request(request: bytes) -> tuple[str, str]:
    """("get", PF) or ("set", PF) of an rtnetlink request of nicpassd.host.vf_netlink."""
    if vf_netlink.NLMSGHDR.unpack_from(request)[1] == vf_netlink.RTM_GETLINK:
        return "get", vf_netlink.parse_get(request)
    return "set", vf_netlink.parse_set(request)[0]


class RecordingWriter:
    """The simulated kernel's write boundary, recording ``(parent, attribute, data)`` per write.

    ``parent`` is the directory name: the PCI address for a device attribute, the driver name for
    ``bind``/``unbind``, ``pci`` for ``drivers_probe``. Module loads are recorded as
    ``("modprobe", name, "")``.
    """

    def __init__(self, kernel: SimKernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[str, str, str]] = []

    def write(self, path: Path, data: str) -> None:
        self.calls.append((Path(path).parent.name, Path(path).name, data))
        self.kernel.write(path, data)

    def load_module(self, name: str) -> None:
        self.calls.append(("modprobe", name, ""))
        self.kernel.load_module(name)

    def netlink(self, request: bytes) -> bytes:
        what, interface = describe_request(request)
        if what == "set":  # reads (the inventory's RTM_GETLINKs) are not changes
            self.calls.append(("netlink", what, interface))
        return self.kernel.netlink(request)

    def hold_vfio_group(self, path: Path):
        return self.kernel.hold_vfio_group(path)

    @property
    def writes(self) -> list[tuple[str, str, str]]:
        """Sysfs writes and VF setting changes (not module loads)."""
        return [call for call in self.calls if call[0] != "modprobe"]

    def clear(self) -> None:
        self.calls.clear()


@dataclass
class Sim:
    paths: HostPaths
    kernel: SimKernel
    writer: RecordingWriter
    config: Config
    engine: Engine | None = None
    events: list[UEvent] = field(default_factory=list)

    # --- what the kernel tree shows ------------------------------------------------------
    def dir(self, address: str) -> Path:
        return self.paths.pci_device(address)

    def exists(self, address: str) -> bool:
        return self.dir(address).exists()

    def driver(self, address: str) -> str:
        link = self.dir(address) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else ""

    def override(self, address: str) -> str:
        value = (self.dir(address) / "driver_override").read_text().strip()
        return "" if value == "(null)" else value

    def numvfs(self, address: str) -> int:
        return int((self.dir(address) / "sriov_numvfs").read_text())

    def autoprobe(self, address: str) -> str:
        return (self.dir(address) / "sriov_drivers_autoprobe").read_text().strip()

    def vfs(self, address: str) -> list[str]:
        links = [entry for entry in os.listdir(self.dir(address)) if entry.startswith("virtfn")]
        links.sort(key=lambda name: int(name.removeprefix("virtfn")))
        return [os.path.basename(os.readlink(self.dir(address) / name)) for name in links]

    def netdevs(self) -> set[str]:
        return set(os.listdir(self.paths.class_net))

    def group(self, address: str) -> int:
        return int(os.path.basename(os.readlink(self.dir(address) / "iommu_group")))

    @contextlib.contextmanager
    def vm_holding(self, address: str, guest: str = "web01"):
        """A stand-in QEMU: a real process holding the device's VFIO group node open, with
        libvirt's -name guest=... on its command line. The simulated kernel makes no group nodes:
        this one is made here. Yields the process; kills it at the end."""
        node = self.paths.dev_vfio / str(self.group(address))
        node.parent.mkdir(parents=True, exist_ok=True)
        node.touch()
        qemu = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); print(1, flush=True); "
                                 "time.sleep(120)", str(node), "-name", f"guest={guest},debug-threads=on"],
                                stdout=subprocess.PIPE)
        try:
            qemu.stdout.readline()
            yield qemu
        finally:
            qemu.kill()
            qemu.wait()
            qemu.stdout.close()

    def state(self, address: str) -> tuple[str, str, int | None]:
        """(driver, driver_override, sriov_numvfs or None): what the guard must never change."""
        if not self.exists(address):
            return ("<absent>", "", None)
        numvfs = self.numvfs(address) if (self.dir(address) / "sriov_numvfs").exists() else None
        return (self.driver(address), self.override(address), numvfs)

    def snapshot(self) -> HostSnapshot:
        return sysfs.read_snapshot(self.paths)

    def state_json(self) -> Path:
        return self.paths.state_dir / "state.json"

    def event_tuples(self) -> list[tuple[str, str, str]]:
        return [(event.action, event.subsystem, event.sys_name) for event in self.events]

    def restart(self) -> Engine:
        """A new daemon over the same kernel, /var/lib/nicpassd and /run/nicpassd (a daemon
        restart, not a reboot): its files are read again."""
        self.engine.leasing.close()
        engine = Engine.open(self.engine.host, self.config)
        engine.refresh()
        self.engine = engine
        return engine


def fast_config(**guard: object) -> Config:
    return Config(guard=GuardSettings(**guard),
                  daemon=DaemonSettings(write_timeout=2.0, bind_verify_timeout=VERIFY_TIMEOUT))


def build_kernel(root: Path, topology: Topology | str | None = None) -> Sim:
    if isinstance(topology, str):
        topology = parse_topology(topology)
    paths = HostPaths(root)
    kernel = SimKernel(paths, topology if topology is not None else load_topology())
    sim = Sim(paths, kernel, RecordingWriter(kernel), fast_config())
    kernel.subscribe(sim.events.append)
    return sim


def attach_engine(sim: Sim, *, config: Config | None = None, write_timeout: float = WRITE_TIMEOUT) -> Sim:
    """Put an Engine on ``sim``, fed by its uevents; must run inside the event loop of the test."""
    sim.config = config if config is not None else fast_config()
    host = Host(sim.paths, sim.writer, write_timeout=write_timeout)
    sim.engine = Engine.open(host, sim.config)
    # To whichever engine runs now: after ``Sim.restart`` the new daemon gets the events.
    sim.kernel.subscribe(on_loop(asyncio.get_running_loop(), lambda event: sim.engine.on_uevent(event)))
    sim.engine.refresh()
    sim.writer.clear()
    return sim


def join_pending_kernel_writes(timeout: float = 5.0) -> None:
    """Wait for writes left hanging after a Timeout, so none outlives its test's event loop."""
    for thread in threading.enumerate():
        if thread.name.startswith("kernel-write") and thread is not threading.current_thread():
            thread.join(timeout)


@pytest.fixture(scope="session")
def sim_tools() -> SimpleNamespace:
    """The builders as plain functions, for tests that cannot use function-scoped fixtures
    (hypothesis examples build a fresh host each)."""
    return SimpleNamespace(build_kernel=build_kernel, attach_engine=attach_engine, fast_config=fast_config,
                           join_pending_kernel_writes=join_pending_kernel_writes, fast_tmp_root=fast_tmp_root)


def fast_tmp_root() -> Path:
    """A fresh directory on tmpfs (/dev/shm) when available, else in the system temp dir."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="nicpassd-unit-", dir=parent))


@pytest.fixture
def sim_root():
    """Where simulated hosts are built: tmpfs (/dev/shm) when available, 10x faster than disk."""
    root = fast_tmp_root()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_kernel(sim_root):
    """Factory: a SimKernel (no engine) for a topology (TOML text, Topology, or None = default)."""
    counter = itertools.count()

    def build(topology: Topology | str | None = None) -> Sim:
        return build_kernel(sim_root / f"kernel{next(counter)}", topology)

    yield build
    join_pending_kernel_writes()


@pytest.fixture
def ksim(make_kernel) -> Sim:
    """The default simulated host, kernel only."""
    return make_kernel()


@pytest.fixture
async def make_sim(sim_root):
    """Factory: a simulated host with an Engine driven by its uevents (call inside the test loop).

    The writer is cleared after the initial refresh, so ``sim.writer.calls`` holds only what the
    test caused.
    """
    counter = itertools.count()

    def build(topology: Topology | str | None = None, *, config: Config | None = None,
              write_timeout: float = WRITE_TIMEOUT, release_policy: str = "keep") -> Sim:
        if config is None:
            config = fast_config()
        if release_policy != "keep":
            config = config.model_copy(update={"release": ReleaseSettings(policy=release_policy)})
        sim = build_kernel(sim_root / f"host{next(counter)}", topology)
        return attach_engine(sim, config=config, write_timeout=write_timeout)

    yield build
    join_pending_kernel_writes()


@pytest.fixture
async def sim(make_sim) -> Sim:
    """The default simulated host (built-in topology) with an engine."""
    return make_sim()


@pytest.fixture
def netns():
    """A throwaway network namespace (support/netns.py), deleted after the test."""
    from support import netns as namespaces

    try:
        name = namespaces.create()
    except namespaces.NetnsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield name
    finally:
        namespaces.delete(name)
