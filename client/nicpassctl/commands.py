"""One function per command: ``def cmd_x(client, args) -> ExitCode``.

``client`` is a :class:`nicpassctl.connection.Client` (or anything with the same ``call``-style
methods returning plain data), ``args`` the argparse namespace. Output goes to stdout; failures
are raised as :class:`~nicpassctl.errors.CliError` / ``DaemonError`` and reported by ``main``,
except for multi-device commands, which report each failure themselves.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

from . import render
from .errors import Action, CliError, DaemonError, StdoutClosed, from_exception, printable
from .exitcodes import ExitCode
from .names import (
    BUS_NAME,
    DEVICE_IFACE,
    DEVICES_PREFIX,
    LEASE,
    MANAGE,
    MANAGER_IFACE,
    MANAGER_PATH,
    OM_IFACE,
    PROPS_IFACE,
)


def out(text: str) -> None:
    try:
        print(printable(text, sys.stdout), flush=True)
    except BrokenPipeError:
        raise StdoutClosed() from None


def warn(sentence: str) -> None:
    print(printable(f"nicpassctl: {sentence}", sys.stderr), file=sys.stderr, flush=True)


def device_path(address: str) -> str:
    return DEVICES_PREFIX + address.replace(":", "_").replace(".", "_")


def action_for(args: Any) -> Action:
    """What to name in a 'not authorized to ...' sentence for this command line."""
    cmd = args.command
    dev = getattr(args, "device", None)
    if isinstance(dev, list):
        dev = " ".join(dev)
    verbs = {
        "vfs": (f"change the VF count of {dev}", MANAGE),
        "vf": (f"change the settings of VF {dev}", MANAGE),
        "bind": (f"bind {dev} to {getattr(args, 'driver', '') or 'its host driver'}", MANAGE),
        "unbind": (f"give {dev} back to its host driver", MANAGE),
        "forget": (f"forget the persisted state of {dev}", MANAGE),
        "reconcile": ("apply the persisted desired state", MANAGE),
        "import": ("adopt the boot configuration of other tools", MANAGE if getattr(args, "apply", False) else None),
        "prepare": (f"prepare devices for VM {getattr(args, 'vm_name', '')}", LEASE),
        "release": (f"release the devices of VM {getattr(args, 'vm_uuid', '')}", LEASE),
        "activate": (f"activate the lease of VM {getattr(args, 'vm_uuid', '')}", LEASE),
        "list": ("list devices", None),
        "show": (f"show {dev}", None),
        "check": ("run the preflight check", None),
        "guard": ("read the protected set", None),
        "leases": ("list leases", None),
        "monitor": ("monitor nicpassd", None),
        "version": ("read the nicpassd version", None),
    }
    verb, polkit = verbs.get(cmd, ("talk to nicpassd", None))
    return Action(verb, polkit)


def emit_json(value: Any) -> None:
    out(render.dumps(value))


# ---------------------------------------------------------------- reads

def fetch_devices(client) -> list[dict[str, Any]]:
    objects = client.managed_objects()
    devices = []
    for path, ifaces in objects.items():
        props = ifaces.get(DEVICE_IFACE)
        if props is None:
            continue
        props = dict(props)
        props.setdefault("Address", render.address_from_path(path))
        devices.append(props)
    return devices


def cmd_list(client, args) -> ExitCode:
    devices = fetch_devices(client)
    if args.json:
        emit_json(render.list_json(devices, args.all))
    else:
        out(render.list_text(devices, args.all))
    return ExitCode.OK


def cmd_show(client, args) -> ExitCode:
    (explain,) = client.manager("Explain", "s", [args.device])
    address = explain.get("address") or args.device
    try:
        props = client.get_all(device_path(address), DEVICE_IFACE)
    except DaemonError as err:
        if not err.name.startswith("org.freedesktop.DBus.Error.Unknown"):
            raise
        props = None  # no device object for it (e.g. not exported): Explain alone
    vfs = None
    if props is not None and int(props.get("NumVfs", 0) or 0) > 0:
        vfs = _vfs_of(client, address)
    if args.json:
        emit_json(render.show_json(props, explain, vfs))
    else:
        out(render.show_text(props, explain, vfs))
    return ExitCode.OK


def cmd_check(client, args) -> ExitCode:
    (findings,) = client.manager("Check")
    devices = list(getattr(args, "device", None) or [])
    rows = None
    if devices or getattr(args, "devices", False):
        (rows,) = client.manager("CheckDevices", "as", [devices])
    if args.json:
        host = render.check_json(findings)
        emit_json(host if rows is None else {"host": host, "devices": render.check_devices_json(rows)})
    else:
        out(render.check_text(findings) + ("" if rows is None else "\n\n" + render.check_devices_text(rows)))
    failed = render.check_failed(findings) or any(row[2] == "fail" for row in rows or [])
    return ExitCode.CHECK_FAILED if failed else ExitCode.OK


def cmd_reconcile(client, args) -> ExitCode:
    if args.plan:
        (rows,) = client.manager("PlanReconcile")
    else:
        (rows,) = client.manager("Reconcile", mutate=True)
    if args.json:
        emit_json(render.reconcile_json(rows))
    else:
        out(render.reconcile_text(rows, planned=args.plan))
    return ExitCode.FAILED if render.reconcile_failed(rows) else ExitCode.OK


def cmd_import(client, args) -> ExitCode:
    if args.apply:
        (rows,) = client.manager("Import", "a{sv}", [], options={}, mutate=True)
    else:
        (rows,) = client.manager("PlanImport")
    if args.json:
        emit_json(render.import_json(rows))
    else:
        out(render.import_text(rows, applied=args.apply))
    return ExitCode.FAILED if render.import_failed(rows) else ExitCode.OK


def cmd_guard(client, args) -> ExitCode:
    release = getattr(args, "release", None)
    if release:
        client.manager("ReleaseProtection", "sa{sv}", [release], options={}, mutate=True)
        if args.json:
            emit_json({"released": release})
        else:
            out(f"{release}: released from the guard's memory")
        return ExitCode.OK
    (protected,) = client.manager("GetProtected")
    violations = _violations(client)
    if args.json:
        emit_json(render.guard_json(protected, violations))
    else:
        out(render.guard_text(protected, violations))
    return ExitCode.OK


def _violations(client) -> list[dict[str, Any]]:
    try:
        (violations,) = client.manager("GetViolations")
    except DaemonError as err:  # an older daemon without it
        if err.name != "org.freedesktop.DBus.Error.UnknownMethod":
            raise
        return []
    return violations


def cmd_leases(client, args) -> ExitCode:
    (leases,) = client.manager("ListLeases")
    if args.json:
        emit_json(render.leases_json(leases))
    else:
        out(render.leases_text(leases))
    return ExitCode.OK


def cmd_version(client, args) -> ExitCode:
    from .cli import client_version

    daemon = client.get(MANAGER_PATH, MANAGER_IFACE, "Version")
    if args.json:
        emit_json({"client": client_version(), "daemon": daemon})
    else:
        out(f"nicpassctl {client_version()}\nnicpassd {daemon}")
    return ExitCode.OK


# ---------------------------------------------------------------- changes

def cmd_vfs(client, args) -> ExitCode:
    options: dict[str, Any] = {"persist": not args.runtime}
    if args.vfio:
        options["driver"] = "vfio-pci"
    if getattr(args, "force", False):
        options["force"] = True
    if getattr(args, "stable_macs", None) is not None:
        options["stable_macs"] = args.stable_macs
    address, persisted_on = _pf_and_persisted_vf_driver(client, args.device)
    before = _vfs_of(client, address) if address else []
    client.manager("SetVfCount", "sua{sv}", [args.device, args.count], options=options, mutate=True)
    # Persisting a count without --vfio also persists "VFs on their host driver": say what that dropped.
    dropped = persisted_on if persisted_on and not args.vfio and not args.runtime else ""
    now = _vfs_of(client, address) if address else []
    removed = [vf for vf in before if vf.get("Address") not in {each.get("Address") for each in now}]
    if args.json:
        emit_json({"device": args.device, "count": args.count, "persist": not args.runtime,
                   "driver": options.get("driver"), "dropped_vf_driver": dropped or None,
                   "vfs": [vf.get("Address") for vf in now], "removed": [vf.get("Address") for vf in removed],
                   "persisted_per_vf": {vf.get("Address"): vf.get("DesiredDriver") for vf in now
                                        if vf.get("DesiredDriver") and not args.vfio}})
        return ExitCode.OK
    where = " on vfio-pci" if args.vfio else ""
    how = "persisted" if not args.runtime else "runtime only"
    if dropped:
        how += (f"; its VFs are no longer persisted on {dropped}: after a reboot they come up on their host "
                f"driver (add --vfio to keep them on {dropped})")
    out(f"{args.device}: {args.count} VFs{where} ({how})")
    for vf in now:  # every device the change left, and why a VF is where it is
        line = f"  {vf.get('Address')}: {vf.get('Driver') or 'no driver'}"
        if vf.get("DesiredDriver") and not args.vfio:
            line += (f" (persisted on {vf.get('DesiredDriver')} for this VF; `nicpassctl unbind {vf.get('Address')}` "
                     "gives it back to its host driver for good)")
        out(line)
    for vf in removed:
        line = f"  {vf.get('Address')}: removed"
        if vf.get("DesiredDriver"):
            line += (f" (its own persisted {vf.get('DesiredDriver')} stays for when the count brings it back; "
                     f"`nicpassctl forget {vf.get('Address')}` drops it)")
        out(line)
    return ExitCode.OK


def _pf_and_persisted_vf_driver(client, device: str) -> tuple[str, str]:
    """The PF's address and the driver its VFs are persisted on (each "" when the daemon does not say)."""
    try:
        (explained,) = client.manager("Explain", "s", [device])
        address = str(explained.get("address", ""))
        return address, str(client.get(device_path(address or device), DEVICE_IFACE, "DesiredVfDriver") or "")
    except DaemonError:  # not found and the like: SetVfCount says it, typed
        return "", ""


