"""The persisted VFs, created first thing when the daemon starts, before it imports its own stack.

The kernel forgets ``sriov_numvfs`` at every reboot, and the daemon's reconcile re-creates the VFs
only once its Python stack is imported and its first inventory read: 3.2 s after its start in the
e2e guest (Linux 6.1 under TCG), against 1.1 s for the kernel writes themselves. VMs that start
at boot wait for those VFs. So ``nicpassd`` (``nicpassd.start``) first does the writes a careful
shell loop would, from the early-binding list, with this module alone (standard library only),
and then starts the daemon, whose reconcile finds them done and checks everything else.

The list (``nicpassd.host.early_binding``) carries a PF's count only when the daemon last found it
allowed by the guard, with the PF's identity, and only for PFs whose VFs need nothing but a count
and one driver for all of them: no VF settings, no single VF persisted on another driver (those
are written while the VFs have no driver yet, which is the engine's job). The rules are the
engine's (docs/kernel-rules.md §1, §2, §5): only 0 -> N; for VFs on vfio-pci, autoprobe off
while they are created, then each VF's ``driver_override`` and probe; every step read back, and
on a failure everything undone, so that the reconcile that follows starts from where the host was.

Left to the daemon, with the reason in its log: a PF that is absent, not bound to its driver yet,
another card (identity), already with VFs, held by a ``--runtime`` change, remembered by the guard
as the host's management path, or whose interface (or a bond, bridge or VLAN above it) carries a
route; and everything, when the undo journal holds an operation a crash interrupted.
"""

from __future__ import annotations

import json
import os
import time

from nicpassd.host import kernelio, procfs
from nicpassd.host.early_binding import PCI_DEVICES, BadList, join_path, mismatch, read_list

TYPE_CHECKING = False  # as in early_binding: no typing or pathlib import on the boot path
if TYPE_CHECKING:
    from nicpassd.host.early_binding import Kernel, StrPath

UNDO_JOURNAL = "run/nicpassd/journal.json"
RUNTIME_HOLDS = "run/nicpassd/runtime.json"
GUARD_MEMORY = "var/lib/nicpassd/guard.json"


class EarlyFailure(Exception):
    """A step read back as not done."""


def create_persisted_vfs(root: StrPath, kernel: Kernel) -> list[str]:
    """Create the VFs the early-binding list names; one line per PF of what was done or why not."""
    try:
        counts = read_list(root).get("vf_counts") or {}
    except BadList as exc:
        return [f"no VFs created early: {exc}"]
    if not counts:
        return []
    try:
        if _entries(join_path(root, UNDO_JOURNAL), "entries"):
            return ["no VFs created early: the undo journal holds an operation a crash interrupted; "
                    "the daemon rolls it back first"]
        held = _entries(join_path(root, RUNTIME_HOLDS), "holds")
        remembered = {entry.get("address") for entry in _entries(join_path(root, GUARD_MEMORY), "entries")
                      if isinstance(entry, dict)}
    except (OSError, ValueError, TypeError) as exc:
        return [f"no VFs created early: {exc}; the daemon reads its state files itself"]
    lines = []
    for pf, entry in sorted(counts.items()):
        try:
            why_not = _why_not(root, pf, entry, held, remembered)
            lines.append(f"{pf}: {why_not or _create(root, kernel, pf, int(entry['count']), entry['driver'])}")
        except Exception as exc:  # noqa: BLE001 - nothing here may keep the daemon from starting
            lines.append(f"{pf}: not created early ({exc!r}); the daemon's reconcile takes it over")
    return lines


