"""Run D-Bus clients as user nobody (65534), the way an unprivileged user reaches the daemon.

Only system binaries are used: a venv under /root is not readable by nobody. cwd "/" and
HOME=/nonexistent so that nothing under /root is looked at.
"""

from __future__ import annotations

import asyncio
import subprocess

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent", "LC_ALL": "C.UTF-8"}


def run_as_nobody(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run argv as nobody and capture its output (text)."""
    return subprocess.run([*SETPRIV, *argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd="/", env=ENV)


def busctl_as_nobody(address: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`busctl --address=ADDRESS ARGS...` as nobody."""
    return run_as_nobody("busctl", f"--address={address}", *args, timeout=timeout)


async def busctl_async(address: str, *args: str, nobody: bool = False,
                       timeout: float = 30) -> subprocess.CompletedProcess:
    """busctl (as nobody if asked) without blocking the event loop: for services running in the
    test's own loop, which a blocking subprocess.run would starve."""
    argv = [*(SETPRIV if nobody else []), "busctl", f"--address={address}", *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd="/", env=ENV)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())
