"""The recorder: a recorded host, simulated again, reads back like the original."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nicpassd.daemon import main
from nicpassd.host.sysfs import read_snapshot
from nicpassd.paths import HostPaths
from nicpassd.sim.kernel import SimKernel
from nicpassd.sim.recorder import record, record_to
from nicpassd.sim.topology import Address, Topology, load_topology, parse_topology

STACKED = """
description = "vlan and macvlan on a plain NIC; IPv6-only default route"
[[functions]]
address = "0000:02:00.0"
vendor = "8086"
device = "10fb"
driver = "ixgbe"
netdev = "enp2s0"
mac = "00:1b:21:00:02:00"
carrier = false
sriov_totalvfs = 8
vf_device = "10ed"
vf_driver = "ixgbevf"
vf_offset = 128
vf_stride = 2

[[links]]
name = "enp2s0.100"
kind = "vlan"
lowers = ["enp2s0"]
mac = "00:1b:21:00:02:00"

[[links]]
name = "mv0"
kind = "macvlan"
lowers = ["enp2s0.100"]
mac = "02:00:00:00:00:42"

[[routes]]
dev = "mv0"
gateway = "fe80::1"
family = 6

[[routes]]
dev = "enp2s0.100"
dst = "2001:db8:100::/64"
"""


def _normalized(paths: HostPaths):
    """What the daemon sees, with IOMMU group numbers replaced by group membership.

    Only the groups of inventoried functions count, and loaded drivers are left out: functions
    in no NIC's group (a SATA controller) are not recorded, nor are their drivers.
    """
    snapshot = read_snapshot(paths)
    functions = {a: dataclasses.replace(fn, iommu_group=0) for a, fn in snapshot.functions.items()}
    groups = {frozenset(members) for members in snapshot.groups.values() if functions.keys() & set(members)}
    return functions, groups, snapshot.links, snapshot.routes, snapshot.iommu_present, snapshot.cmdline


def _round_trip(tmp_path: Path, topology: Topology) -> tuple[SimKernel, Topology]:
    first = SimKernel(HostPaths(tmp_path / "a"), topology)
    recorded = record(first.paths)
    SimKernel(HostPaths(tmp_path / "b"), recorded)
    assert _normalized(HostPaths(tmp_path / "b")) == _normalized(first.paths)
    return first, recorded


def test_default_host_round_trips(tmp_path, capsys):
    topology = load_topology()
    kernel, recorded = _round_trip(tmp_path, topology)
    # The whole topology comes back, bar the non-network function in no NIC's group (ahci).
    assert {fn.address for fn in recorded.functions} == {fn.address for fn in topology.functions} - {"0000:00:17.0"}
    assert recorded.links == topology.links
    assert parse_topology(json.dumps(recorded.model_dump(by_alias=True)), json_format=True) == recorded

    # With VFs enabled, the PF is recorded (not its VFs) and the VF driver comes from a VF.
    kernel.write(kernel.paths.pci_device("0000:3b:00.0") / "sriov_numvfs", "4")
    after = record(kernel.paths)
    assert {fn.address for fn in after.functions} == {fn.address for fn in recorded.functions}
    pf = next(fn for fn in after.functions if fn.address == "0000:3b:00.0")
    assert (pf.sriov_totalvfs, pf.vf_device, pf.vf_driver, pf.vf_offset) == (64, "154c", "iavf", 16)
    assert record_to(kernel.paths, "-") == 0
    captured = capsys.readouterr()
    assert parse_topology(captured.out, json_format=True) == after
    assert "nicpassd: note: 4 VFs not recorded" in captured.err


def test_stacked_links_and_ipv6_default_round_trip(tmp_path):
    topology = parse_topology(STACKED)
    _, recorded = _round_trip(tmp_path, topology)
    assert recorded.links == topology.links  # lowers first, vlan_id unknown (no /proc/net/vlan)
    assert recorded.routes == topology.routes
    assert not recorded.functions[0].carrier

    # And through a TOML file.
    target = tmp_path / "stacked.toml"
    assert record_to(HostPaths(tmp_path / "a"), str(target)) == 0
    assert load_topology(target) == recorded


def test_host_driver_of_a_vfio_bound_function_and_vf_driver_from_modules_alias(tmp_path):
    kernel = SimKernel(HostPaths(tmp_path), parse_topology(STACKED))
    # The simulator writes no modules.alias: give the recorder one, as a real host has.
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.1.0-test\n")  # the simulator wrote its own
    alias = tmp_path / "lib/modules/6.1.0-test/modules.alias"
    alias.parent.mkdir(parents=True)
    alias.write_text("alias pci:v00008086d000010FBsv*sd*bc*sc*i* ixgbe\n"
                     "alias pci:v00008086d000010EDsv*sd*bc*sc*i* ixgbevf\n"
                     "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n")
    pf = "0000:02:00.0"
    kernel.load_module("vfio-pci")
    kernel.write(kernel.paths.pci_device(pf) / "driver_override", "vfio-pci")
    kernel.write(kernel.paths.pci_drivers / "ixgbe/unbind", pf)
    kernel.write(kernel.paths.drivers_probe, pf)
    assert os.readlink(kernel.paths.pci_device(pf) / "driver").endswith("vfio-pci")
    recorded = record(kernel.paths).functions[0]
    assert (recorded.driver, recorded.bound, recorded.vf_driver) == ("ixgbe", True, "ixgbevf")

    alias.write_text("")  # unknown: the function boots unbound, its VFs bind nothing
    recorded = record(kernel.paths).functions[0]
    assert (recorded.driver, recorded.vf_driver) == ("", "")


def test_addresses_from_if_inet6_and_fib_trie(tmp_path):
    kernel = SimKernel(HostPaths(tmp_path), load_topology())
    proc_net = kernel.paths.proc_net
    # The simulator writes neither file: these are what a kernel shows for the default host.
    (proc_net / "if_inet6").write_text(
        "20010db8000000000000000000000010 09 40 00 80      br0\n"
        "fe800000000000000000000000000001 09 40 20 80      br0\n"  # link-local: the kernel's own
        "20010db80000000000000000000000aa 09 40 00 01      br0\n"  # temporary (privacy)
        "00000000000000000000000000000001 01 80 10 80       lo\n"
    )
    (proc_net / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
        "     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\n"
        "     +-- 192.0.2.0/24 2 0 2\n        |-- 192.0.2.0\n           /24 link UNICAST\n"
        "        |-- 192.0.2.10\n           /32 host LOCAL\n"
        "        |-- 192.0.2.255\n           /32 link BROADCAST\n"
        "     |-- 198.51.100.7\n        /32 host LOCAL\n"  # no connected route: dropped
    )
    assert record(kernel.paths).addresses == (
        Address(dev="br0", address="2001:db8::10/64"), Address(dev="br0", address="192.0.2.10/24"))


def test_records_this_machine_read_only():
    # Read-only by construction (the recorder only opens, lists and readlinks): this checks that
    # whatever this machine has (a virtio NIC, perhaps no PCI NIC at all) makes a valid topology.
    topology = record(HostPaths(Path("/")))
    assert Topology.model_validate(topology.model_dump(by_alias=True)) == topology
    env = {k: v for k, v in os.environ.items() if k != "NICPASSD_ROOT"}
    result = subprocess.run([sys.executable, "-m", "nicpassd", "--record-topology", "-"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    parse_topology(result.stdout, json_format=True)


def test_cli_writes_a_file_that_simulate_accepts(tmp_path, capsys):
    SimKernel(HostPaths(tmp_path / "root"), load_topology())
    out = tmp_path / "out.json"
    assert main(["--record-topology", str(out), "--root", str(tmp_path / "root")]) == 0
    assert load_topology(out).functions

    # Errors: one sentence on stderr, exit 1.
    assert main(["--record-topology", str(out), "--root", str(tmp_path / "nothing")]) == 1
    assert main(["--record-topology", str(tmp_path / "no/dir/out.json"), "--root", str(tmp_path / "root")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line for line in errors if "note:" not in line] == [
        f"nicpassd: cannot record the topology of {tmp_path / 'nothing'}: "
        f"{tmp_path / 'nothing/sys/bus/pci/devices'} does not exist (is the root directory right?)",
        f"nicpassd: cannot write {tmp_path / 'no/dir/out.json'}: No such file or directory",
    ]


@pytest.mark.parametrize("name", ["lo", "veth0"])
def test_unrecorded_lowers_drop_a_vlan_but_not_a_bridge(tmp_path, name):
    topology = parse_topology(STACKED)
    kernel = SimKernel(HostPaths(tmp_path), topology)
    net = kernel.paths.sys / "devices/virtual/net"
    # A bridge with the NIC and a veth port, and a vlan on the veth (veth: no DEVTYPE, no lowers).
    (net / name).mkdir()
    (net / name / "type").write_text("772\n" if name == "lo" else "1\n")
    (kernel.paths.class_net / name).symlink_to(f"../../devices/virtual/net/{name}")
    for upper, kind in (("br9", "bridge"), (f"{name}.5", "vlan")):
        (net / upper).mkdir()
        (net / upper / "uevent").write_text(f"DEVTYPE={kind}\n")
        (net / upper / f"lower_{name}").symlink_to(f"../{name}")
        (kernel.paths.class_net / upper).symlink_to(f"../../devices/virtual/net/{upper}")
    (net / "br9/lower_enp2s0").symlink_to("../../../pci0000:00/0000:02:00.0/net/enp2s0")
    links = {link.name: link for link in record(kernel.paths).links}
    assert links["br9"].lowers == ("enp2s0",)
    assert name not in links and f"{name}.5" not in links


GUARD_SOURCES = """
[[functions]]
address = "0000:af:00.0"
vendor = "8086"
device = "10d3"
driver = "e1000e"
netdev = "enp175s0f0"
iommu_group = 40

[[links]]
name = "wg0"
kind = "wireguard"
remotes = ["203.0.113.5"]

[[routes]]
dev = "enp175s0f0"
dst = "203.0.113.5/32"
gateway = "192.0.2.1"

[[routes]]
dev = "wg0"
dst = "default"
table = 100

[[rules]]
priority = 1000
table = 100
source = "198.51.100.0/24"

[[mounts]]
fstype = "nfs4"
source = "192.0.2.50:/vz"
target = "/var/lib/vz"
options = "rw,addr=192.0.2.50"
"""


def test_the_guards_sources_are_recorded(tmp_path):
    """Tunnels, policy-routing tables and rules, network mounts: what the guard reads is recorded."""
    topology = parse_topology(GUARD_SOURCES)
    _, recorded = _round_trip(tmp_path, topology)
    assert recorded.links == tuple(link.model_copy(update={"mac": recorded.links[0].mac}) for link in topology.links)
    assert {(r.dev, r.prefix, r.table) for r in recorded.routes} == {(r.dev, r.prefix, r.table) for r in topology.routes}
    assert recorded.rules == topology.rules and recorded.mounts == topology.mounts
