"""Turn plain data (as returned by nicpassd, Variants already unwrapped) into text or JSON.

Nothing here talks to the bus: every function takes dicts/lists and returns a string or a
JSON-able value, so it is testable without a daemon.
"""

from __future__ import annotations

import re
import time
from typing import Any, Iterable

_SNAKE_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")

# Device properties in the order a person wants to read them (extras follow, sorted).
DEVICE_ORDER = [
    "Address", "Interfaces", "Driver", "DesiredDriver", "Persisted", "Drift", "VendorId", "DeviceId",
    "SubsystemVendorId", "SubsystemDeviceId", "ClassCode", "IsNetwork", "IommuGroup",
    "PhysicalFunction", "TotalVfs", "NumVfs", "DesiredVfs", "DesiredVfDriver", "Protected", "ProtectionReasons", "LeasedTo",
]
EXPLAIN_ORDER = [
    "address", "verdict", "allowed", "protected", "reasons", "driver", "desired_driver", "persisted",
    "interfaces", "iommu_group", "group_viable", "group_members", "leased_to", "last_violation",
]


def snake(name: str) -> str:
    """``SubsystemVendorId`` → ``subsystem_vendor_id``."""
    return _SNAKE_RE.sub("_", name).lower()


def address_from_path(path: str) -> str:
    """``/org/nicpass/NicPass1/devices/0000_3b_00_0`` → ``0000:3b:00.0``."""
    seg = path.rsplit("/", 1)[-1]
    parts = seg.split("_")
    if len(parts) == 4:
        return f"{parts[0]}:{parts[1]}:{parts[2]}.{parts[3]}"
    return seg


def _json():
    import json  # only --json and event output need it: not paid by every command

    return json


def dumps(value: Any, *, compact: bool = False) -> str:
    if compact:
        return _json().dumps(value, sort_keys=False, separators=(",", ":"))
    return _json().dumps(value, indent=2, sort_keys=False)


# ---------------------------------------------------------------- small formatters

def _hex(value: str) -> str:
    value = str(value or "")
    return value[2:] if value.lower().startswith("0x") else value


def _yn(value: Any) -> str:
    return "yes" if value else "no"


def fmt_value(value: Any) -> str:
    """One value for a human: bools yes/no, lists comma-joined, empty → '-'."""
    if isinstance(value, bool):
        return _yn(value)
    if isinstance(value, (list, tuple)):
        items = [fmt_value(v) if not isinstance(v, (list, tuple)) else " ".join(map(str, v)) for v in value]
        return ", ".join(items) if items else "-"
    if value is None or value == "":
        return "-"
    return str(value)


def _addr_key(address: str) -> tuple:
    """Sort PCI addresses numerically (falls back to text for anything else)."""
    parts = re.split(r"[:.]", address)
    try:
        return (0, tuple(int(p, 16) for p in parts))
    except ValueError:
        return (1, address)


