"""The one place where nicpassd writes to the kernel.

Sysfs writes can block for minutes when a driver is wedged (kernel rules §3), so each write runs
in its own daemon thread and the event loop waits for it with a timeout. A timed-out thread is
left behind (a write stuck in the kernel cannot be cancelled) and reported.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from nicpassd.errors import KernelError, Timeout

log = logging.getLogger(__name__)
T = TypeVar("T")


class KernelWriter(Protocol):
    """What the host model needs from the kernel's write boundary."""

    def write(self, path: Path, data: str) -> None:
        """Write ``data`` to a sysfs attribute; raise OSError with the kernel's errno."""

    def load_module(self, name: str) -> None:
        """Make sure a kernel module is loaded; raise OSError on failure."""


class SysfsWriter:
    """The production writer: plain writes to sysfs, modprobe for modules."""

    def write(self, path: Path, data: str) -> None:
        # One write() call: sysfs attributes take the whole value in one store.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def load_module(self, name: str) -> None:
        result = subprocess.run(["modprobe", name], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OSError(errno.ENOENT, result.stderr.strip() or f"modprobe {name} failed")


def describe_oserror(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{exc.strerror or exc} ({code})"


async def run_blocking(fn: Callable[[], T], *, timeout: float, what: str) -> T:
    """Run ``fn`` in a fresh daemon thread; raise ``Timeout`` if it takes longer than ``timeout``.

    A fresh thread per call (not a pool) so that one hung write cannot starve later ones.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    # A write that outlives its timeout still settles the future later: consume that outcome.
    future.add_done_callback(lambda done: done.cancelled() or done.exception())

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def hand_back(result: T | None, error: BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed while the write hung (daemon shutdown)
            log.warning("%s finished after the daemon stopped waiting for it", what)

    def worker() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            hand_back(None, exc)
        else:
            hand_back(result, None)

    threading.Thread(target=worker, name=f"kernel-write: {what}", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        log.error("%s did not complete within %.1f s; the kernel write is left pending", what, timeout)
        raise Timeout(
            f"{what} did not complete within {timeout:g} s (the driver may be stuck)",
            "check the kernel log (journalctl -k) and retry once the device recovers",
        ) from None


async def write_attribute(writer: KernelWriter, path: Path, data: str, *, timeout: float) -> None:
    what = f"writing {data.strip() or 'an empty line'!r} to {path.name}"
    try:
        await run_blocking(lambda: writer.write(path, data), timeout=timeout, what=what)
    except OSError as exc:
        raise KernelError(f"the kernel refused {what} of {path.parent.name}: {describe_oserror(exc)}") from exc
