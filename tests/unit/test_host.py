"""The host model: reading a sysfs/procfs tree into a snapshot, and writing with timeouts."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time

import pytest

from nicpassd.errors import KernelError, Timeout
from nicpassd.host import sysfs
from nicpassd.host.host import Host
from nicpassd.host.model import Route
from nicpassd.host.writer import run_blocking, write_attribute

MGMT = ("0000:01:00.0", "0000:01:00.1")


def join_hung_writes() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("kernel-write"):
            thread.join(2)


def write(sim, relative: str, data: str) -> None:
    sim.kernel.write(sim.paths.sys / relative, data)


# ------------------------------------------------------------------------------- reader
def test_snapshot_inventories_nics_and_their_group_mates_only(ksim):
    snapshot = ksim.snapshot()
    assert set(snapshot.functions) == {
        *MGMT, "0000:3b:00.0", "0000:3b:00.1", "0000:5e:00.0",
        "0000:af:00.0", "0000:af:00.1",  # the USB controller sharing group 40 is inventoried
    }
    assert "0000:00:17.0" not in snapshot.functions  # SATA, in a group of its own
    assert snapshot.functions["0000:af:00.1"].class_code == "0c0330"


def test_snapshot_reads_function_attributes(ksim):
    pf = ksim.snapshot().functions["0000:3b:00.0"]
    assert (pf.vendor_id, pf.device_id, pf.subsystem_vendor_id, pf.subsystem_device_id) == ("8086", "1572", "8086", "0006")
    assert (pf.driver, pf.driver_override, pf.interfaces) == ("i40e", "", ("enp59s0f0",))
    assert (pf.sriov_capable, pf.total_vfs, pf.num_vfs, pf.autoprobe) == (True, 64, 0, True)
    assert ksim.snapshot().functions["0000:af:00.0"].sriov_capable is False


def test_snapshot_reads_iommu_groups(ksim):
    snapshot = ksim.snapshot()
    assert snapshot.groups[14] == MGMT
    assert snapshot.groups[40] == ("0000:af:00.0", "0000:af:00.1")
    assert snapshot.groups[5] == ("0000:00:17.0",)
    assert snapshot.group_members("0000:af:00.0") == ("0000:af:00.0", "0000:af:00.1")
    assert snapshot.functions["0000:01:00.1"].iommu_group == 14


def test_snapshot_reads_links_with_kinds_lowers_and_uppers(ksim):
    links = ksim.snapshot().links
    assert (links["eno1"].kind, links["eno1"].device, links["eno1"].uppers) == ("physical", "0000:01:00.0", ("bond0",))
    assert (links["bond0"].kind, links["bond0"].lowers, links["bond0"].uppers) == ("bond", ("eno1", "eno2"), ("br0",))
    assert (links["br0"].kind, links["br0"].lowers, links["br0"].device) == ("bridge", ("bond0",), "")
    assert links["enp59s0f0"].mac == "3c:fd:fe:a0:00:00"


def test_snapshot_reads_routes_of_both_families(ksim):
    assert set(ksim.snapshot().routes) == {
        Route(4, "0.0.0.0/0", "br0", "192.0.2.1"),
        Route(4, "192.0.2.0/24", "br0", ""),
        Route(6, "::/0", "br0", "fe80::1"),
    }


def test_routes_are_parsed_from_the_kernel_proc_formats(ksim):
    # Lines as a real kernel prints them (little-endian hex IPv4, padded device names in IPv6).
    (ksim.paths.proc_net / "route").write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n")
    (ksim.paths.proc_net / "ipv6_route").write_text(
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n"
        "20010db8000000000000000000000000 40 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
        "00000000000000000000000000000001 80 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n")
    assert sysfs.read_proc_routes(ksim.paths) == (  # the fallback where no netlink answers
        Route(4, "0.0.0.0/0", "eth0", "192.168.2.1"),
        Route(4, "192.168.2.0/24", "eth0", ""),
        Route(6, "::/0", "eth0", "fe80::1"),
        Route(6, "2001:db8::/64", "eth0", ""),
    )


def test_permanent_mac_only_for_addr_assign_type_zero(ksim):
    write(ksim, "bus/pci/devices/0000:3b:00.0/sriov_numvfs", "1")
    functions = ksim.snapshot().functions
    assert functions["0000:01:00.0"].permanent_mac == "ac:1f:6b:10:00:01"
    vf = functions["0000:3b:02.0"]
    assert vf.interfaces == ("enp59s0f0v0",) and vf.permanent_mac == ""  # addr_assign_type 1
    assert functions["0000:af:00.1"].permanent_mac == ""  # no netdev


def test_vfs_and_their_pf_are_linked_in_the_snapshot(ksim):
    write(ksim, "bus/pci/devices/0000:3b:00.0/sriov_numvfs", "2")
    functions = ksim.snapshot().functions
    assert functions["0000:3b:00.0"].virtfns == ("0000:3b:02.0", "0000:3b:02.1")
    assert functions["0000:3b:00.0"].num_vfs == 2
    assert functions["0000:3b:02.1"].physfn == "0000:3b:00.0" and functions["0000:3b:02.1"].is_vf


def test_dsn_serial_is_parsed_from_config_space(ksim):
    functions = ksim.snapshot().functions
    assert functions["0000:3b:00.0"].serial == "3c-fd-fe-ff-ff-a0-00-00"
    assert functions["0000:af:00.0"].serial == ""


def test_dsn_serial_is_found_behind_other_extended_capabilities(tmp_path):
    config = bytearray(4096)
    config[0x100:0x104] = (0x0001 | (1 << 16) | (0x150 << 20)).to_bytes(4, "little")  # AER -> 0x150
    config[0x150:0x154] = (0x0003 | (1 << 16)).to_bytes(4, "little")  # DSN, last
    config[0x154:0x15C] = (0x0011223344556677).to_bytes(8, "little")
    (tmp_path / "config").write_bytes(bytes(config))
    assert sysfs.read_serial(tmp_path / "config") == "00-11-22-33-44-55-66-77"
    (tmp_path / "short").write_bytes(bytes(64))  # unprivileged readers see 64 bytes only
    assert sysfs.read_serial(tmp_path / "short") == ""


def test_config_space_is_read_a_capability_at_a_time_not_whole(tmp_path, monkeypatch):
    """Issue 22: the kernel reads config space a dword per access, and under a hypervisor each
    access traps; the serial of every new function (every VF at its creation, in the daemon and
    the udev helper) costs one access per capability, not the 1,024 of the whole file."""
    from nicpassd.host import kernelio

    config = bytearray(4096)
    config[0x100:0x104] = (0x0001 | (1 << 16) | (0x150 << 20)).to_bytes(4, "little")  # AER -> 0x150
    config[0x150:0x154] = (0x0010 | (1 << 16) | (0x170 << 20)).to_bytes(4, "little")  # SR-IOV -> 0x170
    config[0x170:0x174] = (0x0003 | (1 << 16)).to_bytes(4, "little")  # DSN, last
    config[0x174:0x17C] = (0x0011223344556677).to_bytes(8, "little")
    (tmp_path / "config").write_bytes(bytes(config))
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(kernelio.os, "pread", lambda fd, n, at: (reads.append((at, n)), real_pread(fd, n, at))[1])
    assert kernelio.read_serial(tmp_path / "config") == "00-11-22-33-44-55-66-77"
    assert reads == [(0x100, 4), (0x150, 4), (0x170, 4), (0x174, 8)]
    reads.clear()
    assert kernelio.has_sriov_capability(tmp_path / "config") is True
    assert sum(n for _, n in reads) <= 16
    (tmp_path / "short").write_bytes(bytes(64))  # what an unprivileged reader gets
    assert kernelio.has_sriov_capability(tmp_path / "short") is None
    assert kernelio.read_serial(tmp_path / "missing") == ""


def test_snapshot_reads_iommu_cmdline_and_loaded_drivers(ksim):
    snapshot = ksim.snapshot()
    assert snapshot.iommu_present is True
    assert "intel_iommu=on" in snapshot.cmdline.split()
    assert {"i40e", "e1000e", "igb", "xhci_hcd"} <= snapshot.loaded_drivers
    assert "vfio-pci" not in snapshot.loaded_drivers


def test_snapshot_without_iommu(make_kernel, ksim):
    sim = make_kernel(ksim.kernel.topology.model_copy(update={"iommu": False}))
    snapshot = sim.snapshot()
    assert snapshot.iommu_present is False and snapshot.groups == {}
    assert snapshot.functions["0000:af:00.0"].iommu_group == -1
    assert "0000:af:00.1" not in snapshot.functions  # no group, so not a group mate


# ------------------------------------------------------------------------------- writer
async def test_run_blocking_times_out_without_blocking_the_loop():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    release = threading.Event()
    started = time.monotonic()
    try:
        with pytest.raises(Timeout, match="did not complete within 0.1 s"):
            await run_blocking(lambda: release.wait(2), timeout=0.1, what="a hung write")
    finally:
        elapsed = time.monotonic() - started
        release.set()
        join_hung_writes()
        task.cancel()
    assert elapsed < 0.5
    assert ticks >= 4  # the loop kept running other coroutines while the write hung


async def test_a_kernel_write_is_handed_back_to_its_caller_in_one_turn_of_the_loop():
    """The worker thread's outcome reaches the awaiting coroutine on the loop's next turn (the
    minimum: a future's waiter is woken by call_soon), not three turns later as through
    wait_for(shield(...)): under a flood of D-Bus reads a turn is milliseconds."""
    loop = asyncio.get_running_loop()
    turns, handed_back = 0, []

    async def count() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    original = loop.call_soon_threadsafe

    def traced(callback, *args, **kwargs):
        return original(lambda *a: (handed_back.append(turns), callback(*a)), *args, **kwargs)

    counter = asyncio.create_task(count())
    await asyncio.sleep(0)
    loop.call_soon_threadsafe = traced
    try:
        assert await run_blocking(lambda: 42, timeout=5, what="x") == 42
        resumed = turns
    finally:
        del loop.call_soon_threadsafe
        counter.cancel()
    assert len(handed_back) == 1 and resumed - handed_back[0] <= 1


async def test_a_batch_that_keeps_moving_is_not_timed_out_and_one_that_stalls_is(ksim):
    """The write timeout is per write: a batch longer than it in all goes on while each write
    completes in time; one write that hangs is a Timeout naming it."""
    from nicpassd.host.writer import BatchWrite, write_batch

    class Slow:
        def __init__(self, hang_at: int) -> None:
            self.done, self.hang_at, self.release = 0, hang_at, threading.Event()

        def write(self, path, data) -> None:
            if self.done == self.hang_at:
                self.release.wait(2)
            time.sleep(0.03)
            self.done += 1

    writes = [BatchWrite(f"0000:00:0{index}.0", ksim.paths.drivers_probe, "x") for index in range(6)]
    moving = Slow(hang_at=-1)
    assert await write_batch(moving, writes, timeout=0.1) == {} and moving.done == 6  # 0.18 s in all
    stalling = Slow(hang_at=2)
    try:
        with pytest.raises(Timeout, match="0000:00:02.0 did not complete within 0.1 s"):
            await write_batch(stalling, writes, timeout=0.1)
    finally:
        stalling.release.set()
        join_hung_writes()


async def test_run_blocking_returns_the_result_and_raises_the_error():
    assert await run_blocking(lambda: 42, timeout=1, what="x") == 42
    with pytest.raises(OSError):
        await run_blocking(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "boom")), timeout=1, what="x")


def test_a_write_finishing_after_its_loop_closed_is_silent():
    """A hung write outliving the daemon's loop must not crash its worker thread."""
    failures: list[BaseException] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    release = threading.Event()
    try:
        async def main():
            with pytest.raises(Timeout):
                await run_blocking(lambda: release.wait(2), timeout=0.05, what="a hung write")

        asyncio.run(main())  # the loop is closed when this returns
        release.set()
        for thread in threading.enumerate():
            if thread.name.startswith("kernel-write: a hung write"):
                thread.join(2)
    finally:
        threading.excepthook = previous_hook
    assert failures == []


async def test_write_attribute_turns_oserror_into_kernel_error_with_errno(ksim):
    path = ksim.paths.pci_device("0000:3b:00.0") / "sriov_numvfs"
    with pytest.raises(KernelError, match=r"ERANGE"):
        await write_attribute(ksim.kernel, path, "65", timeout=1)


async def test_host_write_times_out_on_a_hung_kernel_write(ksim):
    host = Host(ksim.paths, ksim.kernel, write_timeout=0.05)
    ksim.kernel.hang_write("sriov_numvfs", 0.3)
    with pytest.raises(Timeout):
        await host.set_num_vfs("0000:3b:00.0", 2)
    assert ksim.numvfs("0000:3b:00.0") == 0
    join_hung_writes()  # before this test's loop closes
    assert ksim.numvfs("0000:3b:00.0") == 0


async def test_host_clears_the_override_with_a_newline(ksim):
    host = Host(ksim.paths, ksim.writer)
    await host.set_driver_override("0000:af:00.0", "vfio-pci")
    await host.set_driver_override("0000:af:00.0", "")
    assert ksim.writer.writes == [
        ("0000:af:00.0", "driver_override", "vfio-pci\n"), ("0000:af:00.0", "driver_override", "\n")]
    assert ksim.override("0000:af:00.0") == ""


async def test_host_load_module_failure_is_kernel_error(ksim):
    host = Host(ksim.paths, ksim.kernel)
    with pytest.raises(KernelError, match="nosuchmodule"):
        await host.load_module("nosuchmodule")


def _virtio_net_tree(root, address: str, name: str, mac: str) -> None:
    """A virtio-net function the way the kernel lays it out: the netdev hangs off the virtio
    device on the function (<fn>/virtio0/net/<name>), not off the function (<fn>/net)."""
    fn = root / "sys/devices/pci0000:00/0000:00:02.0" / address
    (fn / "virtio0/net" / name).mkdir(parents=True)
    for attr, value in (("vendor", "0x1af4"), ("device", "0x1041"), ("subsystem_vendor", "0x1af4"),
                        ("subsystem_device", "0x1100"), ("class", "0x020000"), ("driver_override", "(null)")):
        (fn / attr).write_text(value + "\n")
    (fn / "virtio0/net" / name / "address").write_text(mac + "\n")
    (fn / "virtio0/net" / name / "addr_assign_type").write_text("0\n")
    (fn / "virtio0/net" / name / "device").symlink_to("../../../virtio0")
    for bus in ("pci", "virtio"):
        (root / "sys/bus" / bus).mkdir(parents=True, exist_ok=True)
    (fn / "subsystem").symlink_to(root / "sys/bus/pci")
    (fn / "virtio0/subsystem").symlink_to(root / "sys/bus/virtio")
    drivers = root / "sys/bus/pci/drivers/virtio-pci"
    drivers.mkdir(parents=True)
    (fn / "driver").symlink_to(drivers)
    devices = root / "sys/bus/pci/devices"
    devices.mkdir(parents=True)
    (devices / address).symlink_to(fn)
    (root / "sys/class/net").mkdir(parents=True)
    (root / "sys/class/net" / name).symlink_to(fn / "virtio0/net" / name)


def test_virtio_net_function_lists_the_netdev_under_its_virtio_device(tmp_path):
    from nicpassd.paths import HostPaths

    _virtio_net_tree(tmp_path, "0000:01:00.0", "enp1s0", "52:54:00:00:00:01")
    function = sysfs.read_function(HostPaths(tmp_path), "0000:01:00.0")
    assert function is not None and function.driver == "virtio-pci"
    assert function.interfaces == ("enp1s0",)
    assert function.permanent_mac == "52:54:00:00:00:01"
    assert sysfs.read_link(HostPaths(tmp_path), "enp1s0").device == "0000:01:00.0"


def test_virtio_function_without_a_netdev_lists_no_interface(tmp_path):
    from nicpassd.paths import HostPaths

    _virtio_net_tree(tmp_path, "0000:01:00.0", "enp1s0", "52:54:00:00:00:01")
    fn = tmp_path / "sys/bus/pci/devices/0000:01:00.0"
    (fn.resolve() / "virtio1").mkdir()  # e.g. a virtio-blk sibling device: no net/ under it
    function = sysfs.read_function(HostPaths(tmp_path), "0000:01:00.0")
    assert function.interfaces == ("enp1s0",)
