"""Processes of the real host: start times from /proc, pidfds, a VM's pidfile.

PIDs are the running host's, also under a simulated root (a test's QEMU stand-in is a real
process), so /proc is never moved by the root; a pidfile is a file of the host and is.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # no pathlib at import: nicpassd.start reads its own start time before the daemon's imports
if TYPE_CHECKING:
    from pathlib import Path

PROC = "/proc"
PID_MAX = 2**22  # the kernel's upper bound of pid_max


def valid_pid(pid: int) -> bool:
    return 1 < pid <= PID_MAX


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot); 0 when the process is gone. With the
    PID it names one process for good: a PID reused by another process has another start time."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return 0
    fields = data.rsplit(b")", 1)[-1].split()  # the command name may hold spaces and ")"
    try:
        return int(fields[19])  # fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return 0


def open_pidfd(pid: int) -> int:
    """A pidfd of ``pid``: readable once the process exits (ProcessLookupError when it is gone,
    OSError on kernels before 5.3)."""
    return os.pidfd_open(pid)


def read_pidfile(path: Path, *, not_before: float = 0.0) -> int:
    """The running process a pidfile names; 0 when the file is absent, older than
    ``not_before`` (unix time), unreadable, or names no running process."""
    try:
        if not_before and path.stat().st_mtime < not_before:
            return 0
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pid if valid_pid(pid) and process_start_time(pid) else 0


def holders_of(path: str) -> list[int]:
    """The processes with ``path`` open (a /dev/vfio/N group: QEMU, or any VFIO user), found the
    way fuser does: every /proc/PID/fd link. Processes that vanish meanwhile are skipped."""
    holders = []
    try:
        pids = [name for name in os.listdir(PROC) if name.isdigit()]
    except OSError:
        return holders
    for pid in pids:
        try:
            fds = os.listdir(f"{PROC}/{pid}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                if os.readlink(f"{PROC}/{pid}/fd/{fd}") == path:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


def command_line(pid: int) -> list[str]:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def qemu_guest_name(argv: list[str]) -> str:
    """The guest name a QEMU command line carries (libvirt: ``-name guest=NAME,debug-threads=on``;
    by hand: ``-name NAME``), "" when none."""
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-name", "--name"):
            for part in value.split(","):
                if part.startswith("guest="):
                    return part.removeprefix("guest=")
            first = value.split(",", 1)[0]
            return "" if "=" in first else first
    return ""
