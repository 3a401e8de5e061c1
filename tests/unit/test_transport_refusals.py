"""What the transport writes about refused calls: never a flood (issue 19)."""

from __future__ import annotations


def test_refusals_are_logged_cut_escaped_and_rate_limited(caplog):
    """Issue 19: a 100,000-character argument became a 100 kB log line, every time."""
    import logging

    from nicpassd.transport.service import RefusalLog

    caplog.set_level(logging.INFO, logger="nicpassd.transport.service")
    refusals = RefusalLog(burst=3, window=60)
    for _ in range(10):
        refusals.log(":1.7", "Explain", "x" * 100_000 + "\n\x1b[31m")
    refusals.log(":1.8", "Explain", "short")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(len(line) < 400 for line in lines)
    assert lines[-1] == "Explain of :1.8 refused: short"
