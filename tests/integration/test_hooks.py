"""The libvirt qemu hook and the Proxmox hookscript, run as real subprocesses against nicpassd on the
private bus (the in-process ``service`` fixture on the simulated kernel, or no daemon at all).

Every run goes through ``run_hook``, which also checks the hook's contract on every call: stdout
stays empty, the hook leaves no process behind (its session is empty once it exits, and its pipes
reach EOF) and it never runs virsh or any other libvirt client (those are stubs that record).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import REPO

from nicpassd.paths import HostPaths
from nicpassd.sim.kernel import SimKernel
from nicpassd.sim.topology import load_topology
from nicpassd.transport.service import DEVICE_IFACE, device_path

HOOKS = REPO / "client" / "hooks"
LIBVIRT_HOOK = HOOKS / "libvirt-qemu"
PVE_HOOK = HOOKS / "nicpassd-pve-hook"

PF = "0000:3b:00.0"
VF = [f"0000:3b:02.{n}" for n in range(8)] + [f"0000:3b:03.{n}" for n in range(8)]
NIC, USB, ENO1 = "0000:af:00.0", "0000:af:00.1", "0000:01:00.0"
WEB_UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
NODE = os.uname().nodename.split(".")[0]


def domain_xml(name: str, uuid: str, devices: str) -> str:
    """A domain as `virsh dumpxml` prints it, with ``devices`` among the usual ones."""
    return f"""<domain type='kvm' id='7'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <resource><partition>/machine</partition></resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/><vmport state='off'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2' index='1'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'><alias name='pcie.0'/></controller>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='1' port='0x10'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0' multifunction='on'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default' portid='0b5b4a6c-1b2f-4a47-a2d2-1b0a7a0e6c10' bridge='virbr0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
{devices}    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <graphics type='spice' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-{uuid}</label></seclabel>
</domain>
"""


def hostdev(address: str, *, managed: str = "yes", guest: str = "0x06", function: str = "0x0",
            multifunction: bool = False) -> str:
    domain, bus, slot_fn = address.split(":")
    slot, fn = slot_fn.split(".")
    extra = " multifunction='on'" if multifunction else ""
    return f"""    <hostdev mode='subsystem' type='pci' managed='{managed}'>
      <driver name='vfio'/>
      <source>
        <address domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/>
      </source>
      <alias name='hostdev0'/>
      <address type='pci' domain='0x0000' bus='{guest}' slot='0x00' function='{function}'{extra}/>
    </hostdev>
"""


def hostdev_interface(address: str) -> str:
    domain, bus, slot_fn = address.split(":")
    slot, fn = slot_fn.split(".")
    return f"""    <interface type='hostdev' managed='yes'>
      <mac address='52:54:00:a1:b2:c3'/>
      <driver name='vfio'/>
      <source>
        <address type='pci' domain='0x{domain}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/>
      </source>
      <vlan><tag id='42'/></vlan>
      <alias name='hostdev1'/>
      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
    </interface>
"""


USB_HOSTDEV = """    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x046d'/><product id='0xc52b'/><address bus='1' device='3'/></source>
      <address type='usb' bus='0' port='1'/>
    </hostdev>
"""

WEB = domain_xml("web", WEB_UUID, hostdev(VF[0]) + hostdev(VF[1], managed="no", guest="0x08") + USB_HOSTDEV
                 + hostdev_interface(VF[2]))
MULTIFUNCTION = domain_xml("router", "0b8e7a8e-3a52-4d43-9e4f-3f6c2a7d9a11",
                           hostdev(NIC, multifunction=True) + hostdev(USB, function="0x1"))
PLAIN = domain_xml("plain", "3d2f0c84-9f1e-4c55-8f6b-7a8d1b2c3e4f", "")
GPU_ONLY = domain_xml("gpu", "7a1c3e55-2b6d-4f80-9c1a-5e4d3c2b1a09", hostdev("0000:65:00.0"))
MGMT = domain_xml("oops", "11111111-2222-4333-8444-555555555555", hostdev(ENO1))

PHASES_IGNORED = [("start", "begin"), ("stopped", "end"), ("migrate", "begin"), ("restore", "begin"),
                  ("reconnect", "begin"), ("attach", "begin"), ("prepare", "end"), ("release", "begin"),
                  ("started", "end"), ("stopped", "begin")]
LIBVIRT_CLIENTS = ("virsh", "virt-xml", "virt-install", "virt-manager", "libvirtd", "virtqemud")


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def libvirt_stubs(tmp_path) -> Path:
    """A PATH directory whose libvirt clients only record that they were run."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in LIBVIRT_CLIENTS:
        stub = stubs / name
        stub.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {tmp_path}/libvirt-called\n")
        stub.chmod(0o755)
    yield stubs
    assert not (tmp_path / "libvirt-called").exists(), (tmp_path / "libvirt-called").read_text()


