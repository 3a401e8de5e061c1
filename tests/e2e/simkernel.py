"""The simulated kernel as a "kernel under test" for conformance.py (host side, in-process)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from nicpassd.host import vf_netlink
from nicpassd.host.events import UEvent
from nicpassd.host.host import Host
from nicpassd.host.model import VfSettings
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
        self._host = Host(self.paths, self.kernel)
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

    def vf_set(self, interface: str, index: int, words: list[str]) -> str:
        """`ip link set dev INTERFACE vf INDEX WORDS...` as rtnetlink requests to the simulator."""
        values: dict[str, object] = {}
        for word, text in zip(words[::2], words[1::2]):
            name = IP_WORDS[word]
            values[name] = (text == "on") if name in ("spoofchk", "trust") else \
                int(text) if name in ("vlan", "qos", "min_tx_rate", "max_tx_rate") else text
        current = next((vf for vf in self._host.read_vf_settings(interface) if vf.index == index), VfSettings(index))
        try:
            for _setting, attribute in vf_netlink.vf_attributes(index, vf_netlink.VfChange(**values), current):
                vf_netlink.check_ack(self.kernel.netlink(vf_netlink.encode_set(interface, attribute)))
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "ok"

    def vf_show(self, interface: str) -> list[dict]:
        return [{"mac": vf.mac or "00:00:00:00:00:00", "vlan": vf.vlan, "qos": vf.qos, "spoofchk": vf.spoofchk,
                 "trust": vf.trust, "link_state": vf.link_state} for vf in self._host.read_vf_settings(interface)]


IP_WORDS = {"mac": "mac", "vlan": "vlan", "qos": "qos", "proto": "vlan_proto", "spoofchk": "spoofchk",
            "trust": "trust", "state": "link_state", "min_tx_rate": "min_tx_rate", "max_tx_rate": "max_tx_rate"}


def guest_env() -> Env:
    return Env(pf="0000:02:00.0", pf_driver="igb", nic="0000:03:00.0", nic_driver="e1000e")
