"""How long the guard takes to recompute the protected set of a big host (goal: < 20 ms; with
every source of the management path — sessions, policy routing, ECMP, tunnels, network storage,
cluster links — beside the plain host in the same run: goal < 5 ms).

The host: 16 SR-IOV PFs x 63 VFs = 1,024 PCI functions, PFs paired in IOMMU groups, every PF pair
bonded, the first bond under a bridge with the default routes, a VLAN and a macvlan on each other
bond, one address per VF netdev (1,008 ways in for the last-way-in rule), management prefixes, a
root disk controller. ``compute_protected`` is timed on a synthetic snapshot (the guard alone);
``read_snapshot`` is timed on the simulated kernel with the same 1,024 functions (informational:
it is what a refresh reads before the guard runs).

Run: .venv/bin/python bench/bench_guard.py [--runs N] [--no-snapshot]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nicpassd.engine.config import GuardSettings  # noqa: E402
from nicpassd.engine.guard import compute_protected  # noqa: E402
import dataclasses  # noqa: E402

from nicpassd.host.model import (ClusterPrefix, HostSnapshot, IfAddress, NetLink, NetStorage, PciFunction,  # noqa: E402
                                 RootStorage, Route, Rule, Session, Tunnel)

PFS, VFS_PER_PF = 16, 63
SETTINGS = GuardSettings(management_prefixes=("10.0.0.0/8", "2001:db8:ffff::/48"),
                         management_interfaces=("bond1.100",), never_touch=("8086:1521",))


def pf_address(i: int) -> str:
    return f"0000:{0x20 + i:02x}:00.0"


def vf_address(i: int, j: int) -> str:
    return f"0000:{0x20 + i:02x}:{1 + j // 8:02x}.{j % 8}"


def synthetic_host() -> HostSnapshot:
    functions: dict[str, PciFunction] = {}
    groups: dict[int, tuple[str, ...]] = {}
    links: dict[str, NetLink] = {}
    addresses: list[IfAddress] = []
    group = 100
    for i in range(PFS):
        pf = pf_address(i)
        vfs = tuple(vf_address(i, j) for j in range(VFS_PER_PF))
        pf_group = 10 + i // 2  # PF pairs share a group (a dual-port card without ACS)
        groups[pf_group] = tuple(sorted((*groups.get(pf_group, ()), pf)))
        functions[pf] = PciFunction(pf, "8086", "1572", "8086", "0006", "020000", driver="i40e",
                                    iommu_group=pf_group, interfaces=(f"pf{i}",), virtfns=vfs, total_vfs=VFS_PER_PF,
                                    num_vfs=VFS_PER_PF, sriov_capable=True)
        links[f"pf{i}"] = NetLink(f"pf{i}", "physical", pf, uppers=(f"bond{i // 2}",), carrier=True)
        for j, vf in enumerate(vfs):
            groups[group] = (vf,)
            name = f"pf{i}v{j}"
            functions[vf] = PciFunction(vf, "8086", "154c", "8086", "0006", "020000", driver="iavf",
                                        iommu_group=group, interfaces=(name,), physfn=pf)
            links[name] = NetLink(name, "physical", vf, carrier=True)
            addresses.append(IfAddress(4, f"172.16.{i}.{j + 1}/24", name))
            group += 1
    for b in range(PFS // 2):
        lowers = (f"pf{2 * b}", f"pf{2 * b + 1}")
        uppers = ("br0",) if b == 0 else (f"bond{b}.100",)
        links[f"bond{b}"] = NetLink(f"bond{b}", "bond", lowers=lowers, uppers=uppers, carrier=True)
        if b:
            links[f"bond{b}.100"] = NetLink(f"bond{b}.100", "vlan", lowers=(f"bond{b}",), uppers=(f"mv{b}",), carrier=True)
            links[f"mv{b}"] = NetLink(f"mv{b}", "macvlan", lowers=(f"bond{b}.100",), carrier=True)
            addresses.append(IfAddress(4, f"10.{b}.0.1/16", f"mv{b}"))
    links["br0"] = NetLink("br0", "bridge", lowers=("bond0",), carrier=True)
    addresses += [IfAddress(4, "192.0.2.10/24", "br0"), IfAddress(6, "2001:db8::10/64", "br0")]
    routes = (Route(4, "0.0.0.0/0", "br0", "192.0.2.1"), Route(6, "::/0", "br0", "fe80::1"),
              Route(4, "192.0.2.0/24", "br0"), *(Route(4, f"172.16.{i}.0/24", f"pf{i}v0") for i in range(PFS)))
    functions["0000:00:17.0"] = PciFunction("0000:00:17.0", "8086", "a352", "15d9", "1c48", "010601", driver="ahci",
                                            iommu_group=5)
    groups[5] = ("0000:00:17.0",)
    return HostSnapshot(functions=functions, groups=groups, links=links, routes=routes, addresses=tuple(addresses),
                        root_storage=(RootStorage("0000:00:17.0", ("/ on /dev/sda2", "sda2", "sda")),))


def with_sources(snapshot: HostSnapshot) -> HostSnapshot:
    """The same host with every other source of the management path in use: an ECMP default
    route over br0 and bond1.100, a management uplink in a policy-routing table, a WireGuard
    tunnel over bond2.100, 1,000 established TCP sessions (50 of them SSH), 20 NFS mounts, an
    iSCSI target, corosync links and Ceph networks."""
    links = dict(snapshot.links)
    links["wg0"] = NetLink("wg0", "wireguard", carrier=True)
    routes = [r for r in snapshot.routes if not (r.is_default and r.family == 4)]
    routes += [Route(4, "0.0.0.0/0", "br0", "192.0.2.1"), Route(4, "0.0.0.0/0", "bond1.100", "10.1.0.254"),
               Route(4, "0.0.0.0/0", "mv3", "10.3.0.254", 100), Route(4, "10.99.0.0/16", "wg0"),
               Route(4, "203.0.113.5/32", "bond2.100", "10.2.0.254"), Route(4, "10.1.0.0/16", "mv1"),
               Route(4, "10.2.0.0/16", "mv2"), Route(4, "10.3.0.0/16", "mv3")]
    rules = (Rule(4, 0, 255), Rule(4, 1000, 100, "from 10.3.0.0/16"), Rule(4, 32766, 254), Rule(4, 32767, 253))
    sessions = tuple(Session("192.0.2.10", 22 if n < 50 else 443, f"198.51.{100 + n % 100}.{n // 100 + 1}", 40000 + n)
                     for n in range(1000))
    storage = (*(NetStorage("NFS", f"10.1.0.{n + 10}", f"/mnt/pve/nfs{n}") for n in range(20)),
               NetStorage("iSCSI", "10.2.0.50", "session 1:0"))
    cluster = (ClusterPrefix("10.4.0.1/32", "corosync link 0"), ClusterPrefix("10.4.0.2/32", "corosync link 0"),
               ClusterPrefix("10.5.0.0/16", "Ceph cluster network"))
    return dataclasses.replace(snapshot, links=links, routes=tuple(routes), rules=rules, sessions=sessions,
                               tunnels={"wg0": Tunnel("wg0", "wireguard", ("203.0.113.5",))},
                               network_storage=storage, cluster=cluster)


SOURCES_SETTINGS = GuardSettings(management_prefixes=("10.0.0.0/8", "2001:db8:ffff::/48"),
                                 management_interfaces=("bond1.100", "wg0"), never_touch=("8086:1521",))


def measure(fn, runs: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return sorted(samples)


def report(name: str, samples: list[float]) -> None:
    p95 = samples[max(0, int(len(samples) * 0.95) - 1)]
    print(f"{name:44s} n={len(samples):4d} median={statistics.median(samples):8.2f} ms  p95={p95:8.2f} ms  "
          f"max={samples[-1]:8.2f} ms")


def simulated_host(root: Path):
    from nicpassd.paths import HostPaths
    from nicpassd.sim.kernel import SimKernel
    from nicpassd.sim.topology import Topology

    functions = [{"address": pf_address(i), "vendor": "8086", "device": "1572", "driver": "i40e",
                  "netdev": f"pf{i}", "iommu_group": 10 + i // 2, "sriov_totalvfs": VFS_PER_PF,
                  "vf_device": "154c", "vf_driver": "iavf", "vf_offset": 8, "vf_stride": 1} for i in range(PFS)]
    links = [{"name": f"bond{b}", "kind": "bond", "lowers": [f"pf{2 * b}", f"pf{2 * b + 1}"]} for b in range(PFS // 2)]
    links.append({"name": "br0", "kind": "bridge", "lowers": ["bond0"]})
    topology = Topology.model_validate({
        "functions": functions, "links": links,
        "addresses": [{"dev": "br0", "address": "192.0.2.10/24"}, {"dev": "br0", "address": "2001:db8::10/64"}],
        "routes": [{"dev": "br0", "gateway": "192.0.2.1"}, {"dev": "br0", "gateway": "fe80::1", "family": 6}]})
    paths = HostPaths(root)
    kernel = SimKernel(paths, topology)
    for i in range(PFS):
        kernel.write(paths.pci_device(pf_address(i)) / "sriov_numvfs", str(VFS_PER_PF))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--no-snapshot", action="store_true", help="skip the simulated read_snapshot timing")
    args = parser.parse_args()
    snapshot = synthetic_host()
    result = compute_protected(snapshot, SETTINGS)
    print(f"synthetic host: {len(snapshot.functions)} PCI functions ({PFS} PFs x {VFS_PER_PF} VFs + SATA), "
          f"{len(snapshot.links)} links, {len(snapshot.addresses)} addresses; {len(result.entries)} protected")
    samples = measure(lambda: compute_protected(snapshot, SETTINGS), args.runs)
    report("compute_protected (1,024 functions)", samples)
    from nicpassd.engine import guard

    def cold() -> None:
        for cached in (guard._ip, guard._net, guard._reaches_host, guard._parsed_addresses, guard._routes_by_table):
            cached.cache_clear()  # every address and prefix parsed anew, as on the first refresh
        compute_protected(snapshot, SETTINGS)

    report("compute_protected, address parse cache cold", measure(cold, args.runs))
    print(f"goal < 20 ms (median): {'met' if statistics.median(samples) < 20 else 'NOT met'}")
    sourced = with_sources(snapshot)
    result = compute_protected(sourced, SOURCES_SETTINGS)
    kinds = sorted({kind for entry in result.entries.values() for kind in entry.kinds})
    with_all = measure(lambda: compute_protected(sourced, SOURCES_SETTINGS), args.runs)
    report("compute_protected with every source", with_all)
    print(f"  {len(result.entries)} protected; reason kinds: {', '.join(kinds)}")
    ratio = statistics.median(with_all) / statistics.median(samples)
    print(f"goal < 5 ms (median) with every source: {'met' if statistics.median(with_all) < 5 else 'NOT met'} "
          f"({ratio:.2f}x the plain host in this run)")
    if args.no_snapshot:
        return
    from nicpassd.host import sysfs

    with tempfile.TemporaryDirectory(prefix="nicpassd-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        start = time.perf_counter()
        paths = simulated_host(Path(tmp))
        built = time.perf_counter() - start
        snap = sysfs.read_snapshot(paths)
        print(f"simulated host: {len(snap.functions)} PCI functions, built in {built:.1f} s")
        report("read_snapshot on the simulator (informational)", measure(lambda: sysfs.read_snapshot(paths), 20, 2))
        report("read_snapshot + compute_protected", measure(
            lambda: compute_protected(sysfs.read_snapshot(paths), SETTINGS), 20, 2))


if __name__ == "__main__":
    main()
