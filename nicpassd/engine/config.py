"""Daemon settings from /etc/nicpassd/nicpassd.toml (a missing file means the defaults)."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GuardSettings(_Section):
    management_interfaces: tuple[str, ...] = ()
    management_prefixes: tuple[str, ...] = ()
    never_touch: tuple[str, ...] = ()  # PCI addresses or vendor:device ids

    @field_validator("management_prefixes")
    @classmethod
    def _prefixes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(value, strict=False)) for value in values)


class ReleaseSettings(_Section):
    policy: Literal["keep", "restore"] = "keep"


class DaemonSettings(_Section):
    write_timeout: float = Field(30.0, gt=0)
    bind_verify_timeout: float = Field(3.0, gt=0)
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
    try:
        return Config.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
