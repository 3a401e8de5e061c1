"""The simulated PF drivers' VF settings: what ``ip link set PF vf N ...`` reaches (rtnetlink).

Each PF driver implements some of the ``ndo_set_vf_*`` callbacks and refuses the rest; the
table follows Linux 6.1's igb, i40e, ixgbe, ice and mlx5_core (the e2e guest's igb is the one
held to the real kernel by the conformance tests). The simulated kernel answers rtnetlink
requests with the same bytes as the kernel (``nicpassd.host.vf_netlink``).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, replace

from nicpassd.host import vf_netlink as wire
from nicpassd.host.model import VfSettings


@dataclass(frozen=True)
class DriverSupport:
    """What one PF driver does with each VF setting."""

    mac: bool = True
    vlan: bool = True
    protocols: tuple[str, ...] = ("802.1Q",)
    spoofchk: bool = True
    trust: bool = True
    link_state: bool = True
    max_rate: bool = True
    min_rate: bool = False  # asked anyway: EINVAL ("min tx rate not supported")
    rate_needs_link: bool = False  # igb: a rate only at 1 Gbit/s link speed
    rss_query: bool = False
    default_spoofchk: bool = True
    pf_must_be_up: bool = False  # igb: the VF's mailbox (its MAC at probe) is served only while the PF is up


DRIVERS = {
    "igb": DriverSupport(link_state=False, rate_needs_link=True, pf_must_be_up=True),
    "i40e": DriverSupport(),
    "ixgbe": DriverSupport(rss_query=True),
    "ice": DriverSupport(),
    "mlx5_core": DriverSupport(protocols=("802.1Q", "802.1ad"), min_rate=True, default_spoofchk=False),
}
NO_SUPPORT = DriverSupport(mac=False, vlan=False, spoofchk=False, trust=False, link_state=False, max_rate=False)


def vf_reaches_pf(driver: str, pf_up: bool) -> bool:
    """Does a probing VF get its administrative MAC from its PF's driver?"""
    return pf_up or not DRIVERS.get(driver, NO_SUPPORT).pf_must_be_up


def defaults(driver: str, count: int) -> list[VfSettings]:
    """A PF driver's VFs as sriov_numvfs creates them: no MAC, no VLAN, spoof check as the driver
    defaults it, not trusted."""
    support = DRIVERS.get(driver, NO_SUPPORT)
    return [VfSettings(index, spoofchk=support.default_spoofchk if support.spoofchk else None,
                       trust=False if support.trust else None, rss_query=False if support.rss_query else None)
            for index in range(count)]


class Refused(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def apply(driver: str, vfs: list[VfSettings], attribute: int, value: bytes, *, link_up: bool) -> None:
    """One IFLA_VF_* attribute into ``vfs`` (in place), as ``do_setvfinfo`` and the driver would."""
    support = DRIVERS.get(driver, NO_SUPPORT)
    index = struct.unpack_from("=I", value)[0] if attribute != wire.IFLA_VF_VLAN_LIST else \
        struct.unpack_from("=I", value, 4)[0]
    if index >= len(vfs):
        raise Refused(errno.EINVAL, f"VF {index} does not exist")
    vf = vfs[index]
    if attribute == wire.IFLA_VF_MAC:
        _require(support.mac, driver, "a VF MAC")
        raw = value[4:10]
        if raw[0] & 1:
            raise Refused(errno.EINVAL, "invalid Ethernet address (multicast)")
        vfs[index] = replace(vf, mac="" if not any(raw) else wire.mac_text(raw))
    elif attribute in (wire.IFLA_VF_VLAN, wire.IFLA_VF_VLAN_LIST):
        _require(support.vlan, driver, "a VF VLAN")
        if attribute == wire.IFLA_VF_VLAN:
            _, vlan, qos = struct.unpack_from("=III", value)
            proto = "802.1Q"
        else:
            _, vlan, qos = struct.unpack_from("=III", value, 4)
            proto = wire.PROTOCOL_NAMES.get(struct.unpack_from("!H", value, 16)[0], "?")
        if vlan > 4095 or qos > 7:
            raise Refused(errno.EINVAL, "VLAN id above 4095 or QoS above 7")
        if proto not in support.protocols:
            raise Refused(errno.EPROTONOSUPPORT, f"{driver} tags VF traffic with 802.1Q only")
        vfs[index] = replace(vf, vlan=vlan, qos=qos if vlan else 0, vlan_proto=proto)
    elif attribute == wire.IFLA_VF_RATE:
        _require(support.max_rate, driver, "VF rate limits")
        _, low, high = struct.unpack_from("=III", value)
        if low and not support.min_rate:
            raise Refused(errno.EINVAL, f"{driver} has no minimum TX rate for VFs")
        if high and low > high:
            raise Refused(errno.EINVAL, "the minimum TX rate is above the maximum")
        if support.rate_needs_link and high and not link_up:
            raise Refused(errno.EINVAL, "a VF rate limit needs the PF's link up at 1000 Mbps")
        vfs[index] = replace(vf, min_tx_rate=low, max_tx_rate=high)
    elif attribute == wire.IFLA_VF_SPOOFCHK:
        _require(support.spoofchk, driver, "VF spoof checking")
        vfs[index] = replace(vf, spoofchk=bool(struct.unpack_from("=II", value)[1]))
    elif attribute == wire.IFLA_VF_TRUST:
        _require(support.trust, driver, "trusted VFs")
        vfs[index] = replace(vf, trust=bool(struct.unpack_from("=II", value)[1]))
    elif attribute == wire.IFLA_VF_LINK_STATE:
        _require(support.link_state, driver, "a VF link state")
        state = struct.unpack_from("=II", value)[1]
        if state >= len(wire.LINK_STATES):
            raise Refused(errno.EINVAL, f"link state {state} is not auto, enable or disable")
        vfs[index] = replace(vf, link_state=wire.LINK_STATES[state])
    else:
        raise Refused(errno.EOPNOTSUPP, f"VF attribute {attribute} is not supported by {driver}")


def _require(supported: bool, driver: str, what: str) -> None:
    if not supported:
        raise Refused(errno.EOPNOTSUPP, f"{driver or 'the PF driver'} does not support {what}")
