"""What other tools were told to do with devices at boot, read (never written): modprobe.d (what
modules get at load time: the guard's boot-capture check reads it too), ``vfio-pci.ids=`` wherever
it is given, and for ``nicpassctl import`` driverctl's overrides, systemd-networkd's SR-IOV
settings and udev rules that write ``sriov_numvfs``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nicpassd.paths import HostPaths

MODPROBE_DIRS = ("/etc/modprobe.d", "/run/modprobe.d", "/usr/lib/modprobe.d", "/lib/modprobe.d")
DRIVERCTL_DIR = "/etc/driverctl.d"
# networkd and udev: a file in /etc hides one of the same name further down (their own rule).
NETWORKD_DIRS = ("/etc/systemd/network", "/run/systemd/network", "/usr/lib/systemd/network", "/lib/systemd/network")
UDEV_RULE_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d")


@dataclass(frozen=True)
class DriverctlOverride:
    path: str  # /etc/driverctl.d/pci-0000:3b:00.0
    address: str
    driver: str


@dataclass(frozen=True)
class Section:
    name: str
    line: int  # of its [header]
    values: dict[str, tuple[str, int]]  # key -> (value, line); the last assignment wins


@dataclass(frozen=True)
class NetworkdUnit:
    """A .network or .link file: its [Match] and the sections nicpassd can adopt."""

    path: str
    kind: str  # "network" or "link"
    match: dict[str, list[str]]  # key -> words (space-separated globs, as networkd reads them)
    sections: tuple[Section, ...] = field(default=())

    def sriov(self) -> list[Section]:
        return [section for section in self.sections if section.name == "SR-IOV"]

    def link_value(self, key: str) -> tuple[str, int] | None:
        for section in self.sections:
            if section.name == "Link" and key in section.values:
                return section.values[key]
        return None


@dataclass(frozen=True)
class UdevNumVfsRule:
    path: str
    line: int
    text: str
    match: dict[str, str]  # KERNEL / KERNELS / NAME / ENV{INTERFACE} ... -> pattern (== only)
    count: int


def _ordered_files(paths: HostPaths, directories: tuple[str, ...], suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(absolute path as the admin sees it, path under the root), sorted by file name across the
    directories, a name in an earlier directory hiding the same name in a later one."""
    chosen: dict[str, tuple[str, Path]] = {}
    for directory in directories:
        try:
            names = os.listdir(paths.under(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith(suffixes) and name not in chosen:
                chosen[name] = (f"{directory}/{name}", paths.under(directory) / name)
    return [chosen[name] for name in sorted(chosen)]


def read_modprobe_config(paths: HostPaths) -> list[tuple[str, int, str]]:
    """(file as the admin sees it, line number, line) of every modprobe.d configuration line,
    continuation lines joined, comments and blank lines skipped; files in modprobe's order (by
    name, /etc first)."""
    lines: list[tuple[str, int, str]] = []
    for shown, path in _ordered_files(paths, MODPROBE_DIRS, (".conf",)):
        try:
            text = path.read_text(errors="replace")
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
                lines.append((shown, start, line))
    return lines


@dataclass(frozen=True)
class VfioIds:
    """One place that tells vfio-pci to take devices by model, at every load of the module."""

    source: str  # "kernel command line", or "FILE:LINE" of modprobe.d
    text: str  # the word (vfio-pci.ids=...) or the whole modprobe.d line
    ids: frozenset[str]  # "vendor:device", as vfio-pci matches them (subsystem ids ignored)
    file: str = ""  # modprobe.d: the file


def vfio_pci_ids(cmdline: str, modprobe_lines: list[tuple[str, int, str]]) -> list[VfioIds]:
    """``vfio-pci.ids=`` on the kernel command line (the kernel treats - and _ alike) and
    ``options vfio-pci ids=`` in modprobe.d."""
    def ids_of(text: str) -> frozenset[str]:
        return frozenset(":".join(item.lower().split(":")[:2]) for item in text.split(",") if item)

    found = []
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key.replace("-", "_") == "vfio_pci.ids":
            found.append(VfioIds("kernel command line", word, ids_of(value)))
    for file, number, line in modprobe_lines:
        words = line.split()
        if len(words) >= 3 and words[0] == "options" and words[1].replace("-", "_") == "vfio_pci":
            for option in words[2:]:
                if option.startswith("ids="):
                    found.append(VfioIds(f"{file}:{number}", line, ids_of(option.removeprefix("ids=")), file))
    return found


def read_driverctl(paths: HostPaths) -> list[DriverctlOverride]:
    """driverctl keeps one file per override, ``BUS-DEVICE``, holding the driver's name."""
    overrides = []
    for shown, path in _ordered_files(paths, (DRIVERCTL_DIR,), ("",)):
        name = path.name
        if not name.startswith("pci-"):
            continue
        try:
            driver = path.read_text(errors="replace").strip()
        except OSError:
            continue
        overrides.append(DriverctlOverride(shown, name.removeprefix("pci-"), driver))
    return overrides


def parse_unit(text: str) -> list[Section]:
    """systemd's INI dialect: repeated sections stay apart (a .network has one [SR-IOV] per VF),
    ``#``/``;`` comments, backslash continuation lines."""
    sections: list[Section] = []
    current: Section | None = None
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending:
            start = number
            if not line or line[0] in "#;":
                continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line.startswith("[") and line.endswith("]"):
            current = Section(line[1:-1].strip(), start, {})
            sections.append(current)
        elif "=" in line and current is not None:
            key, _, value = line.partition("=")
            current.values[key.strip()] = (value.strip(), start)
    return sections


def read_networkd(paths: HostPaths) -> list[NetworkdUnit]:
    units = []
    for shown, path in _ordered_files(paths, NETWORKD_DIRS, (".network", ".link")):
        try:
            sections = parse_unit(path.read_text(errors="replace"))
        except OSError:
            continue
        match: dict[str, list[str]] = {}
        for section in sections:
            if section.name == "Match":
                for key, (value, _) in section.values.items():
                    match.setdefault(key, []).extend(value.split())
        units.append(NetworkdUnit(shown, path.suffix.lstrip("."), match,
                                  tuple(s for s in sections if s.name in ("SR-IOV", "Link"))))
    return units


_NUMVFS = re.compile(r"^ATTRS?\{(?:device/)?sriov_numvfs\}$")
_PAIR = re.compile(r'([A-Za-z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"')


def read_udev_numvfs(paths: HostPaths) -> list[UdevNumVfsRule]:
    """Rules that write a count into ``sriov_numvfs`` (``ATTR{sriov_numvfs}="8"`` or, for a
    netdev, ``ATTR{device/sriov_numvfs}="8"``), with the ``==`` keys they match on."""
    rules = []
    for shown, path in _ordered_files(paths, UDEV_RULE_DIRS, (".rules",)):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#") or "sriov_numvfs" not in line:
                continue
            match: dict[str, str] = {}
            count = None
            for key, operator, value in _PAIR.findall(line):
                if operator == "==":
                    match[key] = value
                elif operator == "=" and _NUMVFS.match(key) and value.isdigit():
                    count = int(value)
            if count is not None:
                rules.append(UdevNumVfsRule(shown, number, line, match, count))
    return rules
