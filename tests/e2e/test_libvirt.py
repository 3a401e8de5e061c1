"""A libvirt domain with a <hostdev> VF, started by virsh, goes through nicpassd's hook.

libvirt (9.0) runs a nested QEMU (7.2, TCG inside TCG) in the guest. The domain is started
paused: QEMU still realizes the VFIO device (opens the container, the group, the device), which
is what the hook must have made possible, and no nested guest code has to run. managed='no', so
libvirt itself does not bind the VF: only the hook's Prepare can have put it on vfio-pci.
"""

from __future__ import annotations

import time

import pytest

from .conftest import IGB, REPO

pytestmark = pytest.mark.e2e

VM, UUID = "e2e-vm1", "3f1a6c0e-5b2d-4e8f-9a61-7c2d0e4b9a10"
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]


def pci_address(bdf: str) -> str:
    """A libvirt <address> attribute list of a PCI address."""
    domain, bus, rest = bdf.split(":")
    slot, function = rest.split(".")
    return f"domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'"


def domain_of(name: str, uuid: str, devices: str) -> str:
    """A minimal nested-QEMU domain (started paused in the tests) with these devices."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{devices}    <memballoon model='none'/>
  </devices>
</domain>
"""


def domain_xml(bdf: str) -> str:
    return domain_of(VM, UUID, f"""    <hostdev mode='subsystem' type='pci' managed='no'>
      <source><address {pci_address(bdf)}/></source>
    </hostdev>
""")


def leases(g) -> list[dict]:
    return g.ctl_json("leases")


