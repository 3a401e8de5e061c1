"""The D-Bus face of the engine: the Manager object, one object per device, ObjectManager signals.

This module only translates: arguments in, engine calls, typed results and errors out (the
engine's ``Explanation``, ``Finding`` and ``StepOutcome`` become D-Bus types here and nowhere
else). Authorization is declared per method (``@authorized(ACTION)``, firewalld's
``dbus_polkit_require_auth``): polkit is asked before the method looks at its arguments, so an
unauthorized caller learns nothing about them. Annotations are the D-Bus signatures dbus-fast
reads, so this module must not use ``from __future__ import annotations``.
"""

import functools
import logging

from dbus_fast import Message, MessageType, Variant
from dbus_fast.errors import DBusError
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from nicpassd import __version__, stopwatch
from nicpassd.engine.engine import Engine, InventoryDelta
from nicpassd.engine.leasing import UUID
from nicpassd.engine.results import Explanation
from nicpassd.engine.views import DeviceView
from nicpassd.errors import InvalidArgument, NicpassError
from nicpassd.transport.caller import caller
from nicpassd.transport.domain import domain_devices
from nicpassd.transport.polkit import Authorizer

log = logging.getLogger(__name__)

BUS_NAME = "org.nicpass.NicPass1"
MANAGER_PATH = "/org/nicpass/NicPass1"
MANAGER_IFACE = "org.nicpass.NicPass1.Manager"
DEVICE_IFACE = "org.nicpass.NicPass1.Device"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
ERROR_PREFIX = "org.nicpass.NicPass1.Error."
ACTION_MANAGE = "org.nicpass.NicPass1.manage"
ACTION_LEASE = "org.nicpass.NicPass1.lease"
ACTION_FORCE = "org.nicpass.NicPass1.force"  # asked in addition when a caller passes force=true


DEVICES_PATH = f"{MANAGER_PATH}/devices/"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"


def device_path(address: str) -> str:
    return f"{DEVICES_PATH}{address.replace(':', '_').replace('.', '_')}"


MAX_ERROR_TEXT = 2000  # a refusal's sentence, over D-Bus and in the log


class RefusalLog:
    """Refusals in the log without letting a caller flood it: each line cut short and escaped,
    and at most ``burst`` lines per caller per ``window`` seconds (then one line saying how many
    were left out). journald's own rate limit would drop the daemon's other lines too."""

    def __init__(self, burst: int = 10, window: float = 60.0) -> None:
        self.burst, self.window = burst, window
        self._seen: dict[str, tuple[float, int]] = {}  # sender -> (window start, refusals in it)

    def log(self, sender: str, method: str, text: str) -> None:
        import time

        now = time.monotonic()
        start, count = self._seen.get(sender, (now, 0))
        if now - start > self.window:
            if count > self.burst:
                log.info("%d more refusal(s) of %s left out of the log", count - self.burst, sender)
            start, count = now, 0
        count += 1
        self._seen[sender] = (start, count)
        if len(self._seen) > 1024:  # callers come and go: forget the oldest
            self._seen.pop(next(iter(self._seen)))
        if count <= self.burst:
            log.info("%s of %s refused: %s", method, sender or "an unknown caller",
                     text[:300].encode("unicode_escape").decode() + ("…" if len(text) > 300 else ""))


def dbus_errors(fn):
    """Engine errors become typed D-Bus errors; anything unexpected is logged, never leaked."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except DBusError:
            raise
        except NicpassError as exc:
            text = str(exc)
            refusals = getattr(args[0], "refusals", None) if args else None
            if refusals is not None:
                refusals.log(caller()[0], fn.__name__, text)
            raise DBusError(ERROR_PREFIX + exc.name, text[:MAX_ERROR_TEXT]) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise DBusError("org.freedesktop.DBus.Error.Failed",
                            f"{fn.__name__} failed unexpectedly; see the nicpassd journal") from None
    return wrapper


def authorized(action: str):
    """Ask polkit for ``action`` on behalf of the caller before the method runs (AccessDenied
    otherwise). The method's ``self`` has ``authorize(action)``."""
    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self, *args, **kwargs):
            with stopwatch.timed(fn.__name__, log):
                await self.authorize(action)
                stopwatch.lap("polkit")
                return await fn(self, *args, **kwargs)
        wrapper.polkit_action = action
        return wrapper
    return decorate


