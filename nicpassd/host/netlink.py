"""rtnetlink, stdlib only: interface addresses (RTM_GETADDR dump) and change events.

Two things the guard needs from the kernel's networking that sysfs and procfs do not give:

- the IPv4 addresses of each interface (procfs has no per-interface IPv4 list; IPv6 addresses come
  from ``/proc/net/if_inet6``, read by ``sysfs.read_addresses``);
- a push notification whenever a route, an address or a link changes, so that the protected set
  is recomputed at once rather than by polling.

``AddressSource`` is what the host reader asks for addresses. Production uses
``NetlinkAddressSource`` (a raw ``AF_NETLINK``/``NETLINK_ROUTE`` socket, one dump per snapshot);
the simulated kernel writes the bytes the kernel would answer a dump with into its root
(``SIM_DUMP``), and ``SimulatedAddressSource`` feeds those bytes to the same parser. The event
side is ``RtnlEvents``: a socket bound to the link, address and route multicast groups, read with
``loop.add_reader`` (no thread, no polling); each message becomes
``UEvent("change", "route", <interface>)`` for ``engine.on_uevent``.

Why not pyroute2: this is ~200 lines of struct packing over a stable ABI, the daemon needs only
two message types, and the libvirt hook/CLI never import it; pyroute2 would add a large
dependency (and its own threads/sockets model) for no behaviour we need.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Callable, Iterator, Protocol

from nicpassd.host.events import UEvent, UEventCallback
from nicpassd.host.model import IfAddress
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWRULE, RTM_DELRULE = 32, 33
RTM_NEWNEXTHOP, RTM_DELNEXTHOP = 104, 105
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_FLAGS = 1, 2, 3, 8
IFLA_IFNAME = 3
RTA_OIF = 4
# Legacy multicast group bits for bind(): RTMGRP_LINK, _IPV4_IFADDR, _IPV4_ROUTE, _IPV6_IFADDR, _IPV6_ROUTE.
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
RTMGRP_IPV4_RULE, RTMGRP_IPV6_RULE = 0x80, 1 << (19 - 1)  # RTNLGRP_IPV4_RULE 8, RTNLGRP_IPV6_RULE 19
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
          | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE)
RTNLGRP_NEXTHOP = 32  # past the 32 bits of bind(): joined with NETLINK_ADD_MEMBERSHIP
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
IFA_F_DADFAILED = 0x08

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTATTR = struct.Struct("=HH")  # len, type
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
VERSIONS = {socket.AF_INET: 4, socket.AF_INET6: 6}
RECEIVE_BUFFER = 4 * 1024 * 1024

# Where the simulated kernel keeps its answer to an RTM_GETADDR dump (the simulated netlink).
SIM_DUMP = "/proc/net/.nicpassd-rtnl-getaddr"


class NetlinkError(OSError):
    pass


def _align(length: int) -> int:
    return (length + 3) & ~3


# ------------------------------------------------------------------------------ wire format
def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, payload) of each netlink message in ``data``."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        yield kind, flags, data[offset + NLMSGHDR.size:offset + length]
        offset += _align(length)


def attributes(payload: bytes, offset: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while offset + RTATTR.size <= len(payload):
        length, kind = RTATTR.unpack_from(payload, offset)
        if length < RTATTR.size:
            break
        found[kind & 0x3FFF] = payload[offset + RTATTR.size:offset + length]  # strip NLA_F_ flags
        offset += _align(length)
    return found


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def parse_address(payload: bytes, index_to_name: Callable[[int], str]) -> IfAddress | None:
    """One RTM_NEWADDR payload; None for a family we do not track or a failed address."""
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(payload)
    version = VERSIONS.get(family)
    if version is None:
        return None
    attrs = attributes(payload, IFADDRMSG.size)
    if IFA_FLAGS in attrs:
        flags = struct.unpack("=I", attrs[IFA_FLAGS][:4])[0]
    if flags & IFA_F_DADFAILED:
        return None
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)  # IFA_LOCAL: ours; IFA_ADDRESS: the peer on ptp
    if raw is None:
        return None
    name = _text(attrs[IFA_LABEL]) if IFA_LABEL in attrs else index_to_name(index)
    if version == 4:
        name = name.split(":", 1)[0]  # "eth0:1" labels are aliases of eth0
    return IfAddress(version, f"{socket.inet_ntop(family, raw)}/{prefixlen}", name, scope)


def encode(kind: int, flags: int, payload: bytes, seq: int = 0) -> bytes:
    data = NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload
    return data + b"\0" * (_align(len(data)) - len(data))


def encode_attribute(kind: int, value: bytes) -> bytes:
    data = RTATTR.pack(RTATTR.size + len(value), kind) + value
    return data + b"\0" * (_align(len(data)) - len(data))


def encode_address(address: IfAddress, index: int, *, kind: int = RTM_NEWADDR, flags: int = NLM_F_MULTI) -> bytes:
    """The RTM_NEWADDR message the kernel sends for ``address`` (simulator and tests)."""
    interface = ipaddress.ip_interface(address.address)
    family = FAMILIES[address.family]
    payload = IFADDRMSG.pack(family, interface.network.prefixlen, 0, address.scope, index)
    payload += encode_attribute(IFA_ADDRESS, interface.ip.packed)
    if address.family == 4:
        payload += encode_attribute(IFA_LOCAL, interface.ip.packed)
        payload += encode_attribute(IFA_LABEL, address.dev.encode() + b"\0")
    return encode(kind, flags, payload)


def encode_dump(addresses: list[tuple[IfAddress, int]]) -> bytes:
    """A whole RTM_GETADDR dump answer: one RTM_NEWADDR per (address, ifindex), then NLMSG_DONE."""
    return b"".join(encode_address(address, index) for address, index in addresses) + encode(
        NLMSG_DONE, NLM_F_MULTI, struct.pack("=i", 0))


# -------------------------------------------------------------------------- address sources
class AddressSource(Protocol):
    def addresses(self, family: int) -> list[IfAddress]:
        """Every address of ``family`` (4 or 6) on every interface."""


def _index_to_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"if{index}"


def _open(groups: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


_sequence = itertools.count(1)


def dump(kind: int, payload: bytes, *, timeout: float = 5.0) -> bytes:
    """Send one dump request on a fresh socket; return every answer up to NLMSG_DONE."""
    seq = next(_sequence) & 0xFFFFFFFF
    with _open() as sock:
        sock.settimeout(timeout)
        sock.sendto(encode(kind, NLM_F_REQUEST | NLM_F_DUMP, payload, seq), (0, 0))
        chunks: list[bytes] = []
        while True:
            data = sock.recv(65536)
            chunks.append(data)
            for kind_, _flags, body in messages(data):
                if kind_ == NLMSG_DONE:
                    return b"".join(chunks)
                if kind_ == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise NetlinkError(code, f"netlink dump failed: {os.strerror(code)}")


class NetlinkAddressSource:
    """Production: ``ip -family addr show`` as an RTM_GETADDR dump."""

    def addresses(self, family: int) -> list[IfAddress]:
        data = dump(RTM_GETADDR, IFADDRMSG.pack(FAMILIES[family], 0, 0, 0, 0))
        return _parse_dump(data, family, _index_to_name)


class SimulatedAddressSource:
    """The simulated kernel's dump answer (``SIM_DUMP`` under the root), through the same parser."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def addresses(self, family: int) -> list[IfAddress]:
        try:
            data = self.path.read_bytes()
        except OSError:
            return []
        return _parse_dump(data, family, lambda index: f"if{index}")


