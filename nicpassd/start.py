"""``nicpassd``: the persisted VFs first, then the daemon.

The daemon's own stack (asyncio, pydantic, dbus-fast, pyudev and nicpassd's engine) takes seconds
to import on a slow or emulated CPU, and at boot VMs wait for their VFs. So the command creates
the VFs the early-binding list names (``nicpassd.host.early_vfs``) before it imports anything else
(argparse included: the command line is read for ``--root`` alone, and only when it is the
daemon's), then parses its arguments and starts the daemon, which logs what was done and
reconciles the rest. A simulated host does the same from ``nicpassd.daemon`` once its simulated
kernel is built.

The installed command (packaging/install) starts Python with ``-S``: site's step (the venv, its
.pth files, the system's packages) waits until the VFs are created, and is taken here, before the
daemon's stack is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ROOT_ENV = "NICPASSD_ROOT"  # nicpassd.paths.ROOT_ENV, whose import (dataclasses) this start avoids
# The options a daemon's start may carry (the unit passes none). Anything else (--simulate,
# --check-config, --help, an abbreviation) is not a start of the daemon on this host's kernel.
DAEMON_OPTIONS = ("--root", "--log-level", "--bus-address")
LOG_LEVELS = ("debug", "info", "warning", "error")  # --log-level's choices (nicpassd.arguments)


def main(argv: list[str] | None = None) -> int:
    # A SIGHUP (a reload) before the daemon has read its configuration asks for nothing it will
    # not do anyway; its default action would end the process. nicpassd.daemon.run takes over.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    arguments = sys.argv[1:] if argv is None else argv
    early: list[str] = []
    root = daemon_root(arguments)
    if root is not None:
        from nicpassd.host.early_binding import SysfsKernel
        from nicpassd.host.early_vfs import create_persisted_vfs, process_age

        started = time.perf_counter()
        early = create_persisted_vfs(root, SysfsKernel(root))
        if early:
            early.append(f"took {(time.perf_counter() - started) * 1000:.0f} ms, "
                         f"done {process_age():.2f} s after the process started")
    if sys.flags.no_site:  # the installed command (packaging/install): the site step waited until now
        import site

        site.main()
    from nicpassd.arguments import parse_args
    from nicpassd.daemon import run_parsed

    return run_parsed(parse_args(argv), early)


def daemon_root(arguments: list[str]) -> str | None:
    """The root of a start of the daemon on the host's kernel, or None for any other command line."""
    root = os.environ.get(ROOT_ENV, "/")
    remaining = iter(arguments)
    for argument in remaining:
        name, has_value, value = argument.partition("=")
        if name not in DAEMON_OPTIONS:
            return None
        if not has_value:
            value = next(remaining, None)
            if value is None:
                return None
        if name == "--log-level" and value not in LOG_LEVELS:
            return None  # argparse refuses it: a command line it refuses changes nothing
        if name == "--root":
            root = value
    return root


if __name__ == "__main__":
    sys.exit(main())
