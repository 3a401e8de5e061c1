"""The host model: the only door to the kernel. Every read and write of sysfs, /proc and the
VM processes the engine needs goes through ``Host``; the engine never builds a kernel path.

Reads of whole functions (``function``) cost a few dozen syscalls; the bind paths and their
verification loops use ``binding`` and ``driver_of`` (one or two syscalls). Writes run in worker
threads with the write timeout (docs/kernel-rules.md §3): one write at a time (``set_*``, ``unbind``,
``probe``) or a whole batch in one thread (``write_batch`` of the ``*_write`` descriptions).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from nicpassd.errors import Busy, KernelError
from nicpassd.host import kernelio, legacy, platform, procfs, sysfs, vf_netlink
from nicpassd.host.kernelio import VFIO
from nicpassd.host.model import HostSnapshot, PciFunction, VfSettings
from nicpassd.host.vf_netlink import VfChange
from nicpassd.host.vfio_latch import NOBODY, VfioLatches
from nicpassd.host.writer import (BatchFailure, BatchWrite, KernelWriter, describe_oserror, run_blocking,
                                  write_attribute, write_batch)
from nicpassd.paths import HostPaths

log = logging.getLogger(__name__)


class VfRefused(Exception):
    """The PF's driver refused a VF setting: which one, the errno, the driver's words."""

    def __init__(self, setting: str, code: int, detail: str, applied: list[str] | None = None) -> None:
        super().__init__(f"{setting}: {detail or errno.errorcode.get(code, code)}")
        self.setting = setting
        self.code = code
        self.detail = detail
        self.applied = list(applied or ())  # the requests before it, which the kernel carried out


class Host:
    def __init__(self, paths: HostPaths, writer: KernelWriter, *, write_timeout: float = 30.0) -> None:
        self.paths = paths
        self.writer = writer
        self.write_timeout = write_timeout
        self._pci_root = os.fspath(paths.pci_devices)
        self._drivers_probe = paths.drivers_probe  # one Path for the 1,000 probes of a boot reconcile
        self._latches = VfioLatches(paths, writer, self.vfio_holder)

    # ------------------------------------------------------------------- reads
    def snapshot(self) -> HostSnapshot:
        return sysfs.read_snapshot(self.paths)

    def function(self, address: str) -> PciFunction | None:
        return sysfs.read_function(self.paths, address)

    def present(self, address: str) -> PciFunction:
        """``function`` of a device being changed: KernelError when it disappeared meanwhile."""
        function = self.function(address)
        if function is None:
            raise KernelError(f"{address} disappeared from the kernel while being changed")
        return function

    def binding(self, address: str) -> PciFunction:
        """Only what binding and restoring a binding need (driver, driver_override), read cheaply:
        a function with just those two fields. KernelError when the function is gone."""
        try:
            override = kernelio.read_override(f"{self._pci_root}/{address}")
        except OSError:
            raise KernelError(f"{address} disappeared from the kernel while being changed") from None
        return PciFunction(address, "", "", "", "", "", driver=self.driver_of(address), driver_override=override)

    def driver_of(self, address: str) -> str:
        """Just the driver link: the cheap read of a verification loop ("" for none or gone)."""
        return kernelio.link_name(f"{self._pci_root}/{address}/driver")

    def interface_up(self, name: str) -> bool:
        """Is the netdev administratively up (IFF_UP in its flags)?"""
        try:
            return bool(int(kernelio.read_text(self.paths.class_net / name / "flags", "0"), 16) & 0x1)
        except ValueError:
            return False

    def interfaces_of(self, address: str) -> tuple[str, ...]:
        """The netdevs on a function (``net/``, or under a virtio device), cheaply."""
        base = f"{self._pci_root}/{address}"
        try:
            entries = os.listdir(base)
        except OSError:
            return ()
        names: list[str] = []
        for directory in ([f"{base}/net"] if "net" in entries else []) + [
                f"{base}/{entry}/net" for entry in entries if entry.startswith("virtio")]:
            try:
                names += os.listdir(directory)
            except OSError:
                continue
        return tuple(sorted(names))

    def driver_registered(self, name: str) -> bool:
        return (self.paths.pci_drivers / name).is_dir()

    def udev_pending(self, addresses) -> set[str]:
        """The PCI functions among ``addresses`` that udev has not finished processing yet (its
        "add" still queued or running: no database entry), when udevd runs at all. Their rules
        (the early-binding helper, module loading, naming) come first; NetworkManager waits for
        udev's initialization the same way. Without udevd (containers, the simulator) nothing
        is pending."""
        if not self.paths.udev_control.exists():
            return set()
        data = self.paths.udev_data
        return {address for address in addresses if not (data / f"+pci:{address}").exists()}

    # ------------------------------------------------------- VM processes
    @staticmethod
    def process_start_time(pid: int) -> int:
        return procfs.process_start_time(pid)

    @staticmethod
    def open_pidfd(pid: int) -> int:
        return procfs.open_pidfd(pid)

    def read_pidfile(self, pidfile: str, *, not_before: float = 0.0) -> int:
        """The running process an absolute pidfile path (under the host root) names, or 0."""
        return procfs.read_pidfile(self.paths.under(pidfile), not_before=not_before)

    def vfio_users(self, group: int) -> list[tuple[int, str, str]]:
        """(pid, program, QEMU guest name or "") of each process holding /dev/vfio/GROUP open."""
        if group < 0:
            return []
        users = []
        for pid in procfs.holders_of(os.fspath(self.paths.dev_vfio / str(group))):
            argv = procfs.command_line(pid)
            users.append((pid, os.path.basename(argv[0]) if argv else "", procfs.qemu_guest_name(argv)))
        return users

    def vfio_holder(self, address: str, group: int) -> tuple[str, int, str]:
        """Who holds a device through VFIO, as far as the kernel and libvirt let us see:
        (who, pid, guest). The process holding its group (readable for root's processes:
        Proxmox's QEMU), else a running libvirt domain whose live XML holds it (libvirt runs QEMU
        as another user), else ("unknown writer", 0, "")."""
        users = self.vfio_users(group)
        if users:
            pid, program, guest = users[0]
            return f"{program or 'a process'} (pid {pid}{f', guest {guest}' if guest else ''})", pid, guest
        domains = self.libvirt_domains_with(address)
        if domains:
            guest, pid = domains[0]
            return f"libvirt domain {guest}{f' (QEMU pid {pid})' if pid else ''}", pid, guest
        return NOBODY, 0, ""

    def vfio_latched(self, addresses: "list[str] | tuple[str, ...]"):
        """Hold the VFIO groups of ``addresses`` around taking them off vfio-pci; yields
        {address: Busy} of those a VM holds (``nicpassd.host.vfio_latch``)."""
        return self._latches.held(addresses)

    def vfio_busy(self, address: str) -> Busy | None:
        """Busy naming the VM that holds ``address`` through VFIO now, or None."""
        return self._latches.busy(address)

    def libvirt_domains_with(self, address: str) -> list[tuple[str, int]]:
        """(name, QEMU pid or 0) of each running libvirt domain whose live XML holds ``address``
        (/run/libvirt/qemu/NAME.xml, a <domstatus> around the domain; a hot-attached hostdev is in
        it). Readable where /proc/PID/fd of QEMU is not: libvirt runs QEMU as another user."""
        import nicpassd_domain_xml

        found = []
        directory = self.paths.under("/run/libvirt/qemu")
        try:
            names = sorted(name for name in os.listdir(directory) if name.endswith(".xml"))
        except OSError:
            return found
        for name in names:
            try:
                text = (directory / name).read_text(errors="replace")
            except OSError:
                continue
            start, end = text.find("<domain"), text.rfind("</domain>")
            if start < 0 or end < 0:
                continue
            try:
                domain, _uuid, devices = nicpassd_domain_xml.domain_devices(text[start:end + len("</domain>")])
            except ValueError:
                continue
            if address in devices:
                domain = domain or name.removesuffix(".xml")
                found.append((domain, procfs.read_pidfile(directory / f"{domain}.pid")))
        return found

    def modprobe_config(self) -> list[tuple[str, int, str]]:
        """Every line of modprobe.d (/etc, /run, /usr/lib, /lib): what modules get at load time."""
        return legacy.read_modprobe_config(self.paths)

    def driverctl_overrides(self) -> list[legacy.DriverctlOverride]:
        return legacy.read_driverctl(self.paths)

    def networkd_units(self) -> list[legacy.NetworkdUnit]:
        return legacy.read_networkd(self.paths)

    def udev_numvfs_rules(self) -> list[legacy.UdevNumVfsRule]:
        return legacy.read_udev_numvfs(self.paths)

    def read_platform(self) -> platform.Platform:
        """What the preflight check reads about CPU, IOMMU, vfio and the boot loader."""
        return platform.read_platform(self.paths)

    def read_function_platform(self, address: str) -> platform.FunctionPlatform:
        return platform.read_function_platform(self.paths, address)

    # ------------------------------------------------------------------ writes
    # docs/kernel-rules.md §7-8: driver_override, unbind, drivers_probe
    async def set_driver_override(self, address: str, driver: str) -> None:
        await self._write(self.override_write(address, driver))

    async def unbind(self, address: str, driver: str) -> None:
        """Busy, with nothing written, when ``driver`` is vfio-pci and a VM holds the device."""
        with self.vfio_latched([address] if driver == VFIO else []) as busy:
            if busy:
                raise busy[address]
            await self._write(self.unbind_write(address, driver))

    async def probe(self, address: str) -> None:
        await self._write(self.probe_write(address))

    async def set_num_vfs(self, address: str, count: int) -> None:
        await self._write(BatchWrite(address, self.paths.pci_device(address) / "sriov_numvfs", str(count)))

    async def set_autoprobe(self, address: str, enabled: bool) -> None:
        await self._write(BatchWrite(address, self.paths.pci_device(address) / "sriov_drivers_autoprobe",
                                     "1" if enabled else "0"))

    def override_write(self, address: str, driver: str) -> BatchWrite:
        # "\n" clears: a 0-byte write may be ignored (docs/kernel-rules.md §8).
        return BatchWrite(address, Path(f"{self._pci_root}/{address}/driver_override"), (driver or "") + "\n")

    def unbind_write(self, address: str, driver: str) -> BatchWrite:
        return BatchWrite(address, self.paths.pci_drivers / driver / "unbind", address)

    def probe_write(self, address: str) -> BatchWrite:
        return BatchWrite(address, self._drivers_probe, address)

    # -------------------------------------------------------------- VF settings
    def read_vf_settings(self, interface: str) -> tuple[VfSettings, ...]:
        """The VF settings a PF's driver holds (one RTM_GETLINK of the PF): () when the PF has no
        VFs or its driver reports none."""
        try:
            return tuple(vf_netlink.parse_link(self.writer.netlink(vf_netlink.encode_get(interface))))
        except OSError as exc:  # the interface went meanwhile, or no netlink on this root
            log.debug("reading the VF settings of %s failed: %s", interface, exc)
            return ()

    def read_vf_setting(self, interface: str, index: int) -> VfSettings | None:
        """``read_vf_settings`` of one VF (None: not reported)."""
        return next((vf for vf in self.read_vf_settings(interface) if vf.index == index), None)

    async def set_vf(self, interface: str, index: int, change: VfChange, current: VfSettings) -> None:
        """``ip link set INTERFACE vf INDEX ...``: one request per setting, in the kernel's order,
        in a worker thread with the write timeout. ``VfRefused`` names the first setting the
        driver refused (the ones before it are applied)."""
        applied: list[str] = []
        for setting, attribute in vf_netlink.vf_attributes(index, change, current):
            request = vf_netlink.encode_set(interface, attribute)
            try:
                answer = await run_blocking(lambda: self.writer.netlink(request), timeout=self.write_timeout,
                                            what=f"setting the {setting} of VF {index} of {interface}")
                vf_netlink.check_ack(answer)
            except OSError as exc:
                raise VfRefused(setting, exc.errno or 0, getattr(exc, "detail", "") or exc.strerror or "",
                                applied) from None
            applied.append(setting)

    async def write_batch(self, writes: list[BatchWrite]) -> dict[str, BatchFailure]:
        """The writes in order in one worker thread; the failures by function (each function
        stops at its first failure). ``Timeout`` when a write hangs."""
        return await write_batch(self.writer, writes, timeout=self.write_timeout)

    async def load_module(self, name: str) -> None:
        try:
            await run_blocking(lambda: self.writer.load_module(name), timeout=self.write_timeout,
                               what=f"loading module {name}")
        except OSError as exc:
            raise KernelError(f"cannot load kernel module {name}: {describe_oserror(exc)}",
                              f"install the module for the running kernel (modprobe {name})") from exc

    async def load_driver(self, name: str) -> None:
        """``load_module`` only when the driver is not registered yet (each modprobe is a process)."""
        if not self.driver_registered(name):
            await self.load_module(name)

    async def _write(self, write: BatchWrite) -> None:
        await write_attribute(self.writer, write.path, write.data, timeout=self.write_timeout)