def _vfs_of(client, pf: str) -> list[dict[str, Any]]:
    """The PF's VFs as the daemon shows them now (it read them in before answering this)."""
    objects = client.managed_objects()
    return sorted((interfaces[DEVICE_IFACE] for interfaces in objects.values()
                   if DEVICE_IFACE in interfaces and interfaces[DEVICE_IFACE].get("PhysicalFunction") == pf),
                  key=lambda vf: render._addr_key(vf.get("Address", "")))


# nicpassctl vf's words -> (SetVfSettings key, D-Bus type, parser)
VF_WORDS = {
    "mac": ("mac", "s", str), "vlan": ("vlan", "u", int), "qos": ("qos", "u", int), "proto": ("vlan_proto", "s", str),
    "trust": ("trust", "b", "onoff"), "spoofchk": ("spoofchk", "b", "onoff"), "max-rate": ("max_tx_rate", "u", int),
    "min-rate": ("min_tx_rate", "u", int), "state": ("link_state", "s", str),
}


def vf_settings_of(words: list[str]) -> dict[str, Any]:
    """``mac M vlan N trust on`` -> {"mac": Variant, ...}; a usage error (exit 2) naming the bad word."""
    from .connection import Variant

    if len(words) % 2:
        raise CliError(ExitCode.USAGE, f"setting {words[-1]!r} has no value (settings come in pairs: SETTING VALUE)")
    settings: dict[str, Any] = {}
    for word, text in zip(words[::2], words[1::2]):
        if word not in VF_WORDS:
            raise CliError(ExitCode.USAGE, f"unknown VF setting {word!r}; use {', '.join(VF_WORDS)}")
        key, signature, parse = VF_WORDS[word]
        if key in settings:
            raise CliError(ExitCode.USAGE, f"{word} is given twice")
        if parse == "onoff":
            if text not in ("on", "off"):
                raise CliError(ExitCode.USAGE, f"{word} is on or off, not {text!r}")
            value: Any = text == "on"
        elif parse is int:
            if not text.isdigit():
                raise CliError(ExitCode.USAGE, f"{word} is a whole number, not {text!r}")
            value = int(text)
        else:
            value = text
        settings[key] = Variant(signature, value)
    return settings


