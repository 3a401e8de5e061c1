"""The production event source (nicpassd/host/udev.py: pyudev's netlink monitor on the asyncio loop).

- udev-sourced events from umockdev: the monitor runs in a subprocess under ``umockdev-wrapper``,
  which redirects libudev to a mock sysfs and a mock udev netlink socket; devices are added and
  events raised through libumockdev with ctypes (no PyGObject);
- kernel-sourced events for real: a veth pair created and deleted in a throwaway network namespace
  (``unshare --net``), where this machine's own interfaces are not even visible.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from support import REPO

UMOCKDEV_SCRIPT = textwrap.dedent(r"""
    import asyncio, ctypes, json, sys
    lib = ctypes.CDLL("libumockdev.so.0")
    lib.umockdev_testbed_new.restype = ctypes.c_void_p
    lib.umockdev_testbed_add_devicev.restype = ctypes.c_void_p
    lib.umockdev_testbed_add_devicev.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                                 ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                                 ctypes.POINTER(ctypes.c_char_p)]
    lib.umockdev_testbed_uevent.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]

    def strv(*items):
        return (ctypes.c_char_p * (len(items) + 1))(*[item.encode() for item in items], None)

    def add(bed, subsystem, name, parent, attributes, properties):
        path = lib.umockdev_testbed_add_devicev(bed, subsystem.encode(), name.encode(), parent,
                                                strv(*attributes), strv(*properties))
        return ctypes.cast(path, ctypes.c_char_p).value

    from nicpassd.host.udev import UdevEvents

    bed = lib.umockdev_testbed_new()
    loop = asyncio.new_event_loop()
    events = []
    source = UdevEvents(loop, events.append, source="udev")
    # add_devicev() raises "add" itself.
    pf = add(bed, "pci", "0000:3b:00.0", None, ["vendor", "0x8086", "device", "0x1572", "sriov_totalvfs", "64"],
             ["PCI_SLOT_NAME", "0000:3b:00.0", "DRIVER", "i40e"])
    net = add(bed, "net", "enp59s0f0", pf, ["address", "3c:fd:fe:a0:00:00"], ["INTERFACE", "enp59s0f0"])
    add(bed, "usb", "1-1", None, ["idVendor", "1d6b"], ["DEVTYPE", "usb_device"])  # not ours: filtered
    vf = add(bed, "pci", "0000:3b:02.0", pf, ["vendor", "0x8086", "device", "0x154c"],
             ["PCI_SLOT_NAME", "0000:3b:02.0"])
    lib.umockdev_testbed_uevent(bed, vf, b"bind")
    lib.umockdev_testbed_uevent(bed, vf, b"unbind")
    lib.umockdev_testbed_uevent(bed, pf, b"change")
    lib.umockdev_testbed_uevent(bed, net, b"remove")
    lib.umockdev_testbed_uevent(bed, vf, b"remove")

    async def collect():
        for _ in range(500):
            if len(events) >= 8:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # anything extra would show up now

    loop.run_until_complete(collect())
    source.close()
    print(json.dumps([[e.action, e.subsystem, e.sys_name, e.driver] for e in events]))
""")

VETH_SCRIPT = textwrap.dedent(r"""
    import asyncio, json, socket, subprocess, time
    from nicpassd.host.udev import UdevEvents

    loop = asyncio.new_event_loop()
    events = []
    source = UdevEvents(loop, lambda e: events.append((time.monotonic(), e)), source="kernel")
    import os
    with socket.socket(fileno=os.dup(source.monitor.fileno())) as sock:  # a dup: libudev owns its fd
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    async def run():
        started = time.monotonic()
        subprocess.run(["ip", "link", "add", "nptest0", "type", "veth", "peer", "name", "nptest1"], check=True)
        for _ in range(300):
            if len(events) >= 2:
                break
            await asyncio.sleep(0.005)
        subprocess.run(["ip", "link", "del", "nptest0"], check=True)
        for _ in range(300):
            if sum(1 for _, e in events if e.action == "remove") >= 2:
                break
            await asyncio.sleep(0.005)
        return events[0][0] - started if events else None

    latency = loop.run_until_complete(run())
    print(json.dumps({"events": [[e.action, e.subsystem, e.sys_name] for _, e in events],
                      "latency": latency, "rcvbuf": buffer}))
""")


def run_python(argv_prefix: list[str], script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*argv_prefix, sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO)


@pytest.mark.skipif(shutil.which("umockdev-wrapper") is None, reason="umockdev is not installed (scripts/setup)")
def test_udev_events_from_umockdev():
    result = run_python(["umockdev-wrapper"], UMOCKDEV_SCRIPT)
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout.strip().splitlines()[-1])
    assert events == [
        ["add", "pci", "0000:3b:00.0", "i40e"],
        ["add", "net", "enp59s0f0", ""],
        ["add", "pci", "0000:3b:02.0", ""],
        ["bind", "pci", "0000:3b:02.0", ""],
        ["unbind", "pci", "0000:3b:02.0", ""],
        ["change", "pci", "0000:3b:00.0", "i40e"],
        ["remove", "net", "enp59s0f0", ""],
        ["remove", "pci", "0000:3b:02.0", ""],
    ]  # the usb device raised "add" too: filtered out by subsystem


def _can_unshare_net() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_net(), reason="needs root and network namespaces")
def test_kernel_uevents_of_a_veth_pair_in_a_throwaway_namespace():
    result = run_python(["unshare", "--net", "--"], VETH_SCRIPT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(report["events"]) == [["add", "net", "nptest0"], ["add", "net", "nptest1"],
                                        ["remove", "net", "nptest0"], ["remove", "net", "nptest1"]]
    assert report["latency"] < 1.0
    assert report["rcvbuf"] >= 64 * 1024 * 1024  # SO_RCVBUFFORCE as root: the enlarged buffer


@pytest.mark.skipif(os.geteuid() != 0, reason="a kernel netlink socket needs no privilege, the buffer does")
async def test_lost_events_become_one_overflow_event():
    import asyncio

    from nicpassd.host.udev import OVERFLOW, UdevEvents

    events = []
    source = UdevEvents(asyncio.get_running_loop(), events.append, source="kernel")
    calls = iter([OSError(errno.ENOBUFS, "No buffer space available"), None])

    def poll(timeout=None):
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    source.monitor.poll = poll
    source._drain()
    source.close()
    assert events == [OVERFLOW]
