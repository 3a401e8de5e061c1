"""Issue 15 in the guest: `nicpassctl check` and `check --devices` agree with what the guest's
kernel shows (IOMMU on with interrupt remapping, vfio-pci loadable, igb SR-IOV capable, each
function's reset method as /sys shows it), and every IOMMU/KVM/virtualization line of libvirt's
own `virt-host-validate qemu` has a nicpassd finding that says the same."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import IGB, MGMT, SESSION_NOTES

pytestmark = pytest.mark.e2e

# virt-host-validate's line (a fragment) -> the nicpassd finding that answers the same question
VALIDATE_TO_FINDING = {
    "hardware virtualization": "cpu-virtualization",
    "/dev/kvm exists": "cpu-virtualization",
    "/dev/kvm is accessible": "cpu-virtualization",
    "device assignment IOMMU support": "iommu",
    "IOMMU is enabled by kernel": "iommu",
}


def validate_lines(g) -> list[tuple[str, str, str]]:
    """(question, PASS/WARN/FAIL, its reason) of each line `virt-host-validate qemu` prints."""
    out = g.run("virt-host-validate qemu 2>&1 || true", timeout=120).stdout
    lines = []
    for line in out.splitlines():
        match = re.match(r"\s*QEMU: Checking (.+?)\s*:\s*(PASS|WARN|FAIL)\s*(.*)", line)
        if match:
            lines.append((match.group(1), match.group(2), match.group(3).strip(" ()")))
    return lines


def test_check_agrees_with_the_guest_kernel_and_with_virt_host_validate(g):
    result = g.ctl("--json", "check", "--devices")
    report = json.loads(result.stdout)
    host = {finding["id"]: finding for finding in report["host"]}
    failed = [f"{d['address']} {f['id']}" for d in report["devices"] for f in d["findings"] if f["level"] == "fail"]
    failed += [f["id"] for f in report["host"] if f["level"] == "fail"]
    # exit 8 exactly when a finding fails: here the management NIC's guard finding (it is protected)
    assert (result.returncode == 8) == bool(failed) and result.returncode in (0, 8), (result.returncode, failed)
    assert failed == [f"{MGMT} guard"], failed
    # what the guest kernel shows, read here independently of nicpassd
    units = g.run("ls /sys/class/iommu").stdout.split()
    remapped = "IR-" in g.run("cat /proc/interrupts").stdout
    assert units and host["iommu"]["level"] == "ok" and all(unit in host["iommu"]["message"] for unit in units), host
    assert remapped and host["interrupt-remapping"]["level"] == "ok", host["interrupt-remapping"]
    assert host["vfio"]["level"] == "ok", host["vfio"]
    devices = {device["address"]: {f["id"]: f for f in device["findings"]} for device in report["devices"]}
    assert devices[IGB]["sriov"]["level"] == "ok" and "SR-IOV capable: up to 7 VFs" in devices[IGB]["sriov"]["message"]
    # The VFs' memory as the kernel placed it: `resource` has 13 lines, the IOV BARs last (7-12),
    # at least one of them assigned (flags not zero): what the simulator models.
    resource = g.run(["cat", f"/sys/bus/pci/devices/{IGB}/resource"]).check().stdout.splitlines()
    assert len(resource) == 13 and any(int(line.split()[2], 16) for line in resource[7:13]), resource
    shown = []
    for address, found in devices.items():
        methods = g.run(f"cat /sys/bus/pci/devices/{address}/reset_method 2>/dev/null || true").stdout.split()
        expected = f"reset: {', '.join(methods)}" if methods else "no reset method"
        assert found["reset"]["message"].startswith(expected), (address, methods, found["reset"])
        shown.append(f"{address}: {found['reset']['message'][:40]}")

    table, disagreements = [], []
    for question, verdict, reason in validate_lines(g):
        finding_id = next((f for fragment, f in VALIDATE_TO_FINDING.items() if fragment in question), None)
        if finding_id is None:
            if re.search(r"IOMMU|VFIO|vfio|kvm|virtualization", question):
                pytest.fail(f"virt-host-validate checks {question!r} ({verdict}) and no nicpassd finding is mapped to it")
            continue
        ours = host[finding_id]["level"]
        table.append(f"{question}: virt-host-validate {verdict} / nicpassd {finding_id} {ours}")
        if (verdict == "PASS") != (ours == "ok"):
            # Each nicpassd verdict was checked against the guest kernel above; a disagreement is
            # virt-host-validate's, and goes in the note with its own reason.
            disagreements.append(f"{question}: virt-host-validate {verdict} ({reason}), nicpassd {ours}")
    assert table, "virt-host-validate printed no line nicpassd answers"
    assert host["cpu-virtualization"]["level"] == ("ok" if g.run("test -e /dev/kvm").returncode == 0 else "warn")
    SESSION_NOTES.append("preflight vs virt-host-validate: " + "; ".join(table) + " | disagreements: "
                         + ("; ".join(disagreements) or "none") + " | reset: " + "; ".join(shown))
