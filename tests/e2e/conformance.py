"""Kernel-behaviour conformance checks, written once over an abstract "kernel under test".

The same checks run against the simulated kernel (``nicpassd.sim.kernel.SimKernel`` in a temporary
root, in the normal unit suite: ``test_conformance_sim.py``) and against the real kernel of the
e2e guest (``test_conformance_kernel.py``, which runs this file inside the guest as a script).
Each check asserts the kernel rules of docs/kernel-rules.md and records what it
*observed* in a normalized, JSON-able form (errno names, roles instead of addresses), so the two
kernels' observations can be compared item by item and every difference reported.

Stdlib only: the guest runs it with its system python3 (``python3 conformance.py --json``).

A kernel under test (duck-typed) offers, with paths relative to /sys:
  write(rel, data: str)   one write(2); raises OSError with the kernel's errno
  read(rel) -> str        the attribute's text, stripped
  exists(rel) -> bool     lexists (a dangling link exists)
  listdir(rel) -> list    sorted entries
  readlink(rel) -> str    basename of a symlink's target
  load_module(name)
  start_uevents(); stop_uevents() -> list[(action, subsystem, role-or-name, driver)]
      uevents of subsystems pci and net; the kernel under test maps netdev events to
      "net:<PCI address of the netdev's device>"
  vf_set(interface, index, words) -> str
      `ip link set dev INTERFACE vf INDEX WORDS...` (one setting): "ok" or the errno name
  vf_show(interface) -> list[dict]
      each VF's {mac, vlan, qos, spoofchk, trust, link_state} as the PF's driver reports it
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


class Env:
    """What the checks work on: an SR-IOV PF with a PF driver and a plain NIC with a host driver."""

    def __init__(self, pf: str, pf_driver: str, nic: str, nic_driver: str) -> None:
        self.pf, self.pf_driver, self.nic, self.nic_driver = pf, pf_driver, nic, nic_driver

    def to_dict(self) -> dict:
        return dict(pf=self.pf, pf_driver=self.pf_driver, nic=self.nic, nic_driver=self.nic_driver)


def dev(address: str, attr: str = "") -> str:
    return f"bus/pci/devices/{address}" + (f"/{attr}" if attr else "")


def outcome(k, rel: str, data: str) -> str:
    """'ok' or the errno name of one write."""
    try:
        k.write(rel, data)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def driver_of(k, address: str) -> str:
    return k.readlink(dev(address, "driver")) if k.exists(dev(address, "driver")) else ""


def vfs_of(k, pf: str) -> list[str]:
    links = [e for e in k.listdir(dev(pf)) if e.startswith("virtfn")]
    return [k.readlink(dev(pf, link)) for link in sorted(links, key=lambda e: int(e[6:]))]


def numvfs(k, pf: str) -> int:
    return int(k.read(dev(pf, "sriov_numvfs")))


def settle(k, predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def roles(env: Env, k, extra: dict[str, str] | None = None) -> dict[str, str]:
    names = {env.pf: "PF", env.nic: "NIC"}
    for index, vf in enumerate(vfs_of(k, env.pf)):
        names[vf] = f"VF{index}"
    names.update(extra or {})
    return names


def normalize(events, names: dict[str, str]) -> list[str]:
    out = []
    for action, subsystem, name, driver in events:
        if action == "move":  # udev's renames of netdevs arrive whenever udev gets to them
            continue
        if subsystem == "net":
            parent = name.removeprefix("net:")
            role = "net:" + names.get(parent, "?")
        else:
            role = names.get(name, "other")
        out.append(" ".join(filter(None, (action, subsystem, role, driver))))
    return out


def reset_pf(k, env: Env) -> None:
    """Back to a known state: PF on its driver, autoprobe on, no VFs."""
    if not driver_of(k, env.pf):
        k.write(dev(env.pf, "driver_override"), "\n")
        k.write("bus/pci/drivers_probe", env.pf)
    if numvfs(k, env.pf):
        k.write(dev(env.pf, "sriov_numvfs"), "0")
    if k.read(dev(env.pf, "sriov_drivers_autoprobe")) != "1":
        k.write(dev(env.pf, "sriov_drivers_autoprobe"), "1")


# --------------------------------------------------------------------------------- checks
@check
def numvfs_transitions(k, env: Env, obs: dict) -> None:
    """§1: 0→N and N→0 only; EBUSY N→M; same value no-op; ERANGE above total; EINVAL junk."""
    reset_pf(k, env)
    total = int(k.read(dev(env.pf, "sriov_totalvfs")))
    rel = dev(env.pf, "sriov_numvfs")
    obs["write current 0"] = outcome(k, rel, "0")
    obs["write 2 from 0"] = outcome(k, rel, "2")
    obs["numvfs after 2"] = numvfs(k, env.pf)
    obs["write 2 again"] = outcome(k, rel, "2")
    obs["write 3 while 2"] = outcome(k, rel, "3")
    obs["numvfs after EBUSY"] = numvfs(k, env.pf)
    obs["VFs after EBUSY"] = len(vfs_of(k, env.pf))
    obs["write total+1"] = outcome(k, rel, str(total + 1))
    obs["write -1"] = outcome(k, rel, "-1")
    obs["write abc"] = outcome(k, rel, "abc")
    obs["write 0 from 2"] = outcome(k, rel, "0")
    obs["VFs after 0"] = len(vfs_of(k, env.pf))
    obs["write total"] = outcome(k, rel, str(total))
    obs["numvfs after total"] = numvfs(k, env.pf)
    obs["write 0 from total"] = outcome(k, rel, "0")
    assert obs["write current 0"] == "ok" and obs["write 2 from 0"] == "ok", obs
    assert obs["numvfs after 2"] == 2 and obs["write 2 again"] == "ok", obs
    assert obs["write 3 while 2"] == "EBUSY" and obs["numvfs after EBUSY"] == 2 and obs["VFs after EBUSY"] == 2, obs
    assert obs["write total+1"] == "ERANGE", obs
    assert obs["write -1"] == "EINVAL" and obs["write abc"] == "EINVAL", obs
    assert obs["write 0 from 2"] == "ok" and obs["VFs after 0"] == 0, obs
    assert obs["numvfs after total"] == total, obs


@check
def numvfs_without_pf_driver(k, env: Env, obs: dict) -> None:
    """§1: with no PF driver, changing the count is ENOENT (writing the current value is not)."""
    reset_pf(k, env)
    k.write(f"bus/pci/drivers/{env.pf_driver}/unbind", env.pf)
    try:
        obs["PF driver after unbind"] = driver_of(k, env.pf)
        obs["write 2 unbound"] = outcome(k, dev(env.pf, "sriov_numvfs"), "2")
        obs["write 0 unbound"] = outcome(k, dev(env.pf, "sriov_numvfs"), "0")
        obs["write total+1 unbound"] = outcome(k, dev(env.pf, "sriov_numvfs"),
                                               str(int(k.read(dev(env.pf, "sriov_totalvfs"))) + 1))
    finally:
        k.write("bus/pci/drivers_probe", env.pf)
    obs["PF driver after probe"] = driver_of(k, env.pf)
    assert obs["PF driver after unbind"] == "", obs
    assert obs["write 2 unbound"] == "ENOENT", obs
    assert obs["write 0 unbound"] == "ok" and obs["write total+1 unbound"] == "ERANGE", obs
    assert obs["PF driver after probe"] == env.pf_driver, obs


@check
def vf_links_and_groups(k, env: Env, obs: dict) -> None:
    """§6/§11: virtfnN/physfn links, VF addresses from offset/stride, a group per VF."""
    reset_pf(k, env)
    k.write(dev(env.pf, "sriov_numvfs"), "2")
    try:
        vfs = vfs_of(k, env.pf)
        offset = int(k.read(dev(env.pf, "sriov_offset")))
        stride = int(k.read(dev(env.pf, "sriov_stride")))
        obs["offset"], obs["stride"] = offset, stride
        domain, bus, devfn = env.pf.split(":")[0], int(env.pf.split(":")[1], 16), env.pf.split(":")[2]
        slot, fn = devfn.split(".")
        rid = (bus << 8) | (int(slot, 16) << 3) | int(fn)
        expected = []
        for index in range(2):
            r = rid + offset + stride * index
            expected.append(f"{domain}:{r >> 8:02x}:{(r & 0xff) >> 3:02x}.{r & 7:x}")
        obs["VF addresses follow offset/stride"] = vfs == expected
        pf_group = k.readlink(dev(env.pf, "iommu_group"))
        groups = [k.readlink(dev(vf, "iommu_group")) for vf in vfs]
        obs["VF groups distinct from PF and each other"] = len(set(groups)) == 2 and pf_group not in groups
        obs["VF group members"] = [k.listdir(f"kernel/iommu_groups/{g}/devices") == [vf] for g, vf in zip(groups, vfs)]
        obs["physfn links"] = [k.readlink(dev(vf, "physfn")) == env.pf for vf in vfs]
        obs["VF device id is sriov_vf_device"] = [
            k.read(dev(vf, "device")).removeprefix("0x") == k.read(dev(env.pf, "sriov_vf_device")).removeprefix("0x")
            for vf in vfs]
        obs["VF vendor is PF vendor"] = [k.read(dev(vf, "vendor")) == k.read(dev(env.pf, "vendor")) for vf in vfs]
        obs["VF has sriov_totalvfs"] = [k.exists(dev(vf, "sriov_totalvfs")) for vf in vfs]
        obs["VF has driver_override"] = [k.exists(dev(vf, "driver_override")) for vf in vfs]
        obs["VF driver_override"] = [k.read(dev(vf, "driver_override")) for vf in vfs]
        obs["VF bound with autoprobe=1"] = [bool(driver_of(k, vf)) for vf in vfs]
        obs["VF has a netdev"] = [settle(k, lambda vf=vf: bool(k.exists(dev(vf, "net")) and k.listdir(dev(vf, "net"))), 10)
                                  for vf in vfs]
        obs["VF listed in bus/pci/devices"] = [vf in k.listdir("bus/pci/devices") for vf in vfs]
        obs["VF has iommu link"] = [k.exists(dev(vf, "iommu")) for vf in vfs]
    finally:
        k.write(dev(env.pf, "sriov_numvfs"), "0")
    obs["VFs gone from bus/pci/devices"] = not any(vf in k.listdir("bus/pci/devices") for vf in vfs)
    obs["VF groups gone"] = not any(k.exists(f"kernel/iommu_groups/{g}/devices/{vf}") for g, vf in zip(groups, vfs))
    assert obs["VF addresses follow offset/stride"], (vfs, expected)
    assert obs["VF groups distinct from PF and each other"], (pf_group, groups)
    assert all(obs["VF group members"]) and all(obs["physfn links"]), obs
    assert all(obs["VF device id is sriov_vf_device"]) and all(obs["VF bound with autoprobe=1"]), obs
    assert not any(obs["VF has sriov_totalvfs"]), obs
    assert obs["VFs gone from bus/pci/devices"] and obs["VF groups gone"], obs


@check
def autoprobe_off(k, env: Env, obs: dict) -> None:
    """§5: with sriov_drivers_autoprobe=0 new VFs come up without a driver."""
    reset_pf(k, env)
    k.write(dev(env.pf, "sriov_drivers_autoprobe"), "0")
    try:
        obs["write autoprobe 0"] = k.read(dev(env.pf, "sriov_drivers_autoprobe"))
        obs["write autoprobe junk"] = outcome(k, dev(env.pf, "sriov_drivers_autoprobe"), "maybe")
        k.write(dev(env.pf, "sriov_numvfs"), "2")
        vfs = vfs_of(k, env.pf)
        obs["VF drivers"] = [driver_of(k, vf) for vf in vfs]
        obs["VF netdevs"] = [k.exists(dev(vf, "net")) for vf in vfs]
        k.write(dev(env.pf, "sriov_drivers_autoprobe"), "1")
        obs["VF drivers after autoprobe back to 1"] = [driver_of(k, vf) for vf in vfs]
    finally:
        reset_pf(k, env)
    assert obs["VF drivers"] == ["", ""], obs
    assert obs["write autoprobe junk"] == "EINVAL", obs
    assert obs["VF drivers after autoprobe back to 1"] == ["", ""], obs  # does not affect enabled VFs


@check
def bind_sequence(k, env: Env, obs: dict) -> None:
    """§7/§8: driver_override semantics, unbind, drivers_probe, and the errors on the way."""
    nic, host = env.nic, env.nic_driver
    k.load_module("vfio-pci")
    obs["override initially"] = k.read(dev(nic, "driver_override"))
    obs["set override"] = outcome(k, dev(nic, "driver_override"), "vfio-pci")
    obs["override reads"] = k.read(dev(nic, "driver_override"))
    obs["driver after override (no auto unbind)"] = driver_of(k, nic)
    obs["probe while bound"] = outcome(k, "bus/pci/drivers_probe", nic)
    obs["driver after probe while bound"] = driver_of(k, nic)
    obs["bind to vfio-pci while bound"] = outcome(k, "bus/pci/drivers/vfio-pci/bind", nic)
    obs["unbind from host driver"] = outcome(k, f"bus/pci/drivers/{host}/unbind", nic)
    obs["driver after unbind"] = driver_of(k, nic)
    obs["netdev after unbind"] = k.exists(dev(nic, "net")) and bool(k.listdir(dev(nic, "net")))
    obs["unbind again"] = outcome(k, f"bus/pci/drivers/{host}/unbind", nic)
    obs["bind host driver against override"] = outcome(k, f"bus/pci/drivers/{host}/bind", nic)
    obs["driver after refused bind"] = driver_of(k, nic)
    obs["probe unbound"] = outcome(k, "bus/pci/drivers_probe", nic)
    obs["driver after probe"] = driver_of(k, nic)
    obs["dev/vfio group node"] = None  # filled by kernels that have /dev (not sysfs)
    obs["probe unknown address"] = outcome(k, "bus/pci/drivers_probe", "0000:7f:1f.7")
    obs["0-byte override write"] = outcome(k, dev(nic, "driver_override"), "")
    obs["override after 0-byte write"] = k.read(dev(nic, "driver_override"))
    obs["clear override with newline"] = outcome(k, dev(nic, "driver_override"), "\n")
    obs["override after clear"] = k.read(dev(nic, "driver_override"))
    obs["driver after clear (stays)"] = driver_of(k, nic)
    obs["unbind from vfio-pci"] = outcome(k, "bus/pci/drivers/vfio-pci/unbind", nic)
    obs["bind host driver"] = outcome(k, f"bus/pci/drivers/{host}/bind", nic)
    obs["driver at end"] = driver_of(k, nic)
    obs["bind host driver while bound to it"] = outcome(k, f"bus/pci/drivers/{host}/bind", nic)
    obs["netdev at end"] = settle(k, lambda: k.exists(dev(nic, "net")) and bool(k.listdir(dev(nic, "net"))), 10)
    obs.pop("dev/vfio group node")
    if driver_of(k, nic) != host:  # leave the NIC as found
        k.write(dev(nic, "driver_override"), "\n")
        if driver_of(k, nic):
            k.write(f"bus/pci/drivers/{driver_of(k, nic)}/unbind", nic)
        k.write("bus/pci/drivers_probe", nic)
    assert obs["override initially"] == "(null)", obs
    assert obs["override reads"] == "vfio-pci" and obs["driver after override (no auto unbind)"] == host, obs
    assert obs["probe while bound"] == "ok" and obs["driver after probe while bound"] == host, obs
    assert obs["unbind from host driver"] == "ok" and obs["driver after unbind"] == "", obs
    assert obs["unbind again"] == "ENODEV", obs
    assert obs["driver after probe"] == "vfio-pci", obs
    assert obs["probe unknown address"] == "ENODEV", obs
    assert obs["override after 0-byte write"] == "vfio-pci", obs
    assert obs["override after clear"] == "(null)" and obs["driver after clear (stays)"] == "vfio-pci", obs
    assert obs["driver at end"] == host and obs["netdev at end"], obs


@check
def uevents_vf_creation(k, env: Env, obs: dict) -> None:
    """§6: VFs are hot-plugged devices: add, driver bind, netdev; removal in reverse."""
    reset_pf(k, env)
    k.start_uevents()
    k.write(dev(env.pf, "sriov_numvfs"), "2")
    settle(k, lambda: all(k.exists(dev(vf, "net")) for vf in vfs_of(k, env.pf)), 10)
    time.sleep(0.5)
    created = k.stop_uevents()
    names = roles(env, k)
    obs["create 2 VFs"] = normalize(created, names)
    k.start_uevents()
    k.write(dev(env.pf, "sriov_numvfs"), "0")
    time.sleep(0.5)
    obs["remove 2 VFs"] = normalize(k.stop_uevents(), names)
    assert any(e.startswith("add pci VF0") for e in obs["create 2 VFs"]), obs
    assert any(e.startswith("remove pci VF1") for e in obs["remove 2 VFs"]), obs


@check
def uevents_bind(k, env: Env, obs: dict) -> None:
    """§6/§8: the uevents of moving a VF from its host driver to vfio-pci and back."""
    reset_pf(k, env)
    k.load_module("vfio-pci")
    k.write(dev(env.pf, "sriov_numvfs"), "1")
    try:
        vf = vfs_of(k, env.pf)[0]
        host = driver_of(k, vf)
        settle(k, lambda: k.exists(dev(vf, "net")), 10)
        time.sleep(0.3)
        names = roles(env, k)
        k.start_uevents()
        k.write(dev(vf, "driver_override"), "vfio-pci")
        k.write(f"bus/pci/drivers/{host}/unbind", vf)
        k.write("bus/pci/drivers_probe", vf)
        time.sleep(0.3)
        obs["VF to vfio-pci"] = normalize(k.stop_uevents(), names)
        k.start_uevents()
        k.write(dev(vf, "driver_override"), "\n")
        k.write("bus/pci/drivers/vfio-pci/unbind", vf)
        k.write("bus/pci/drivers_probe", vf)
        settle(k, lambda: k.exists(dev(vf, "net")), 10)
        time.sleep(0.3)
        obs["VF back to host driver"] = normalize(k.stop_uevents(), names)
    finally:
        reset_pf(k, env)
    assert "bind pci VF0 vfio-pci" in obs["VF to vfio-pci"], obs
    assert any(e.startswith("unbind pci VF0") for e in obs["VF to vfio-pci"]), obs


@check
def vf_settings(k, env: Env, obs: dict) -> None:
    """§16: VF settings live in the PF's driver (rtnetlink): their defaults when the VFs are
    created, what the driver takes and refuses (each setting alone), and that re-creating the
    VFs resets them."""
    reset_pf(k, env)
    interface = k.listdir(dev(env.pf, "net"))[0]
    k.write(dev(env.pf, "sriov_numvfs"), "2")
    try:
        obs["defaults"] = k.vf_show(interface)
        for name, words in (("mac zero", ["mac", "00:00:00:00:00:00"]), ("mac unicast", ["mac", "02:00:00:00:00:31"]),
                            ("mac multicast", ["mac", "03:00:00:00:00:31"]), ("vlan 12 qos 3", ["vlan", "12", "qos", "3"]),
                            ("qos 8", ["vlan", "5", "qos", "8"]),  # (ip itself refuses a VLAN above 4095)
                            ("vlan proto 802.1ad", ["vlan", "7", "proto", "802.1ad"]),
                            ("spoofchk off", ["spoofchk", "off"]), ("trust on", ["trust", "on"]),
                            ("state disable", ["state", "disable"]), ("min rate", ["min_tx_rate", "10"]),
                            ("max rate, PF down", ["max_tx_rate", "100"]), ("VF 9", ["trust", "on"])):
            obs[name] = k.vf_set(interface, 9 if name == "VF 9" else 0, words)
        obs["after"] = k.vf_show(interface)
        k.write(dev(env.pf, "sriov_numvfs"), "0")
        k.write(dev(env.pf, "sriov_numvfs"), "2")
        obs["after re-creation"] = k.vf_show(interface)
    finally:
        reset_pf(k, env)
    assert len(obs["defaults"]) == 2 and obs["defaults"][0] == obs["defaults"][1], obs
    assert obs["mac unicast"] == obs["vlan 12 qos 3"] == obs["spoofchk off"] == obs["trust on"] == "ok", obs
    assert obs["mac multicast"] == "EINVAL" and obs["qos 8"] == "EINVAL", obs
    assert obs["after"][0] == {**obs["defaults"][0], "mac": "02:00:00:00:00:31", "vlan": 12, "qos": 3,
                               "spoofchk": False, "trust": True}, obs
    assert obs["after"][1] == obs["defaults"][1], obs
    assert obs["after re-creation"] == obs["defaults"], obs


def run_all(k, env: Env, only: list[str] | None = None) -> dict:
    """Run every check; never raises. {name: {"ok": bool, "error": str, "observed": {...}}}"""
    results = {}
    for fn in CHECKS:
        if only and fn.__name__ not in only:
            continue
        obs: dict = {}
        t0 = time.monotonic()
        try:
            fn(k, env, obs)
            ok, error = True, ""
        except AssertionError as exc:
            ok, error = False, f"rule violated: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported per check
            ok, error = False, f"{type(exc).__name__}: {exc}"
        results[fn.__name__] = {"ok": ok, "error": error, "observed": obs,
                                "seconds": round(time.monotonic() - t0, 2)}
    return results


def differences(a: dict, b: dict, a_name: str = "kernel", b_name: str = "sim") -> list[str]:
    """Every observation on which two runs of ``run_all`` disagree, one sentence each."""
    out = []
    for check_name in sorted(set(a) | set(b)):
        oa = a.get(check_name, {}).get("observed", {})
        ob = b.get(check_name, {}).get("observed", {})
        for key in sorted(set(oa) | set(ob)):
            va, vb = oa.get(key, "<not observed>"), ob.get(key, "<not observed>")
            if va != vb:
                out.append(f"{check_name}: {key}: {a_name}={va!r} {b_name}={vb!r}")
    return out


def run_differences(a: dict, b: dict, a_name: str = "kernel", b_name: str = "sim") -> list[str]:
    """``differences`` over two whole runs as ``--json`` prints them ({"env", "results"}), plus
    the env and each check's pass/fail; timings and any other top-level field are ignored."""
    out = []
    if a.get("env") != b.get("env"):
        out.append(f"env: {a_name}={a.get('env')!r} {b_name}={b.get('env')!r}")
    ra, rb = a.get("results", {}), b.get("results", {})
    for check_name in sorted(set(ra) | set(rb)):
        oka, okb = ra.get(check_name, {}).get("ok"), rb.get(check_name, {}).get("ok")
        if oka != okb:
            out.append(f"{check_name}: passed: {a_name}={oka!r} {b_name}={okb!r}")
    return out + differences(ra, rb, a_name, b_name)


