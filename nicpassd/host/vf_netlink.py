"""SR-IOV VF settings over rtnetlink, stdlib only: what ``ip link show PF`` lists per VF and what
``ip link set PF vf N ...`` changes.

The settings live in the PF's driver, not on the VF: they are read with one ``RTM_GETLINK`` of
the PF (``IFLA_EXT_MASK`` = ``RTEXT_FILTER_VF``, stats skipped) and written with one
``RTM_SETLINK`` of the PF per setting, each carrying ``IFLA_VFINFO_LIST`` → ``IFLA_VF_INFO`` →
one ``IFLA_VF_*`` attribute. One setting per request because the kernel applies the attributes
of one request in turn and stops at the first the driver refuses, leaving the earlier ones
applied (``do_setvfinfo``): a request per setting names the one refused.

The kernel rules encoded here and in ``nicpassd.engine.vf_settings`` (README, "VF settings"):

- the driver decides what it supports; what it does not implement is ``EOPNOTSUPP``; an 802.1ad
  VLAN on a driver that only tags 802.1Q is ``EPROTONOSUPPORT``; a value out of its range
  (VLAN > 4095, QoS > 7, a multicast MAC, a min rate on igb or i40e, a rate while the link is
  down on igb) is ``EINVAL``;
- the PF is named by its interface name (``IFLA_IFNAME``), so no ifindex lookup is needed;
- ``spoofchk``, ``trust`` and ``rss_query`` read back -1 (here: None) when the driver does not
  report them; a VF with no administrative MAC reads back all zeroes (here: "");
- a VF's own host driver (igbvf, iavf, mlx5_core) takes a new administrative MAC when it is
  probed again or its link is reset: nicpassd rebinds a VF on its host driver after a MAC change.

The same encoder and parser serve the simulated kernel, which answers with the bytes the kernel
would (``nicpassd.sim.vf_settings``).
"""

from __future__ import annotations

import errno
import functools
import socket
import struct
from dataclasses import dataclass, fields
from typing import Iterator

from nicpassd.host.model import VfSettings
from nicpassd.host.netlink import (IFINFOMSG, NLM_F_REQUEST, NLMSG_ERROR, NLMSGHDR, RTATTR, _align, encode,
                                   encode_attribute, messages)

RTM_NEWLINK, RTM_GETLINK, RTM_SETLINK = 16, 18, 19
NLM_F_ACK = 0x4
NLA_F_NESTED = 1 << 15
IFLA_ADDRESS, IFLA_IFNAME, IFLA_NUM_VF, IFLA_VFINFO_LIST, IFLA_EXT_MASK = 1, 3, 21, 22, 29
IFLA_VF_INFO = 1
IFLA_VF_MAC, IFLA_VF_VLAN, IFLA_VF_TX_RATE, IFLA_VF_SPOOFCHK, IFLA_VF_LINK_STATE = 1, 2, 3, 4, 5
IFLA_VF_RATE, IFLA_VF_RSS_QUERY_EN, IFLA_VF_STATS, IFLA_VF_TRUST, IFLA_VF_VLAN_LIST = 6, 7, 8, 9, 12
IFLA_VF_VLAN_INFO = 1
RTEXT_FILTER_VF, RTEXT_FILTER_SKIP_STATS = 1, 1 << 3
SOL_NETLINK, NETLINK_EXT_ACK = 270, 11
NLMSGERR_ATTR_MSG = 1
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8
PROTOCOLS = {"802.1Q": ETH_P_8021Q, "802.1ad": ETH_P_8021AD}
PROTOCOL_NAMES = {value: name for name, value in PROTOCOLS.items()}
LINK_STATES = ("auto", "enable", "disable")  # IFLA_VF_LINK_STATE_AUTO, _ENABLE, _DISABLE
UNKNOWN = 0xFFFFFFFF  # a setting the driver does not report (-1 as a __u32)

_U32_PAIR = struct.Struct("=II")
_VLAN = struct.Struct("=III")
_RATE = struct.Struct("=III")
_MAC = struct.Struct("=I32s")
_U32 = struct.Struct("=I")


