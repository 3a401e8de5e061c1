"""A VF's settings — MAC, VLAN, spoof check, trust, link state, TX rates — checked, written through
its PF's driver, read back, and restored when the driver refuses one of them.

Called through ``Operations.set_vf_settings`` (under the mutation lock) by the API and by the
reconciler. The kernel rules (README, "VF settings"; ``nicpassd.host.vf_netlink``):

- the PF's driver holds the settings: the PF must be on its host driver, with its netdev;
- each setting is its own request, so a refusal names it; what was applied before it is put back;
- ``EOPNOTSUPP``/``EPROTONOSUPPORT`` (the driver does not implement it) is ``NotSupported``,
  ``EINVAL`` (out of the driver's range) is ``InvalidArgument``, anything else ``KernelError`` —
  each naming the driver and, when the kernel gave them, its own words;
- a VF on its host driver (igbvf, iavf, mlx5_core) takes a new administrative MAC only when it
  is probed again: after a MAC change such a VF is unbound and probed (verified).
"""

from __future__ import annotations

import errno
import hashlib
import logging
from dataclasses import fields
from typing import Callable, Protocol

from nicpassd.errors import InvalidArgument, KernelError, NicpassError, NotSupported
from nicpassd.host.host import Host, VfRefused
from nicpassd.host.kernelio import PASSTHROUGH_DRIVERS
from nicpassd.host.model import VfSettings
from nicpassd.host.vf_netlink import LINK_STATES, PROTOCOLS, REQUEST_FIELDS, VfChange, mac_bytes

log = logging.getLogger(__name__)
SETTINGS = tuple(f.name for f in fields(VfChange))
MAX_RATE = 1_000_000  # Mbit/s: 1 Tbit/s, beyond any NIC
NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT)


class Operations(Protocol):
    host: Host
    label: Callable[[str], str]

    async def reprobe(self, address: str) -> None: ...

    async def set_vf_settings(self, pf: str, index: int, change: VfChange, current: VfSettings) -> VfSettings: ...


# ---------------------------------------------------------------------------- stable MACs
def stable_mac(pf_mac: str, index: int) -> str:
    """A VF's MAC that survives every reboot: derived from its PF's permanent MAC and its index,
    locally administered (bit 1 of the first octet) and unicast (bit 0 clear). A hash, not
    "PF MAC + index": the ports of one card have consecutive MACs, and their VFs must not meet."""
    digest = hashlib.sha256(f"nicpassd-vf-mac:{pf_mac.lower()}:{index}".encode()).digest()
    return ":".join(f"{byte:02x}" for byte in bytes([(digest[0] & 0xFC) | 0x02, *digest[1:6]]))


def desired_settings(desire, pf_mac: str, count: int) -> dict[int, dict[str, object]]:
    """VF index -> the settings persisted for it, stable MACs included (for the first ``count``
    VFs when the PF asks for them and its permanent MAC is known)."""
    wanted = {int(key): value.model_dump() for key, value in desire.vf_settings.items()}
    if desire.stable_macs and pf_mac:
        for index in range(count):
            wanted.setdefault(index, {}).setdefault("mac", stable_mac(pf_mac, index))
    return wanted