def explanation_to_dbus(info: Explanation) -> dict:
    return {
        "address": Variant("s", info.address), "allowed": Variant("b", info.allowed),
        "verdict": Variant("s", info.verdict), "protected": Variant("b", info.protected),
        "reasons": Variant("as", list(info.reasons)), "iommu_group": Variant("i", info.iommu_group),
        "group_members": Variant("a(ss)", [[m.address, m.driver] for m in info.group_members]),
        "group_viable": Variant("b", info.group_viable), "leased_to": Variant("s", info.leased_to),
        "persisted": Variant("b", info.persisted), "desired_driver": Variant("s", info.desired_driver),
        "driver": Variant("s", info.driver), "interfaces": Variant("as", list(info.interfaces)),
        "drift": Variant("s", info.drift), "overridable": Variant("b", info.overridable),
        "last_violation": Variant("s", info.last_violation),
    }


def violation_to_dbus(violation) -> dict:
    return {
        "address": Variant("s", violation.address), "kind": Variant("s", violation.kind),
        "interfaces": Variant("as", list(violation.interfaces)), "reasons": Variant("as", list(violation.reasons)),
        "old_driver": Variant("s", violation.old_driver), "new_driver": Variant("s", violation.new_driver),
        "driver_override": Variant("s", violation.driver_override), "culprit": Variant("s", violation.culprit),
        "culprit_pid": Variant("u", violation.culprit_pid), "guest": Variant("s", violation.guest),
        "vm_uuid": Variant("s", violation.vm_uuid), "detected": Variant("t", int(violation.detected)),
        "outcome": Variant("s", violation.outcome), "summary": Variant("s", violation.summary),
    }


MAX_DEVICES = 4096  # one call's devices: more PCI functions than a host has
MAX_DOMAIN_XML = 4 * 1024 * 1024  # libvirt's own limit for a domain XML is 10 MB; one with PCI devices is KBs


def _option(options: dict, name: str, kind: type, default):
    variant = options.get(name)
    if variant is None:
        return default
    value = variant.value if isinstance(variant, Variant) else variant
    if not isinstance(value, kind):
        raise InvalidArgument(f"option {name!r} must be of type {kind.__name__}")
    return value