class Hooks:
    def __init__(self, root: Path, bus_address: str, stubs: Path) -> None:
        self.root = root
        self.env = dict(os.environ, NICPASSD_ROOT=str(root), DBUS_SYSTEM_BUS_ADDRESS=bus_address,
                        PATH=f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}")

    async def run(self, hook: Path, *argv: str, stdin: str = "", timeout: float = 60) -> Ran:
        process = await asyncio.create_subprocess_exec(
            str(hook), *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, cwd="/", start_new_session=True)
        # communicate() returns only at EOF on stdout and stderr: a child left holding them hangs it.
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), timeout)
        with pytest.raises(ProcessLookupError):  # nothing left in the hook's session
            os.killpg(process.pid, 0)
        result = Ran(process.returncode, out.decode(), err.decode())
        assert result.stdout == "", f"{hook.name} {argv} printed on stdout: {result.stdout!r}"
        return result

    async def libvirt(self, guest: str, op: str, subop: str, xml: str) -> Ran:
        return await self.run(LIBVIRT_HOOK, guest, op, subop, "-", stdin=xml)

    async def pve(self, vmid: str, phase: str) -> Ran:
        return await self.run(PVE_HOOK, vmid, phase)

    def write(self, absolute: str, text: str) -> Path:
        path = self.root / absolute.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


@pytest.fixture
async def hooks(service, libvirt_stubs):
    yield Hooks(service.paths.root, service.address, libvirt_stubs)
    service.engine.leasing.close()


@pytest.fixture
def hooks_daemon_down(private_bus, libvirt_stubs, tmp_path):
    """No nicpassd on the bus; a simulated sysfs under the root (the hook reads PCI classes)."""
    paths = HostPaths(tmp_path / "host")
    SimKernel(paths, load_topology())
    gpu = paths.pci_device("0000:65:00.0")
    gpu.mkdir(parents=True)
    (gpu / "class").write_text("0x030000\n")
    return Hooks(paths.root, private_bus.address, libvirt_stubs)




def driver(service, address: str) -> str:
    link = service.paths.pci_device(address) / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def holder(service) -> dict[str, str]:
    return service.engine.leases.holder()


async def until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def with_vfs(service, count: int = 4) -> None:
    await service.engine.set_vf_count(PF, count, persist=False)


# ============================================================================ libvirt hook
async def test_libvirt_lifecycle_prepare_started_release(service, hooks, qemu, polkit):
    await with_vfs(service)
    ran = await hooks.libvirt("web", "prepare", "begin", WEB)
    assert (ran.returncode, ran.stderr) == (0, "")
    (lease,) = service.engine.leases.of_vm(WEB_UUID)
    # managed='yes', managed='no' and <interface type='hostdev'>; not the USB hostdev
    assert (lease.vm_name, lease.devices, lease.state) == ("web", VF[:3], "reserved")
    assert lease.pidfile == "/run/libvirt/qemu/web.pid"
    assert [driver(service, vf) for vf in VF[:3]] == ["vfio-pci"] * 3

    process = qemu()  # libvirt wrote QEMU's pid before `started`
    hooks.write("/run/libvirt/qemu/web.pid", f"{process.pid}\n")
    ran = await hooks.libvirt("web", "started", "begin", WEB)
    assert (ran.returncode, ran.stderr) == (0, "")
    (lease,) = service.engine.leases.of_vm(WEB_UUID)
    assert (lease.state, lease.pid, lease.expires) == ("active", process.pid, 0.0)

    for op, subop in (("stopped", "end"),):
        assert (await hooks.libvirt("web", op, subop, WEB)).returncode == 0
    ran = await hooks.libvirt("web", "release", "end", WEB)
    assert (ran.returncode, ran.stderr) == (0, "")
    assert holder(service) == {} and driver(service, VF[0]) == "vfio-pci"  # policy "keep"
    # libvirt runs its hooks as root, whom polkit authorizes for every action: it is not asked.
    assert polkit.checks() == []


