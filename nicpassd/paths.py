"""Every filesystem path nicpassd touches, rooted in one injectable directory.

Production uses ``/``; the simulator and the tests move the root (``--root DIR`` or
``NICPASSD_ROOT``). Nothing else in the code base builds an absolute path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "NICPASSD_ROOT"


@dataclass(frozen=True)
class HostPaths:
    root: Path = Path("/")

    def under(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    # kernel views
    @property
    def sys(self) -> Path:
        return self.under("/sys")

    @property
    def pci_devices(self) -> Path:
        return self.under("/sys/bus/pci/devices")

    @property
    def pci_drivers(self) -> Path:
        return self.under("/sys/bus/pci/drivers")

    @property
    def drivers_probe(self) -> Path:
        return self.under("/sys/bus/pci/drivers_probe")

    @property
    def class_net(self) -> Path:
        return self.under("/sys/class/net")

    @property
    def class_iommu(self) -> Path:
        return self.under("/sys/class/iommu")

    @property
    def iommu_groups(self) -> Path:
        return self.under("/sys/kernel/iommu_groups")

    @property
    def proc_net(self) -> Path:
        return self.under("/proc/net")

    @property
    def proc_cmdline(self) -> Path:
        return self.under("/proc/cmdline")

    @property
    def dev_vfio(self) -> Path:
        return self.under("/dev/vfio")

    # udev's runtime state: its control socket (udevd runs) and its database (a device it has
    # finished processing has a file there)
    @property
    def udev_control(self) -> Path:
        return self.under("/run/udev/control")

    @property
    def udev_data(self) -> Path:
        return self.under("/run/udev/data")

    # our own state
    @property
    def config_file(self) -> Path:
        return self.under("/etc/nicpassd/nicpassd.toml")

    @property
    def state_dir(self) -> Path:
        return self.under("/var/lib/nicpassd")

    @property
    def runtime_dir(self) -> Path:
        return self.under("/run/nicpassd")

    def pci_device(self, address: str) -> Path:
        return self.pci_devices / address
