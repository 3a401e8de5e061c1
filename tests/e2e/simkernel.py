"""The simulated kernel as a "kernel under test" for conformance.py (host side, in-process)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from nicpassd.host.events import UEvent
from nicpassd.paths import HostPaths
from nicpassd.sim.kernel import SimKernel
from nicpassd.sim.topology import Topology

from .conformance import Env, run_all

HERE = Path(__file__).resolve().parent
GUEST_TOPOLOGY = HERE / "guest-topology.toml"
# What the e2e guest's real kernel showed for every check of conformance.py (its --json output
# plus a "source" field saying where it came from); the unit suite holds the simulator to it.
KERNEL_OBSERVATIONS = HERE / "kernel-observations" / "linux-6.1-igb.json"


def load_kernel_observations() -> dict:
    return json.loads(KERNEL_OBSERVATIONS.read_text())


def sim_run(topology: Topology, env: Env, root: Path | None = None) -> dict:
    """conformance.run_all on a simulator of ``topology``, shaped (and JSON-typed) like the
    guest's ``conformance.py --json`` output."""
    results = run_all(SimUnderTest(topology, root), env)
    return json.loads(json.dumps({"env": env.to_dict(), "results": results}))


class SimUnderTest:
    def __init__(self, topology: Topology, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="nicpassd-conformance-"))
        self.paths = HostPaths(self.root)
        self.kernel = SimKernel(self.paths, topology)
        self.kernel.subscribe(self._on_event)
        self._capturing = False
        self._events: list = []
        self._net_parent: dict[str, str] = {}

    def _p(self, rel: str) -> Path:
        return self.paths.sys / rel

    def write(self, rel: str, data: str) -> None:
        self.kernel.write(self._p(rel), data)

    def read(self, rel: str) -> str:
        return self._p(rel).read_text().strip()

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self._p(rel))

    def listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self._p(rel)))

    def readlink(self, rel: str) -> str:
        return os.path.basename(os.readlink(self._p(rel)))

    def load_module(self, name: str) -> None:
        self.kernel.load_module(name)

    def _parent_of(self, ifname: str) -> str:
        link = self.paths.class_net / ifname / "device"
        if os.path.lexists(link):
            self._net_parent[ifname] = os.path.basename(os.readlink(link))
        return self._net_parent.get(ifname, "")

    def _on_event(self, event: UEvent) -> None:
        if event.subsystem == "net":
            name = "net:" + self._parent_of(event.sys_name)
        elif event.subsystem == "pci":
            name = event.sys_name
        else:
            return
        if self._capturing:
            self._events.append((event.action, event.subsystem, name, event.driver))

    def start_uevents(self) -> None:
        for ifname in os.listdir(self.paths.class_net):
            self._parent_of(ifname)
        self._events = []
        self._capturing = True

    def stop_uevents(self) -> list:
        self._capturing = False
        return list(self._events)


def guest_env() -> Env:
    return Env(pf="0000:02:00.0", pf_driver="igb", nic="0000:03:00.0", nic_driver="e1000e")
