"""Crash-safe file replacement, shared by the daemon's state files and the stdlib-only udev helper.

Standard library only: nicpassd/host/early_binding.py runs from udev and must not pay for the daemon's
imports.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write(path: Path, payload: bytes, *, mode: int = 0o600, prefix: str | None = None,
                 durable: bool = True) -> None:
    """Temp file, fsync, rename, fsync the directory: the file is old or new, never half.

    ``durable=False`` leaves out the fsyncs: still old or new after the process dies at any
    point (the rename is atomic), but not after a power loss. For files that describe the
    running kernel, which a reboot resets anyway (the undo journal in /run)."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=prefix or f".{path.name}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(payload)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(directory: Path, prefix: str) -> None:
    """Temp files a crash left behind (never renamed into place, so never part of the state)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(prefix):
            log.info("removing %s left by an interrupted write", directory / name)
            (directory / name).unlink(missing_ok=True)


async def atomic_write_async(path: Path, payload: bytes, *, mode: int = 0o600, prefix: str | None = None) -> None:
    """``atomic_write`` in a worker thread: two fsyncs are milliseconds on a busy disk, which the
    event loop (D-Bus, uevents, the watchdog) must not wait out."""
    import asyncio

    await asyncio.to_thread(atomic_write, path, payload, mode=mode, prefix=prefix)


def keep_aside(path: Path) -> tuple[str, list[str]]:
    """An unreadable file of nicpassd's, kept for a human under a name of its own
    (``NAME.broken-TIME``: a second one never overwrites the first). Returns that name and the
    PCI addresses the file names, for the caller to fail closed on: an unreadable record of what
    was leased, held or half-changed must not free what it may have named."""
    import time

    from nicpassd.host.kernelio import PCI_ADDRESS

    try:
        raw = path.read_bytes()
    except OSError:
        raw = b""
    stamp = time.strftime('%Y%m%dT%H%M%S')
    broken = path.with_name(f"{path.name}.broken-{stamp}")
    n = 1
    while os.path.lexists(broken):  # twice in one second: the first one is kept too
        n += 1
        broken = path.with_name(f"{path.name}.broken-{stamp}-{n}")
    try:
        path.replace(broken)
    except OSError as exc:
        log.error("cannot keep the unreadable %s aside: %s", path, exc)
    return broken.name, sorted(set(PCI_ADDRESS.findall(raw.decode(errors="replace"))))
