"""Persisted state is restored by nicpassd after a real reboot of the guest."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import E1000E, IGB, SESSION_NOTES

pytestmark = pytest.mark.e2e
EVIDENCE: dict[str, object] = {}
VF_MAC = "02:00:00:00:00:62"


def test_persisted_state_restored_after_reboot(g):
    assert g.ctl("vfs", IGB, "3").returncode == 0
    vfs = g.fn(IGB)["virtfns"]
    # VF 2's settings (issue 14), checked in test_persisted_vf_settings_restored_after_reboot
    result = g.ctl("vf", f"{IGB}:2", "mac", VF_MAC, "vlan", "21", "spoofchk", "off")
    assert result.returncode == 0, result.stderr
    result = g.ctl("bind", E1000E, vfs[1], "--driver", "vfio-pci")
    assert result.returncode == 0, result.stderr
    assert g.ctl("vfs", IGB, "3").returncode == 0  # unchanged count: a no-op
    before = g.state()["functions"]
    assert before[E1000E]["driver"] == "vfio-pci" and before[vfs[1]]["driver"] == "vfio-pci"
    g.run("sync")

    seconds = g.vm.reboot()
    SESSION_NOTES.append(f"guest reboot (persistence scenario): {seconds:.1f}s to systemd running")
    # what happened to the e1000e during this boot, before anything else touches it
    EVIDENCE["kmsg"] = g.run("dmesg").stdout
    EVIDENCE["e1000e"] = E1000E
    EVIDENCE["udev"] = g.run("journalctl -b --no-pager -o cat -u systemd-udevd | grep -i nicpassd || true").stdout
    EVIDENCE["helper_log"] = g.run("journalctl -b --no-pager -o short-monotonic -t nicpassd-udev-override").stdout
    EVIDENCE["udevdb"] = g.run(f"udevadm info -q property -p /bus/pci/devices/{E1000E} | grep -i -e nicpassd -e driver"
                               " || true").stdout
    # the helper as udev starts it (no environment), on an empty root: does it start at all?
    EVIDENCE["helper"] = g.run("env -i /usr/libexec/nicpassd/nicpassd-udev-override --root /nonexistent "
                               f"{E1000E} 2>&1; echo rc=$?").stdout
    EVIDENCE["boot"] = g.run("journalctl -b --no-pager -o short-monotonic | grep -e 'nicpassd' -e 'udev-trigger' "
                             "-e 'systemd-udevd' | head -40").stdout
    start = g.run("systemctl show -p ExecMainStartTimestampMonotonic --value nicpassd").stdout.strip()
    EVIDENCE["daemon_start_us"] = int(start or 0)
    g.wait_daemon()
    EVIDENCE["daemon"] = g.run("journalctl -b --no-pager -o short-monotonic -u nicpassd | head -60").stdout
    try:
        state = g.wait(lambda s: s["functions"][IGB]["sriov_numvfs"] == 3
                       and s["functions"][E1000E]["driver"] == "vfio-pci",
                       90, what="the persisted VF count and the e1000e on vfio-pci after the reboot")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- nicpassd journal\n{g.journal()}") from None
    fns = state["functions"]
    assert fns[IGB]["virtfns"] == vfs
    assert all(r["ok"] for r in g.vfio_open(E1000E))
    # the VF persisted on vfio-pci (checked in test_persisted_vf_binding_restored_after_reboot)
    try:
        state = g.wait(lambda s: s["functions"].get(vfs[1], {}).get("driver") == "vfio-pci", 60,
                       what=f"the persisted VF {vfs[1]} on vfio-pci")
        EVIDENCE["vf"] = ""
        EVIDENCE["vf_open"] = g.vfio_open(vfs[1])
    except AssertionError as exc:
        EVIDENCE["vf"] = f"{str(exc)[:200]}\n--- nicpassd journal\n{g.journal(30)}"
    fns = g.state()["functions"]
    assert fns[vfs[0]]["driver"] == "igbvf" and fns[vfs[2]]["driver"] == "igbvf", fns
    interface = fns[IGB]["net"][0]
    EVIDENCE["vf_settings"] = json.loads(g.run(["ip", "-j", "-d", "link", "show", "dev", interface]).check().stdout)[0]
    # and the persisted state is still what nicpassd reports
    listed = {d["address"]: d for d in g.ctl_json("list")}
    assert listed[IGB]["persisted"] and listed[E1000E]["persisted"]


def test_persisted_vf_binding_restored_after_reboot():
    """A single VF persisted on vfio-pci is on vfio-pci again after the reboot (its PF's VFs are
    re-created by nicpassd at boot first)."""
    if "vf" not in EVIDENCE:
        pytest.skip("the reboot scenario did not get that far")
    assert not EVIDENCE["vf"], EVIDENCE["vf"]
    assert all(r["ok"] for r in EVIDENCE["vf_open"]), EVIDENCE["vf_open"]


def test_persisted_vf_settings_restored_after_reboot():
    """The kernel forgets every VF setting at reboot; nicpassd writes the persisted ones while it
    creates the VFs again (`ip -d link show PF` after the boot)."""
    if "vf_settings" not in EVIDENCE:
        pytest.skip("the reboot scenario did not get that far")
    vf = next(vf for vf in EVIDENCE["vf_settings"].get("vfinfo_list", []) if vf.get("vf") == 2)
    assert vf["address"] == VF_MAC and (vf.get("vlan_list") or [{}])[0].get("vlan") == 21, vf
    assert vf.get("spoofchk") is False, vf


def _early_binding_evidence():
    if not EVIDENCE:
        pytest.skip("the reboot scenario did not get as far as the reboot")
    from .conftest import REPO
    if not list((REPO / "packaging/udev").glob("*.rules")):
        pytest.skip("no udev rule in the repo")
    lines = [line for line in EVIDENCE["kmsg"].splitlines() if f"e1000e {EVIDENCE['e1000e']}" in line]
    stamps = [float(line[1:line.index("]")]) for line in lines if line.startswith("[")]
    return lines, stamps


def test_early_binding_moved_the_device_not_the_daemon():
    """packaging/udev/90-nicpassd.rules: on the coldplug "add" after the switch to the root file
    system, the helper puts the function persisted on vfio-pci onto vfio-pci (unbinding the host
    driver that took it in the initrd), and nicpassd, which leaves a device to udev until udev has
    processed it, finds it done: its boot reconcile has no step for it."""
    lines, stamps = _early_binding_evidence()
    daemon_start = EVIDENCE["daemon_start_us"] / 1e6
    left = f"{stamps[-1]:.1f}s" if stamps else "never bound"
    context = (f"\nthe host driver let go at {left}, nicpassd started at {daemon_start:.1f}s\n  " + "\n  ".join(lines)
               + f"\nthe helper's log:\n{EVIDENCE['helper_log']}\nudev database of {EVIDENCE['e1000e']}:\n{EVIDENCE['udevdb']}\nhelper run by hand: {EVIDENCE['helper']}"
               + f"\nnicpassd this boot:\n{EVIDENCE['daemon']}\nboot:\n{EVIDENCE['boot']}")
    acted = [line for line in EVIDENCE["helper_log"].splitlines() if f"{EVIDENCE['e1000e']}: " in line]
    assert acted and acted[-1].endswith("now on vfio-pci"), "the udev helper did not act at coldplug" + context
    moved = [line for line in EVIDENCE["daemon"].splitlines() if f"reconciled {EVIDENCE['e1000e']}" in line]
    assert not moved, "nicpassd moved the device itself: the helper had not done it when nicpassd looked" + context
    SESSION_NOTES.append(f"early binding: the udev helper moved the e1000e off its host driver at {left} "
                         f"(nicpassd started at {daemon_start:.1f}s): {acted[-1]}")


def test_host_driver_probed_the_device_only_in_the_initrd():
    """README "Early binding and the initramfs": the rule is not in the initrd. Debian's
    initramfs-tools (MODULES=most) carries the NIC drivers, so the host driver may probe a
    persisted function there, before the root file system is mounted; from the root file system on
    it never probes it again (the rule's override holds, the helper took it away at coldplug)."""
    _early_binding_evidence()
    kmsg = EVIDENCE["kmsg"].splitlines()
    root = next((float(line[1:line.index("]")]) for line in kmsg
                 if line.startswith("[") and "EXT4-fs (vda): mounted filesystem" in line), None)
    assert root is not None, "no root file system mount in the kernel log"
    probes = [line for line in kmsg if f"e1000e {EVIDENCE['e1000e']}" in line and "Network Connection" in line]
    late = [line for line in probes if float(line[1:line.index("]")]) > root]
    assert not late, (f"the host driver probed the persisted vfio-pci device after the root file system was "
                      f"mounted ({root:.1f}s):\n  " + "\n  ".join(late))


def test_runtime_changes_are_not_restored_after_reboot(g):
    assert g.ctl("vfs", IGB, "2", "--runtime").returncode == 0
    assert g.ctl("bind", E1000E, "--driver", "vfio-pci", "--runtime").returncode == 0
    g.vm.reboot()
    g.wait_daemon()
    time.sleep(5)
    fns = g.state()["functions"]
    assert fns[IGB]["sriov_numvfs"] == 0 and fns[E1000E]["driver"] == "e1000e", fns


def test_persisted_vfs_of_a_count_only_pf_come_back_at_a_real_boot(g):
    """A PF persisted with 3 VFs on vfio-pci and nothing else, and a real reboot: the VFs are on
    vfio-pci after the boot, and the daemon's log says whether its start created them before its
    imports (nicpassd/host/early_vfs.py) or left them to its reconcile (the PF not yet bound by
    igb when nicpassd started: udev loads igb during coldplug, which runs beside nicpassd)."""
    assert g.ctl("vfs", IGB, "3", "--vfio").returncode == 0
    vfs = g.fn(IGB)["virtfns"]
    g.run("sync")
    g.vm.reboot()
    g.wait_daemon()
    state = g.wait(lambda s: s["functions"][IGB]["virtfns"] == vfs
                   and all(s["functions"].get(vf, {}).get("driver") == "vfio-pci" for vf in vfs),
                   90, what="3 VFs on vfio-pci after the reboot")
    assert state["functions"][IGB]["sriov_numvfs"] == 3
    journal = g.run("journalctl -b -u nicpassd --no-pager -o short-monotonic").stdout
    early = [line for line in journal.splitlines() if "VFs at start, before the engine" in line]
    assert any(IGB in line for line in early), journal  # the start looked at the PF, whatever it found
    SESSION_NOTES.append("real boot, count-only PF: " + " | ".join(line.split("engine: ", 1)[1] for line in early))
