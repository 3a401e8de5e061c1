"""`python -m nicpassd.sim.kernel_server --root DIR --write ATTRIBUTE VALUE`: someone else's
write into a running simulated kernel, exactly as `echo VALUE > /sys/...` (the same errors, the
same uevents), so anyone can play libvirt, driverctl or a careless admin against nicpassd."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nicpassd.paths import HostPaths
from nicpassd.sim import kernel_server

ENO1, PF = "0000:01:00.0", "0000:3b:00.0"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One kernel for the module (a start costs seconds); each test changes other devices."""
    paths = HostPaths(tmp_path_factory.mktemp("served"))
    kernel_server.spawn(paths, None)
    try:
        yield paths
    finally:
        kernel_server.stop(paths)


def second_writer(paths: HostPaths, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nicpassd.sim.kernel_server", "--root", str(paths.root), *args],
                          capture_output=True, text=True, timeout=60)


def test_a_shell_users_writes_reach_the_running_kernel(served):
    devices = "sys/bus/pci/devices"
    assert second_writer(served, "--modprobe", "vfio-pci").returncode == 0
    assert second_writer(served, "--write", f"{devices}/{ENO1}/driver_override", "vfio-pci").returncode == 0
    assert second_writer(served, "--write", f"{devices}/{ENO1}/driver/unbind", ENO1).returncode == 0
    assert second_writer(served, "--write", "sys/bus/pci/drivers_probe", ENO1).returncode == 0
    driver = served.pci_device(ENO1) / "driver"
    assert driver.resolve().name == "vfio-pci"
    assert (served.pci_device(ENO1) / "driver_override").read_text() == "vfio-pci\n"


def test_the_kernels_refusal_is_the_shells(served):
    numvfs = f"sys/bus/pci/devices/{PF}/sriov_numvfs"
    assert second_writer(served, "--write", numvfs, "2").returncode == 0
    refused = second_writer(served, "--write", numvfs, "3")  # 0 then N only
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"write to {numvfs}: Device or resource busy"
    assert (served.pci_device(PF) / "sriov_numvfs").read_text().strip() == "2"


def test_no_kernel_no_write(tmp_path):
    result = second_writer(HostPaths(tmp_path), "--write", "sys/bus/pci/drivers_probe", ENO1)
    assert result.returncode == 1 and "no simulated kernel serves" in result.stderr