def cmd_vf(client, args) -> ExitCode:
    settings = vf_settings_of(args.settings)
    options: dict[str, Any] = {"persist": not args.runtime}
    if getattr(args, "force", False):
        options["force"] = True
    (after,) = client.manager("SetVfSettings", "sa{sv}a{sv}", [args.device, settings], options=options,
                                    mutate=True)
    if args.json:
        emit_json({"device": args.device, "persist": not args.runtime, "settings": after})
    else:
        how = "persisted" if not args.runtime else "runtime only"
        out(f"{args.device}: {render.vf_settings_text(after)} ({how})")
    return ExitCode.OK


def _names(sentence: str, device: str) -> bool:
    """Does the daemon's sentence already name the device as the user wrote it?"""
    return re.search(rf"(?<![\w:.-]){re.escape(device)}(?![\w:-]|\.\w)", sentence) is not None


def _each(client, args, call, success, batch=None) -> ExitCode:
    """Run ``call(device)`` for every device; report each failure; exit with the first one's code.
    ``batch(devices)``, when given and there are several devices, does them in one call and
    returns {device: DaemonError or None} (None: an older daemon without it; each is called)."""
    outcomes = batch(list(args.device)) if batch is not None and len(args.device) > 1 else None
    results, first = [], ExitCode.OK
    for device in args.device:
        try:
            if outcomes is None:
                call(device)
            elif outcomes[device] is not None:
                raise outcomes[device]
        except (CliError, DaemonError) as exc:
            err = from_exception(exc, action_for(argparse.Namespace(**{**vars(args), "device": device})))
            if err.code == ExitCode.DAEMON_UNREACHABLE:
                raise err from None  # nothing else will work either: one sentence, no partial output
            sentence = err.sentence if _names(err.sentence, device) else f"{device}: {err.sentence}"
            warn(sentence)
            first = first or err.code
            results.append({"device": device, "ok": False, "exit_code": int(err.code),
                            "error": getattr(exc, "name", None), "message": sentence})
            continue
        text, record = success(device)
        results.append({"device": device, "ok": True, **record})
        if not args.json:
            out(text)
    if args.json:
        emit_json(results)
    return first