async def test_libvirt_started_without_a_pidfile_ties_the_lease_to_the_uuid(service, hooks):
    await with_vfs(service)
    assert (await hooks.libvirt("web", "prepare", "begin", WEB)).returncode == 0
    ran = await hooks.libvirt("web", "started", "begin", WEB)
    assert (ran.returncode, ran.stderr) == (0, "")
    (lease,) = service.engine.leases.of_vm(WEB_UUID)
    assert (lease.state, lease.pid) == ("active", 0)


async def test_libvirt_qemu_exit_ends_the_lease_even_without_release(service, hooks, qemu):
    await with_vfs(service)
    assert (await hooks.libvirt("web", "prepare", "begin", WEB)).returncode == 0
    process = qemu()
    hooks.write("/run/libvirt/qemu/web.pid", str(process.pid))  # no trailing newline
    assert (await hooks.libvirt("web", "started", "begin", WEB)).returncode == 0
    assert service.engine.leases.of_vm(WEB_UUID)[0].pid == process.pid
    process.kill()  # QEMU crashed and the release hook never came (libvirtd was restarting)
    process.wait()
    await until(lambda: holder(service) == {})


async def test_libvirt_multifunction_device_is_prepared_as_a_whole(service, hooks):
    ran = await hooks.libvirt("router", "prepare", "begin", MULTIFUNCTION)
    assert (ran.returncode, ran.stderr) == (0, "")
    assert holder(service) == {NIC: "0b8e7a8e-3a52-4d43-9e4f-3f6c2a7d9a11", USB: "0b8e7a8e-3a52-4d43-9e4f-3f6c2a7d9a11"}
    assert (driver(service, NIC), driver(service, USB)) == ("vfio-pci", "vfio-pci")
    # one function alone: the group is not viable, and the other function is leased to "router"
    only_nic = domain_xml("half", "22222222-3333-4444-8555-666666666666", hostdev(NIC))
    ran = await hooks.libvirt("half", "prepare", "begin", only_nic)
    assert ran.returncode == 1 and "leased to VM router (0b8e7a8e" in ran.stderr
    assert (await hooks.libvirt("router", "release", "end", MULTIFUNCTION)).returncode == 0
    assert holder(service) == {}


async def test_libvirt_domain_without_pci_devices_never_reaches_the_daemon(service, hooks, polkit):
    for op, subop in [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"),
                      ("release", "end"), *PHASES_IGNORED]:
        ran = await hooks.libvirt("plain", op, subop, PLAIN)
        assert (ran.returncode, ran.stderr) == (0, ""), (op, subop)
    assert polkit.checks() == [] and holder(service) == {}


async def test_libvirt_non_nic_devices_are_left_to_libvirt(service, hooks):
    # 65:00.0 (a GPU, say) is not a NIC nor a group mate of one: nothing to lease, the VM starts.
    for op, subop in (("prepare", "begin"), ("started", "begin"), ("release", "end")):
        ran = await hooks.libvirt("gpu", op, subop, GPU_ONLY)
        assert (ran.returncode, ran.stderr) == (0, ""), (op, subop)
    assert holder(service) == {}


