"""Established TCP sessions to this host, over sock_diag (NETLINK_SOCK_DIAG), not by parsing
``ss``: the guard protects the interface the admin's own SSH (or web console) session arrives on.

``read_sessions`` dumps the established TCP sockets of both families (inet_diag, the interface
``ss`` uses) and returns (local address, local port, peer address, peer port). The kernel
announces closed sessions on the SKNLGRP_INET(6)_TCP_DESTROY multicast groups (``SessionEvents``),
so a closed session stops protecting at once; a new one is read at the next refresh, and every
change nicpassd makes refreshes before it asks the guard. Standard library only.

The simulated kernel writes the dump answer into its root (``SIM_DUMP``); a copied tree has none.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from pathlib import Path

from nicpassd.host.events import UEvent, UEventCallback
from nicpassd.host.model import Session
from nicpassd.host.netlink import NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, encode, messages
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCP_ESTABLISHED = 1
# sock_diag multicast groups (enum sknetlink_groups), as bind() bits: 1 << (group - 1)
SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY = 1, 3
DESTROY_GROUPS = (1 << (SKNLGRP_INET_TCP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_TCP_DESTROY - 1))
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states (then the sockid)
INET_DIAG_SOCKID = struct.Struct(">HH16s16sI8s")  # sport, dport (network order), src, dst, if, cookie
INET_DIAG_MSG = struct.Struct("=BBBB")  # family, state, timer, retrans (then the sockid, 5 u32)
SIM_DUMP = "/proc/net/.nicpassd-sockdiag-tcp"


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


def parse(data: bytes) -> list[Session]:
    found = []
    for kind, _flags, payload in messages(data):
        if kind != SOCK_DIAG_BY_FAMILY or len(payload) < INET_DIAG_MSG.size + INET_DIAG_SOCKID.size:
            continue
        family, state, _timer, _retrans = INET_DIAG_MSG.unpack_from(payload)
        if state != TCP_ESTABLISHED or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        sport, dport, src, dst, _if, _cookie = INET_DIAG_SOCKID.unpack_from(payload, INET_DIAG_MSG.size)
        local, peer = _address(family, src), _address(family, dst)
        if family == socket.AF_INET6:  # an IPv4 client of a dual-stack listener: ::ffff:a.b.c.d
            local, peer = (str(ipaddress.ip_address(a).ipv4_mapped or a) for a in (local, peer))
        found.append(Session(local, sport, peer, dport))
    return found


def encode_session(session: Session) -> bytes:
    """The inet_diag_msg the kernel sends for ``session`` (the simulator and tests)."""
    family = socket.AF_INET6 if ":" in session.local else socket.AF_INET
    local = ipaddress.ip_address(session.local).packed.ljust(16, b"\0")
    peer = ipaddress.ip_address(session.peer).packed.ljust(16, b"\0")
    payload = INET_DIAG_MSG.pack(family, TCP_ESTABLISHED, 0, 0)
    payload += INET_DIAG_SOCKID.pack(session.local_port, session.peer_port, local, peer, 0, b"\0" * 8)
    payload += struct.pack("=IIIII", 0, 0, 0, 0, 0)  # expires, rqueue, wqueue, uid, inode
    return encode(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, payload)


def encode_dump(sessions: list[Session]) -> bytes:
    return b"".join(encode_session(s) for s in sessions) + encode(NLMSG_DONE, NLM_F_MULTI, struct.pack("=i", 0))


def _dump_family(family: int) -> bytes:
    request = INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED)
    request += INET_DIAG_SOCKID.pack(0, 0, b"\0" * 16, b"\0" * 16, 0, b"\xff" * 8)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5.0)
        sock.sendto(encode(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, request), (0, 0))
        chunks = []
        while True:
            data = sock.recv(1 << 16)
            chunks.append(data)
            for kind, _flags, body in messages(data):
                if kind == NLMSG_DONE:
                    return b"".join(chunks)
                if kind == NLMSG_ERROR and struct.unpack_from("=i", body)[0]:
                    code = -struct.unpack_from("=i", body)[0]
                    raise OSError(code, f"sock_diag dump failed: {errno.errorcode.get(code, code)}")


def read_sessions(paths: HostPaths) -> tuple[Session, ...]:
    simulated = paths.under(SIM_DUMP)
    if simulated.exists():
        try:
            return tuple(parse(simulated.read_bytes()))
        except OSError:
            return ()
    if paths.root.resolve() != Path("/"):
        return ()
    try:
        data = _dump_family(socket.AF_INET) + _dump_family(socket.AF_INET6)
    except OSError as exc:
        log.warning("cannot list the established TCP sessions over sock_diag: %s", exc)
        return ()
    return tuple(dict.fromkeys(parse(data)))


class SessionEvents:
    """Closed TCP sessions (SKNLGRP_INET(6)_TCP_DESTROY) as ``UEvent("change", "route", "")``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: UEventCallback) -> None:
        self.loop = loop
        self.callback = callback
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        try:
            self.sock.bind((0, DESTROY_GROUPS))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        closed = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                closed = closed or exc.errno == errno.ENOBUFS
                if exc.errno != errno.ENOBUFS:
                    log.error("sock_diag event socket failed: %s", exc)
                    break
                continue
            closed = closed or any(kind == SOCK_DIAG_BY_FAMILY for kind, _f, _p in messages(data))
        if closed:
            self.callback(UEvent("change", "route", ""))

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