ERRNO_NAMES = {os.strerror(code): name for code, name in sorted(errno.errorcode.items(), reverse=True)}


class IpVfSettings:
    """VF settings through iproute2, as an admin sets and reads them."""

    def vf_set(self, interface: str, index: int, words: list) -> str:
        import subprocess
        result = subprocess.run(["ip", "link", "set", "dev", interface, "vf", str(index), *words],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return "ok"
        said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        for text, name in ERRNO_NAMES.items():  # "RTNETLINK answers: Invalid argument"
            if said.endswith(text):
                return name
        return f"ip failed: {said}"

    def vf_show(self, interface: str) -> list:
        import subprocess
        out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", interface], capture_output=True, text=True,
                             check=True).stdout
        shown = []
        for vf in json.loads(out)[0].get("vfinfo_list", []):
            vlan = (vf.get("vlan_list") or [{}])[0]
            shown.append({"mac": vf.get("address"), "vlan": vlan.get("vlan", vf.get("vlan", 0)),
                          "qos": vlan.get("qos", vf.get("qos", 0)), "spoofchk": vf.get("spoofchk"),
                          "trust": vf.get("trust"), "link_state": vf.get("link_state")})
        return shown


# ------------------------------------------------------------------------ the real kernel
NETLINK_KOBJECT_UEVENT = 15