async def test_libvirt_refusal_aborts_the_start_with_one_line(service, hooks):
    ran = await hooks.libvirt("oops", "prepare", "begin", MGMT)
    assert ran.returncode == 1
    assert ran.stderr.count("\n") == 1 and ran.stderr.startswith("nicpassd hook: cannot start VM oops: ")
    assert "protected" in ran.stderr and driver(service, ENO1) == "igb"

    await with_vfs(service)
    assert (await hooks.libvirt("web", "prepare", "begin", WEB)).returncode == 0
    other = domain_xml("db", "33333333-4444-4555-8666-777777777777", hostdev(VF[3]) + hostdev(VF[1]))
    ran = await hooks.libvirt("db", "prepare", "begin", other)
    assert ran.returncode == 1 and ran.stderr.count("\n") == 1
    assert f"leased to VM web ({WEB_UUID})" in ran.stderr
    assert driver(service, VF[3]) == "iavf"  # all or nothing
    assert set(holder(service).values()) == {WEB_UUID}


async def test_libvirt_phases_it_does_not_handle_exit_0_and_change_nothing(service, hooks, polkit):
    await with_vfs(service)
    for op, subop in PHASES_IGNORED:
        ran = await hooks.libvirt("web", op, subop, WEB)
        assert (ran.returncode, ran.stderr) == (0, ""), (op, subop)
    assert polkit.checks() == [] and holder(service) == {} and driver(service, VF[0]) == "iavf"


async def test_libvirt_unreadable_xml_refuses_only_prepare(service, hooks):
    broken = WEB.replace("</devices>", "")
    ran = await hooks.libvirt("web", "prepare", "begin", broken)
    assert ran.returncode == 1 and "domain XML cannot be read" in ran.stderr
    assert (await hooks.libvirt("web", "release", "end", "<domain><devices><hostdev/>")).returncode == 0


async def test_libvirt_missing_helper_is_a_clear_refusal(service, hooks):
    hooks.env["NICPASSD_HOOK_HELPER"] = "/nonexistent/helper"  # and none under /usr/lib/nicpassd here
    if Path("/usr/lib/nicpassd/nicpassd-hook-helper").exists():
        pytest.skip("a helper is installed on this machine")
    ran = await hooks.libvirt("web", "prepare", "begin", WEB)
    assert ran.returncode == 1 and "nicpassd-hook-helper is missing (reinstall nicpassd)" in ran.stderr
    assert (await hooks.libvirt("plain", "prepare", "begin", PLAIN)) == Ran(0, "", "")  # not needed there


async def test_libvirt_prepare_without_dbus_send_is_done_by_the_helper(service, hooks, libvirt_stubs, polkit):
    """No dbus-send (or a nicpassd without PrepareDomain): the Python helper prepares, the same way."""
    stub = libvirt_stubs / "dbus-send"
    stub.write_text("#!/bin/sh\necho 'dbus-send: not found' >&2\nexit 127\n")
    stub.chmod(0o755)
    await with_vfs(service)
    ran = await hooks.libvirt("web", "prepare", "begin", WEB)
    assert (ran.returncode, ran.stderr) == (0, "")
    (lease,) = service.engine.leases.of_vm(WEB_UUID)
    assert (lease.vm_name, lease.devices, lease.pidfile) == ("web", VF[:3], "/run/libvirt/qemu/web.pid")
    ran = await hooks.libvirt("oops", "prepare", "begin", MGMT)
    assert ran.returncode == 1 and ran.stderr.count("\n") == 1 and "protected" in ran.stderr
    assert ran.stderr.startswith("nicpassd hook: cannot start VM oops: ")
    stub.write_text("#!/bin/sh\necho 'Error org.freedesktop.DBus.Error.UnknownMethod: No such method' >&2\nexit 1\n")
    assert (await hooks.libvirt("web", "release", "end", WEB)).returncode == 0
    ran = await hooks.libvirt("web", "prepare", "begin", WEB)  # an older nicpassd: the helper again
    assert (ran.returncode, ran.stderr) == (0, "") and len(service.engine.leases.of_vm(WEB_UUID)) == 1


async def test_libvirt_prepare_of_a_domain_with_usb_devices_only_leases_nothing(service, hooks):
    usb_only = domain_xml("kbd", "44444444-5555-4666-8777-888888888888", USB_HOSTDEV)
    ran = await hooks.libvirt("kbd", "prepare", "begin", usb_only)
    assert (ran.returncode, ran.stderr) == (0, "") and holder(service) == {}


