"""Daemon settings from /etc/nicpassd/nicpassd.toml (a missing file means the defaults)."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_FULL_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_SHORT_PCI = re.compile(r"^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class ConfigError(ValueError):
    pass


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
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): fix the file") from exc
    try:
        return Config.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