def _bind_each(client, driver: str, options: dict[str, Any]):
    """BindEach: the devices' kernel work in one batch (one pass of writes, one state write)."""
    def batch(devices: list[str]) -> dict[str, DaemonError | None] | None:
        try:
            (answer,) = client.manager("BindEach", "assa{sv}", [devices, driver], options=options, mutate=True)
        except DaemonError as exc:
            if exc.name == "org.freedesktop.DBus.Error.UnknownMethod":
                return None  # a daemon from before BindEach: one Bind per device
            raise
        outcomes: dict[str, DaemonError | None] = {}
        for device, name, message in answer:
            outcomes[device] = DaemonError(name, message, "BindEach") if name else None
        return outcomes
    return batch


def cmd_bind(client, args) -> ExitCode:
    persist = not args.runtime
    options: dict[str, Any] = {"persist": persist}
    for flag in ("force", "group"):
        if getattr(args, flag, False):
            options[flag] = True

    def call(device):
        client.manager("Bind", "ssa{sv}", [device, args.driver], options=options, mutate=True)

    target = args.driver or "its host driver"
    how = "persisted" if persist else "runtime only"
    groups = _Groups(client, args.device)

    def success(device):
        lines, record = [f"{device}: bound to {target} ({how})"], {"driver": args.driver, "persist": persist}
        group, mates = groups.of(device)
        if options.get("group"):  # all or nothing: every mate went along
            lines += [f"{mate}: bound to {target} with the IOMMU group of {device} ({how})" for mate, _ in mates]
            record["group_members"] = [mate for mate, _ in mates]
        elif args.driver in PASSTHROUGH:
            blockers = [f"{mate} on {driver}" for mate, driver in mates
                        if driver and driver not in PASSTHROUGH and mate not in groups.addresses()]
            if blockers:  # bound, but a VM cannot have it yet: said now rather than at the VM's start
                warn(f"note: IOMMU group {group} of {device} is not viable for a VM yet: {', '.join(blockers)}; "
                     f"bind the whole group with `nicpassctl bind --group {device}`")
                record["group_viable"] = False
        return "\n".join(lines), record

    groups.ask()
    batch = None if options.get("group") else _bind_each(client, args.driver, options)
    return _each(client, args, call, success, batch)