def _known_options(options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidArgument(f"unknown option(s) {', '.join(unknown)}; accepted: {', '.join(allowed) or 'none'}")


PROPERTY_NAMES = {
    "address": "Address", "vendor_id": "VendorId", "device_id": "DeviceId",
    "subsystem_vendor_id": "SubsystemVendorId", "subsystem_device_id": "SubsystemDeviceId",
    "class_code": "ClassCode", "is_network": "IsNetwork", "driver": "Driver", "iommu_group": "IommuGroup",
    "interfaces": "Interfaces", "physical_function": "PhysicalFunction", "total_vfs": "TotalVfs",
    "num_vfs": "NumVfs", "protected": "Protected", "protection_reasons": "ProtectionReasons",
    "leased_to": "LeasedTo", "persisted": "Persisted", "desired_driver": "DesiredDriver",
    "desired_vfs": "DesiredVfs", "drift": "Drift", "desired_vf_driver": "DesiredVfDriver", "vf_settings": "VfSettings",
    "desired_vf_settings": "DesiredVfSettings",
}
PROPERTY_SIGNATURES = {
    "is_network": "b", "iommu_group": "i", "interfaces": "as", "total_vfs": "u", "num_vfs": "u",
    "protected": "b", "protection_reasons": "as", "persisted": "b", "desired_vfs": "i",
    "vf_settings": "a{sv}", "desired_vf_settings": "a{sv}",
}
VF_SETTING_SIGNATURES = {"mac": "s", "vlan": "u", "qos": "u", "vlan_proto": "s", "spoofchk": "b", "trust": "b",
                         "link_state": "s", "min_tx_rate": "u", "max_tx_rate": "u", "rss_query": "b"}


def _vf_setting_values(settings: dict[str, Variant]) -> dict[str, object]:
    """SetVfSettings' (and Prepare's ``vf_settings``) a{sv}, each name and D-Bus type checked."""
    values = {}
    for name, variant in settings.items():
        if name not in VF_SETTING_SIGNATURES or name == "rss_query":
            raise InvalidArgument(f"unknown VF setting {name!r}",
                                  f"use {', '.join(n for n in VF_SETTING_SIGNATURES if n != 'rss_query')}")
        if not isinstance(variant, Variant) or variant.signature != VF_SETTING_SIGNATURES[name]:
            given = variant.signature if isinstance(variant, Variant) else type(variant).__name__
            raise InvalidArgument(f"VF setting {name!r} must be of D-Bus type {VF_SETTING_SIGNATURES[name]!r}, "
                                  f"not {given!r}")
        values[name] = variant.value
    return values


def vf_settings_to_dbus(pairs) -> dict[str, Variant]:
    return {name: Variant(VF_SETTING_SIGNATURES[name], value) for name, value in pairs}


def _dbus_value(field: str, value):
    if field in ("vf_settings", "desired_vf_settings"):
        return vf_settings_to_dbus(value)
    return list(value) if isinstance(value, tuple) else value


def device_properties(view: DeviceView) -> dict[str, Variant]:
    """The Device interface's properties, as GetManagedObjects and GetAll answer them."""
    return {name: Variant(PROPERTY_SIGNATURES.get(field, "s"), _dbus_value(field, getattr(view, field)))
            for field, name in PROPERTY_NAMES.items()}


class DeviceInterface(ServiceInterface):
    def __init__(self, view: DeviceView) -> None:
        super().__init__(DEVICE_IFACE)
        self.view = view

    def all_properties(self) -> dict[str, Variant]:
        """GetAll's answer, built directly (``NicpassBus`` announces a new object with it)."""
        return device_properties(self.view)

    def update(self, view: DeviceView, changed: dict[str, object]) -> None:
        self.view = view
        payload = {PROPERTY_NAMES[name]: _dbus_value(name, value) for name, value in changed.items()
                   if name in PROPERTY_NAMES}
        if payload:
            self.emit_properties_changed(payload)

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> "s":
        return self.view.address

    @dbus_property(access=PropertyAccess.READ)
    def VendorId(self) -> "s":
        return self.view.vendor_id

    @dbus_property(access=PropertyAccess.READ)
    def DeviceId(self) -> "s":
        return self.view.device_id

    @dbus_property(access=PropertyAccess.READ)
    def SubsystemVendorId(self) -> "s":
        return self.view.subsystem_vendor_id

    @dbus_property(access=PropertyAccess.READ)
    def SubsystemDeviceId(self) -> "s":
        return self.view.subsystem_device_id

    @dbus_property(access=PropertyAccess.READ)
    def ClassCode(self) -> "s":
        return self.view.class_code

    @dbus_property(access=PropertyAccess.READ)
    def IsNetwork(self) -> "b":
        return self.view.is_network

    @dbus_property(access=PropertyAccess.READ)
    def Driver(self) -> "s":
        return self.view.driver

    @dbus_property(access=PropertyAccess.READ)
    def IommuGroup(self) -> "i":
        return self.view.iommu_group

    @dbus_property(access=PropertyAccess.READ)
    def Interfaces(self) -> "as":
        return list(self.view.interfaces)

    @dbus_property(access=PropertyAccess.READ)
    def PhysicalFunction(self) -> "s":
        return self.view.physical_function

    @dbus_property(access=PropertyAccess.READ)
    def TotalVfs(self) -> "u":
        return self.view.total_vfs

    @dbus_property(access=PropertyAccess.READ)
    def NumVfs(self) -> "u":
        return self.view.num_vfs

    @dbus_property(access=PropertyAccess.READ)
    def Protected(self) -> "b":
        return self.view.protected

    @dbus_property(access=PropertyAccess.READ)
    def ProtectionReasons(self) -> "as":
        return list(self.view.protection_reasons)

    @dbus_property(access=PropertyAccess.READ)
    def LeasedTo(self) -> "s":
        return self.view.leased_to

    @dbus_property(access=PropertyAccess.READ)
    def Persisted(self) -> "b":
        return self.view.persisted

    @dbus_property(access=PropertyAccess.READ)
    def DesiredDriver(self) -> "s":
        return self.view.desired_driver

    @dbus_property(access=PropertyAccess.READ)
    def DesiredVfs(self) -> "i":
        return self.view.desired_vfs

    @dbus_property(access=PropertyAccess.READ)
    def DesiredVfDriver(self) -> "s":
        """A PF's: the driver its VFs are persisted on ("" = their host driver)."""
        return self.view.desired_vf_driver

    @dbus_property(access=PropertyAccess.READ)
    def Drift(self) -> "s":
        return self.view.drift

    @dbus_property(access=PropertyAccess.READ)
    def VfSettings(self) -> "a{sv}":
        """A VF's settings as its PF's driver reports them ({} for a function that is not a VF)."""
        return vf_settings_to_dbus(self.view.vf_settings)

    @dbus_property(access=PropertyAccess.READ)
    def DesiredVfSettings(self) -> "a{sv}":
        """The settings persisted for this VF ({} when none)."""
        return vf_settings_to_dbus(self.view.desired_vf_settings)


class ManagerInterface(ServiceInterface):
    def __init__(self, engine: Engine, authorizer: Authorizer) -> None:
        super().__init__(MANAGER_IFACE)
        self.engine = engine
        self.authorizer = authorizer
        self.refusals = RefusalLog()

    async def authorize(self, action: str) -> None:
        sender, interactive = caller()
        await self.authorizer.require(sender, action, interactive=interactive)

    async def _authorize_force(self, force: bool) -> str:
        """With ``force``: ask polkit for the force action too; return who asked, for the log."""
        if not force:
            return ""
        await self.authorize(ACTION_FORCE)
        sender, _ = caller()
        try:
            uid = await self.authorizer.uid_of(sender)
        except Exception:  # noqa: BLE001 - the name is enough for the log
            uid = None
        return sender if uid is None else f"{sender} (uid {uid})"

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def ViolationCount(self) -> "u":
        """Out-of-band changes of protected or leased devices seen since the daemon started."""
        return self.engine.sentinel.count

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def SetVfCount(self, device: "s", count: "u", options: "a{sv}"):
        """options: ``persist`` b, ``driver`` s, ``force`` b; ``stable_macs`` b: every VF without a
        persisted MAC gets one derived from the PF's permanent MAC and its index (persisted; absent:
        as it was)."""
        _known_options(options, ("persist", "driver", "force", "stable_macs"))
        persist = _option(options, "persist", bool, True)
        driver = _option(options, "driver", str, "")
        force = _option(options, "force", bool, False)
        stable_macs = _option(options, "stable_macs", bool, None)
        who = await self._authorize_force(force)
        await self.engine.set_vf_count(device, count, persist=persist, driver=driver, force=force, caller=who,
                                       stable_macs=stable_macs)

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def Bind(self, device: "s", driver: "s", options: "a{sv}"):
        """options: ``persist`` b (default true); ``force`` b: override a guard entry that is not on
        the management path (asks polkit for org.nicpass.NicPass1.force too, logged); ``group`` b:
        bind the function's non-bridge IOMMU group mates too (refused if any is protected)."""
        _known_options(options, ("persist", "force", "group"))
        persist = _option(options, "persist", bool, True)
        force = _option(options, "force", bool, False)
        group = _option(options, "group", bool, False)
        who = await self._authorize_force(force)
        await self.engine.bind(device, driver, persist=persist, force=force, group=group, caller=who)

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def BindEach(self, devices: "as", driver: "s", options: "a{sv}") -> "a(sss)":
        """``Bind`` of each device (``driver`` "" gives each back to its host driver, as Unbind
        does), as one batch: one pass of kernel writes verified together, one state write. Each
        device succeeds or fails on its own: returns (device, error name, message) per device in
        order, the error name "" when it was bound. options: ``persist`` b (default true),
        ``force`` b (as for Bind)."""
        _known_options(options, ("persist", "force"))
        persist = _option(options, "persist", bool, True)
        force = _option(options, "force", bool, False)
        if not devices or len(devices) > MAX_DEVICES:
            raise InvalidArgument(f"{len(devices)} devices given; BindEach takes 1 to {MAX_DEVICES}")
        who = await self._authorize_force(force)
        outcomes = await self.engine.bind_each(list(devices), driver, persist=persist, force=force, caller=who)
        answer = []
        for device in devices:
            error = outcomes[device]
            if error is None:
                answer.append([device, "", ""])
                continue
            text = str(error)
            self.refusals.log(caller()[0], "BindEach", text)
            answer.append([device, ERROR_PREFIX + error.name, text[:MAX_ERROR_TEXT]])
        return answer

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def SetVfSettings(self, device: "s", settings: "a{sv}", options: "a{sv}") -> "a{sv}":
        """A VF's settings (``device``: the VF, or "PF:index"), as ``ip link set PF vf N ...``:
        ``mac`` s, ``vlan`` u, ``qos`` u, ``vlan_proto`` s ("802.1Q"/"802.1ad"), ``spoofchk`` b,
        ``trust`` b, ``link_state`` s ("auto"/"enable"/"disable"), ``min_tx_rate`` u,
        ``max_tx_rate`` u (Mbit/s). Written through the PF's driver and read back; persisted
        (re-applied whenever the VF is created) unless options ``persist`` b is false. Returns
        what the kernel shows after. NotSupported when the driver does not implement a setting,
        InvalidArgument when it refuses the value; what was applied before a refusal is put back."""
        _known_options(options, ("persist", "force"))
        persist = _option(options, "persist", bool, True)
        force = _option(options, "force", bool, False)
        values = _vf_setting_values(settings)
        who = await self._authorize_force(force)
        after = await self.engine.set_vf_settings(device, values, persist=persist, force=force, caller=who)
        return vf_settings_to_dbus((name, value) for name, value in vars(after).items()
                                   if name != "index" and value is not None)

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def Unbind(self, device: "s", options: "a{sv}"):
        _known_options(options, ("persist",))
        persist = _option(options, "persist", bool, True)
        await self.engine.unbind(device, persist=persist)

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def Forget(self, device: "s", options: "a{sv}"):
        _known_options(options, ("restore",))
        restore = _option(options, "restore", bool, False)
        await self.engine.forget(device, restore=restore)

    @method()
    @dbus_errors
    @authorized(ACTION_LEASE)
    async def Prepare(self, vm_name: "s", vm_uuid: "s", devices: "as", options: "a{sv}") -> "s":
        """options: ``pid`` u (the VM runs already: activate at once), ``pidfile`` s (where its
        QEMU PID will appear; adopted if the reservation expires while it runs), ``reservation``
        u (seconds until an unused reservation is reclaimed, default 120), ``skip_unmanaged`` b
        (skip devices nicpassd does not manage instead of NotFound; returns "" when none is left),
        ``group`` b (lease the devices' non-bridge IOMMU group mates too, bound to vfio-pci; refused
        if any of them is protected), ``vf_settings`` a{sa{sv}} ({VF: settings as for
        SetVfSettings} for this VM only: written once the VFs are on vfio-pci, put back as they
        were at release; never persisted)."""
        _known_options(options, ("pid", "pidfile", "reservation", "skip_unmanaged", "group", "vf_settings"))
        pid = _option(options, "pid", int, 0)
        pidfile = _option(options, "pidfile", str, "")
        reservation = _option(options, "reservation", int, 0)
        skip_unmanaged = _option(options, "skip_unmanaged", bool, False)
        group = _option(options, "group", bool, False)
        per_vf = _option(options, "vf_settings", dict, {})
        if any(not isinstance(value, dict) for value in per_vf.values()):
            raise InvalidArgument("option 'vf_settings' must be of D-Bus type 'a{sa{sv}}'")
        lease = await self.engine.prepare(vm_name, vm_uuid, list(devices), pid=pid, pidfile=pidfile,
                                          reservation=float(reservation), skip_unmanaged=skip_unmanaged,
                                          group=group, vf_settings={device: _vf_setting_values(values)
                                                                    for device, values in per_vf.items()})
        return lease.lease_id if lease is not None else ""

    @method()
    @dbus_errors
    @authorized(ACTION_LEASE)
    async def PrepareDomain(self, domain_xml: "s", pidfile: "s") -> "s":
        """``Prepare`` for a libvirt domain about to start, from its domain XML as the qemu hook
        receives it: its ``<name>``, ``<uuid>`` and every PCI device it takes (``<hostdev
        mode='subsystem' type='pci'>``, managed or not, and ``<interface type='hostdev'>``),
        skipping the ones nicpassd does not manage (``skip_unmanaged``); ``pidfile`` as for
        Prepare ("" for none). Returns the lease id, "" when nothing was left to lease. Plain
        arguments, so that the hook can call it with dbus-send (which cannot send a{sv}) instead
        of starting Python: the daemon, already running, reads the XML."""
        if len(domain_xml) > MAX_DOMAIN_XML:
            raise InvalidArgument(f"the domain XML is {len(domain_xml)} characters; at most {MAX_DOMAIN_XML} are read")
        name, uuid, devices = domain_devices(domain_xml)
        if not devices:
            return ""
        if not uuid:
            raise InvalidArgument("its domain XML has no <uuid>")
        if not UUID.match(uuid):
            raise InvalidArgument(f"its domain XML's <uuid> {uuid[:40]!r} is not a UUID")
        lease = await self.engine.prepare(name, uuid, devices, pidfile=pidfile, skip_unmanaged=True)
        return lease.lease_id if lease is not None else ""

    @method()
    @dbus_errors
    @authorized(ACTION_LEASE)
    async def Activate(self, vm_uuid: "s", options: "a{sv}"):
        """The VM started: tie its lease to it (option ``pid`` u: its QEMU process, watched so
        that its exit ends the lease). Ends the reservation timer. Option ``missing_ok`` b: a VM
        that holds no lease is no error (the libvirt hook calls this for every VM with PCI
        devices, nicpassd's or not)."""
        _known_options(options, ("pid", "missing_ok"))
        pid = _option(options, "pid", int, 0)
        missing_ok = _option(options, "missing_ok", bool, False)
        await self.engine.activate(vm_uuid, pid=pid, missing_ok=missing_ok)

    @method()
    @dbus_errors
    @authorized(ACTION_LEASE)
    async def Release(self, vm_uuid: "s", options: "a{sv}"):
        _known_options(options, ())
        await self.engine.release(vm_uuid)

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def Reconcile(self) -> "a(sss)":
        """Bring every device to its persisted desired state now: (address, action, result) per
        step done or desire not applied; result "ok" or "<ErrorName>: sentence"."""
        return [list(outcome.row) for outcome in await self.engine.reconcile()]

    @method()
    @dbus_errors
    async def CheckDevices(self, devices: "as") -> "a(sssss)":
        """Each function's readiness for passthrough, ``(address, id, level, message, remedy)``:
        its IOMMU group (viable, isolated, who shares it and why), its reset methods, SR-IOV
        (capable, or capable but disabled), the guard. Every network function when ``devices``
        is empty. A read: no authorization."""
        self.engine.catch_up()
        return [[address, f.id, f.level.value, f.message, f.remedy]
                for address, f in self.engine.check_devices(list(devices))]

    @method()
    @dbus_errors
    async def PlanReconcile(self) -> "a(sss)":
        """What ``Reconcile`` would do now, without doing it: (address, action, "planned: what")
        per step of its first pass, and (address, action, "<ErrorName>: why" or "skipped: why")
        per desire it would not apply. A read: no authorization."""
        return [list(row) for row in await self.engine.plan_reconcile()]

    @method()
    @dbus_errors
    async def PlanImport(self) -> "a(ssssss)":
        """What other tools were told to do with the NICs at boot — driverctl overrides,
        ``vfio-pci.ids=`` (kernel command line, modprobe.d), systemd-networkd ``[SR-IOV]`` and
        ``SR-IOVVirtualFunctions=``, udev rules writing ``sriov_numvfs`` — as nicpassd desires:
        (source, device, action, target, status, what to remove from the old tool) per line and
        device. status "adopt: ..." for what ``Import`` persists, "already persisted",
        "refused: ..." (the guard), "skipped: ...". A read: no authorization."""
        return [list(row.row) for row in await self.engine.plan_import()]

    @method()
    @dbus_errors
    @authorized(ACTION_MANAGE)
    async def Import(self, options: "a{sv}") -> "a(ssssss)":
        """``PlanImport``'s adoptable rows persisted (and applied where the kernel differs), each
        on its own: the same rows, status "adopted: ..." or "failed: ErrorName: ...". Nothing of
        the old tools is changed: the rows say what to remove."""
        _known_options(options, ())
        sender, _ = caller()
        return [list(row.row) for row in await self.engine.adopt(caller=sender)]

    @method()
    @dbus_errors
    async def Check(self) -> "a(ssss)":
        self.engine.catch_up()
        return [[f.id, f.level.value, f.message, f.remedy] for f in self.engine.check()]

    @method()
    @dbus_errors
    async def Explain(self, device: "s") -> "a{sv}":
        self.engine.catch_up()
        return explanation_to_dbus(self.engine.explain(device))

    @method()
    @dbus_errors
    @authorized(ACTION_FORCE)
    async def ReleaseProtection(self, device: "s", options: "a{sv}"):
        """Forget a device the guard remembers as the host's management path although the kernel
        no longer shows it there (taken: no driver, vfio-pci, no netdev). Asks polkit for
        org.nicpass.NicPass1.force; logged with the caller. A device on the live path is
        ``InvalidArgument``, one not remembered ``NotFound``."""
        _known_options(options, ())
        sender, _ = caller()
        await self.engine.release_protection(device, caller=sender)

    @method()
    @dbus_errors
    async def GetProtected(self) -> "a(sas)":
        self.engine.catch_up()
        return [[entry.address, list(entry.reasons)]
                for entry in sorted(self.engine.protected.entries.values(), key=lambda e: e.address)]

    @method()
    @dbus_errors
    async def ListLeases(self) -> "aa{sv}":
        return [{
            "lease_id": Variant("s", lease.lease_id), "vm_name": Variant("s", lease.vm_name),
            "vm_uuid": Variant("s", lease.vm_uuid), "state": Variant("s", lease.state),
            "devices": Variant("as", list(lease.devices)), "expires": Variant("t", int(lease.expires)),
            "pid": Variant("u", lease.pid),
        } for lease in self.engine.leases.leases.values()]

    @method()
    @dbus_errors
    async def GetViolations(self) -> "aa{sv}":
        """The last out-of-band change of each device that had one (taken from the management
        path, or a leased device rebound), with its culprit and what was done."""
        return [violation_to_dbus(v) for _, v in sorted(self.engine.sentinel.last.items())]

    @signal()
    def LeaseChanged(self, lease_id: str, vm_uuid: str, state: str) -> "sss":
        return [lease_id, vm_uuid, state]

    @signal()
    def ProtectionViolated(self, device: str, details: dict) -> "sa{sv}":
        """A protected (or leased) device was changed by someone else: once when it is found
        (outcome "detected"), once with what was done (healed: ..., heal failed: ..., ...)."""
        return [device, details]


class DeviceExporter:
    """Keeps one exported object per device in step with the engine's inventory, and the answer to
    GetManagedObjects on the manager's path: built once per inventory change, not once per call
    (a flood of readers then costs the daemon the marshalling only, and writes do not starve)."""

    def __init__(self, bus, engine: Engine) -> None:
        self.bus = bus
        self.engine = engine
        self.objects: dict[str, DeviceInterface] = {}
        self._managed_objects: dict | None = None
        for view in engine.views.values():
            self._add(view)
        engine.inventory_listeners.append(self.apply)
        bus.add_message_handler(self.answer_managed_objects)
        bus.add_message_handler(self.read_in_before_properties)

    def managed_objects(self) -> dict:
        if self._managed_objects is None:
            self._managed_objects = {device_path(address): {DEVICE_IFACE: device_properties(interface.view)}
                                     for address, interface in self.objects.items()}
        return self._managed_objects

    def answer_managed_objects(self, message: Message) -> Message | None:
        if (message.member != "GetManagedObjects" or message.path != MANAGER_PATH
                or message.interface != OBJECT_MANAGER_IFACE or message.message_type != MessageType.METHOD_CALL):
            return None
        if message.signature:
            return Message.new_error(message, "org.freedesktop.DBus.Error.InvalidArgs",
                                     "GetManagedObjects takes no arguments")
        self.engine.read_in_marked()  # a change answered before its re-read: never a stale answer
        return Message.new_method_return(message, "a{oa{sa{sv}}}", [self.managed_objects()])

    def read_in_before_properties(self, message: Message) -> None:
        """A device's Properties.Get/GetAll is answered by dbus-fast from the view its object
        holds: what a change marked is read in first, as for GetManagedObjects (a caller's Get
        right after its Bind must see the DesiredDriver it persisted). Never answers itself."""
        if (message.interface == PROPERTIES_IFACE and message.message_type == MessageType.METHOD_CALL
                and message.path.startswith(DEVICES_PATH)):
            self.engine.read_in_marked()
        return None

    def _add(self, view: DeviceView) -> None:
        interface = DeviceInterface(view)
        self.objects[view.address] = interface
        self.bus.export(device_path(view.address), interface)

    def apply(self, delta: InventoryDelta) -> None:
        if delta.removed or delta.added or delta.changed:
            self._managed_objects = None
        for address in delta.removed:
            interface = self.objects.pop(address, None)
            if interface is not None:
                self.bus.unexport(device_path(address), interface)
        for view in delta.added:
            self._add(view)
        for view, changed in delta.changed:
            interface = self.objects.get(view.address)
            if interface is not None:
                interface.update(view, changed)


def export_service(bus, engine: Engine, authorizer: Authorizer) -> ManagerInterface:
    manager = ManagerInterface(engine, authorizer)
    bus.export(MANAGER_PATH, manager)
    DeviceExporter(bus, engine)
    engine.lease_listeners.append(lambda lease, state: manager.LeaseChanged(lease.lease_id, lease.vm_uuid, state))
    engine.sentinel.listeners.append(lambda violation: manager.ProtectionViolated(violation.address,
                                                                                   violation_to_dbus(violation)))
    return manager


class ServiceError(RuntimeError):
    pass


async def start_service(engine: Engine, bus_address: str | None = None):
    """Connect to the (system) bus, export the engine, own the well-known name."""
    from dbus_fast import NameFlag, RequestNameReply

    from nicpassd.transport.bus import NicpassBus
    from nicpassd.transport.caller import record_caller

    bus = await NicpassBus(bus_address=bus_address, object_manager_path=MANAGER_PATH).connect()
    bus.add_message_handler(record_caller)
    export_service(bus, engine, Authorizer(bus))
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply != RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise ServiceError(f"cannot own {BUS_NAME} on the bus ({reply.name}): is another nicpassd running?")
    return bus
