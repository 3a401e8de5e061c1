"""Network storage the host depends on: NFS, CIFS, Ceph and GlusterFS mounts, iSCSI sessions,
NVMe over TCP/RDMA controllers, and libvirt storage pools on network servers. Losing the NIC
that reaches their servers hangs every VM on the host, so the guard protects it.

Read-only, standard library only: the mount table (/proc/self/mountinfo: the kernel writes the
server's address as ``addr=`` for NFS and CIFS), /sys/class/iscsi_connection,
/sys/class/nvme and /etc/libvirt/storage. Only servers given as addresses are followed (a name
would need DNS, which the daemon does not do behind the admin's back). A change of the mount
table wakes ``MountEvents`` (mountinfo is pollable: the kernel flags it on every mount and
umount), so a mount that goes stops protecting within that event.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import select
from pathlib import Path

from nicpassd.host.events import UEvent, UEventCallback
from nicpassd.host.model import NetStorage
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = {"nfs": "NFS", "nfs4": "NFS", "cifs": "CIFS", "smb3": "CIFS", "ceph": "Ceph",
                       "fuse.glusterfs": "GlusterFS", "glusterfs": "GlusterFS", "fuse.ceph": "Ceph"}
POOL_HOST = re.compile(r"<host\s+name=['\"]([^'\"]+)['\"]")
POOL_NAME = re.compile(r"<name>([^<]+)</name>")


def _literal(text: str) -> str:
    """``text`` as an IP address ("" for a host name, or anything else)."""
    text = text.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _servers_of_mount(fstype: str, source: str, options: str) -> list[str]:
    found = [_literal(option[5:]) for option in options.split(",") if option.startswith("addr=")]
    found += [_literal(part) for option in options.split(",") if option.startswith("mon_addr=")
              for part in re.split(r"[/,]", option[9:])]
    if fstype in ("ceph", "fuse.ceph") and ":/" in source:
        for monitor in source.split(":/", 1)[0].split(","):
            host = monitor.rsplit(":", 1)[0] if monitor.count(":") == 1 or monitor.startswith("[") else monitor
            found.append(_literal(host))
    elif ":" in source and not found:
        found.append(_literal(source.split(":/", 1)[0] if ":/" in source else source.rsplit(":", 1)[0]))
    elif source.startswith("//") and not found:
        found.append(_literal(source[2:].split("/", 1)[0]))
    return [server for server in dict.fromkeys(found) if server]


def read_mounts(paths: HostPaths) -> list[NetStorage]:
    found = []
    for line in _read(paths.under("/proc/self/mountinfo")).splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        fstype, source, options = rest[0], _unescape(rest[1]), rest[2]
        kind = NETWORK_FILESYSTEMS.get(fstype)
        if kind is None:
            continue
        target = _unescape(fields[4])
        found += [NetStorage(kind, server, target) for server in _servers_of_mount(fstype, source, options)]
    return found


def read_block_transports(paths: HostPaths) -> list[NetStorage]:
    found = []
    iscsi = paths.under("/sys/class/iscsi_connection")
    for entry in sorted(os.listdir(iscsi)) if iscsi.is_dir() else ():
        server = _literal(_read(iscsi / entry / "persistent_address") or _read(iscsi / entry / "address"))
        if server:
            found.append(NetStorage("iSCSI", server, f"session {entry.removeprefix('connection')}"))
    nvme = paths.under("/sys/class/nvme")
    for entry in sorted(os.listdir(nvme)) if nvme.is_dir() else ():
        if _read(nvme / entry / "transport") not in ("tcp", "rdma"):
            continue
        fields = dict(part.split("=", 1) for part in _read(nvme / entry / "address").split(",") if "=" in part)
        server = _literal(fields.get("traddr", ""))
        if server:
            found.append(NetStorage("NVMe-oF", server, entry))
    return found


def read_libvirt_pools(paths: HostPaths) -> list[NetStorage]:
    found = []
    directory = paths.under("/etc/libvirt/storage")
    for name in sorted(os.listdir(directory)) if directory.is_dir() else ():
        if not name.endswith(".xml"):
            continue
        text = _read(directory / name)
        pool = (POOL_NAME.search(text) or re.match("(.*)", name.removesuffix(".xml"))).group(1)
        for host in POOL_HOST.findall(text):
            server = _literal(host)
            if server:
                found.append(NetStorage("libvirt pool", server, pool))
    return found


def read_network_storage(paths: HostPaths) -> tuple[NetStorage, ...]:
    return tuple(dict.fromkeys([*read_mounts(paths), *read_block_transports(paths), *read_libvirt_pools(paths)]))


class MountEvents:
    """Mount table changes as ``UEvent("change", "route", "")``: the kernel flags an open
    /proc/self/mountinfo (POLLPRI|POLLERR) on every mount and umount. The file is always
    readable, so it is watched through an epoll of its own registered for EPOLLPRI only (as
    libmount does), and that epoll's fd is what the event loop waits on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: UEventCallback, paths: HostPaths) -> None:
        self.loop = loop
        self.callback = callback
        self.fd = os.open(paths.under("/proc/self/mountinfo"), os.O_RDONLY | os.O_CLOEXEC)
        self._consume()
        self.epoll = select.epoll()
        self.epoll.register(self.fd, select.EPOLLPRI)
        loop.add_reader(self.epoll.fileno(), self._changed)

    def _consume(self) -> None:
        os.lseek(self.fd, 0, os.SEEK_SET)
        while os.read(self.fd, 1 << 16):
            pass

    def _changed(self) -> None:
        # The outer loop's readiness check already consumed the kernel's flag (mounts_poll clears
        # it as it reports it), so the wakeup itself is the news; the inner epoll is level-
        # triggered and is not ready again until the next change.
        self.epoll.poll(0)
        self._consume()
        self.callback(UEvent("change", "route", ""))

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
        os.close(self.fd)
