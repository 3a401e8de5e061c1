#!/usr/bin/env python3
"""Print, as JSON, what the guest kernel shows about its PCI network functions (stdlib only).

{"functions": {addr: {...}}, "vfio": [group numbers with a /dev/vfio node], "routes": [...]}
Run in the guest: python3 /mnt/src/tests/e2e/guest/state.py
"""
import json
import os

PCI = "/sys/bus/pci/devices"


def rd(path, default=""):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return default


def link(path):
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def function(address):
    base = f"{PCI}/{address}"
    virtfns = sorted((e for e in os.listdir(base) if e.startswith("virtfn")), key=lambda e: int(e[6:]))
    net = sorted(os.listdir(f"{base}/net")) if os.path.isdir(f"{base}/net") else []
    group = link(f"{base}/iommu_group")
    return {
        "vendor": rd(f"{base}/vendor").removeprefix("0x"), "device": rd(f"{base}/device").removeprefix("0x"),
        "class": rd(f"{base}/class").removeprefix("0x"),
        "driver": link(f"{base}/driver"), "driver_override": rd(f"{base}/driver_override"),
        "iommu_group": int(group) if group else -1,
        "group_members": sorted(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices")) if group else [],
        "net": net, "physfn": link(f"{base}/physfn"),
        "virtfns": [link(f"{base}/{v}") for v in virtfns],
        "sriov_totalvfs": int(rd(f"{base}/sriov_totalvfs", "0") or 0),
        "sriov_numvfs": int(rd(f"{base}/sriov_numvfs", "0") or 0),
        "sriov_drivers_autoprobe": rd(f"{base}/sriov_drivers_autoprobe"),
    }


def main():
    functions = {a: function(a) for a in sorted(os.listdir(PCI)) if rd(f"{PCI}/{a}/class").startswith("0x02")}
    vfio = sorted(int(n) for n in os.listdir("/dev/vfio") if n.isdigit()) if os.path.isdir("/dev/vfio") else []
    with open("/proc/net/route") as handle:
        routes = [line.split()[:3] for line in handle.read().splitlines()[1:]]
    print(json.dumps({"functions": functions, "vfio": vfio,
                      "default_route_devs": [r[0] for r in routes if r[1] == "00000000"]}))


main()