# ---------------------------------------------------------------------------- arguments
def parse_change(values: dict[str, object]) -> VfChange:
    """The settings asked, checked before anything is written (``InvalidArgument`` naming the bad one)."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise InvalidArgument(f"unknown VF setting(s) {', '.join(map(repr, unknown))}",
                              f"use {', '.join(SETTINGS)}")
    if not values:
        raise InvalidArgument("no VF setting given", f"give one or more of {', '.join(SETTINGS)}")
    checked: dict[str, object] = {}
    for name, value in values.items():
        checked[name] = _checked(name, value)
    change = VfChange(**checked)
    if change.qos and change.vlan == 0:
        raise InvalidArgument("a QoS priority needs a VLAN id", "give vlan N with qos")
    if change.vlan_proto is not None and change.vlan == 0:
        raise InvalidArgument("a VLAN protocol needs a VLAN id", "give vlan N with proto")
    if change.min_tx_rate and change.max_tx_rate and change.min_tx_rate > change.max_tx_rate:
        raise InvalidArgument(f"min-rate {change.min_tx_rate} is above max-rate {change.max_tx_rate}")
    return change


def _checked(name: str, value: object) -> object:
    if name == "mac":
        if not isinstance(value, str):
            raise InvalidArgument("mac must be a string like 02:11:22:33:44:55")
        try:
            raw = mac_bytes(value.lower())
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not any(raw):
            raise InvalidArgument("mac 00:00:00:00:00:00 is not an address", "give a unicast MAC")
        if raw[0] & 1:
            raise InvalidArgument(f"mac {value} is a multicast address", "give a unicast MAC (first octet even)")
        return value.lower()
    if name in ("spoofchk", "trust"):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name} must be on or off (a boolean)")
        return value
    if name == "vlan_proto":
        if value not in PROTOCOLS:
            raise InvalidArgument(f"VLAN protocol {value!r} is not one of {', '.join(PROTOCOLS)}")
        return value
    if name == "link_state":
        if value not in LINK_STATES:
            raise InvalidArgument(f"link state {value!r} is not one of {', '.join(LINK_STATES)}")
        return value
    limits = {"vlan": 4095, "qos": 7, "min_tx_rate": MAX_RATE, "max_tx_rate": MAX_RATE}
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limits[name]:
        raise InvalidArgument(f"{name} must be a whole number from 0 to {limits[name]}; {value!r} given")
    return value


def differences(current: VfSettings, change: VfChange) -> VfChange:
    """The part of ``change`` the VF does not show yet."""
    return VfChange(**{name: value for name, value in change.asked().items() if getattr(current, name) != value})


def undo_of(current: VfSettings, change: VfChange) -> VfChange:
    """The settings ``change`` touches, as they were."""
    return VfChange(**{name: getattr(current, name) for name in change.asked()})


def describe(change: VfChange) -> str:
    words = {True: "on", False: "off"}
    return ", ".join(f"{name.replace('_', ' ')} {words.get(value, value) if isinstance(value, bool) else value}"
                     for name, value in change.asked().items())


# ------------------------------------------------------------------------------- writing
async def apply(ops: Operations, pf: str, index: int, change: VfChange, current: VfSettings) -> VfSettings:
    """Write what differs, read back; on a refusal or a read-back that differs, put back what was
    written and raise the typed error. Returns the settings the kernel shows after."""
    host = ops.host
    vlan = current.vlan if change.vlan is None else change.vlan
    if not vlan and (change.qos or (change.vlan_proto is not None and change.vlan_proto != "802.1Q")):
        raise InvalidArgument(f"VF {index} of {ops.label(pf)} has no VLAN: a QoS priority or protocol needs a VLAN id",
                              "give vlan N with it")
    todo = differences(current, change)
    if not todo.asked():
        return current
    function = host.present(pf)
    interface = function.interfaces[0] if function.interfaces else ""
    if not interface:
        raise NotSupported(f"the VF settings of {ops.label(pf)} are held by its driver, and it has none bound "
                           f"with a netdev (driver: {function.driver or 'none'})",
                           f"give {pf} back to its host driver first")
    driver = function.driver
    try:
        await host.set_vf(interface, index, todo, current)
    except VfRefused as refusal:
        done = VfChange(**{name: value for name, value in todo.asked().items()
                           if any(name in REQUEST_FIELDS[request] for request in refusal.applied)})
        note = await _put_back(host, interface, index, current, done) if done.asked() else "nothing was changed"
        raise _typed(refusal, driver, ops.label(pf), index).with_note(note) from None
    after = host.read_vf_setting(interface, index)
    wrong = [name for name, value in todo.asked().items() if after is None or getattr(after, name) != value]
    if wrong:
        note = await _put_back(host, interface, index, current, todo)
        shown = "nothing" if after is None else describe(VfChange(**{n: getattr(after, n) for n in wrong}))
        raise KernelError(f"the {driver} driver of {ops.label(pf)} accepted {describe(todo)} for VF {index} but "
                          f"shows {shown}", "check the kernel log (journalctl -k)").with_note(note)
    vfs = function.virtfns
    if todo.mac is not None and index < len(vfs):
        vf = vfs[index]
        vf_driver = host.driver_of(vf)
        if vf_driver and vf_driver not in PASSTHROUGH_DRIVERS:
            if host.interface_up(interface):
                await ops.reprobe(vf)  # its driver takes the new MAC when it probes (docs/kernel-rules.md §16)
            else:
                # igb answers a probing VF's mailbox only while the PF is up: a reprobe now would
                # give the VF another random MAC ("PF still in reset state. Is the PF interface up?").
                log.warning("VF %d of %s: the MAC %s is set, but %s is down: %s takes it when %s is up and "
                            "the VF is probed again (or a VM's driver resets it)", index, ops.label(pf),
                            todo.mac, interface, vf_driver, interface, extra={"device": pf, "action": "vf"})
    log.info("VF %d of %s: %s", index, ops.label(pf), describe(todo), extra={"device": pf, "action": "vf"})
    return after


async def put_back(ops: Operations, pf: str, index: int, before: dict[str, object]) -> bool | None:
    """VF ``index`` of ``pf`` back to the settings ``before`` (what differs of them, through
    ``Operations.set_vf_settings``: journaled, read back). True when something was written,
    False when nothing differed, None when the PF's netdev or the VF is gone."""
    function = ops.host.function(pf)
    current = ops.host.read_vf_setting(function.interfaces[0], index) if function and function.interfaces else None
    if current is None:
        return None
    change = VfChange(**{name: value for name, value in before.items() if name in SETTINGS})
    return await ops.set_vf_settings(pf, index, change, current) is not current


async def _put_back(host: Host, interface: str, index: int, current: VfSettings, todo: VfChange) -> str:
    try:
        await host.set_vf(interface, index, undo_of(current, todo), current)
    except (VfRefused, NicpassError) as exc:
        log.error("putting the settings of VF %d of %s back failed: %s", index, interface, exc)
        return f"putting the previous settings back also failed: {exc}"
    return "the previous settings were put back"


def _typed(refusal: VfRefused, driver: str, label: str, index: int) -> NicpassError:
    said = f": {refusal.detail}" if refusal.detail else ""
    setting = refusal.setting
    if refusal.code in NOT_SUPPORTED:
        return NotSupported(f"the {driver} driver of {label} does not support the {setting} of its VFs{said}",
                            "leave that setting out for this card")
    if refusal.code in (errno.EINVAL, errno.ERANGE):
        return InvalidArgument(f"the {driver} driver of {label} refused the {setting} of VF {index}{said}",
                               "give a value this driver accepts")
    name = errno.errorcode.get(refusal.code, str(refusal.code))
    return KernelError(f"setting the {setting} of VF {index} of {label} failed: {name}{said}",
                       "check the kernel log (journalctl -k)")
