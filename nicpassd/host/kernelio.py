"""The smallest kernel reads and writes, standard library only.

Shared by the daemon's host layer and the early-binding udev helper (nicpassd/host/early_binding.py),
which udev starts at boot before anything else is up: importing this module must cost nothing
beyond the standard library's ``os``.
"""

from __future__ import annotations

import os
import re

SRIOV_CAPABILITY = 0x0010
DSN_CAPABILITY = 0x0003
# The drivers a passthrough binding means: the device is held for a VM (or for nobody), not by
# a host driver. The one definition of the set.
VFIO = "vfio-pci"
PASSTHROUGH_DRIVERS = ("vfio-pci", "pci-stub")
DRIVER_MODULES = {"vfio-pci": "vfio_pci", "pci-stub": "pci_stub"}
# A PCI function's full address as the kernel names it (use with fullmatch): the one grammar every
# file nicpassd reads and every name a caller gives is checked against.
PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
MAC_TEXT = r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}"  # as sysfs shows a netdev's address
MAC = re.compile(MAC_TEXT)
SERIAL = re.compile(r"(?:[0-9a-f]{2}-){7}[0-9a-f]{2}")  # a PCIe Device Serial Number, as read_serial gives it


def write_sysfs(path: "os.PathLike[str] | str", data: str) -> None:
    """One write() of the whole value: a sysfs attribute takes it in a single store. Raises
    OSError with the kernel's errno."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def read_text(path: "os.PathLike[str] | str", default: str = "") -> str:
    """A small attribute, stripped; ``default`` when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return default
    try:
        return os.read(fd, 65536).decode().strip()
    except (OSError, UnicodeDecodeError):
        return default
    finally:
        os.close(fd)


def hex_id(path: "os.PathLike[str] | str") -> str:
    """A PCI id attribute (vendor, device, subsystem_*) as four lower-case hex digits."""
    return read_text(path).lower().removeprefix("0x").rjust(4, "0")


def link_name(path: "os.PathLike[str] | str") -> str:
    """The last component of a symlink's target ("" when it is no link): a driver, a PF."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return ""


def read_override(device_dir: str) -> str:
    """A function's driver_override, "" for none; OSError when the function is gone."""
    fd = os.open(f"{device_dir}/driver_override", os.O_RDONLY | os.O_CLOEXEC)
    try:
        override = os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)
    return "" if override == "(null)" else override


class _ExtendedConfig:
    """The extended capabilities of a function's config space, read a dword at a time.

    Not the whole 4 KiB: the kernel answers a read of sysfs ``config`` with one config-space
    access per dword, and under a hypervisor each access traps to the VMM. Walking the chain
    costs one access per capability (and two for the serial), where the whole file is 1,024:
    this runs for every function that appears, VFs included, in the daemon and in the udev helper.
    """

    def __init__(self, config: "os.PathLike[str] | str") -> None:
        try:
            self.fd = os.open(config, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1

    def __enter__(self) -> "_ExtendedConfig":
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``, or b"" when they cannot all be read (beyond the first 64
        bytes, config space is readable with CAP_SYS_ADMIN only)."""
        if self.fd < 0:
            return b""
        try:
            data = os.pread(self.fd, size, offset)
        except OSError:
            return b""
        return data if len(data) == size else b""

    def capabilities(self):
        """(capability id, offset) of each PCIe extended capability."""
        offset, seen = 0x100, 0
        while 0x100 <= offset <= 4096 - 12 and seen < 64:
            header = int.from_bytes(self.read(offset, 4) or b"\0\0\0\0", "little")
            if header in (0, 0xFFFFFFFF):
                return
            yield header & 0xFFFF, offset
            offset, seen = header >> 20, seen + 1


def read_serial(config: "os.PathLike[str] | str") -> str:
    """The PCIe Device Serial Number from extended config space, "" when absent or unreadable
    (beyond the first 64 bytes, config space is readable with CAP_SYS_ADMIN only)."""
    with _ExtendedConfig(config) as space:
        for capability, offset in space.capabilities():
            if capability == DSN_CAPABILITY:
                serial = space.read(offset + 4, 8)
                if not serial:
                    return ""
                raw = int.from_bytes(serial, "little").to_bytes(8, "big").hex()
                return "-".join(raw[i:i + 2] for i in range(0, 16, 2))
    return ""


def has_sriov_capability(config: "os.PathLike[str] | str") -> bool | None:
    """Does the function's config space carry the SR-IOV extended capability (whatever the
    kernel made of it)? None when the extended config space cannot be read (without
    CAP_SYS_ADMIN the kernel gives the first 64 bytes only)."""
    with _ExtendedConfig(config) as space:
        if not space.read(0x100, 4):
            return None
        return any(capability == SRIOV_CAPABILITY for capability, _ in space.capabilities())


def modprobe_path() -> str:
    """modprobe's path: udev runs its programs without PATH, and Python's fallback
    (/bin:/usr/bin) misses /usr/sbin."""
    import shutil

    return shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/sbin/modprobe"


def load_module(name: str) -> None:
    """modprobe ``name`` quietly; OSError with modprobe's words when it fails."""
    import errno
    import subprocess

    result = subprocess.run([modprobe_path(), "-q", name], capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL, timeout=60)
    if result.returncode != 0:
        raise OSError(errno.ENOENT, result.stderr.strip() or f"modprobe {name} failed")
