"""The management NIC is refused (exit 3), also behind a bridge, a bond or a VLAN.

The guest agent talks over virtio-serial, not the network, so these scenarios may rebuild the
management network; each restores networkd's configuration afterwards (reset.sh checks it too).
"""

from __future__ import annotations

import time

import pytest

from .conftest import MGMT

pytestmark = pytest.mark.e2e

# Move enp1s0's address and default route onto an upper device; networkd is stopped meanwhile so
# that it does not put them back on enp1s0.
STACKS = {
    "bridge": """
        ip link add br-mgmt type bridge
        ip link set enp1s0 master br-mgmt
        ip link set br-mgmt up
        ip addr add 10.0.2.15/24 dev br-mgmt
        ip route replace default via 10.0.2.2 dev br-mgmt
    """,
    "bond": """
        ip link add bond-mgmt type bond mode active-backup
        ip link set enp1s0 down
        ip link set enp1s0 master bond-mgmt
        ip link set bond-mgmt up
        ip addr add 10.0.2.15/24 dev bond-mgmt
        ip route replace default via 10.0.2.2 dev bond-mgmt
    """,
    "vlan": """
        ip link add link enp1s0 name mgmt.42 type vlan id 42
        ip link set mgmt.42 up
        ip addr add 10.0.42.15/24 dev mgmt.42
        ip route replace default via 10.0.42.1 dev mgmt.42
    """,
    "bond+bridge+vlan": """
        ip link add bond-mgmt type bond mode active-backup
        ip link set enp1s0 down
        ip link set enp1s0 master bond-mgmt
        ip link set bond-mgmt up
        ip link add link bond-mgmt name bond-mgmt.7 type vlan id 7
        ip link add br-mgmt type bridge
        ip link set bond-mgmt.7 master br-mgmt
        ip link set bond-mgmt.7 up
        ip link set br-mgmt up
        ip addr add 10.0.7.15/24 dev br-mgmt
        ip route replace default via 10.0.7.1 dev br-mgmt
    """,
}

TEARDOWN = """
    ip route del default 2>/dev/null || true
    for l in mgmt.42 bond-mgmt.7 br-mgmt bond-mgmt; do ip link del $l 2>/dev/null || true; done
    ip link set enp1s0 nomaster 2>/dev/null || true
    ip addr flush dev enp1s0
    systemctl restart systemd-networkd
    for _ in $(seq 100); do ip route | grep -q '^default via 10.0.2.2 dev enp1s0' && exit 0; sleep 0.2; done
    echo "networkd did not restore the management route" >&2; exit 1
"""


def assert_refused(g, *args):
    result = g.ctl(*args)
    assert result.returncode == 3, f"nicpassctl {' '.join(args)}: exit {result.returncode}, {result.stderr}"
    assert result.stderr.strip(), "a refusal must say why"
    return result


def assert_mgmt_untouched(g):
    fn = g.fn(MGMT)
    assert fn["driver"] == "virtio-pci" and fn["driver_override"] == "(null)", fn


def test_management_nic_refused(g):
    assert_refused(g, "bind", MGMT, "--driver", "vfio-pci")
    assert_refused(g, "bind", "enp1s0", "--driver", "vfio-pci")
    assert_refused(g, "bind", "01:00.0", "--driver", "vfio-pci")
    assert_mgmt_untouched(g)
    assert g.state()["default_route_devs"] == ["enp1s0"]
    result = g.run(["nicpassctl", "prepare", "vm-x", "8a1e1b6e-7d6a-4f0e-9a57-5d3b8e1f0c11", MGMT])
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert_mgmt_untouched(g)


@pytest.mark.parametrize("stack", list(STACKS))
def test_management_nic_refused_when_stacked(g, stack):
    g.sh("systemctl stop systemd-networkd.socket systemd-networkd\n"
         "ip addr flush dev enp1s0\n" + STACKS[stack])
    try:
        routes = g.state()["default_route_devs"]
        assert routes and "enp1s0" not in routes, routes
        # the daemon learns about links and routes from events; give it a moment
        deadline = time.monotonic() + 20
        while True:
            result = g.ctl("bind", MGMT, "--driver", "vfio-pci")
            if result.returncode == 3 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert result.returncode == 3, (f"{stack}: the management NIC under {routes} was not refused: "
                                        f"exit {result.returncode} {result.stderr}")
        assert_mgmt_untouched(g)
        guard = {entry["address"]: entry for entry in g.ctl_json("guard")}
        assert MGMT in guard, guard
    finally:
        g.sh(TEARDOWN)
    assert g.state()["default_route_devs"] == ["enp1s0"]
