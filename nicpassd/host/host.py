"""The host model: the only code that reads or writes the kernel's view of PCI and networking."""

from __future__ import annotations

from nicpassd.errors import KernelError
from nicpassd.host import sysfs
from nicpassd.host.model import HostSnapshot, PciFunction
from nicpassd.host.writer import KernelWriter, describe_oserror, run_blocking, write_attribute
from nicpassd.paths import HostPaths


class Host:
    def __init__(self, paths: HostPaths, writer: KernelWriter, *, write_timeout: float = 30.0) -> None:
        self.paths = paths
        self.writer = writer
        self.write_timeout = write_timeout

    # reads
    def snapshot(self) -> HostSnapshot:
        return sysfs.read_snapshot(self.paths)

    def function(self, address: str) -> PciFunction | None:
        return sysfs.read_function(self.paths, address)

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

    # writes (kernel rules §7-8: driver_override, unbind, drivers_probe)
    async def set_driver_override(self, address: str, driver: str) -> None:
        # "\n" clears: a 0-byte write may be ignored (kernel rules §8).
        await self._write(self.paths.pci_device(address) / "driver_override", (driver or "") + "\n")

    async def unbind(self, address: str, driver: str) -> None:
        await self._write(self.paths.pci_drivers / driver / "unbind", address)

    async def probe(self, address: str) -> None:
        await self._write(self.paths.drivers_probe, address)

    async def set_num_vfs(self, address: str, count: int) -> None:
        await self._write(self.paths.pci_device(address) / "sriov_numvfs", str(count))

    async def set_autoprobe(self, address: str, enabled: bool) -> None:
        await self._write(self.paths.pci_device(address) / "sriov_drivers_autoprobe", "1" if enabled else "0")

    async def load_module(self, name: str) -> None:
        try:
            await run_blocking(lambda: self.writer.load_module(name), timeout=self.write_timeout,
                               what=f"loading module {name}")
        except OSError as exc:
            raise KernelError(f"cannot load kernel module {name}: {describe_oserror(exc)}",
                              f"install the module for the running kernel (modprobe {name})") from exc

    async def _write(self, path, data: str) -> None:
        await write_attribute(self.writer, path, data, timeout=self.write_timeout)