class NoAddressSource:
    """A root that is neither this host nor a simulated one (a copied tree): no netlink to ask."""

    def addresses(self, family: int) -> list[IfAddress]:
        return []


def _parse_dump(data: bytes, family: int, index_to_name: Callable[[int], str]) -> list[IfAddress]:
    found = []
    for kind, _flags, payload in messages(data):
        if kind == RTM_NEWADDR and len(payload) >= IFADDRMSG.size:
            address = parse_address(payload, index_to_name)
            if address is not None and address.family == family:
                found.append(address)
    return found


def address_source_for(paths: HostPaths) -> AddressSource:
    """The simulated netlink when the root holds one, the kernel's for ``/``, else nothing."""
    simulated = paths.under(SIM_DUMP)
    if simulated.exists():
        return SimulatedAddressSource(simulated)
    if paths.root.resolve() == Path("/"):
        return NetlinkAddressSource()
    return NoAddressSource()


# ----------------------------------------------------------------------------------- events
def describe(kind: int, payload: bytes) -> str:
    """The interface a route/address/link message is about ("" when it names none)."""
    try:
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            attrs = attributes(payload, IFINFOMSG.size)
            if IFLA_IFNAME in attrs:
                return _text(attrs[IFLA_IFNAME])
            return _index_to_name(IFINFOMSG.unpack_from(payload)[2])
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            attrs = attributes(payload, IFADDRMSG.size)
            if IFA_LABEL in attrs:
                return _text(attrs[IFA_LABEL]).split(":", 1)[0]
            return _index_to_name(IFADDRMSG.unpack_from(payload)[4])
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            attrs = attributes(payload, RTMSG.size)
            if RTA_OIF in attrs:
                return _index_to_name(struct.unpack("=I", attrs[RTA_OIF][:4])[0])
    except (struct.error, IndexError):
        pass
    return ""


WATCHED = {RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE,
           RTM_NEWNEXTHOP, RTM_DELNEXTHOP}


class RtnlEvents:
    """Route, rule, nexthop, address and link changes from the kernel, on the asyncio loop.

    Each message becomes ``UEvent("change", "route", interface)``; the engine coalesces a burst
    into one refresh. A receive-buffer overrun (``ENOBUFS``: events were lost) is reported as one
    event too, since the refresh re-reads everything anyway.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: UEventCallback, *, groups: int = GROUPS) -> None:
        self.loop = loop
        self.callback = callback
        self.sock = _open(groups)
        self.sock.setblocking(False)
        try:  # nexthop objects (kernel 5.3+): their group is past what bind() can name
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_NEXTHOP)
        except OSError as exc:
            log.info("no netlink events for nexthop objects (%s)", exc)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError as exc:
            log.warning("could not enlarge the netlink receive buffer: %s", exc)
        loop.add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("netlink events were lost (receive buffer overrun); re-reading the host")
                    self.callback(UEvent("change", "route", ""))
                    continue
                log.error("netlink event socket failed: %s", exc)
                return
            for kind, _flags, payload in messages(data):
                if kind in WATCHED:
                    self.callback(UEvent("change", "route", describe(kind, payload)))

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