def _entries(path: str, key: str):
    """The ``key`` collection of one of the daemon's JSON state files (empty when there is none)."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key, {}), (dict, list)):
        raise ValueError(f"{path}: not what nicpassd writes")
    return data.get(key) or {}


def _why_not(root: StrPath, pf: str, entry: dict[str, str], held, remembered: set) -> str:
    device_dir = join_path(root, PCI_DEVICES, pf)
    if not os.path.isdir(device_dir):
        return "left to the daemon: not present"
    if pf in held:
        return "left as it is: changed with --runtime until the host reboots"
    if pf in remembered:
        return "left to the daemon's guard: it was on the host's management path"
    problem = mismatch(entry, device_dir)
    if problem:
        return f"left to the daemon: identity changed ({problem})"
    if not kernelio.link_name(join_path(device_dir, "driver")):
        return "left to the daemon: its driver has not bound it yet"
    present = kernelio.read_text(join_path(device_dir, "sriov_numvfs"))
    if present != "0":
        return f"left to the daemon: it has {present or 'an unreadable number of'} VFs"
    total = kernelio.read_text(join_path(device_dir, "sriov_totalvfs"))
    if not total.isdigit() or int(entry["count"]) > int(total):
        return f"left to the daemon: {entry['count']} VFs persisted, sriov_totalvfs is {total or 'unreadable'}"
    routed = _routed(root, device_dir)
    if routed:
        return f"left to the daemon's guard: {', '.join(routed)} {'carries' if len(routed) == 1 else 'carry'} routes"
    return ""


def _create(root: StrPath, kernel: Kernel, pf: str, count: int, driver: str) -> str:
    device_dir = join_path(root, PCI_DEVICES, pf)
    autoprobe = kernelio.read_text(join_path(device_dir, "sriov_drivers_autoprobe"))
    wanted_autoprobe = "0" if driver else "1"  # as the engine leaves it (vf_count.apply_vf_count)
    try:
        if driver:
            kernel.load_module(driver)
        if autoprobe != wanted_autoprobe:
            kernel.write(join_path(device_dir, "sriov_drivers_autoprobe"), wanted_autoprobe)
        kernel.write(join_path(device_dir, "sriov_numvfs"), str(count))
        vfs = _virtfns(device_dir)
        if len(vfs) != count:
            raise EarlyFailure(f"sriov_numvfs {count} gave {len(vfs)} VFs")
        if driver:
            for vf in vfs:
                kernel.write(join_path(root, PCI_DEVICES, vf, "driver_override"), driver + "\n")
            for vf in vfs:
                if not kernelio.link_name(join_path(root, PCI_DEVICES, vf, "driver")):
                    kernel.write(join_path(root, "sys/bus/pci/drivers_probe"), vf)
            astray = [vf for vf in vfs if kernelio.link_name(join_path(root, PCI_DEVICES, vf, "driver")) != driver]
            if astray:
                raise EarlyFailure(f"{', '.join(astray)} not on {driver} after the probe")
    except Exception as exc:  # noqa: BLE001 - undone whatever went wrong (an OSError is the kernel's answer)
        what = f"the kernel said: {exc.strerror or exc}" if isinstance(exc, OSError) else \
            str(exc) if isinstance(exc, EarlyFailure) else repr(exc)
        return f"not created early ({what}); {_undo(root, kernel, device_dir, autoprobe)}; the daemon tries again"
    return f"{count} VFs created" + (f" on {driver}" if driver else "")


def _undo(root: StrPath, kernel: Kernel, device_dir: str, autoprobe: str) -> str:
    """Back to no VFs and the previous autoprobe, read back."""
    problems = []
    for vf in _virtfns(device_dir):
        try:
            kernel.write(join_path(root, PCI_DEVICES, vf, "driver_override"), "\n")
        except Exception:  # noqa: BLE001 - the VF goes with sriov_numvfs 0 below
            pass
    try:
        if kernelio.read_text(join_path(device_dir, "sriov_numvfs")) != "0":
            kernel.write(join_path(device_dir, "sriov_numvfs"), "0")
        if autoprobe and kernelio.read_text(join_path(device_dir, "sriov_drivers_autoprobe")) != autoprobe:
            kernel.write(join_path(device_dir, "sriov_drivers_autoprobe"), autoprobe)
    except Exception as exc:  # noqa: BLE001 - said, and read back below
        problems.append(exc.strerror or str(exc) if isinstance(exc, OSError) else repr(exc))
    now = kernelio.read_text(join_path(device_dir, "sriov_numvfs"))
    if problems or now != "0":
        return f"undoing it failed ({'; '.join(problems) or f'sriov_numvfs reads {now}'})"
    return "undone"


def _virtfns(device_dir: str) -> list[str]:
    try:
        names = [name for name in os.listdir(device_dir) if name.startswith("virtfn")]
    except OSError:
        return []
    return [kernelio.link_name(join_path(device_dir, name)) for name in sorted(names, key=lambda name: int(name[6:]))]


def _routed(root: StrPath, device_dir: str) -> list[str]:
    """The PF's interfaces, and the bonds, bridges and VLANs above them, that carry a route other
    than IPv6's link-local and multicast ones (which every interface that is up has)."""
    try:
        chain = set(os.listdir(join_path(device_dir, "net")))
    except OSError:
        return []
    todo = list(chain)
    while todo:
        try:
            names = os.listdir(join_path(root, "sys/class/net", todo.pop()))
            uppers = {name[6:] for name in names if name.startswith("upper_")}
        except OSError:
            continue
        todo.extend(uppers - chain)
        chain |= uppers
    routed = set()
    for line in _lines(join_path(root, "proc/net/route"))[1:]:
        fields = line.split()
        if fields and fields[0] in chain:
            routed.add(fields[0])
    for line in _lines(join_path(root, "proc/net/ipv6_route")):
        fields = line.split()
        if len(fields) == 10 and fields[9] in chain and not fields[0].startswith(("fe80", "ff")):
            routed.add(fields[9])
    return sorted(routed)


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().splitlines()
    except OSError:
        return []


def process_age() -> float:
    """Seconds since this process started (0.0 when /proc cannot say)."""
    ticks = procfs.process_start_time(os.getpid())
    return time.monotonic() - ticks / os.sysconf("SC_CLK_TCK") if ticks else 0.0
