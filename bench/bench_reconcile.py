#!/usr/bin/env python3
"""Boot reconcile: 16 PFs × 64 VFs, every VF persisted on vfio-pci, on the simulated kernel.

Two runs on two fresh, identical simulated hosts (same topology, same simulator):

- daemon: what ``nicpassd`` does at start once the kernel is up — read the host, roll back the undo
  journal (empty), the boot reconcile (plan, then per PF: autoprobe off, ``sriov_numvfs`` 0→64 with
  read-back and ``virtfnN`` wait, every VF's driver_override/drivers_probe with verification, each
  step journaled and guard-checked), and the refresh that puts the 1,024 new VFs in its inventory;
- bare: a plain loop doing only the minimal writes of the same change (``sriov_drivers_autoprobe``
  0, ``sriov_numvfs`` 64, then per VF ``driver_override`` and ``drivers_probe``), no reads, no checks.

This is the engine's own boot path. At a real boot the ``nicpassd`` command creates VFs that need
nothing but a count before the engine starts (nicpassd/host/early_vfs.py, from the early-binding
list, which this fresh root does not have); the engine's path is what PFs with VF settings or single
VFs on another driver take, and what the early pass leaves to it.

"Converged" is when the boot reconcile returns: every VF count read back, every VF verified on
vfio-pci. The daemon then reads the 1,024 new VFs into its inventory (views, D-Bus objects) in the
run their uevents queued: reported too ("with its inventory"). Reports wall times and daemon/bare
(goal ≤ 1.1 with the inventory) per round, interleaved ``--rounds`` times since this machine's
load moves either one. Exit 1 when the daemon logs an error or does not converge, 2 when the goal
is missed (bench/benchlib.py).

In this process the simulated kernel is Python in the daemon's kernel-write threads: unlike the
real kernel, it competes with the daemon's event loop for the GIL. The simulator therefore hands
the uevents of one write (or one batch of writes) over when it returns, as a netlink socket queues
them, instead of waking the loop per event. The early-binding udev rule is off in both by default, so
the daemon does every bind itself (``--udev-rule`` shows the boot of a host with the rule, where
the VFs land on vfio-pci as they appear).

    .venv/bin/python bench/bench_reconcile.py [--pfs 16] [--vfs 64] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import DaemonErrors, verdict
from nicpassd.host.early_binding import udev_rule
from nicpassd.engine.config import Config, DaemonSettings
from nicpassd.engine.engine import Engine
from nicpassd.engine.views import build_views
from nicpassd.engine.recovery import recover
from nicpassd.engine.store import DeviceDesire, Identity, StateStore
from nicpassd.host.events import on_loop
from nicpassd.host import sysfs
from nicpassd.host.host import Host
from nicpassd.paths import HostPaths
from nicpassd.sim.kernel import SimKernel
from nicpassd.sim.topology import Topology, parse_topology

MGMT = """
[[functions]]
address = "0000:01:00.0"
vendor = "8086"
device = "1521"
driver = "igb"
netdev = "eno1"
mac = "ac:1f:6b:10:00:01"

[[routes]]
dev = "eno1"
dst = "default"
gateway = "192.0.2.1"
"""


def topology(pfs: int, vfs: int) -> Topology:
    parts = ["format = 1\ndescription = \"boot reconcile bench\"\n"]
    for index in range(pfs):
        bus = 0x10 + index * 2
        parts.append(f"""
