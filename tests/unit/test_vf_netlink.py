"""The VF settings' rtnetlink codec (nicpassd/host/vf_netlink.py): what the simulated kernel answers
goes through the same parser, and the requests reach a real kernel (in a network namespace: a
veth has no VFs, so the kernel answers with its own "no VF list" and EOPNOTSUPP)."""

from __future__ import annotations

import errno
import json
import textwrap

import pytest

from nicpassd.host import vf_netlink as wire
from nicpassd.host.model import VfSettings
from support.netns import run_python


def test_a_link_answer_with_every_setting_round_trips():
    vfs = [VfSettings(0, mac="02:00:00:00:00:01", vlan=10, qos=2, spoofchk=True, trust=False, link_state="disable",
                      min_tx_rate=10, max_tx_rate=100, rss_query=True),
           VfSettings(1, vlan=20, vlan_proto="802.1ad"),
           VfSettings(2)]
    assert wire.parse_link(wire.encode_link("enp1s0", "52:54:00:00:00:01", vfs)) == vfs


def test_an_attribute_shorter_than_the_kernel_sends_is_not_read_past_its_end():
    """A VF info is read in place: a truncated attribute is skipped, never read into the next."""
    trust = wire.encode_attribute(wire.IFLA_VF_TRUST, (4).to_bytes(4, "little") + (1).to_bytes(4, "little"))
    short_vlan = wire.encode_attribute(wire.IFLA_VF_VLAN, (4).to_bytes(4, "little") + (7).to_bytes(4, "little"))
    short_mac = wire.encode_attribute(wire.IFLA_VF_MAC, (4).to_bytes(4, "little") + bytes([2, 0, 0, 0, 0, 9]))
    parsed = wire.parse_vf_info(short_vlan + short_mac + trust)
    assert parsed == VfSettings(-1, trust=True)
    cut = trust + wire.encode_attribute(wire.IFLA_VF_RATE, bytes(12))[:-4]  # its length says 16, 12 are there
    assert wire.parse_vf_info(cut) == VfSettings(-1, trust=True)


def test_each_setting_is_its_own_request_in_the_kernel_s_order_and_carries_what_goes_with_it():
    current = VfSettings(3, vlan=100, qos=5, min_tx_rate=10, max_tx_rate=0)
    change = wire.VfChange(trust=True, max_tx_rate=500, mac="02:00:00:00:00:09", qos=1)
    requests = wire.vf_attributes(3, change, current)
    assert [name for name, _ in requests] == ["mac", "vlan", "rate", "trust"]
    name, attributes = wire.parse_set(wire.encode_set("eth9", requests[1][1]))
    assert name == "eth9" and [kind for kind, _ in attributes] == [wire.IFLA_VF_VLAN]
    assert attributes[0][1][:12] == (3).to_bytes(4, "little") + (100).to_bytes(4, "little") + (1).to_bytes(4, "little")
    _, attributes = wire.parse_set(wire.encode_set("eth9", requests[2][1]))
    assert attributes[0][1] == b"".join(n.to_bytes(4, "little") for n in (3, 10, 500))  # the min rate kept


def test_an_error_answer_carries_the_driver_s_words():
    request = wire.encode_set("eth0", wire.vf_attributes(0, wire.VfChange(trust=True), VfSettings(0))[0][1])
    with pytest.raises(wire.VfNetlinkError) as raised:
        wire.check_ack(wire.encode_error(errno.EOPNOTSUPP, request, "trusted VFs are not supported"))
    assert (raised.value.errno, raised.value.detail) == (errno.EOPNOTSUPP, "trusted VFs are not supported")
    wire.check_ack(wire.encode_error(0, request))  # an ack


CHILD = textwrap.dedent("""
    import errno, json, subprocess
    from nicpassd.host import vf_netlink as wire
    from nicpassd.host.model import VfSettings

    subprocess.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
    got = {"vfs": [vars(vf) for vf in wire.parse_link(wire.exchange(wire.encode_get("v0"), timeout=5))]}
    request = wire.encode_set("v0", wire.vf_attributes(0, wire.VfChange(mac="02:00:00:00:00:01"), VfSettings(0))[0][1])
    try:
        wire.check_ack(wire.exchange(request, timeout=5))
    except wire.VfNetlinkError as exc:
        got["set"] = [exc.errno, exc.detail]
    try:
        wire.parse_link(wire.exchange(wire.encode_get("nosuch0"), timeout=5))
    except wire.VfNetlinkError as exc:
        got["missing"] = errno.errorcode[exc.errno]
    print(json.dumps(got))
""")


def test_the_requests_reach_a_real_kernel(netns):
    result = run_python(netns, CHILD)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["vfs"] == []  # a veth: the kernel's answer has no VF list
    assert got["set"][0] == errno.EOPNOTSUPP  # do_setvfinfo(): no ndo_set_vf_mac
    assert got["missing"] == "ENODEV"
