"""The real-kernel benchmark (issue 22): nicpassd against a bare loop of the same writes and
driverctl, in one boot of the guest. Not part of the default e2e run (it takes minutes under TCG):

    scripts/bench-kernel            # = NICPASSD_E2E_BENCH=1 scripts/e2e -k bench_kernel -s

It fails (with the reason) when a run does not converge or the daemon logs an error; the figures
are printed and kept in the run folder (bench-kernel.json). The guest side is guest/bench.py.
"""

from __future__ import annotations

import json
import os
import statistics

import pytest

from .conftest import GUEST_E2E, log

pytestmark = [pytest.mark.e2e, pytest.mark.bench]


def _row(name: str, samples: list[float]) -> str:
    return f"  {name:26s} {statistics.median(samples):8.3f} s   ({', '.join(f'{s:.3f}' for s in samples)})"


def report(results: dict) -> list[str]:
    lines = [f"real-kernel benchmark, kernel {results['kernel']}, {results['rounds']} rounds, medians:"]
    for work, samples in results.items():
        if not isinstance(samples, dict):
            continue
        lines.append(f"{work}:")
        lines += [_row(name, values) for name, values in samples.items()]
        base = next((name for name in ("bare", "/bin/true", "python -c pass") if name in samples), None)
        for name in ("daemon", "nicpassctl", "nicpassd start to all bound", "prepare begin", "nicpassctl --version",
                     "nicpassctl list"):
            if name in samples and base:
                lines.append(f"  {name} / {base}: "
                             f"{statistics.median(samples[name]) / statistics.median(samples[base]):.2f}x")
        if "driverctl" in samples:
            lines.append(f"  nicpassctl / driverctl: "
                         f"{statistics.median(samples['nicpassctl']) / statistics.median(samples['driverctl']):.2f}x")
    return lines


def test_bench_kernel(g, guest):
    profile = os.environ.get("NICPASSD_BENCH_PROFILE", "")
    argv = ["python3", f"{GUEST_E2E}/guest/bench.py", "--rounds", os.environ.get("NICPASSD_BENCH_ROUNDS", "3")]
    if os.environ.get("NICPASSD_BENCH_ONLY"):
        argv += ["--only", os.environ["NICPASSD_BENCH_ONLY"]]
    if profile:
        argv += ["--profile", "/tmp/nicpassd.prof"]
    result = g.run(argv, timeout=3000)
    assert result.stdout.strip(), result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    (guest.run_dir / "bench-kernel.json").write_text(json.dumps(results, indent=1))
    for line in report(results):
        log(line)
    for line in results.get("boot journal", [])[-25:]:
        log(f"  | {line}")
    if profile:
        stats = g.run(["/usr/lib/nicpassd/venv/bin/python", "-c",
                       "import pstats; s = pstats.Stats('/tmp/nicpassd.prof'); s.sort_stats('cumulative')"
                       ".print_stats(60); s.sort_stats('tottime').print_stats(40)"], timeout=300)
        (guest.run_dir / "bench-kernel-profile.txt").write_text(stats.stdout)
        log(f"profile: {guest.run_dir / 'bench-kernel-profile.txt'}")
    assert "failed" not in results, results["failed"]
    assert "daemon errors" not in results, results["daemon errors"]