def cmd_unbind(client, args) -> ExitCode:
    persist = not args.runtime
    how = "persisted binding forgotten" if persist else "runtime only, persisted binding kept"
    groups = _Groups(client, args.device if args.group else [])

    def call(device):
        if args.group:  # Unbind has no group option: Bind to "" (the host driver) is the same call
            client.manager("Bind", "ssa{sv}", [device, ""], options={"persist": persist, "group": True},
                                 mutate=True)
        else:
            client.manager("Unbind", "sa{sv}", [device], options={"persist": persist}, mutate=True)

    def success(device):
        lines, record = [f"{device}: given back to its host driver ({how})"], {"persist": persist}
        if args.group:
            mates = [mate for mate, _ in groups.of(device)[1]]
            lines += [f"{mate}: given back to its host driver with the IOMMU group of {device}" for mate in mates]
            record["group_members"] = mates
        return "\n".join(lines), record

    groups.ask()
    # Unbind is Bind to "" (the host driver) with the same persistence.
    batch = None if args.group else _bind_each(client, "", {"persist": persist})
    return _each(client, args, call, success, batch)


PASSTHROUGH = ("vfio-pci", "pci-stub")


class _Groups:
    """The IOMMU group of each device of a bind, from Explain, asked before the bind and read
    after it: the round trips overlap, and nothing read depends on the order (the mates' drivers
    are not the bind's to change, except with --group, whose mates all go along)."""

    def __init__(self, client, devices: list[str]) -> None:
        self.client, self.devices, self.pending, self.answers = client, list(devices), [], None

    def ask(self) -> None:
        self.pending = [self.client.begin_manager("Explain", "s", [device]) for device in self.devices]

    def _answers(self) -> dict[str, dict[str, Any] | None]:
        if self.answers is None:
            self.answers = {}
            for device, call in zip(self.devices, self.pending):
                try:
                    (self.answers[device],) = call.result()
                except DaemonError:
                    self.answers[device] = None
        return self.answers

    def addresses(self) -> set[str]:
        return {answer.get("address", "") for answer in self._answers().values() if answer}

    def of(self, device: str) -> tuple[int, list[tuple[str, str]]]:
        """(group number, [(mate, its driver)]) of the device's non-bridge group mates."""
        explain = self._answers().get(device)
        if not explain:
            return -1, []
        members = render.explain_record(explain).get("group_members", [])
        return explain.get("iommu_group", -1), [
            (member["address"], member["driver"]) for member in members
            if member["address"] != explain.get("address") and not member["driver"].startswith("pcieport")]


def cmd_forget(client, args) -> ExitCode:
    client.manager("Forget", "sa{sv}", [args.device], options={"restore": args.restore}, mutate=True)
    if args.json:
        emit_json({"device": args.device, "restore": args.restore})
    else:
        tail = " and given back to its host driver" if args.restore else ""
        out(f"{args.device}: persisted state forgotten{tail}")
    return ExitCode.OK


def cmd_prepare(client, args) -> ExitCode:
    from .connection import Variant

    options: dict[str, Any] = {}
    per_vf = {}
    for text in args.vf:
        words = text.split()
        if len(words) < 3:
            raise CliError(ExitCode.USAGE, f"--vf {text!r}: give the VF and one or more SETTING VALUE pairs")
        if words[0] in per_vf:
            raise CliError(ExitCode.USAGE, f"--vf {words[0]} is given twice")
        per_vf[words[0]] = vf_settings_of(words[1:])
    if per_vf:
        options["vf_settings"] = Variant("a{sa{sv}}", per_vf)
    (lease_id,) = client.manager("Prepare", "ssasa{sv}", [args.vm_name, args.vm_uuid, args.device],
                                       options=options, mutate=True)
    if args.json:
        emit_json({"lease_id": lease_id, "vm_name": args.vm_name, "vm_uuid": args.vm_uuid,
                   "devices": args.device})
    else:
        out(lease_id)
    return ExitCode.OK


def cmd_activate(client, args) -> ExitCode:
    client.manager("Activate", "sa{sv}", [args.vm_uuid], options={"pid": args.pid} if args.pid else {},
                         mutate=True)
    if args.json:
        emit_json({"vm_uuid": args.vm_uuid, "active": True, "pid": args.pid})
    else:
        out(f"{args.vm_uuid}: lease active" + (f", tied to process {args.pid}" if args.pid else ""))
    return ExitCode.OK


def cmd_release(client, args) -> ExitCode:
    (leases,) = client.manager("ListLeases")
    mine = [lease for lease in leases if lease.get("vm_uuid") == args.vm_uuid]
    client.manager("Release", "sa{sv}", [args.vm_uuid], options={}, mutate=True)  # idempotent
    devices = sorted({device for lease in mine for device in lease.get("devices", [])})
    if args.json:
        emit_json({"vm_uuid": args.vm_uuid, "released": bool(mine), "devices": devices})
    elif not mine:
        out(f"VM {args.vm_uuid} holds no lease; nothing to release")
    else:
        name = mine[0].get("vm_name") or args.vm_uuid
        out(f"VM {name}: released {', '.join(devices)} (the release policy decides their driver)")
    return ExitCode.OK


