"""What every benchmark here shares: one meaning for its exit status, and failing on the daemon's
errors rather than printing the figures of a failing run.

Exit status: 0 the figures meet the goal; 1 the run failed (the daemon logged an error, a run did
not converge, a result was wrong: the figures mean nothing); 2 the run was sound and the goal was
missed. ``tests/integration/test_benches.py`` runs every benchmark small and accepts 0 and 2 only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

MET, FAILED, GOAL_MISSED = 0, 1, 2


class DaemonErrors(logging.Handler):
    """Every record at error level or above the daemon logs while installed (``with``), except
    the levels a benchmark expects (the sentinel reports a violation at critical)."""

    def __init__(self, *, expected_levels: tuple[int, ...] = ()) -> None:
        super().__init__(logging.ERROR)
        self.expected_levels = expected_levels
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno not in self.expected_levels:
            self.errors.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self) -> "DaemonErrors":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)


def errors_in_log(path: Path) -> list[str]:
    """The error lines of a daemon run as a process (``nicpassd`` logs "LEVEL message")."""
    if not path.exists():
        return []
    return [line.rstrip() for line in path.read_text(errors="replace").splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]


def verdict(errors: list[str], met: bool) -> int:
    """Print why the run failed (the first errors) or that the goal was missed; the exit status."""
    if errors:
        print(f"FAILED: the daemon logged {len(errors)} error(s); the figures above are of a failing run:",
              file=sys.stderr)
        for line in errors[:10]:
            print(f"  {line}", file=sys.stderr)
        return FAILED
    if not met:
        print("goal missed (exit 2)", file=sys.stderr)
        return GOAL_MISSED
    return MET


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]
