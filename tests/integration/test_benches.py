"""Every benchmark in bench/ runs, small, and its run is sound.

A benchmark that is never run rots: one wrapped the kernel boundary and broke when the boundary
grew, and for months printed the figures of a run in which every reconcile failed. Here each runs
with a few rounds, and must end with exit 0 (goal met) or 2 (a sound run that missed its goal):
exit 1 means the daemon logged an error, a run did not converge or a result was wrong
(bench/benchlib.py). No figure is asserted: the goals live in the benchmarks' own output.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import REPO

SMALL_RUNS = {
    "bench_dbus.py": ["--calls", "50"],
    "bench_guard.py": ["--runs", "3"],
    "bench_heal.py": ["--rounds", "2"],
    "bench_hooks.py": ["--runs", "8"],
    "bench_hotplug.py": ["--vfs", "8", "--rounds", "2"],
    "bench_hotplug.py --no-bus": ["--vfs", "8", "--rounds", "2", "--no-bus"],
    "bench_idle.py": ["--seconds", "1"],
    "bench_load.py": ["--seconds", "3", "--readers", "3", "--writers", "1", "--alone-writes", "5"],
    "bench_reconcile.py": ["--pfs", "2", "--vfs", "4", "--rounds", "1"],
}
SOUND = (0, 2)  # goal met, goal missed; 1 is a failed run


def test_every_benchmark_is_covered() -> None:
    scripts = {path.name for path in (REPO / "bench").glob("bench_*.py")}
    assert scripts == {name.split()[0] for name in SMALL_RUNS}


@pytest.mark.parametrize("name", sorted(SMALL_RUNS))
def test_a_small_run_of_the_benchmark_is_sound(name: str) -> None:
    script = REPO / "bench" / name.split()[0]
    env = {key: value for key, value in os.environ.items() if key != "DBUS_SYSTEM_BUS_ADDRESS"}
    result = subprocess.run([sys.executable, str(script), *SMALL_RUNS[name]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode in SOUND, (
        f"{name} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