@dataclass(frozen=True)
class VfChange:
    """What one ``ip link set PF vf N ...`` asks: None = leave that setting as it is."""

    mac: str | None = None
    vlan: int | None = None
    qos: int | None = None
    vlan_proto: str | None = None
    spoofchk: bool | None = None
    trust: bool | None = None
    link_state: str | None = None
    min_tx_rate: int | None = None
    max_tx_rate: int | None = None

    def asked(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


class VfNetlinkError(OSError):
    """The kernel's refusal: errno, and the driver's own words when it gave them (extended ack)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail or errno.errorcode.get(code, str(code)))
        self.detail = detail


# ----------------------------------------------------------------------------------- MACs
def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(part) == 2 for part in parts):
        raise ValueError(f"{text!r} is not a MAC address (six hex pairs separated by colons)")
    return bytes(int(part, 16) for part in parts)


def mac_text(raw: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in raw)


# -------------------------------------------------------------------------------- requests
def _nested(kind: int, payload: bytes) -> bytes:
    return encode_attribute(kind | NLA_F_NESTED, payload)


def _link_request(interface: str, attrs: bytes) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + encode_attribute(IFLA_IFNAME, interface.encode() + b"\0") + attrs


def encode_get(interface: str, seq: int = 0) -> bytes:
    """RTM_GETLINK of the PF with its VF list, without the VFs' counters."""
    mask = encode_attribute(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_VF | RTEXT_FILTER_SKIP_STATS))
    return encode(RTM_GETLINK, NLM_F_REQUEST, _link_request(interface, mask), seq)


# What each request of ``vf_attributes`` sets (its name in messages -> the VfChange fields it carries).
REQUEST_FIELDS = {"mac": ("mac",), "vlan": ("vlan", "qos", "vlan_proto"), "rate": ("min_tx_rate", "max_tx_rate"),
                  "spoofchk": ("spoofchk",), "link state": ("link_state",), "trust": ("trust",)}


def vf_attributes(index: int, change: VfChange, current: VfSettings) -> list[tuple[str, bytes]]:
    """(setting, IFLA_VF_* attribute) per setting ``change`` asks for, in the kernel's order.
    ``current`` fills what one attribute carries besides the setting asked (QoS with the VLAN,
    the other rate)."""
    out: list[tuple[str, bytes]] = []
    if change.mac is not None:
        out.append(("mac", encode_attribute(IFLA_VF_MAC, _MAC.pack(index, mac_bytes(change.mac or "00:00:00:00:00:00")))))
    if change.vlan is not None or change.qos is not None or change.vlan_proto is not None:
        vlan = current.vlan if change.vlan is None else change.vlan
        qos = current.qos if change.qos is None else change.qos
        proto = current.vlan_proto if change.vlan_proto is None else change.vlan_proto
        if proto == "802.1Q":
            out.append(("vlan", encode_attribute(IFLA_VF_VLAN, _VLAN.pack(index, vlan, qos))))
        else:  # only IFLA_VF_VLAN_LIST carries the protocol
            info = _VLAN.pack(index, vlan, qos) + struct.pack("!H", PROTOCOLS[proto]) + b"\0\0"
            out.append(("vlan", _nested(IFLA_VF_VLAN_LIST, encode_attribute(IFLA_VF_VLAN_INFO, info))))
    if change.min_tx_rate is not None or change.max_tx_rate is not None:
        low = current.min_tx_rate if change.min_tx_rate is None else change.min_tx_rate
        high = current.max_tx_rate if change.max_tx_rate is None else change.max_tx_rate
        out.append(("rate", encode_attribute(IFLA_VF_RATE, _RATE.pack(index, low, high))))
    if change.spoofchk is not None:
        out.append(("spoofchk", encode_attribute(IFLA_VF_SPOOFCHK, _U32_PAIR.pack(index, int(change.spoofchk)))))
    if change.link_state is not None:
        state = LINK_STATES.index(change.link_state)
        out.append(("link state", encode_attribute(IFLA_VF_LINK_STATE, _U32_PAIR.pack(index, state))))
    if change.trust is not None:
        out.append(("trust", encode_attribute(IFLA_VF_TRUST, _U32_PAIR.pack(index, int(change.trust)))))
    return out


def encode_set(interface: str, attribute: bytes, seq: int = 0) -> bytes:
    """RTM_SETLINK of the PF with one VF attribute (from ``vf_attributes``)."""
    vfinfo = _nested(IFLA_VFINFO_LIST, _nested(IFLA_VF_INFO, attribute))
    return encode(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, _link_request(interface, vfinfo), seq)


