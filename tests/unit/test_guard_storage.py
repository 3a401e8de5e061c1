"""Network storage (nicpassd/host/storage.py): the NIC that reaches an NFS, CIFS or Ceph server,
an iSCSI target, an NVMe/TCP controller or a libvirt pool's server is protected with the mount
point or device as the reason; an umount takes it away within one event; the mount table's own
change notification is seen for real in a mount namespace."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

from nicpassd.engine.config import Config, DaemonSettings, GuardSettings
from nicpassd.host import storage
from nicpassd.host.model import NetStorage
from nicpassd.paths import HostPaths
from nicpassd.sim.topology import Mount, Route

NIC = "0000:af:00.0"
NFS = Mount(fstype="nfs4", source="198.51.100.50:/export/vz", target="/var/lib/vz",
            options="rw,vers=4.2,rsize=1048576,proto=tcp,clientaddr=198.51.100.10,addr=198.51.100.50")



def storage_network(sim) -> None:
    sim.kernel.set_routes([*sim.kernel.topology.routes, Route(dev="enp175s0f0", dst="198.51.100.0/24")])


async def test_an_nfs_mount_protects_the_nic_that_reaches_its_server_until_it_is_unmounted(sim):
    storage_network(sim)
    sim.kernel.set_mounts([NFS])
    await sim.engine.quiesce()
    assert sim.engine.protected.reasons(NIC) == ("NFS server 198.51.100.50 of /var/lib/vz: enp175s0f0",)
    sim.kernel.set_mounts([])
    await sim.engine.quiesce()
    assert NIC not in sim.engine.protected


async def test_storage_can_be_switched_off(make_sim):
    sim = make_sim(config=Config(guard=GuardSettings(storage=False), daemon=DaemonSettings(bind_verify_timeout=0.5)))
    storage_network(sim)
    sim.kernel.set_mounts([NFS])
    await sim.engine.quiesce()
    assert NIC not in sim.engine.protected


def test_every_kind_of_network_storage_is_read(tmp_path):
    paths = HostPaths(tmp_path)
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n"
        "40 22 0:60 / /mnt/pve/nfs rw - nfs 198.51.100.50:/export rw,vers=3,addr=198.51.100.50\n"
        "41 22 0:61 / /mnt/smb\\040share rw - cifs //198.51.100.60/share rw,vers=3.1.1,addr=198.51.100.60\n"
        "42 22 0:62 / /mnt/cephfs rw - ceph 198.51.100.71:6789,198.51.100.72:6789:/ rw,name=admin\n"
        "43 22 0:63 / /mnt/gluster rw - fuse.glusterfs 198.51.100.80:/vol0 rw\n"
        "44 22 0:64 / /mnt/byname rw - nfs4 filer.example:/x rw,addr=198.51.100.90\n"
        "45 22 0:65 / /mnt/unresolved rw - fuse.glusterfs gluster.example:/vol rw\n")
    iscsi = tmp_path / "sys/class/iscsi_connection/connection1:0"
    iscsi.mkdir(parents=True)
    (iscsi / "persistent_address").write_text("198.51.100.100\n")
    nvme = tmp_path / "sys/class/nvme"
    (nvme / "nvme0").mkdir(parents=True)
    (nvme / "nvme0/transport").write_text("pcie\n")
    (nvme / "nvme1").mkdir()
    (nvme / "nvme1/transport").write_text("tcp\n")
    (nvme / "nvme1/address").write_text("traddr=198.51.100.110,trsvcid=4420,src_addr=198.51.100.10\n")
    pools = tmp_path / "etc/libvirt/storage"
    pools.mkdir(parents=True)
    (pools / "isos.xml").write_text("<pool type='netfs'><name>isos</name><source><host name='198.51.100.120'/>"
                                    "<dir path='/isos'/></source></pool>")
    assert storage.read_network_storage(paths) == (
        NetStorage("NFS", "198.51.100.50", "/mnt/pve/nfs"),
        NetStorage("CIFS", "198.51.100.60", "/mnt/smb share"),
        NetStorage("Ceph", "198.51.100.71", "/mnt/cephfs"), NetStorage("Ceph", "198.51.100.72", "/mnt/cephfs"),
        NetStorage("GlusterFS", "198.51.100.80", "/mnt/gluster"),
        NetStorage("NFS", "198.51.100.90", "/mnt/byname"),
        NetStorage("iSCSI", "198.51.100.100", "session 1:0"),
        NetStorage("NVMe-oF", "198.51.100.110", "nvme1"),
        NetStorage("libvirt pool", "198.51.100.120", "isos"),
    )


CHILD = """
import asyncio, os, subprocess, sys
from nicpassd.host.storage import MountEvents
from nicpassd.paths import HostPaths

async def main():
    events = []
    watcher = MountEvents(asyncio.get_running_loop(), events.append, HostPaths())
    await asyncio.sleep(0.1)
    quiet = len(events)
    target = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "none", target], check=True)
    for _ in range(100):
        if events:
            break
        await asyncio.sleep(0.01)
    subprocess.run(["umount", target], check=True)
    watcher.close()
    print(quiet, len(events))

asyncio.run(main())
"""


def test_a_mount_wakes_the_watcher_and_nothing_else_does(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    env = dict(os.environ, PYTHONPATH=str(__import__("support").REPO))
    result = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", CHILD,
                             str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    quiet, after = map(int, result.stdout.split())
    assert (quiet, after >= 1) == (0, True)  # no event while nothing changed (no busy loop), one on mount