# ---------------------------------------------------------------- monitor

MONITOR_RULES = [
    f"type='signal',sender='{BUS_NAME}',interface='{PROPS_IFACE}',member='PropertiesChanged',"
    f"path_namespace='{MANAGER_PATH}'",
    # path_namespace, not path: dbus-fast's export() emits InterfacesAdded/Removed from the object's
    # own path rather than the ObjectManager's; accept both.
    f"type='signal',sender='{BUS_NAME}',interface='{OM_IFACE}',path_namespace='{MANAGER_PATH}'",
    f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_IFACE}',member='LeaseChanged'",
    f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_IFACE}',member='ProtectionViolated'",
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
]


def _where(path: str) -> dict[str, Any]:
    if path.startswith(DEVICES_PREFIX):
        return {"address": render.address_from_path(path), "path": path}
    return {"address": None, "path": path}


def signal_to_event(path: str, interface: str, member: str, body: list[Any]) -> dict[str, Any] | None:
    """A received signal → a monitor event dict (None for signals that are not ours)."""
    now = time.time()
    if interface == PROPS_IFACE and member == "PropertiesChanged" and path.startswith(MANAGER_PATH):
        iface, changed, invalidated = body
        return {"time": now, "event": "changed", **_where(path), "interface": iface,
                "properties": changed, "invalidated": list(invalidated)}
    if interface == OM_IFACE and member == "InterfacesAdded":
        obj, ifaces = body
        return {"time": now, "event": "added", **_where(obj), "interfaces": sorted(ifaces)}
    if interface == OM_IFACE and member == "InterfacesRemoved":
        obj, ifaces = body
        return {"time": now, "event": "removed", **_where(obj), "interfaces": list(ifaces)}
    if interface == MANAGER_IFACE and member == "LeaseChanged":
        lease_id, vm_uuid, state = body
        return {"time": now, "event": "lease", "lease_id": lease_id, "vm_uuid": vm_uuid, "state": state}
    if interface == MANAGER_IFACE and member == "ProtectionViolated":
        address, details = body
        return {"time": now, "event": "violation", "address": address, **details}
    if interface == "org.freedesktop.DBus" and member == "NameOwnerChanged" and body and body[0] == BUS_NAME:
        _, old, new = body
        if new and not old:
            return {"time": now, "event": "daemon-started", "owner": new}
        if old and not new:
            return {"time": now, "event": "daemon-stopped", "owner": old}
        return None
    return None


class _Stopped(Exception):
    """SIGINT or SIGTERM while monitoring: the normal end of ``monitor``."""


def _stop(signum, frame) -> None:
    raise _Stopped()


def cmd_monitor(client, args) -> ExitCode:
    import signal
    client.get(MANAGER_PATH, MANAGER_IFACE, "Version")  # is the daemon there at all? (else exit 6)

    def handler(sender, path, interface, member, body) -> None:
        try:
            event = signal_to_event(path, interface, member, body)
        except (ValueError, TypeError):
            return  # malformed body: not one of ours
        if event is not None:
            out(render.event_json(event) if args.json else render.event_text(event))

    before = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        client.subscribe(MONITOR_RULES, handler)
        client.listen()
    except _Stopped:
        return ExitCode.OK
    except (OSError, EOFError):
        raise CliError(ExitCode.DAEMON_UNREACHABLE,
                       "lost the connection to the system bus; check that dbus is running and monitor again") from None
    finally:
        for sig, handler_before in before.items():
            signal.signal(sig, handler_before)
    raise AssertionError("listen() returns only by raising")


COMMANDS = {
    "list": cmd_list, "show": cmd_show, "check": cmd_check, "vfs": cmd_vfs, "vf": cmd_vf, "bind": cmd_bind,
    "unbind": cmd_unbind, "forget": cmd_forget, "reconcile": cmd_reconcile, "import": cmd_import, "guard": cmd_guard, "leases": cmd_leases,
    "prepare": cmd_prepare, "activate": cmd_activate, "release": cmd_release, "monitor": cmd_monitor, "version": cmd_version,
}
