"""Cluster links (nicpassd/host/cluster.py): a Proxmox/corosync cluster's link addresses and
Ceph's public and cluster networks are management prefixes: the NIC carrying them is protected,
with the file and the setting as the reason; [guard] cluster = false switches it off."""

from __future__ import annotations

from nicpassd.engine.config import Config, DaemonSettings, GuardSettings
from nicpassd.host.cluster import read_cluster
from nicpassd.host.model import ClusterPrefix
from nicpassd.sim.topology import Address, Route

NIC = "0000:af:00.0"
COROSYNC = """
logging {
  debug: off
}
nodelist {
  node {
    name: pve1
    nodeid: 1
    quorum_votes: 1
    ring0_addr: 198.51.100.11
    ring1_addr: pve1-backup.example
  }
  node {
    name: pve2
    nodeid: 2
    ring0_addr: 198.51.100.12
  }
}
totem {
  cluster_name: lab
  interface {
    linknumber: 0
  }
  version: 2
}
"""
CEPH = """[global]
fsid = 5d3b0c2e-0000-4000-8000-000000000001
public network = 203.0.113.0/24
cluster_network = 198.51.100.0/24, not-a-network
"""


def cluster_network(sim) -> None:
    sim.kernel.set_addresses([*sim.kernel.topology.addresses, Address(dev="enp175s0f0", address="198.51.100.11/24")])
    sim.kernel.set_routes([*sim.kernel.topology.routes, Route(dev="enp175s0f0", dst="198.51.100.0/24")])


def test_corosync_and_ceph_settings_are_read(tmp_path):
    from nicpassd.paths import HostPaths

    (tmp_path / "etc/pve").mkdir(parents=True)
    (tmp_path / "etc/pve/corosync.conf").write_text(COROSYNC)
    (tmp_path / "etc/ceph").mkdir(parents=True)
    (tmp_path / "etc/ceph/ceph.conf").write_text(CEPH)
    assert read_cluster(HostPaths(tmp_path)) == (
        ClusterPrefix("198.51.100.11/32", "corosync link 0 (ring0_addr 198.51.100.11 in /etc/pve/corosync.conf)"),
        ClusterPrefix("198.51.100.12/32", "corosync link 0 (ring0_addr 198.51.100.12 in /etc/pve/corosync.conf)"),
        ClusterPrefix("203.0.113.0/24", "Ceph public network 203.0.113.0/24 (in /etc/ceph/ceph.conf)"),
        ClusterPrefix("198.51.100.0/24", "Ceph cluster network 198.51.100.0/24 (in /etc/ceph/ceph.conf)"),
    )


async def test_the_nic_of_the_corosync_link_is_protected(sim):
    (sim.paths.root / "etc/pve").mkdir(parents=True)
    (sim.paths.root / "etc/pve/corosync.conf").write_text(COROSYNC)
    cluster_network(sim)
    sim.engine.refresh()
    reasons = sim.engine.protected.reasons(NIC)
    assert "address 198.51.100.11/24 in corosync link 0 (ring0_addr 198.51.100.11 in /etc/pve/corosync.conf): " \
           "enp175s0f0" in reasons
    assert "route 198.51.100.0/24 carries corosync link 0 (ring0_addr 198.51.100.12 in /etc/pve/corosync.conf): " \
           "enp175s0f0" in reasons
    assert not sim.engine.protected.entries[NIC].overridable


async def test_the_ceph_cluster_network_is_protected_unless_switched_off(make_sim):
    for enabled in (True, False):
        sim = make_sim(config=Config(guard=GuardSettings(cluster=enabled), daemon=DaemonSettings(bind_verify_timeout=0.5)))
        (sim.paths.root / "etc/ceph").mkdir(parents=True)
        (sim.paths.root / "etc/ceph/ceph.conf").write_text(CEPH)
        cluster_network(sim)
        sim.engine.refresh()
        expected = ("route 198.51.100.0/24 in Ceph cluster network 198.51.100.0/24 (in /etc/ceph/ceph.conf): "
                    "enp175s0f0") if enabled else None
        assert (sim.engine.protected.reasons(NIC)[0] if NIC in sim.engine.protected else None) == expected


async def test_the_protection_goes_with_the_configuration(sim):
    (sim.paths.root / "etc/pve").mkdir(parents=True)
    (sim.paths.root / "etc/pve/corosync.conf").write_text(COROSYNC)
    cluster_network(sim)
    sim.engine.refresh()
    assert NIC in sim.engine.protected
    (sim.paths.root / "etc/pve/corosync.conf").unlink()  # the node left the cluster
    sim.engine.refresh()
    assert NIC not in sim.engine.protected
