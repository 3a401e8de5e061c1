"""Where one call's wall time went, as one debug line: ``BindEach 412.3 ms: polkit 31.0, journal
2.1, writes 301.7, verify 60.2, state 12.5, refresh 4.8``.

On a real kernel every sysfs access can wait for a device lock and every file write for a disk;
a profile shows CPU, not those waits. The D-Bus layer starts a stopwatch around a method when
debug logging is on; the engine marks the end of each phase with ``lap``, which does nothing when
no stopwatch runs. The stopwatch lives in a context variable, so it follows the call's own task
and concurrent calls never share one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextvars import ContextVar
from typing import Iterator

_running: ContextVar["Stopwatch | None"] = ContextVar("nicpassd_stopwatch", default=None)


class Stopwatch:
    def __init__(self, what: str) -> None:
        self.what = what
        self.start = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}  # phase -> seconds; a phase met twice adds up

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        total = (self._last - self.start) * 1000
        phases = ", ".join(f"{phase} {seconds * 1000:.1f}" for phase, seconds in self.laps.items())
        return f"{self.what} {total:.1f} ms: {phases}"


def lap(phase: str) -> None:
    """The phase that ends now, for the stopwatch of the running call if there is one."""
    stopwatch = _running.get()
    if stopwatch is not None:
        stopwatch.lap(phase)


@contextlib.contextmanager
def timed(what: str, logger: logging.Logger) -> Iterator[None]:
    """Time the block's phases and log them at debug level (nothing at all unless debug is on)."""
    if not logger.isEnabledFor(logging.DEBUG) or _running.get() is not None:
        yield
        return
    stopwatch = Stopwatch(what)
    token = _running.set(stopwatch)
    try:
        yield
    finally:
        _running.reset(token)
        stopwatch.lap("other")
        logger.debug("%s", stopwatch.summary(), extra={"action": "timing"})
