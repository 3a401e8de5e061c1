"""Tunnels and their underlay, over netlink: what a management network carried by WireGuard,
VXLAN, GENEVE, GRE, IPIP/SIT or VTI depends on. Standard library only.

For each tunnel interface: its kind, the remote endpoint(s), the local address and the lower
device it is bound to (``dev``), from the link info of an RTM_GETLINK dump, and for WireGuard
the endpoint of every peer (generic netlink, WG_CMD_GET_DEVICE). The guard walks from a protected
tunnel to the device given by ``dev``, else to the interface of the route to each remote.

The simulated kernel writes its tunnels as JSON into its root (``SIM_TUNNELS``); a copied tree
has none.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path

from nicpassd.host.model import Tunnel
from nicpassd.host.netlink import IFINFOMSG, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attributes, dump, \
    encode, encode_attribute, messages
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)

RTM_NEWLINK, RTM_GETLINK = 16, 18
IFLA_IFNAME, IFLA_LINKINFO = 3, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
# Per kind: (remote attribute(s), local attribute, lower-device attribute) in IFLA_INFO_DATA.
KINDS = {
    "vxlan": ((2, 16), (4, 17), 3),  # IFLA_VXLAN_GROUP/_GROUP6, _LOCAL/_LOCAL6, _LINK
    "geneve": ((2, 7), (), 0),  # IFLA_GENEVE_REMOTE/_REMOTE6
    "gre": ((7,), (6,), 1), "gretap": ((7,), (6,), 1),  # IFLA_GRE_REMOTE, _LOCAL, _LINK
    "ip6gre": ((7,), (6,), 1), "ip6gretap": ((7,), (6,), 1),
    "ipip": ((3,), (2,), 1), "sit": ((3,), (2,), 1), "ip6tnl": ((3,), (2,), 1),  # IFLA_IPTUN_*
    "vti": ((4,), (3,), 1), "vti6": ((4,), (3,), 1),  # IFLA_VTI_REMOTE, _LOCAL, _LINK
    "xfrm": ((), (), 1),  # IFLA_XFRM_LINK
}
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2
WG_CMD_GET_DEVICE, WGDEVICE_A_IFNAME, WGDEVICE_A_PEERS, WGPEER_A_ENDPOINT = 0, 2, 8, 4
NETLINK_GENERIC = 16
GENLMSGHDR = struct.Struct("=BBH")
SIM_TUNNELS = "/proc/net/.nicpassd-tunnels.json"


def _ip(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""


def parse_links(data: bytes, index_to_name) -> dict[str, Tunnel]:
    tunnels = {}
    for kind, _flags, payload in messages(data):
        if kind != RTM_NEWLINK or len(payload) < IFINFOMSG.size:
            continue
        attrs = attributes(payload, IFINFOMSG.size)
        if IFLA_IFNAME not in attrs or IFLA_LINKINFO not in attrs:
            continue
        name = attrs[IFLA_IFNAME].split(b"\0", 1)[0].decode(errors="replace")
        info = attributes(attrs[IFLA_LINKINFO], 0)
        link_kind = info.get(IFLA_INFO_KIND, b"").split(b"\0", 1)[0].decode(errors="replace")
        if link_kind == "wireguard":
            tunnels[name] = Tunnel(name, link_kind)
            continue
        if link_kind not in KINDS:
            continue
        data_attrs = attributes(info.get(IFLA_INFO_DATA, b""), 0)
        remote_ids, local_ids, link_id = KINDS[link_kind]
        remotes = tuple(r for r in (_ip(data_attrs[i]) for i in remote_ids if i in data_attrs)
                        if r and r not in ("0.0.0.0", "::"))
        local = next((_ip(data_attrs[i]) for i in local_ids if i in data_attrs), "")
        index = struct.unpack_from("=I", data_attrs[link_id])[0] if link_id and link_id in data_attrs else 0
        tunnels[name] = Tunnel(name, link_kind, remotes, "" if local in ("0.0.0.0", "::") else local,
                               index_to_name(index) if index else "")
    return tunnels


def _genl_request(sock: socket.socket, family: int, command: int, attrs: bytes, flags: int) -> list[bytes]:
    sock.sendto(encode(family, NLM_F_REQUEST | flags, GENLMSGHDR.pack(command, 1, 0) + attrs), (0, 0))
    replies = []
    while True:
        data = sock.recv(1 << 16)
        done = not (flags & NLM_F_DUMP)
        for kind, _f, body in messages(data):
            if kind == NLMSG_DONE:
                return replies
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", body)[0]
                if code:
                    raise OSError(code, "generic netlink request failed")
                return replies
            if kind == family:
                replies.append(body[GENLMSGHDR.size:])
        if done and replies:
            return replies


def _sockaddr_ip(raw: bytes) -> str:
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return ""


def wireguard_endpoints(names: list[str]) -> dict[str, tuple[str, ...]]:
    """The peer endpoints of each WireGuard interface (generic netlink family "wireguard")."""
    found: dict[str, tuple[str, ...]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        [reply] = _genl_request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                                encode_attribute(CTRL_ATTR_FAMILY_NAME, b"wireguard\0"), 0)
        family = struct.unpack_from("=H", attributes(reply, 0)[CTRL_ATTR_FAMILY_ID])[0]
        for name in names:
            endpoints = []
            for body in _genl_request(sock, family, WG_CMD_GET_DEVICE,
                                      encode_attribute(WGDEVICE_A_IFNAME, name.encode() + b"\0"), NLM_F_DUMP):
                peers = attributes(body, 0).get(WGDEVICE_A_PEERS, b"")
                offset = 0
                while offset + 4 <= len(peers):  # a nested list: one nested attribute per peer
                    length = struct.unpack_from("=H", peers, offset)[0]
                    if length < 4:
                        break
                    peer = attributes(peers[offset + 4:offset + length], 0)
                    if WGPEER_A_ENDPOINT in peer:
                        address = _sockaddr_ip(peer[WGPEER_A_ENDPOINT])
                        if address:
                            endpoints.append(address)
                    offset += (length + 3) & ~3
            found[name] = tuple(dict.fromkeys(endpoints))
    return found


def read_tunnels(paths: HostPaths) -> dict[str, Tunnel]:
    simulated = paths.under(SIM_TUNNELS)
    if simulated.exists():
        try:
            items = json.loads(simulated.read_text())
        except (OSError, ValueError):
            return {}
        return {item["name"]: Tunnel(item["name"], item["kind"], tuple(item.get("remotes", ())), item.get("local", ""),
                                     item.get("dev", "")) for item in items}
    if paths.root.resolve() != Path("/"):
        return {}

    def index_to_name(index: int) -> str:
        try:
            return socket.if_indextoname(index)
        except OSError:
            return ""

    try:
        tunnels = parse_links(dump(RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0)), index_to_name)
    except OSError as exc:
        log.warning("cannot read the tunnels' link info over netlink: %s", exc)
        return {}
    wireguard = [name for name, tunnel in tunnels.items() if tunnel.kind == "wireguard"]
    if wireguard:
        try:
            for name, endpoints in wireguard_endpoints(wireguard).items():
                tunnels[name] = Tunnel(name, "wireguard", endpoints)
        except (OSError, KeyError, ValueError, struct.error) as exc:
            log.warning("cannot read the WireGuard peers' endpoints: %s", exc)
    return tunnels
