"""A hot-unplugged and re-plugged igb gets its persisted VFs back (QMP device_del/device_add)."""

from __future__ import annotations

import time

import pytest

from .conftest import HOTPLUG_BDF, SESSION_NOTES

pytestmark = pytest.mark.e2e

HP_ID, HP_NET, HP_PORT, HP_MAC = "hp-igb", "net-hp-igb", "rp-hp0", "52:54:00:00:0a:01"


@pytest.fixture
def hotplug(g):
    plugged = []

    def plug():
        g.vm.device_add(HP_ID, "igb", HP_PORT, HP_NET, HP_MAC)
        plugged.append(True)
        return g.wait(lambda s: s["functions"].get(HOTPLUG_BDF, {}).get("driver") == "igb"
                      and s["functions"][HOTPLUG_BDF]["net"], 60, what="the hot-plugged igb")

    def unplug():
        seconds = g.vm.device_del(HP_ID)
        plugged.clear()
        return seconds

    yield plug, unplug
    if plugged:
        g.vm.device_del(HP_ID)


def test_replugged_igb_gets_its_vfs_back(g, hotplug):
    plug, unplug = hotplug
    state = plug()
    assert state["functions"][HOTPLUG_BDF]["sriov_totalvfs"] == 7
    g.wait_daemon()
    # the daemon saw the new card
    for _ in range(20):
        listed = {d["address"] for d in g.ctl_json("list")}
        if HOTPLUG_BDF in listed:
            break
        time.sleep(1)
    assert HOTPLUG_BDF in listed, "nicpassd did not notice the hot-plugged igb"
    result = g.ctl("vfs", HOTPLUG_BDF, "2", "--vfio")
    assert result.returncode == 0, result.stderr
    assert g.fn(HOTPLUG_BDF)["sriov_numvfs"] == 2

    seconds = unplug()
    SESSION_NOTES.append(f"hot-unplug of an igb with 2 VFs on vfio-pci: DEVICE_DELETED after {seconds:.1f}s")
    state = g.wait(lambda s: HOTPLUG_BDF not in s["functions"], 30, what="the igb to go")
    assert not any(f["physfn"] == HOTPLUG_BDF for f in state["functions"].values())

    plug()
    try:
        state = g.wait(lambda s: s["functions"][HOTPLUG_BDF]["sriov_numvfs"] == 2
                       and all(s["functions"].get(v, {}).get("driver") == "vfio-pci"
                               for v in s["functions"][HOTPLUG_BDF]["virtfns"]),
                       60, what="the persisted 2 VFs on vfio-pci on the re-plugged igb")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- nicpassd journal\n{g.journal()}") from None
    vfs = state["functions"][HOTPLUG_BDF]["virtfns"]
    assert all(r["ok"] for r in g.vfio_open(*vfs))
    assert g.ctl("forget", HOTPLUG_BDF).returncode == 0