class RealKernel(IpVfSettings):
    """/sys of the running kernel; uevents from the kernel's netlink broadcast (group 1); VF
    settings through `ip`."""

    def __init__(self, sysfs: str = "/sys") -> None:
        self.sysfs = sysfs
        self._sock = None
        self._events: list = []
        self._thread = None
        self._stop = threading.Event()

    def _p(self, rel: str) -> str:
        return os.path.join(self.sysfs, rel)

    def write(self, rel: str, data: str) -> None:
        fd = os.open(self._p(rel), os.O_WRONLY)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def read(self, rel: str) -> str:
        with open(self._p(rel)) as handle:
            return handle.read().strip()

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self._p(rel))

    def listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self._p(rel)))

    def readlink(self, rel: str) -> str:
        return os.path.basename(os.readlink(self._p(rel)))

    def load_module(self, name: str) -> None:
        import subprocess
        subprocess.run(["modprobe", name], check=True)

    def start_uevents(self) -> None:
        self._events = []
        self._stop.clear()
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        sock.bind((0, 1))
        sock.settimeout(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = data.split(b"\0")
            env = dict(f.decode(errors="replace").split("=", 1) for f in fields[1:] if b"=" in f)
            subsystem = env.get("SUBSYSTEM", "")
            if subsystem not in ("pci", "net"):
                continue
            devpath = env.get("DEVPATH", "")
            parts = devpath.split("/")
            if subsystem == "net":  # .../<pci address>/net/<ifname>
                name = "net:" + (parts[-3] if len(parts) >= 3 and parts[-2] == "net" else "")
            else:
                name = parts[-1]
            self._events.append((env.get("ACTION", ""), subsystem, name, env.get("DRIVER", "")))

    def stop_uevents(self) -> list:
        time.sleep(0.2)
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._sock:
            self._sock.close()
        return list(self._events)


def discover_env(k) -> Env:
    """The first SR-IOV PF on its driver and the first plain NIC without SR-IOV."""
    pf = nic = None
    for address in k.listdir("bus/pci/devices"):
        if not k.read(dev(address, "class")).startswith("0x02") or k.exists(dev(address, "physfn")):
            continue
        drv = driver_of(k, address)
        if k.exists(dev(address, "sriov_totalvfs")) and drv and pf is None:
            pf = (address, drv)
        elif not k.exists(dev(address, "sriov_totalvfs")) and drv in ("e1000e", "igb", "ixgbe", "e1000") and nic is None:
            nic = (address, drv)
    if pf is None or nic is None:
        raise SystemExit(f"no SR-IOV PF ({pf}) or plain NIC ({nic}) found")
    return Env(pf[0], pf[1], nic[0], nic[1])


def main(argv: list[str]) -> int:
    k = RealKernel()
    env = discover_env(k)
    only = [a for a in argv if not a.startswith("-")]
    results = run_all(k, env, only or None)
    if "--json" in argv:
        print(json.dumps({"env": env.to_dict(), "results": results}))
    else:
        for name, r in results.items():
            print(f"{'PASS' if r['ok'] else 'FAIL'} {name} ({r['seconds']}s) {r['error']}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
