"""Test support: real processes (private system bus, polkit mock, unprivileged callers)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