[[functions]]
address = "0000:{bus:02x}:00.0"
vendor = "8086"
device = "1572"
subsystem_vendor = "8086"
subsystem_device = "0006"
driver = "i40e"
netdev = "ens{index}f0"
mac = "3c:fd:fe:00:{index:02x}:00"
serial = "3c-fd-fe-ff-ff-00-{index:02x}-00"
sriov_totalvfs = {vfs}
vf_device = "154c"
vf_driver = "iavf"
vf_offset = 16
vf_stride = 1
""")
    return parse_topology("".join(parts) + MGMT)


def pf_addresses(pfs: int) -> list[str]:
    return [f"0000:{0x10 + index * 2:02x}:00.0" for index in range(pfs)]


def persist(paths: HostPaths, pfs: int, vfs: int) -> None:
    store = StateStore(paths.state_dir)
    changes = {}
    for index, address in enumerate(pf_addresses(pfs)):
        identity = Identity(vendor_id="8086", device_id="1572", subsystem_vendor_id="8086", subsystem_device_id="0006",
                            serial=f"3c-fd-fe-ff-ff-00-{index:02x}-00", permanent_mac=f"3c:fd:fe:00:{index:02x}:00",
                            group_members=())
        changes[address] = DeviceDesire(address=address, identity=identity, num_vfs=vfs, vf_driver="vfio-pci")
    store.apply(changes)


class NotConverged(RuntimeError):
    pass


def fresh_root() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="bench-reconcile-", dir=shm if shm.is_dir() else None))


def bare(args) -> float:
    root = fresh_root()
    try:
        paths = HostPaths(root)
        kernel = SimKernel(paths, topology(args.pfs, args.vfs))
        kernel.load_module("vfio-pci")
        started = time.perf_counter()
        for pf in pf_addresses(args.pfs):
            directory = paths.pci_device(pf)
            kernel.write(directory / "sriov_drivers_autoprobe", "0")
            kernel.write(directory / "sriov_numvfs", str(args.vfs))
            for index in range(args.vfs):
                vf = os.path.basename(os.readlink(directory / f"virtfn{index}"))
                kernel.write(paths.pci_device(vf) / "driver_override", "vfio-pci\n")
                kernel.write(paths.drivers_probe, vf)
        elapsed = time.perf_counter() - started
        assert all(os.path.basename(os.readlink(paths.pci_device(vf) / "driver")) == "vfio-pci"
                   for pf in pf_addresses(args.pfs)
                   for vf in (os.path.basename(os.readlink(paths.pci_device(pf) / f"virtfn{i}"))
                              for i in range(args.vfs)))
        return elapsed
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def daemon(args) -> dict[str, float]:
    root = fresh_root()
    try:
        paths = HostPaths(root)
        persist(paths, args.pfs, args.vfs)
        kernel = SimKernel(paths, topology(args.pfs, args.vfs), rules=(udev_rule,) if args.udev_rule else ())
        config = Config(daemon=DaemonSettings(write_timeout=30.0, bind_verify_timeout=3.0))
        engine = Engine.open(Host(paths, kernel, write_timeout=30.0), config)
        kernel.subscribe(on_loop(asyncio.get_running_loop(), engine.on_uevent))
        started = time.perf_counter()
        # What nicpassd.daemon._apply_desired_state does at start:
        engine.refresh()
        await recover(engine.view, engine.ops)
        engine.reconciler.auto = True
        outcomes = await engine.reconciler.run(explicit=False)
        converged = time.perf_counter()
        await engine.quiesce()  # the run its uevents queued: reads the new VFs in, plans nothing
        settled = time.perf_counter()
        failed = [o for o in outcomes if o.result != "ok"]
        vfs = [vf for pf in pf_addresses(args.pfs) for vf in engine.snapshot.functions[pf].virtfns]
        wrong = [vf for vf in vfs if engine.views[vf].driver != "vfio-pci" or engine.views[vf].drift]
        if failed or wrong or len(vfs) != args.pfs * args.vfs:
            raise NotConverged(f"{len(failed)} steps failed ({failed[:3]}), {len(vfs)} VFs, "
                               f"{len(wrong)} not on vfio-pci or drifting")
        return {"converged": converged - started, "settled": settled - started, **floor(engine, vfs)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def floor(engine: Engine, vfs: list[str]) -> dict[str, float]:
    """What taking the new VFs in costs at the least, timed again after the run on the same
    kernel state through the same public functions: each VF read once (its ids as its add uevent
    gave them), every view built, each PF's VF settings read and parsed. The daemon also handles
    the VFs' uevents, journals, plans and checks; this is the part no design can skip."""
    snapshot, view = engine.snapshot, engine.view
    started = time.perf_counter()
    for vf in vfs:
        known = snapshot.functions[vf]
        sysfs.read_function(engine.host.paths, vf, announced=(known.vendor_id, known.device_id,
                                                               known.subsystem_vendor_id, known.subsystem_device_id,
                                                               known.class_code))
    read = time.perf_counter()
    build_views(snapshot, view.protected, engine.store, engine.leases.holder(), view.notes)
    built = time.perf_counter()
    for pf in snapshot.vf_settings:
        engine.host.read_vf_settings(snapshot.functions[pf].interfaces[0])
    settings = time.perf_counter()
    return {"floor_reads": read - started, "floor_views": built - read, "floor_vf_settings": settings - built}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pfs", type=int, default=16)
    parser.add_argument("--vfs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--udev-rule", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with DaemonErrors() as errors:
        for _ in range(args.rounds):  # interleaved, so that load on the machine hits both alike
            bare_s = bare(args)
            try:
                timed = asyncio.run(daemon(args))
            except NotConverged as exc:
                errors.errors.append(f"the boot reconcile did not converge: {exc}")
                break
            least = timed["floor_reads"] + timed["floor_views"] + timed["floor_vf_settings"]
            rows.append({"bare_s": bare_s, "daemon_s": timed["converged"], "settled_s": timed["settled"],
                         "ratio": timed["converged"] / bare_s, "settled_ratio": timed["settled"] / bare_s,
                         "floor_s": least, "floor_share": least / bare_s,
                         **{key: timed[key] for key in ("floor_reads", "floor_views", "floor_vf_settings")}})
    if not rows:
        return verdict(errors.errors, False)
    best_bare = min(r["bare_s"] for r in rows)
    result = {
        "pfs": args.pfs, "vfs_per_pf": args.vfs, "rounds": rows, "udev_rule": args.udev_rule,
        "bare_s_median": statistics.median(r["bare_s"] for r in rows),
        "daemon_s_median": statistics.median(r["daemon_s"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "ratio_of_best": min(r["daemon_s"] for r in rows) / best_bare,
        "settled_ratio_median": statistics.median(r["settled_ratio"] for r in rows),
        "settled_ratio_of_best": min(r["settled_s"] for r in rows) / best_bare,
        "goal_ratio": 1.1,  # with the inventory of the new VFs
        "floor_share_median": statistics.median(r["floor_share"] for r in rows),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"boot reconcile, {args.pfs} PFs x {args.vfs} VFs on vfio-pci ({args.pfs * args.vfs} VFs), "
              f"{args.rounds} rounds{' (udev rule on)' if args.udev_rule else ''}")
        for row in rows:
            print(f"  bare loop {row['bare_s'] * 1000:7.1f} ms   daemon {row['daemon_s'] * 1000:7.1f} ms "
                  f"(ratio {row['ratio']:.2f})   with its inventory of the new VFs {row['settled_s'] * 1000:7.1f} ms "
                  f"(ratio {row['settled_ratio']:.2f})")
        print(f"  converged:  median ratio {result['ratio_median']:.2f}, best daemon / best bare "
              f"{result['ratio_of_best']:.2f}")
        print(f"  + inventory: median ratio {result['settled_ratio_median']:.2f}, best / best "
              f"{result['settled_ratio_of_best']:.2f} (goal ≤ {result['goal_ratio']})")
        last = rows[-1]
        print(f"  the least the inventory of {args.pfs * args.vfs} new VFs costs (timed again after the last round): "
              f"{last['floor_s'] * 1000:.1f} ms = {result['floor_share_median']:.0%} of the bare loop (median) — "
              f"one read each {last['floor_reads'] * 1000:.1f}, their views {last['floor_views'] * 1000:.1f}, "
              f"their PFs' VF settings {last['floor_vf_settings'] * 1000:.1f}")
    return verdict(errors.errors, result["settled_ratio_median"] <= result["goal_ratio"])


if __name__ == "__main__":
    sys.exit(main())
