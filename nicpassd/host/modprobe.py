"""What modprobe will do at the next module load: the modprobe.d configuration (``options``,
``softdep``, ``install``, ``blacklist``), read, never written."""

from __future__ import annotations

import os

from nicpassd.paths import HostPaths

DIRECTORIES = ("/etc/modprobe.d", "/run/modprobe.d", "/usr/lib/modprobe.d", "/lib/modprobe.d")


def read_modprobe_config(paths: HostPaths) -> list[tuple[str, int, str]]:
    """(file as the admin sees it, line number, line) of every modprobe.d configuration line,
    continuation lines joined, comments and blank lines skipped; files in modprobe's order (by
    name, /etc first)."""
    seen: set[str] = set()
    lines: list[tuple[str, int, str]] = []
    for shown in DIRECTORIES:
        directory = paths.under(shown)
        try:
            names = sorted(name for name in os.listdir(directory) if name.endswith(".conf"))
        except OSError:
            continue
        for name in names:
            if name in seen:  # /etc overrides a file of the same name in /usr/lib or /run
                continue
            seen.add(name)
            try:
                text = (directory / name).read_text(errors="replace")
            except OSError:
                continue
            pending, start = "", 0
            for number, raw in enumerate(text.splitlines(), 1):
                line = raw.split("#", 1)[0].rstrip()
                if not pending:
                    start = number
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                line, pending = (pending + line).strip(), ""
                if line:
                    lines.append((f"{shown}/{name}", start, line))
    return lines