@pytest.mark.skipif(not (REPO / "client/hooks/libvirt-qemu").exists(), reason="client/hooks/libvirt-qemu not in the repo")
def test_virsh_start_with_vf_hostdev_leases_and_stop_releases(g):
    assert g.run(["test", "-x", "/etc/libvirt/hooks/qemu.d/50-nicpassd"]).returncode == 0
    assert g.ctl("vfs", IGB, "2").returncode == 0
    vf = g.fn(IGB)["virtfns"][0]
    assert g.fn(vf)["driver"] == "igbvf"
    g.vm.write_file("/tmp/e2e-vm1.xml", domain_xml(vf))
    g.run([*VIRSH, "define", "/tmp/e2e-vm1.xml"]).check()

    started = g.run([*VIRSH, "start", "--paused", VM], timeout=300)
    assert started.returncode == 0, f"virsh start failed: {started.stderr}\n{g.journal(30)}"
    state = g.state()
    assert state["functions"][vf]["driver"] == "vfio-pci", state["functions"][vf]
    group = state["functions"][vf]["iommu_group"]
    pid = g.run(["cat", f"/run/libvirt/qemu/{VM}.pid"]).check().stdout.strip()
    fds = g.run(f"ls -l /proc/{pid}/fd").check().stdout
    assert f"/dev/vfio/{group}" in fds and "vfio-device" in fds, f"QEMU does not hold the VF through VFIO:\n{fds}"
    held = [lease for lease in leases(g) if lease.get("vm_uuid") == UUID or UUID in str(lease)]
    assert held, f"no lease for {UUID}: {leases(g)}"
    assert vf in str(held[0]), held
    # a leased VF's PF is not changed under the VM
    result = g.ctl("vfs", IGB, "0")
    assert result.returncode == 4, (result.returncode, result.stderr)
    assert g.fn(IGB)["sriov_numvfs"] == 2

    stopped = g.run([*VIRSH, "destroy", VM], timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    for _ in range(30):
        if not [lease for lease in leases(g) if UUID in str(lease)]:
            break
        g.run("sleep 1")
    assert not [lease for lease in leases(g) if UUID in str(lease)], f"lease not released: {leases(g)}"
    assert g.fn(vf)["driver"] == "vfio-pci"  # release policy "keep"
    assert g.ctl("vfs", IGB, "0").returncode == 0
    g.run([*VIRSH, "undefine", VM]).check()


def test_hook_refuses_the_management_nic(g):
    if not (REPO / "client/hooks/libvirt-qemu").exists():
        pytest.skip("client/hooks/libvirt-qemu not in the repo")
    g.vm.write_file("/tmp/e2e-vm1.xml", domain_xml("0000:01:00.0"))
    g.run([*VIRSH, "define", "/tmp/e2e-vm1.xml"]).check()
    started = g.run([*VIRSH, "start", "--paused", VM], timeout=300)
    assert started.returncode != 0, "a domain with the management NIC was started"
    assert "nicpassd" in started.stderr or "protected" in started.stderr.lower(), started.stderr
    fn = g.fn("0000:01:00.0")
    assert fn["driver"] == "virtio-pci", fn
    assert g.state()["default_route_devs"] == ["enp1s0"]


HOSTDEV = """<hostdev mode='subsystem' type='pci' managed='yes'>
  <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
</hostdev>
"""


def test_virsh_attach_device_live_of_the_management_nic_is_healed(g):
    """libvirt runs no hook for device hotplug: `virsh attach-device --live` of the management NIC
    (managed='yes': libvirt unbinds it, writes driver_override, probes vfio-pci, QEMU opens it)
    reaches nicpassd only as kernel events. The NIC must end on virtio-pci with its default route,
    and the domain must not keep it."""
    from .conftest import MGMT, SESSION_NOTES
    from .test_guard_heal import mgmt_back, violations

    xml = domain_of(VM, UUID, "")
    assert "hostdev" not in xml
    g.vm.write_file("/tmp/e2e-vm1.xml", xml)
    g.vm.write_file("/tmp/e2e-mgmt-hostdev.xml", HOSTDEV)
    g.run([*VIRSH, "define", "/tmp/e2e-vm1.xml"]).check()
    try:
        started = g.run([*VIRSH, "start", "--paused", VM], timeout=300)
        assert started.returncode == 0, started.stderr
        since = g.run(["date", "+%s"]).check().stdout.strip()
        attach = g.run([*VIRSH, "attach-device", VM, "/tmp/e2e-mgmt-hostdev.xml", "--live"], timeout=300)
        hostdevmgr = g.run("head -c 600 /run/libvirt/hostdevmgr/*.xml 2>&1 | tr -s ' \n' ' '").stdout
        if attach.returncode == 0:
            # QEMU opened it before the heal got to it: nicpassd must not unbind it under QEMU
            # (the test below), and gives it back once the domain lets go.
            held = wait_for_outcome(g, "not healed yet")
            SESSION_NOTES.append(f"attach-device --live of the management NIC: QEMU opened it first; {held[:200]!r}")
            g.run([*VIRSH, "destroy", VM], timeout=120).check()
        seconds = mgmt_back(g, timeout=180)
        live = g.run([*VIRSH, "dumpxml", VM]).stdout
        import nicpassd_domain_xml

        assert MGMT not in nicpassd_domain_xml.domain_devices(live)[2], f"the domain kept the management NIC:\n{live}"
        violation = violations(g)[MGMT]["last_violation"]
        SESSION_NOTES.append(f"attach-device --live of the management NIC: virsh exit {attach.returncode} "
                             f"({attach.stderr.strip()[:160]}); back {seconds:.1f}s after; culprit "
                             f"{violation['culprit']!r}; outcome {violation['outcome'][:120]!r}; "
                             f"libvirt's hostdev bookkeeping right after: {hostdevmgr[:400]}")
        # libvirt, its attach failed, may give the NIC back itself right after nicpassd did (its
        # reattach unbinds and reprobes): then the last report says so. nicpassd's heal is in the journal.
        assert violation["outcome"].startswith(("healed", "back on virtio-pci before nicpassd healed it")), violation
        healed = g.run(["journalctl", "-u", "nicpassd", "--since", f"@{since}", "--no-pager", "-o", "cat"]).stdout
        assert f"{MGMT} (" in healed, healed[-3000:]
        assert "healed: back on virtio-pci" in healed or attach.returncode == 0, healed[-3000:]
    finally:
        g.run([*VIRSH, "destroy", VM], timeout=120)
        g.run([*VIRSH, "undefine", VM])


def wait_for_outcome(g, prefix: str, timeout: float = 60) -> str:
    from .conftest import MGMT
    from .test_guard_heal import violations

    g.wait(lambda _s: violations(g).get(MGMT, {}).get("last_violation", {}).get("outcome", "").startswith(prefix),
           timeout, 0.5, what=f"the management NIC's violation reported as {prefix!r}")
    return violations(g)[MGMT]["last_violation"]["outcome"]


def test_the_management_nic_a_running_domain_holds_is_not_unbound_under_it(g):
    """QEMU holds the management NIC through VFIO (attached while the heal was off, then nicpassd
    restarted with it on). vfio-pci's remove would wait, the device locked, until QEMU let go — for
    ever, the domain being paused — and journald behind that lock (it reads the device's uevent to
    tag the kernel's "Relaying device request" line), then everything that logs: the guest went
    silent. nicpassd writes nothing, names the domain, keeps the host answering, and gives the NIC
    back once the domain is destroyed."""
    from .conftest import MGMT, SESSION_NOTES
    from .test_guard_heal import heal_default, heal_off, mgmt_back, violations

    heal_off(g)
    g.vm.write_file("/tmp/e2e-vm1.xml", domain_of(VM, UUID, ""))
    g.vm.write_file("/tmp/e2e-mgmt-hostdev.xml", HOSTDEV)
    g.run([*VIRSH, "define", "/tmp/e2e-vm1.xml"]).check()
    try:
        g.run([*VIRSH, "start", "--paused", VM], timeout=300).check()
        g.run([*VIRSH, "attach-device", VM, "/tmp/e2e-mgmt-hostdev.xml", "--live"], timeout=300).check()
        assert g.fn(MGMT)["driver"] == "vfio-pci"
        heal_default(g)
        g.run(["systemctl", "restart", "nicpassd"], timeout=120).check()
        outcome = wait_for_outcome(g, "not healed yet")
        assert "in use through VFIO" in outcome and VM in outcome, outcome
        for _ in range(5):  # the host keeps answering, journald keeps logging
            g.run(["logger", "-t", "e2e-alive", "still logging"], timeout=30).check()
            g.run("sleep 1", timeout=30)
        logged = g.run("journalctl -t e2e-alive -b --no-pager -o cat | wc -l", timeout=30).stdout.strip()
        assert logged == "5", logged
        assert g.fn(MGMT)["driver"] == "vfio-pci"
        t0 = time.monotonic()
        g.run([*VIRSH, "destroy", VM], timeout=120).check()
        seconds = mgmt_back(g, timeout=120)
        last = violations(g)[MGMT]["last_violation"]["outcome"]
        SESSION_NOTES.append(f"management NIC held by a paused domain: {outcome[:160]!r}; back {seconds:.1f}s after "
                             f"virsh destroy ({time.monotonic() - t0:.1f}s in all): {last[:100]!r}")
    finally:
        g.run([*VIRSH, "destroy", VM], timeout=120)
        g.run([*VIRSH, "undefine", VM])
