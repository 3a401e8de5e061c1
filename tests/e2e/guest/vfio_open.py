#!/usr/bin/env python3
"""vfio_open.py BDF...: open each device through the VFIO API as a VMM does; print JSON per device.

/dev/vfio/vfio (container) -> VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION(TYPE1v2)
/dev/vfio/<group> -> VFIO_GROUP_GET_STATUS (viable?) -> VFIO_GROUP_SET_CONTAINER -> VFIO_SET_IOMMU
-> VFIO_GROUP_GET_DEVICE_FD(BDF) -> VFIO_DEVICE_GET_INFO -> config-space vendor:device.
Every step is reported; the first failure stops that device. Exit 0 only if all succeeded.
"""
import ctypes
import errno
import fcntl
import json
import os
import struct
import sys

VFIO_TYPE, VFIO_BASE = ord(";"), 100


def io(nr):  # _IO(';', 100 + nr)
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU = io(0), io(1), io(2)
GROUP_GET_STATUS, GROUP_SET_CONTAINER, GROUP_UNSET_CONTAINER, GROUP_GET_DEVICE_FD = io(3), io(4), io(5), io(6)
DEVICE_GET_INFO, DEVICE_GET_REGION_INFO = io(7), io(8)
TYPE1v2_IOMMU = 3
GROUP_FLAGS_VIABLE = 1
CONFIG_REGION = 7

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]


def open_device(bdf):
    report = {"bdf": bdf}
    fds = []
    try:
        group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
        report["group"] = int(group)
        container = os.open("/dev/vfio/vfio", os.O_RDWR)
        fds.append(container)
        report["api_version"] = fcntl.ioctl(container, GET_API_VERSION)
        report["type1v2"] = bool(fcntl.ioctl(container, CHECK_EXTENSION, TYPE1v2_IOMMU))
        gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
        fds.append(gfd)
        _, flags = struct.unpack("II", fcntl.ioctl(gfd, GROUP_GET_STATUS, struct.pack("II", 8, 0)))
        report["viable"] = bool(flags & GROUP_FLAGS_VIABLE)
        if not report["viable"]:
            raise RuntimeError(f"group {group} is not viable")
        fcntl.ioctl(gfd, GROUP_SET_CONTAINER, struct.pack("i", container))
        report["container_set"] = True
        fcntl.ioctl(container, SET_IOMMU, TYPE1v2_IOMMU)
        report["iommu_set"] = True
        dfd = libc.ioctl(gfd, GROUP_GET_DEVICE_FD, bdf.encode())
        if dfd < 0:
            raise OSError(ctypes.get_errno(), f"VFIO_GROUP_GET_DEVICE_FD: {os.strerror(ctypes.get_errno())}")
        fds.append(dfd)
        report["device_fd"] = True
        _, _, regions, irqs = struct.unpack("IIII", fcntl.ioctl(dfd, DEVICE_GET_INFO, struct.pack("IIII", 16, 0, 0, 0)))
        report["regions"], report["irqs"] = regions, irqs
        info = fcntl.ioctl(dfd, DEVICE_GET_REGION_INFO, struct.pack("IIIIQQ", 32, 0, CONFIG_REGION, 0, 0, 0))
        offset = struct.unpack("IIIIQQ", info)[5]
        vendor, device = struct.unpack("<HH", os.pread(dfd, 4, offset))
        report["config_ids"] = f"{vendor:04x}:{device:04x}"
        report["ok"] = True
    except OSError as exc:
        report["ok"] = False
        report["error"] = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
    except RuntimeError as exc:
        report["ok"] = False
        report["error"] = str(exc)
    finally:
        for fd in reversed(fds):
            os.close(fd)
    return report


results = [open_device(bdf) for bdf in sys.argv[1:]]
print(json.dumps(results))
sys.exit(0 if all(r["ok"] for r in results) else 1)
