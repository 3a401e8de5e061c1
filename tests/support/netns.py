"""A throwaway network namespace for tests that need a real kernel's networking (never this
machine's own): create it, run Python inside it with this repository importable, delete it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

from . import REPO


class NetnsUnavailable(Exception):
    pass


def create() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise NetnsUnavailable("needs root and iproute2 to make a network namespace")
    name = f"nicpassd-test-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        raise NetnsUnavailable(f"cannot create a network namespace: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    return name


def delete(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def run_python(name: str, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
