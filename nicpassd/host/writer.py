"""The one place where nicpassd writes to the kernel.

Sysfs writes can block for minutes when a driver is wedged (docs/kernel-rules.md §3), so each write runs
in its own daemon thread and the event loop waits for it with a timeout. A timed-out thread is
left behind (a write stuck in the kernel cannot be cancelled) and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from nicpassd.errors import KernelError, Timeout
from nicpassd.host import kernelio

log = logging.getLogger(__name__)
T = TypeVar("T")


class KernelWriter(Protocol):
    """What the host model needs from the kernel's write boundary."""

    def write(self, path: Path, data: str) -> None:
        """Write ``data`` to a sysfs attribute; raise OSError with the kernel's errno."""

    def load_module(self, name: str) -> None:
        """Make sure a kernel module is loaded; raise OSError on failure."""

    def netlink(self, request: bytes) -> bytes:
        """Send one rtnetlink request (VF settings: nicpassd.host.vf_netlink); return the answer."""

    def hold_vfio_group(self, path: Path) -> Callable[[], None]:
        """Open a VFIO group (/dev/vfio/N) and return what closes it; raise OSError with the
        kernel's errno (EBUSY: another process holds it). ``nicpassd.host.vfio_latch``."""


class SysfsWriter:
    """The production writer: plain writes to sysfs, modprobe for modules, rtnetlink requests."""

    def write(self, path: Path, data: str) -> None:
        kernelio.write_sysfs(path, data)

    def load_module(self, name: str) -> None:
        kernelio.load_module(name)

    def netlink(self, request: bytes) -> bytes:
        from nicpassd.host.vf_netlink import exchange

        return exchange(request, timeout=NETLINK_TIMEOUT)

    def hold_vfio_group(self, path: Path) -> Callable[[], None]:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return lambda: os.close(fd)


NETLINK_TIMEOUT = 30.0  # the RTNL lock can be held that long by a driver; the caller's timeout is shorter


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
        return await _handed_back(future, timeout)
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


@dataclass(frozen=True)
class BatchWrite:
    """One write of a batch: ``data`` to the attribute ``path``, on behalf of function ``address``."""

    address: str
    path: Path
    data: str

    def describe(self) -> str:
        return f"writing {self.data.strip() or 'an empty line'!r} to {self.path.name} of {self.address}"


@dataclass(frozen=True)
class BatchFailure:
    """A write of a batch the kernel refused; the function got no further write."""

    write: BatchWrite
    error: OSError

    def describe(self) -> str:
        return f"the kernel refused {self.write.describe()}: {describe_oserror(self.error)}"


async def write_batch(writer: KernelWriter, writes: list[BatchWrite], *, timeout: float) -> dict[str, BatchFailure]:
    """Many sysfs writes in order, in one worker thread (one thread start instead of one per
    write). A function whose write fails gets no further write. Each write still has the write
    timeout: ``Timeout`` when the thread makes no progress for that long (a hung write is left
    pending, as ``run_blocking`` does). Returns the failures by function address."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    done_count = [0]

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    # A simulated kernel runs Python in this thread: it hands the batch's uevents over when the
    # batch returns rather than waking the loop (and taking the GIL) after every write.
    operation = getattr(writer, "operation", contextlib.nullcontext)

    def work() -> None:
        failed: dict[str, BatchFailure] = {}
        try:
            with operation():
                for write in writes:
                    if write.address not in failed:
                        try:
                            writer.write(write.path, write.data)
                        except OSError as exc:
                            failed[write.address] = BatchFailure(write, exc)
                    done_count[0] += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        else:
            result, error = failed, None
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            log.warning("a batch of kernel writes finished after the daemon stopped waiting for it")

    threading.Thread(target=work, name=f"kernel-write: {len(writes)} writes", daemon=True).start()
    try:
        return await _handed_back(future, timeout, progress=lambda: done_count[0])
    except TimeoutError:
        stuck = writes[min(done_count[0], len(writes) - 1)]
        log.error("%s did not complete within %.1f s; left pending", stuck.describe(), timeout)
        raise Timeout(f"{stuck.describe()} did not complete within {timeout:g} s (the driver may be stuck)",
                      "check the kernel log (journalctl -k) and retry once the device recovers") from None


async def _handed_back(future: "asyncio.Future[T]", timeout: float, *,
                       progress: Callable[[], int] | None = None) -> T:
    """What the worker thread hands back through ``future``, or ``TimeoutError`` once ``timeout``
    passes (with ``progress``: once a whole ``timeout`` passes in which it did not move).

    Awaited directly, not through ``wait_for(shield(future))``: that takes four turns of the event
    loop from the thread's hand-back to the caller instead of two, and under a flood of D-Bus
    reads each turn answers dozens of them (bench/bench_load.py: up to ~4 ms a turn). A caller
    cancelled meanwhile cancels ``future``; the thread's late outcome is then dropped, as one
    after a timeout is."""
    loop = asyncio.get_running_loop()
    seen = progress() if progress is not None else 0

    def expire() -> None:
        nonlocal seen, timer
        if future.done():
            return
        if progress is not None and progress() != seen:
            seen = progress()
            timer = loop.call_later(timeout, expire)
            return
        future.set_exception(TimeoutError())

    timer = loop.call_later(timeout, expire)
    try:
        return await future
    finally:
        timer.cancel()