# --------------------------------------------------------------------------------- answers
def attribute_list(payload: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute, repeated types kept (a VF list repeats IFLA_VF_INFO)."""
    while offset + RTATTR.size <= len(payload):
        length, kind = RTATTR.unpack_from(payload, offset)
        if length < RTATTR.size:
            return
        yield kind & 0x3FFF, payload[offset + RTATTR.size:offset + length]
        offset += _align(length)


# The bytes each VF attribute read here holds at least (a MAC: its VF index and 32 address bytes).
_NEEDED = {IFLA_VF_MAC: _MAC.size, IFLA_VF_VLAN: _VLAN.size, IFLA_VF_RATE: _RATE.size, IFLA_VF_SPOOFCHK: 8,
           IFLA_VF_TRUST: 8, IFLA_VF_RSS_QUERY_EN: 8, IFLA_VF_LINK_STATE: 8}


def _setting(value: int) -> bool | None:
    return None if value == UNKNOWN else bool(value)


def parse_vf_info(info: bytes, address_length: int = 6) -> VfSettings:
    """One IFLA_VF_INFO. Read in place (no slice per attribute): a PF's answer holds one per VF,
    and a boot with 1,000 VFs reads them all."""
    found: dict[str, object] = {}
    index = -1
    offset, end = 0, len(info)
    header = RTATTR.unpack_from
    while offset + 4 <= end:
        length, kind = header(info, offset)
        if length < 4:
            break
        kind &= 0x3FFF
        value = offset + 4
        if length - 4 < _NEEDED.get(kind, 0) or offset + length > end:
            pass  # shorter than the kernel sends it: not read past its end
        elif kind == IFLA_VF_MAC:
            index = _U32.unpack_from(info, value)[0]
            mac = info[value + 4:value + 4 + address_length]
            found["mac"] = mac.hex(":") if any(mac) else ""
        elif kind == IFLA_VF_VLAN:
            index, found["vlan"], found["qos"] = _VLAN.unpack_from(info, value)
        elif kind == IFLA_VF_VLAN_LIST:
            for inner_kind, inner in attribute_list(info[value:offset + length]):
                if inner_kind == IFLA_VF_VLAN_INFO and len(inner) >= 14:
                    proto = struct.unpack_from("!H", inner, 12)[0]
                    found["vlan_proto"] = PROTOCOL_NAMES.get(proto, f"0x{proto:04x}")
        elif kind == IFLA_VF_RATE:
            index, found["min_tx_rate"], found["max_tx_rate"] = _RATE.unpack_from(info, value)
        elif kind == IFLA_VF_SPOOFCHK:
            found["spoofchk"] = _setting(_U32_PAIR.unpack_from(info, value)[1])
        elif kind == IFLA_VF_TRUST:
            found["trust"] = _setting(_U32_PAIR.unpack_from(info, value)[1])
        elif kind == IFLA_VF_RSS_QUERY_EN:
            found["rss_query"] = _setting(_U32_PAIR.unpack_from(info, value)[1])
        elif kind == IFLA_VF_LINK_STATE:
            state = _U32_PAIR.unpack_from(info, value)[1]
            found["link_state"] = LINK_STATES[state] if state < len(LINK_STATES) else str(state)
        offset += (length + 3) & ~3
    return VfSettings(index=index, **found)


def parse_link(data: bytes) -> list[VfSettings]:
    """The VF list of an RTM_NEWLINK answer (raises the NLMSG_ERROR's errno)."""
    for kind, _flags, payload in messages(data):
        if kind == NLMSG_ERROR:
            code, detail = parse_error(payload, _flags)
            if code:
                raise VfNetlinkError(code, detail)
        if kind != RTM_NEWLINK:
            continue
        address_length = 6
        settings: list[VfSettings] = []
        for attr, value in attribute_list(payload, IFINFOMSG.size):
            if attr == IFLA_ADDRESS and value:
                address_length = len(value)
            elif attr == IFLA_VFINFO_LIST:
                settings = [parse_vf_info(info, address_length) for vf_kind, info in attribute_list(value)
                            if vf_kind == IFLA_VF_INFO]
        return sorted(settings, key=lambda each: each.index)
    return []


def parse_error(payload: bytes, flags: int) -> tuple[int, str]:
    """(errno, the extended ack's message) of an NLMSG_ERROR payload (errno 0 = acknowledged)."""
    code = -struct.unpack_from("=i", payload)[0]
    detail = ""
    if flags & NLM_F_ACK_TLVS:
        # After the error code: the request's header (and its payload unless capped).
        offset = 4 + NLMSGHDR.size
        if not flags & NLM_F_CAPPED:
            offset = 4 + _align(NLMSGHDR.unpack_from(payload, 4)[0])
        for kind, value in attribute_list(payload, offset):
            if kind == NLMSGERR_ATTR_MSG:
                detail = value.split(b"\0", 1)[0].decode(errors="replace")
    return code, detail


def encode_error(code: int, request: bytes, detail: str = "") -> bytes:
    """The kernel's answer to ``request``: NLMSG_ERROR (code 0 = ack), capped, with a message."""
    flags = NLM_F_CAPPED | (NLM_F_ACK_TLVS if detail else 0)
    payload = struct.pack("=i", -code) + request[:NLMSGHDR.size]
    if detail:
        payload += encode_attribute(NLMSGERR_ATTR_MSG, detail.encode() + b"\0")
    return encode(NLMSG_ERROR, flags, payload, NLMSGHDR.unpack_from(request)[3])


def encode_link(interface: str, mac: str, vfs: list[VfSettings], seq: int = 0) -> bytes:
    """The kernel's RTM_NEWLINK answer for a PF with ``vfs`` (what the simulated kernel says)."""
    payload = (IFINFOMSG.pack(socket.AF_UNSPEC, 1, 0, 0, 0)
               + encode_attribute(IFLA_IFNAME, interface.encode() + b"\0")
               + encode_attribute(IFLA_ADDRESS, mac_bytes(mac or "00:00:00:00:00:00"))
               + encode_attribute(IFLA_NUM_VF, struct.pack("=I", len(vfs)))
               + _nested(IFLA_VFINFO_LIST, b"".join(_vf_info(vf) for vf in vfs)))
    return encode(RTM_NEWLINK, 0, payload, seq)


@functools.lru_cache(maxsize=8192)
def _vf_info(vf: VfSettings) -> bytes:
    """One VF's IFLA_VF_INFO, kept while its settings are the same: the simulated kernel answers
    every read of a PF with all its VFs, where the kernel's C costs next to nothing."""
    proto = PROTOCOLS.get(vf.vlan_proto, ETH_P_8021Q)
    inner = (encode_attribute(IFLA_VF_MAC, _MAC.pack(vf.index, mac_bytes(vf.mac or "00:00:00:00:00:00")))
             + encode_attribute(IFLA_VF_VLAN, _VLAN.pack(vf.index, vf.vlan, vf.qos))
             + _nested(IFLA_VF_VLAN_LIST, encode_attribute(
                 IFLA_VF_VLAN_INFO, _VLAN.pack(vf.index, vf.vlan, vf.qos) + struct.pack("!H", proto) + b"\0\0"))
             + encode_attribute(IFLA_VF_TX_RATE, _U32_PAIR.pack(vf.index, vf.max_tx_rate))
             + encode_attribute(IFLA_VF_RATE, _RATE.pack(vf.index, vf.min_tx_rate, vf.max_tx_rate))
             + encode_attribute(IFLA_VF_SPOOFCHK, _U32_PAIR.pack(vf.index, _u32(vf.spoofchk)))
             + encode_attribute(IFLA_VF_LINK_STATE, _U32_PAIR.pack(vf.index, LINK_STATES.index(vf.link_state)))
             + encode_attribute(IFLA_VF_RSS_QUERY_EN, _U32_PAIR.pack(vf.index, _u32(vf.rss_query)))
             + encode_attribute(IFLA_VF_TRUST, _U32_PAIR.pack(vf.index, _u32(vf.trust))))
    return _nested(IFLA_VF_INFO, inner)


def _u32(setting: bool | None) -> int:
    return UNKNOWN if setting is None else int(setting)


def parse_get(request: bytes) -> str:
    """The PF interface an RTM_GETLINK from ``encode_get`` names."""
    for kind, _flags, payload in messages(request):
        if kind == RTM_GETLINK:
            for attr, value in attribute_list(payload, IFINFOMSG.size):
                if attr == IFLA_IFNAME:
                    return value.split(b"\0", 1)[0].decode()
    raise ValueError("not an RTM_GETLINK request naming an interface")


def parse_set(request: bytes) -> tuple[str, list[tuple[int, bytes]]]:
    """(PF interface, [(IFLA_VF_* type, value)]) of an RTM_SETLINK from ``encode_set`` (for the
    simulated kernel, which must read exactly what the kernel would)."""
    for kind, _flags, payload in messages(request):
        if kind != RTM_SETLINK:
            continue
        name, found = "", []
        for attr, value in attribute_list(payload, IFINFOMSG.size):
            if attr == IFLA_IFNAME:
                name = value.split(b"\0", 1)[0].decode()
            elif attr == IFLA_VFINFO_LIST:
                for info_kind, info in attribute_list(value):
                    if info_kind == IFLA_VF_INFO:
                        found.extend(attribute_list(info))
        return name, found
    raise ValueError("not an RTM_SETLINK request")


# ------------------------------------------------------------------------------ the socket
def exchange(request: bytes, *, timeout: float) -> bytes:
    """Send one request on a fresh rtnetlink socket (extended acks on); return the answer."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.sendto(request, (0, 0))
        return sock.recv(1 << 20)


def check_ack(answer: bytes) -> None:
    for kind, flags, payload in messages(answer):
        if kind == NLMSG_ERROR:
            code, detail = parse_error(payload, flags)
            if code:
                raise VfNetlinkError(code, detail)
            return
    raise VfNetlinkError(errno.EPROTO, "no acknowledgement from the kernel")