# ------------------------------------------------------------------- libvirt, daemon down
async def test_libvirt_daemon_down_refuses_only_prepare_of_a_domain_with_nics(hooks_daemon_down):
    hooks = hooks_daemon_down
    ran = await hooks.libvirt("web", "prepare", "begin", WEB)
    assert ran.returncode == 1 and ran.stderr.count("\n") == 1
    assert "nicpassd is not running" in ran.stderr and "systemctl start nicpassd" in ran.stderr
    for op, subop in [("started", "begin"), ("release", "end"), *PHASES_IGNORED]:
        ran = await hooks.libvirt("web", op, subop, WEB)
        assert ran.returncode == 0, (op, subop, ran.stderr)
    assert (await hooks.libvirt("plain", "prepare", "begin", PLAIN)) == Ran(0, "", "")
    ran = await hooks.libvirt("gpu", "prepare", "begin", GPU_ONLY)  # no NIC involved: starts
    assert ran.returncode == 0 and "none of 0000:65:00.0 is a NIC" in ran.stderr


async def test_libvirt_bus_down_is_the_same_as_daemon_down(hooks_daemon_down):
    hooks = hooks_daemon_down
    hooks.env["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={hooks.root}/no-bus-here"
    ran = await hooks.libvirt("web", "prepare", "begin", WEB)
    assert ran.returncode == 1 and "nicpassd is not running" in ran.stderr
    assert (await hooks.libvirt("web", "reconnect", "begin", WEB)).returncode == 0
    assert (await hooks.libvirt("web", "release", "end", WEB)).returncode == 0


# ========================================================================== Proxmox hook
PVE_CONF = """boot: order=scsi0;net0
cores: 4
hostpci0: 0000:3b:02.0,pcie=1
hostpci1: host=3b:02.1;3b:02.2,pcie=1,rombar=0
hostpci2: 3b:03
hostpci3: mapping=uplink,pcie=1
machine: q35
memory: 4096
meta: creation-qemu=8.1.5,ctime=1718000000
name: pve-web
net0: virtio=BC:24:11:22:33:44,bridge=vmbr0,firewall=1
ostype: l26
scsi0: local-lvm:vm-101-disk-0,iothread=1,size=32G
smbios1: uuid=9f3b2c1d-4e5f-4a6b-8c7d-0e1f2a3b4c5d
vmgenid: 2c9d7e1a-6b5f-4c3d-9e8a-7f6b5c4d3e2a

[snap1]
hostpci5: 0000:5e:00.0
snaptime: 1718000100
"""
PVE_MAPPING = f"""uplink
	map id=8086:154c,iommugroup=60,node=othernode,path=0000:3b:02.5,subsystem-id=8086:0000
	map id=8086:154c,iommugroup=61,node={NODE},path=0000:3b:02.3,subsystem-id=8086:0000
	description the uplink VF pool

spare
	map id=8086:154c,node={NODE},path=0000:3b:02.6
"""
PVE_UUID = "9f3b2c1d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"


async def test_pve_lifecycle_with_every_host_form_and_a_mapping(service, hooks, qemu, polkit):
    await with_vfs(service, 16)
    hooks.write("/etc/pve/qemu-server/101.conf", PVE_CONF)
    hooks.write("/etc/pve/mapping/pci.cfg", PVE_MAPPING)
    ran = await hooks.pve("101", "pre-start")
    assert (ran.returncode, ran.stderr) == (0, ""), ran.stderr
    (lease,) = service.engine.leases.of_vm(PVE_UUID)
    # full, short, ;-list, a whole slot (3b:03 = VFs 8..15) and the mapping's device on this node;
    # not the snapshot's hostpci5
    assert lease.devices == sorted([VF[0], VF[1], VF[2], VF[3], *VF[8:16]])
    assert (lease.vm_name, lease.state, lease.pidfile) == ("pve-web", "reserved", "/run/qemu-server/101.pid")
    assert driver(service, "0000:5e:00.0") == "mlx5_core"

    process = qemu()
    hooks.write("/run/qemu-server/101.pid", f"{process.pid}\n")
    assert (await hooks.pve("101", "post-start")) == Ran(0, "", "")
    assert service.engine.leases.of_vm(PVE_UUID)[0].pid == process.pid
    assert (await hooks.pve("101", "pre-stop")) == Ran(0, "", "")
    assert (await hooks.pve("101", "post-stop")) == Ran(0, "", "")
    assert holder(service) == {}


async def test_pve_mapping_pool_takes_the_first_free_member(service, hooks):
    await with_vfs(service, 8)
    hooks.write("/etc/pve/qemu-server/102.conf", "hostpci0: mapping=pool\nname: a\n")
    hooks.write("/etc/pve/qemu-server/103.conf", "hostpci0: mapping=pool\nname: b\n")
    hooks.write("/etc/pve/mapping/pci.cfg", f"pool\n\tmap node={NODE},path=0000:3b:02.4,id=8086:154c\n"
                                            f"\tmap node={NODE},path=0000:3b:02.5,id=8086:154c\n")
    assert (await hooks.pve("102", "pre-start")).returncode == 0
    assert (await hooks.pve("103", "pre-start")).returncode == 0
    assert holder(service) == {VF[4]: "pve-102", VF[5]: "pve-103"}  # no smbios1: "pve-VMID"
    ran = await hooks.pve("104", "pre-start")  # no conf at all: nothing to do
    assert ran == Ran(0, "", "")


async def test_pve_refusals_are_fatal_with_one_line(service, hooks):
    await with_vfs(service)
    hooks.write("/etc/pve/qemu-server/110.conf", "hostpci0: 01:00.0\n")
    ran = await hooks.pve("110", "pre-start")
    assert ran.returncode == 1 and ran.stderr.count("\n") == 1 and "protected" in ran.stderr
    hooks.write("/etc/pve/qemu-server/111.conf", "hostpci0: mapping=nowhere\n")
    ran = await hooks.pve("111", "pre-start")
    assert ran.returncode == 1 and f"'nowhere' has no device on node {NODE}" in ran.stderr
    hooks.write("/etc/pve/qemu-server/112.conf", "hostpci0: host=zz:02.0\n")
    ran = await hooks.pve("112", "pre-start")
    assert ran.returncode == 1 and "'zz:02.0' is not a PCI address" in ran.stderr
    assert holder(service) == {}


async def test_pve_vm_without_hostpci_never_reaches_the_daemon(service, hooks, polkit):
    hooks.write("/etc/pve/qemu-server/120.conf", "memory: 2048\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n")
    for phase in ("pre-start", "post-start", "pre-stop", "post-stop", "something-new"):
        assert (await hooks.pve("120", phase)) == Ran(0, "", "")
    assert polkit.checks() == []


async def test_pve_daemon_down(hooks_daemon_down):
    hooks = hooks_daemon_down
    hooks.write("/etc/pve/qemu-server/101.conf", "hostpci0: 0000:3b:00.1\n")
    ran = await hooks.pve("101", "pre-start")
    assert ran.returncode == 1 and "nicpassd is not running" in ran.stderr
    for phase in ("post-start", "pre-stop", "post-stop"):
        assert (await hooks.pve("101", phase)).returncode == 0
    hooks.write("/etc/pve/qemu-server/130.conf", "hostpci0: 65:00.0,x-vga=1\n")  # a GPU only
    assert (await hooks.pve("130", "pre-start")).returncode == 0


# ========================================================= lease state seen by clients
async def test_leased_to_property_follows_the_hook(service, hooks, client):
    from dbus_fast import Message

    await with_vfs(service)

    async def leased_to(address: str) -> str:
        reply = await client.call(Message(destination="org.nicpass.NicPass1", path=device_path(address),
                                          interface="org.freedesktop.DBus.Properties", member="Get",
                                          signature="ss", body=[DEVICE_IFACE, "LeasedTo"]))
        return reply.body[0].value

    assert (await hooks.libvirt("web", "prepare", "begin", WEB)).returncode == 0
    assert [await leased_to(vf) for vf in VF[:4]] == [WEB_UUID] * 3 + [""]
    assert (await hooks.libvirt("web", "release", "end", WEB)).returncode == 0
    assert await leased_to(VF[0]) == ""
