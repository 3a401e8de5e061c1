#!/usr/bin/env python3
"""Bring the e2e guest back to the suite's baseline between scenarios (stdlib only).

Baseline: no libvirt domain, no lease, nothing persisted, no VFs, every NIC on its host driver
with no driver_override, the management network as networkd sets it, nicpassd running.
nicpassd's own state is cleared through its API (release, forget); only when that leaves
something behind (or the daemon is down) is the daemon stopped and its state removed.
Prints what it did, then "baseline" on success.
"""
import glob
import json
import os
import re
import subprocess
import sys
import time

PCI = "/sys/bus/pci/devices"


def sh(*argv, check=False):
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode:
        raise SystemExit(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def rd(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def write(path, data):
    try:
        with open(path, "w") as handle:
            handle.write(data)
    except OSError as exc:
        print(f"reset: writing {data.strip()!r} to {path}: {exc}")


def driver(address):
    link = f"{PCI}/{address}/driver"
    return os.path.basename(os.readlink(link)) if os.path.lexists(link) else ""


# The NICs scenarios change: the igb (and its VFs) and the e1000e. The guard's memory of the
# management path (guard.json: the virtio management NIC, the root disk's controller) is part of
# the baseline; it is a leftover only when a scenario made one of these part of it.
TEST_NICS = re.compile(r"0000:0[23]:[0-9a-f]{2}\.[0-7]")


def leftovers():
    """nicpassd state that should not be there at the baseline."""
    found = []
    for path in glob.glob("/var/lib/nicpassd/**", recursive=True) + glob.glob("/run/nicpassd/**", recursive=True):
        if not os.path.isfile(path):
            continue
        pattern = TEST_NICS if os.path.basename(path) == "guard.json" else \
            re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
        if pattern.search(rd(path)):
            found.append(path)
    return found


def main():
    virsh = ["virsh", "-q", "-c", "qemu:///system"]
    for name in sh(*virsh, "list", "--all", "--name").stdout.split():
        sh(*virsh, "destroy", name)
        sh(*virsh, "undefine", name)
        print(f"reset: removed domain {name}")
    daemon_up = sh("systemctl", "is-active", "nicpassd").stdout.strip() == "active"
    if daemon_up:
        leases = sh("nicpassctl", "--json", "leases")
        for lease in json.loads(leases.stdout or "[]") if leases.returncode == 0 else []:
            uuid = lease.get("vm_uuid") or lease.get("uuid") or ""
            if uuid:
                print(f"reset: release {uuid}: exit {sh('nicpassctl', 'release', uuid).returncode}")
        listed = sh("nicpassctl", "--json", "list", "--all")
        for device in json.loads(listed.stdout or "[]") if listed.returncode == 0 else []:
            if device.get("persisted"):
                print(f"reset: forget {device['address']}: exit {sh('nicpassctl', 'forget', device['address']).returncode}")
    hard = not daemon_up or bool(leftovers())
    if hard:
        print(f"reset: restarting nicpassd with empty state (daemon up: {daemon_up}, left: {leftovers()})")
        sh("systemctl", "stop", "nicpassd")
        sh("systemctl", "reset-failed", "nicpassd")
        sh("sh", "-c", "rm -rf /var/lib/nicpassd/* /run/nicpassd/*")
    for pf in sorted(glob.glob(f"{PCI}/*/sriov_numvfs")):
        if rd(pf) != "0":
            write(pf, "0")
            print(f"reset: {pf}: 0 VFs")
        write(os.path.join(os.path.dirname(pf), "sriov_drivers_autoprobe"), "1")
    for path in sorted(glob.glob(f"{PCI}/*")):
        address = os.path.basename(path)
        if not rd(f"{path}/class").startswith("0x02"):
            continue
        drv = driver(address)
        if rd(f"{path}/driver_override") != "(null)" or drv in ("", "vfio-pci", "pci-stub"):
            write(f"{path}/driver_override", "\n")
            if drv:
                write(f"{path}/driver/unbind", address)
            write("/sys/bus/pci/drivers_probe", address)
            print(f"reset: {address}: {drv or 'no driver'} -> {driver(address) or 'no driver'}")
    # management network: networkd's configuration on enp1s0, no leftover bridges/bonds/VLANs
    links = sh("ip", "-j", "-d", "link", "show").stdout
    for link in json.loads(links or "[]"):
        kind = link.get("linkinfo", {}).get("info_kind", "")
        if kind in ("bridge", "bond", "vlan") and not link["ifname"].startswith("virbr"):
            sh("ip", "link", "del", link["ifname"])
            print(f"reset: deleted {kind} {link['ifname']}")
    if not re.search(r"^default via 10\.0\.2\.2 dev enp1s0", sh("ip", "route").stdout, re.M):
        sh("ip", "link", "set", "enp1s0", "nomaster")
        sh("systemctl", "restart", "systemd-networkd")
        for _ in range(100):
            if re.search(r"^default via 10\.0\.2\.2 dev enp1s0", sh("ip", "route").stdout, re.M):
                break
            time.sleep(0.2)
        print("reset: management network restored by networkd")
    if sh("systemctl", "is-active", "systemd-networkd").stdout.strip() != "active":
        sh("systemctl", "start", "systemd-networkd")
    if hard:
        sh("systemctl", "start", "nicpassd", check=True)
    bad = [a for a in os.listdir(PCI) if rd(f"{PCI}/{a}/class").startswith("0x02")
           and (driver(a) in ("", "vfio-pci") or os.path.lexists(f"{PCI}/{a}/physfn"))]
    if bad or leftovers():
        print(f"reset: not at the baseline: {bad} {leftovers()}")
        return 1
    print("baseline")
    return 0


sys.exit(main())
