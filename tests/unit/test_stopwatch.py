"""The debug timing of one call: which phases a bind or a VF count change spent its time in."""

from __future__ import annotations

import asyncio
import logging
import re

from nicpassd import stopwatch

PF = "0000:3b:00.0"
log = logging.getLogger("nicpassd.test.stopwatch")


def timings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name]


def phases(line: str) -> list[str]:
    """"BindEach 12.3 ms: lock 0.0, refresh 1.2" -> ["lock", "refresh"]"""
    return [part.rsplit(" ", 1)[0] for part in line.split(": ", 1)[1].split(", ")]


async def test_a_bind_of_several_vfs_is_timed_phase_by_phase(sim, caplog):
    await sim.engine.set_vf_count(PF, 3, persist=False)
    caplog.set_level(logging.DEBUG, logger=log.name)
    with stopwatch.timed("BindEach", log):
        await sim.engine.bind_each(sim.vfs(PF), "vfio-pci")
    [line] = timings(caplog)
    assert re.fullmatch(r"BindEach \d+\.\d ms: .*", line)
    steps = [phase for phase in phases(line) if not phase.startswith("refresh: ")]
    assert steps == ["resolve", "lock", "refresh", "guard", "journal", "modprobe", "writes", "verify", "state",
                     "other"]  # the second "refresh" adds to the first
    assert {"refresh: functions", "refresh: guard", "refresh: views"} <= set(phases(line))


async def test_a_vf_count_change_names_the_kernel_steps(sim, caplog):
    caplog.set_level(logging.DEBUG, logger=log.name)
    with stopwatch.timed("SetVfCount", log):
        await sim.engine.set_vf_count(PF, 2, driver="vfio-pci")
    [line] = timings(caplog)
    for phase in ("sriov_numvfs N", "virtfn links", "writes", "verify", "state"):
        assert phase in phases(line), line


async def test_nothing_is_timed_or_logged_without_debug(sim, caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    with stopwatch.timed("BindEach", log):
        stopwatch.lap("anything")
    assert timings(caplog) == []


async def test_concurrent_calls_keep_their_own_laps(caplog):
    caplog.set_level(logging.DEBUG, logger=log.name)

    async def call(name: str, phase: str) -> None:
        with stopwatch.timed(name, log):
            await asyncio.sleep(0.01)
            stopwatch.lap(phase)
            await asyncio.sleep(0.01)

    await asyncio.gather(call("A", "first"), call("B", "second"))
    lines = sorted(timings(caplog))
    assert [phases(line) for line in lines] == [["first", "other"], ["second", "other"]]
    assert stopwatch._running.get() is None
