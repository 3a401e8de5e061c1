"""Cluster links the host cannot lose: a Proxmox/corosync cluster's link addresses and Ceph's
public and cluster networks. Passing that NIC through costs quorum, and the node fences itself.

Read-only parses of /etc/pve/corosync.conf (else /etc/corosync/corosync.conf: every ``ringN_addr``
and ``linkN_addr`` of every node) and /etc/ceph/ceph.conf (``public_network``,
``cluster_network``; spaces, dashes and underscores alike in keys). Each becomes a management
prefix of the guard with its source as the reason. Standard library only.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from nicpassd.host.model import ClusterPrefix
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)

COROSYNC = ("/etc/pve/corosync.conf", "/etc/corosync/corosync.conf")
CEPH = "/etc/ceph/ceph.conf"
RING_ADDRESS = re.compile(r"^\s*(ring|link)(\d+)_addr\s*:\s*(\S+)\s*$", re.M)
CEPH_NETWORK = re.compile(r"^\s*(public|cluster)[ _-]network\s*=\s*(.+?)\s*$", re.M | re.I)


def _host_prefix(text: str) -> str:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return ""  # a host name: resolving it is not the daemon's to do
    return str(ipaddress.ip_network(address))


def read_cluster(paths: HostPaths) -> tuple[ClusterPrefix, ...]:
    found: list[ClusterPrefix] = []
    for name in COROSYNC:
        try:
            text = paths.under(name).read_text(errors="replace")
        except OSError:
            continue
        for kind, number, value in RING_ADDRESS.findall(text):
            prefix = _host_prefix(value)
            if prefix:
                found.append(ClusterPrefix(prefix, f"corosync link {number} ({kind}{number}_addr {value} in {name})"))
        break  # /etc/pve's copy wins where both are present
    try:
        text = paths.under(CEPH).read_text(errors="replace")
    except OSError:
        text = ""
    for kind, value in CEPH_NETWORK.findall(text):
        for item in value.split(","):
            try:
                prefix = str(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                log.warning("%s: %s_network %r is not a network; not protected", CEPH, kind.lower(), item.strip())
                continue
            found.append(ClusterPrefix(prefix, f"Ceph {kind.lower()} network {prefix} (in {CEPH})"))
    return tuple(dict.fromkeys(found))
