"""Daemon settings from /etc/nicpassd/nicpassd.toml (a missing file means the defaults)."""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_FULL_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_SHORT_PCI = re.compile(r"^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in the file: the key (dotted, "" for the file itself), its line (0: not
    found in the text), and what is wrong, with a did-you-mean for an unknown key."""

    key: str
    line: int
    message: str

    def describe(self, path: Path | str) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(ValueError):
    def __init__(self, message: str, problems: tuple[ConfigProblem, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GuardSettings(_Section):
    """What the guard cannot infer. By itself it protects the interfaces with a default route,
    the last interface with a carrier and an address, the root file system's storage, and what
    they depend on (see nicpassd/engine/guard.py)."""

    management_interfaces: tuple[str, ...] = ()
    management_prefixes: tuple[str, ...] = ()  # a route or an address inside one protects its NIC
    never_touch: tuple[str, ...] = ()  # PCI addresses (full or short) or vendor:device ids
    # A device of the management path (or root storage) taken by anyone but nicpassd is given
    # back to its host driver; false: reported only (sentinel.py).
    heal: bool = True
    # Sources of the management path beyond routes and configuration; each can be switched off.
    sessions: bool = True  # the interface an established session to session_ports arrives on
    session_ports: tuple[int, ...] = (22, 8006, 9090)  # SSH, the Proxmox web UI, Cockpit
    tunnels: bool = True  # a protected tunnel protects its underlay (the route to its remote, its dev)
    storage: bool = True  # the NIC reaching NFS/CIFS/Ceph/GlusterFS, iSCSI, NVMe-oF servers, libvirt pools
    cluster: bool = True  # corosync link addresses and Ceph public/cluster networks as management prefixes

    @field_validator("session_ports")
    @classmethod
    def _ports(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        for value in values:
            if not 0 < value < 65536:
                raise ValueError(f"session_ports: {value} is not a TCP port")
        return values

    @field_validator("management_prefixes")
    @classmethod
    def _prefixes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(value, strict=False)) for value in values)

    @field_validator("never_touch")
    @classmethod
    def _never_touch(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        """A typo here would silently protect nothing: accept only what can match."""
        normalized = []
        for value in values:
            text = value.strip().lower()
            if not (_FULL_PCI.match(text) or _SHORT_PCI.match(text) or re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{4}", text)):
                raise ValueError(f"never_touch: {value!r} is neither a PCI address (0000:3b:00.0 or 3b:00.0) "
                                 "nor a vendor:device id (8086:1572)")
            normalized.append(text)
        return tuple(normalized)


ReleasePolicy = Literal["keep", "restore"]


class ReleaseSettings(_Section):
    """What a device becomes when the VM holding it stops: ``keep`` it on vfio-pci, ready for the
    next start, or ``restore`` what nicpassd changed (the host driver). ``devices`` overrides the
    policy per PCI address; without an override, a device persisted for vfio-pci is kept."""

    policy: ReleasePolicy = "keep"
    devices: dict[str, ReleasePolicy] = Field(default_factory=dict)

    @field_validator("devices")
    @classmethod
    def _addresses(cls, values: dict[str, str]) -> dict[str, str]:
        normalized = {}
        for address, policy in values.items():
            text = address.strip().lower()
            if _SHORT_PCI.match(text):
                text = f"0000:{text}"
            if not _FULL_PCI.match(text):
                raise ValueError(f"release.devices: {address!r} is not a PCI address (0000:3b:02.0 or 3b:02.0)")
            normalized[text] = policy
        return normalized

    def policy_for(self, address: str) -> str:
        """The per-device override, or "" when the device has none."""
        return self.devices.get(address, "")


class DaemonSettings(_Section):
    write_timeout: float = Field(30.0, gt=0, le=3600)
    bind_verify_timeout: float = Field(3.0, gt=0, le=600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    guard: GuardSettings = GuardSettings()
    release: ReleaseSettings = ReleaseSettings()
    daemon: DaemonSettings = DaemonSettings()


def load_config(path: Path) -> Config:
    """The configuration in ``path`` (the defaults when there is none); ConfigError naming every
    problem, each with its key and line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): fix the file") from exc
    config, problems = parse_config(text)
    if problems:
        raise ConfigError("; ".join(problem.describe(path) for problem in problems), problems)
    return config


def parse_config(text: str) -> tuple[Config, tuple[ConfigProblem, ...]]:
    """(the configuration, ()) or (the defaults, every problem found)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc)) or "not TOML"
        return Config(), (ConfigProblem("", int(where.group(1)) if where else 0, f"not valid TOML: {message}"),)
    try:
        return Config.model_validate(data), ()
    except ValidationError as exc:
        problems = (_problem(text, error) for error in exc.errors())
        return Config(), tuple(sorted(problems, key=lambda problem: (problem.line or 1 << 30, problem.key)))


def _problem(text: str, error) -> ConfigProblem:
    location = [str(part) for part in error["loc"]]
    keys = [part for part in location if not part.isdigit()]
    if error["type"] == "extra_forbidden":
        known = _known_keys(keys[:-1])
        close = difflib.get_close_matches(keys[-1], known, n=1, cutoff=0.6)
        message = f"unknown key (did you mean {close[0]}?)" if close else \
            f"unknown key; {'.'.join(keys[:-1]) or 'the file'} takes {', '.join(known)}"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        message = message.removeprefix(f"{'.'.join(keys)}: ").removeprefix(f"{keys[-1]}: ") if keys else message
        if error["type"] not in ("value_error",):
            message += f" (given: {error.get('input')!r})"
    return ConfigProblem(".".join(keys), _line_of(text, keys), message)


def _known_keys(section: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in section:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _line_of(text: str, keys: list[str]) -> int:
    """The line where ``keys`` (section..., key) is written: under its [section] header, or as a
    dotted key; 0 when not found (a key under [release.devices] with quotes, say)."""
    lines = text.splitlines()
    *section, key = keys or [""]
    header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(map(re.escape, section)) + r"\s*\]") if section else None
    assignment = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*=")
    dotted = re.compile(r"^\s*" + r"\s*\.\s*".join(map(re.escape, keys)) + r"\s*=")
    inside = header is None
    for number, line in enumerate(lines, 1):
        if dotted.match(line):
            return number
        if re.match(r"^\s*\[", line):
            if not section and re.match(r"^\s*\[\s*" + re.escape(key) + r"\s*[\].]", line):
                return number  # an unknown [table]
            inside = bool(header and header.match(line))
            continue
        if inside and assignment.match(line):
            return number
    return 0