def table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    """Left-aligned columns; a cell may hold several lines (continued on the next rows)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], *(len(line) for line in cell.split("\n")))
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        cells = [c.split("\n") for c in row]
        for k in range(max(len(c) for c in cells)):
            line = "  ".join((c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True))
            out.append(line.rstrip())
    return "\n".join(out)


# ---------------------------------------------------------------- list

def is_network(props: dict[str, Any]) -> bool:
    return bool(props.get("IsNetwork", True))


def select_devices(devices: Iterable[dict[str, Any]], show_all: bool = False) -> list[dict[str, Any]]:
    """Network functions only (unless ``show_all``), sorted by address."""
    chosen = [d for d in devices if show_all or is_network(d)]
    return sorted(chosen, key=lambda d: _addr_key(str(d.get("Address", ""))))


# D-Bus has no null: these properties say "none" with -1 or "", which JSON says with null.
NONE_VALUES = {"IommuGroup": -1, "DesiredVfs": -1, "Driver": "", "PhysicalFunction": "", "LeasedTo": "",
               "DesiredDriver": "", "Drift": "", "DesiredVfDriver": ""}


def device_record(props: dict[str, Any]) -> dict[str, Any]:
    """Every property, snake_case keys (the JSON shape of one device); "none" as null."""
    known = [k for k in DEVICE_ORDER if k in props]
    extra = sorted(k for k in props if k not in DEVICE_ORDER)
    return {snake(k): None if k in NONE_VALUES and props[k] == NONE_VALUES[k] else props[k] for k in known + extra}


def list_json(devices: Iterable[dict[str, Any]], show_all: bool = False) -> list[dict[str, Any]]:
    return [device_record(d) for d in select_devices(devices, show_all)]


def role(props: dict[str, Any]) -> str:
    if props.get("PhysicalFunction"):
        return "VF"
    if int(props.get("TotalVfs", 0) or 0) > 0:
        return "PF"
    return "-"


def persisted_cell(props: dict[str, Any]) -> str:
    """What is persisted for it: ``vfs=N`` and/or the desired driver (a VF's comes from its PF)."""
    parts = []
    desired_vfs = props.get("DesiredVfs", -1)  # i: -1 when no VF count is persisted
    if isinstance(desired_vfs, int) and not isinstance(desired_vfs, bool) and desired_vfs >= 0:
        parts.append(f"vfs={desired_vfs}" + (f"@{props['DesiredVfDriver']}" if props.get("DesiredVfDriver") else ""))
    if props.get("DesiredDriver"):
        parts.append(str(props["DesiredDriver"]))
    cell = ",".join(parts) or ("yes" if props.get("Persisted") else "-")
    return cell + ("*" if props.get("Drift") else "")


def _list_row(props: dict[str, Any], indent: str) -> list[str]:
    group = props.get("IommuGroup", -1)
    leased = str(props.get("LeasedTo") or "")
    vfs = f"{props.get('NumVfs', 0)}/{props.get('TotalVfs', 0)}" if role(props) == "PF" else "-"
    vendor = _hex(props.get("VendorId", ""))
    device = _hex(props.get("DeviceId", ""))
    return [
        indent + str(props.get("Address", "?")),
        ",".join(props.get("Interfaces") or []) or "-",
        props.get("Driver") or "-",
        f"{vendor}:{device}" if vendor or device else "-",
        "-" if group is None or int(group) < 0 else str(group),
        role(props),
        vfs,
        _yn(props.get("Protected")),
        leased[:8] if leased else "-",
        persisted_cell(props),
    ]


LIST_HEADERS = ["ADDRESS", "IFACE", "DRIVER", "VENDOR:DEVICE", "GROUP", "ROLE", "VFS", "PROT", "LEASED",
                "PERSISTED"]


def list_text(devices: Iterable[dict[str, Any]], show_all: bool = False) -> str:
    """The ``list`` table: PFs and plain functions by address, each PF's VFs indented under it."""
    chosen = select_devices(devices, show_all)
    if not chosen:
        return "No network functions found." if not show_all else "No PCI functions found."
    addresses = {d.get("Address") for d in chosen}
    children: dict[str, list[dict[str, Any]]] = {}
    top = []
    for d in chosen:
        pf = d.get("PhysicalFunction")
        if pf and pf in addresses:
            children.setdefault(pf, []).append(d)
        else:
            top.append(d)
    rows = []
    for d in top:
        rows.append(_list_row(d, ""))
        for vf in children.get(d.get("Address"), []):
            rows.append(_list_row(vf, "  "))
    out = table(LIST_HEADERS, rows)
    drift = [d for d in chosen if d.get("Drift")]
    if drift:
        out += "\n\n" + "\n".join(f"* {d.get('Address')}: {d['Drift']}" for d in drift)
    return out


# ---------------------------------------------------------------- show

def explain_record(explain: dict[str, Any]) -> dict[str, Any]:
    """The JSON shape of Explain: group_members as objects, everything else as sent."""
    out = {}
    for key in [k for k in EXPLAIN_ORDER if k in explain] + sorted(k for k in explain if k not in EXPLAIN_ORDER):
        value = explain[key]
        if key == "group_members":
            value = [{"address": m[0], "driver": m[1]} for m in value]
        out[key] = value
    return out


def show_json(props: dict[str, Any] | None, explain: dict[str, Any],
              vfs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    record = {"device": device_record(props) if props is not None else None, "explain": explain_record(explain)}
    if vfs:
        record["vfs"] = [device_record(vf) for vf in vfs]
    return record


def _block(title: str, pairs: list[tuple[str, str]]) -> list[str]:
    lines = [title]
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        sub = value.split("\n")
        lines.append(f"  {key.ljust(width)}  {sub[0]}")
        lines.extend(f"  {'':{width}}  {s}" for s in sub[1:])
    return lines


def _label(snake_key: str) -> str:
    return snake_key.replace("_", " ")


VF_SETTING_ORDER = ("mac", "vlan", "qos", "vlan_proto", "spoofchk", "trust", "link_state", "min_tx_rate",
                    "max_tx_rate", "rss_query")


def vf_settings_text(settings: dict[str, Any]) -> str:
    """``mac 02:…, vlan 12 qos 3, spoofchk on, trust off, state auto`` (what `ip link` shows per VF)."""
    words = {"vlan_proto": "proto", "link_state": "state", "min_tx_rate": "min-rate", "max_tx_rate": "max-rate",
             "rss_query": "rss-query"}
    parts = []
    for key in VF_SETTING_ORDER:
        if key not in settings:
            continue
        value = settings[key]
        if key in ("min_tx_rate", "max_tx_rate") and not value:
            continue  # no limit
        if key == "mac" and not value:
            value = "none"
        elif isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{words.get(key, key)} {value}")
    return ", ".join(parts) or "-"


def vf_table(pf: str, vfs: list[dict[str, Any]]) -> list[str]:
    """The VFs of a PF with their settings, one line each (like `ip link show PF`)."""
    rows = [("VF", "ADDRESS", "DRIVER", "MAC", "VLAN", "SPOOFCHK", "TRUST", "STATE", "RATE", "PERSISTED")]
    for index, props in enumerate(vfs):
        shown, wanted = props.get("VfSettings") or {}, props.get("DesiredVfSettings") or {}
        vlan = str(shown.get("vlan", 0)) if shown.get("vlan") else "-"
        if shown.get("vlan") and shown.get("qos"):
            vlan += f"/{shown['qos']}"
        rate = f"{shown.get('min_tx_rate', 0)}-{shown.get('max_tx_rate', 0)}" if shown.get("max_tx_rate") else "-"
        onoff = {True: "on", False: "off", None: "-"}
        rows.append((str(index), props.get("Address", "?"), props.get("Driver") or "-", shown.get("mac") or "-", vlan,
                     onoff[shown.get("spoofchk")], onoff[shown.get("trust")], shown.get("link_state", "-"), rate,
                     vf_settings_text(wanted) if wanted else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [f"VFs of {pf}"] + ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


# Explain's keys that the Device block shows under its own name
EXPLAIN_IN_DEVICE = ("protected", "reasons", "driver", "desired_driver", "persisted", "interfaces", "iommu_group",
                     "leased_to", "drift")


def show_text(props: dict[str, Any] | None, explain: dict[str, Any], vfs: list[dict[str, Any]] | None = None) -> str:
    address = explain.get("address") or (props or {}).get("Address", "?")
    verdict = explain.get("verdict") or (
        "may be handed to a VM" if explain.get("allowed") else "may not be handed to a VM")
    lines = [verdict if verdict.startswith(str(address)) else f"{address}: {verdict}"]
    if props is not None:
        pairs = []
        for key, value in device_record(props).items():
            if key in ("iommu_group", "desired_vfs") and isinstance(value, int) and value < 0:
                value = "-"
            elif key in ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id"):
                value = _hex(value)
            if key in ("vf_settings", "desired_vf_settings"):
                if not props.get("PhysicalFunction"):
                    continue  # a PF's VFs are in the table below
                value = vf_settings_text(value) if value else "-"
            pairs.append((_label(key), "\n".join(value) if key == "protection_reasons" and value
                          else fmt_value(value)))
        lines += [""] + _block("Device", pairs)
    pairs = []
    # What the Device block already shows is not said twice; Explain adds the verdict's parts.
    shown = set(EXPLAIN_IN_DEVICE) if props is not None else set()
    for key, value in explain_record(explain).items():
        if key in ("address", "verdict") or key in shown:
            continue
        if key == "group_members":
            text = "\n".join(f"{m['address']} ({m['driver'] or 'no driver'})" for m in value) or "-"
        elif key == "reasons":
            text = "\n".join(value) if value else "-"
        elif key == "iommu_group" and isinstance(value, int) and value < 0:
            text = "-"
        else:
            text = fmt_value(value)
        pairs.append((_label(key), text))
    lines += [""] + _block("Explain", pairs)
    if vfs:
        lines += [""] + vf_table(str(address), vfs)
    return "\n".join(lines)


# ---------------------------------------------------------------- check, guard, leases

def reconcile_json(rows: Iterable[list[Any]]) -> list[dict[str, str]]:
    return [{"address": r[0], "action": r[1], "result": r[2]} for r in rows]


def reconcile_failed(rows: Iterable[list[Any]]) -> bool:
    """Anything not applied (or, planned, that would not be), except devices deliberately left
    alone (``skipped: ...``)."""
    return any(not r[2].startswith(("ok", "skipped", "planned")) for r in rows)


def reconcile_text(rows: list[list[Any]], *, planned: bool = False) -> str:
    if not rows:
        return "Nothing to do: every device is in its persisted state."
    body = table(["ADDRESS", "ACTION", "RESULT"], [[r[0], r[1], r[2]] for r in rows])
    done = sum(1 for r in rows if r[2].startswith(("planned", "ok")))
    left = sum(1 for r in rows if r[2].startswith("skipped"))
    if planned:
        summary = f"{done} step(s) planned, {len(rows) - done - left} would not be applied"
    else:
        summary = f"{done} step(s) applied, {len(rows) - done - left} not applied"
    if left:
        # The exit status counts "not applied" only: these are left alone on purpose.
        summary += (f", {left} left alone on purpose (a --runtime change stays until the device is re-plugged "
                    "or the host reboots; repeat that change without --runtime to persist it)")
    if planned:
        summary += ("; nothing was changed (what a step makes possible, such as binding the VFs it creates, "
                    "is planned once it is done)")
    return f"{body}\n\n{summary}"


def import_json(rows: Iterable[list[Any]]) -> list[dict[str, Any]]:
    return [{"source": r[0], "device": r[1] or None, "action": r[2], "target": r[3], "status": r[4],
             "remove": r[5] or None} for r in rows]


def import_failed(rows: Iterable[list[Any]]) -> bool:
    """Something the old tools do that nicpassd would refuse, or that failed to apply."""
    return any(r[4].startswith(("refused", "failed")) for r in rows)


def import_text(rows: list[list[Any]], *, applied: bool) -> str:
    if not rows:
        return ("Nothing to import: no driverctl override, vfio-pci.ids=, networkd SR-IOV setting or udev "
                "sriov_numvfs rule found.")
    body = table(["SOURCE", "DEVICE", "ACTION", "TARGET", "STATUS"],
                 [[r[0], r[1] or "-", r[2], r[3], r[4]] for r in rows])
    # What is adopted is kept by nicpassd now; a line the guard refuses captures a device the
    # host needs at every boot: both go.
    removals = list(dict.fromkeys(r[5] for r in rows if r[5] and r[4].startswith(
        ("adopted", "already persisted", "refused") if applied else ("adopt", "already persisted", "refused"))))
    adopted = sum(1 for r in rows if r[4].startswith("adopted" if applied else "adopt"))
    if applied:
        summary = f"{adopted} adopted (persisted by nicpassd)"
        then = "Both tools now hold the same state. Remove from the old configuration:"
    else:
        summary = f"{adopted} to adopt; nothing was changed (`nicpassctl import --apply` persists them)"
        then = "Once adopted, remove from the old configuration:"
    refused = sum(1 for r in rows if r[4].startswith(("refused", "failed")))
    if refused:
        summary += f"; {refused} refused or failed (STATUS says why)"
    text = f"{body}\n\n{summary}."
    if removals:
        text += f"\n{then}\n" + "\n".join(f"  - {removal}" for removal in removals)
    return text


def check_json(findings: Iterable[list[Any]]) -> list[dict[str, str]]:
    return [{"id": f[0], "level": f[1], "message": f[2], "remedy": f[3]} for f in findings]


def check_failed(findings: Iterable[list[Any]]) -> bool:
    return any(f[1] == "fail" for f in findings)


def check_devices_json(rows: Iterable[list[Any]]) -> list[dict[str, Any]]:
    """CheckDevices rows grouped by device: [{address, ready, findings: [{id, level, message, remedy}]}]."""
    devices: dict[str, list[dict[str, str]]] = {}
    for address, fid, level, message, remedy in rows:
        devices.setdefault(address, []).append({"id": fid, "level": level, "message": message, "remedy": remedy})
    return [{"address": address, "ready": all(f["level"] != "fail" for f in found), "findings": found}
            for address, found in devices.items()]


def check_devices_text(rows: list[list[Any]], labels: dict[str, str] | None = None) -> str:
    """Per function: its readiness, then each finding (``labels``: address -> "address (iface)")."""
    lines = ["Devices"]
    for device in check_devices_json(rows):
        found = device["findings"]
        worst = "fail" if not device["ready"] else ("warn" if any(f["level"] == "warn" for f in found) else "ok")
        lines.append(f"[{worst:^4}] {(labels or {}).get(device['address'], device['address'])}")
        width = max(len(f["id"]) for f in found)
        for finding in found:
            lines.append(f"       {finding['id'].ljust(width)}  {finding['level']:<4}  {finding['message']}")
            if finding["remedy"] and finding["level"] != "ok":
                lines.append(f"       {'':{width}}        remedy: {finding['remedy']}")
    return "\n".join(lines)


def check_text(findings: list[list[Any]]) -> str:
    if not findings:
        return "No findings."
    width = max(len(f[0]) for f in findings)
    lines = []
    for fid, level, message, remedy in findings:
        lines.append(f"[{level:^4}] {fid.ljust(width)}  {message}")
        if remedy and level != "ok":
            lines.append(f"       {'':{width}}  remedy: {remedy}")
    counts = {lvl: sum(1 for f in findings if f[1] == lvl) for lvl in ("ok", "warn", "fail")}
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)")
    return "\n".join(lines)


def guard_json(protected: Iterable[list[Any]], violations: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    last = {v["address"]: v for v in violations}
    items = sorted(protected, key=lambda p: _addr_key(p[0]))
    result = []
    for addr, reasons in items:
        entry: dict[str, Any] = {"address": addr, "reasons": list(reasons)}
        if addr in last:
            entry["last_violation"] = dict(last[addr])
        result.append(entry)
    return result


def guard_text(protected: list[list[Any]], violations: Iterable[dict[str, Any]] = ()) -> str:
    if not protected:
        return "No device is protected."
    rows = [[p["address"], "\n".join(p["reasons"]) or "-"] for p in guard_json(protected)]
    text = table(["ADDRESS", "REASONS"], rows)
    taken = [[v["address"], v.get("summary", "")] for v in violations]
    if taken:
        text += "\n\nTaken by someone else (last time, and what nicpassd did):\n" + table(["ADDRESS", "VIOLATION"], taken)
    return text


def _when(seconds: Any) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(seconds)))


def leases_json(leases: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(lease) for lease in leases]


def leases_text(leases: list[dict[str, Any]]) -> str:
    if not leases:
        return "No leases."
    rows = [
        [
            lease.get("lease_id", "?"),
            lease.get("vm_name") or "-",
            lease.get("vm_uuid") or "-",
            lease.get("state", "?"),
            "\n".join(lease.get("devices") or []) or "-",
            _when(lease.get("expires")),
            str(lease.get("pid") or "-"),
        ]
        for lease in leases
    ]
    return table(["LEASE", "VM", "UUID", "STATE", "DEVICES", "EXPIRES", "PID"], rows)


# ---------------------------------------------------------------- monitor

def clock(now: float | None = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


def _event_value(value: Any) -> str:
    """Compact, but unambiguous: text with spaces or quotes (or empty) is JSON-quoted."""
    if isinstance(value, bool):
        return _yn(value)
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    text = str(value)
    if text == "" or any(c.isspace() or c in "\"'=" for c in text):
        return _json().dumps(text, ensure_ascii=False)
    return text


def event_text(event: dict[str, Any]) -> str:
    """One line per monitor event (``event`` as built by the monitor command)."""
    kind = event["event"]
    head = f"{clock(event.get('time'))} {kind}"
    if kind == "changed":
        changes = " ".join(f"{k}={_event_value(v)}" for k, v in event.get("properties", {}).items())
        changes += "".join(f" {k}=?" for k in event.get("invalidated", []))
        return f"{head} {event.get('address') or event.get('path')} {changes}".rstrip()
    if kind in ("added", "removed"):
        return f"{head} {event.get('address') or event.get('path')}"
    if kind == "lease":
        return f"{head} {event['lease_id']} {event['vm_uuid']} {event['state']}"
    if kind == "violation":
        return f"{head} {event['address']} {event.get('summary', event.get('outcome', ''))}"
    if kind in ("daemon-started", "daemon-stopped"):
        return f"{clock(event.get('time'))} daemon {kind.split('-')[1]}"
    return f"{head} {event}"


def event_json(event: dict[str, Any]) -> str:
    out = dict(event)
    if "properties" in out:
        out["properties"] = {snake(k): v for k, v in out["properties"].items()}
    if "invalidated" in out:
        out["invalidated"] = [snake(k) for k in out["invalidated"]]
    return dumps(out, compact=True)
