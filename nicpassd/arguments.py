"""The daemon's command line (argparse only: ``nicpassd.start`` parses it before any of the daemon is imported)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nicpassd import __version__
from nicpassd.paths import ROOT_ENV
from nicpassd.start import LOG_LEVELS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nicpassd", description="NIC passthrough daemon")
    parser.add_argument("--version", action="version", version=f"nicpassd {__version__}")
    parser.add_argument("--simulate", nargs="?", const="", metavar="TOPOLOGY",
                        help="run against a simulated kernel (built-in default host, or a topology file)")
    parser.add_argument("--root", type=Path, default=None,
                        help=f"root directory for every path (default: ${ROOT_ENV} or /); with --simulate an "
                             "existing DIR keeps its etc/ and var/lib/ (a simulated reboot)")
    parser.add_argument("--bus-address", default=os.environ.get("DBUS_SYSTEM_BUS_ADDRESS"),
                        help="D-Bus address of the system bus (default: $DBUS_SYSTEM_BUS_ADDRESS or the system bus)")
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS)
    parser.add_argument("--keep-kernel", action="store_true",
                        help="with --simulate and --root: run the simulated kernel as a process of its own that "
                             "outlives the daemon (started if none serves DIR yet, else attached to), so that "
                             "restarting the daemon — or killing it — is not a reboot")
    parser.add_argument("--check-config", nargs="?", const="", metavar="FILE",
                        help="check the configuration (default: etc/nicpassd/nicpassd.toml under --root), print "
                             "each problem with its key and line, and exit: 0 when it is good, 78 when not")
    parser.add_argument("--record-topology", metavar="FILE",
                        help="read this host's sysfs (under --root) into a topology file ('-' for stdout) and exit")
    return parser.parse_args(argv)
