"""What the engine answers with: typed outcomes, findings and explanations.

The transport maps these to D-Bus types and the CLI renders them; nothing downstream parses a
sentence back into a result. ``error`` fields hold an error name of the contract
(``nicpassd.errors``: InvalidArgument, Protected, Busy, ...), never wording.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from nicpassd.errors import NicpassError


class Action(StrEnum):
    """What a reconcile step did (or would have done) to a device."""

    FOLLOW = "follow"  # a persisted card found at another address: its desire re-keyed there
    VFS = "vfs"  # set a PF's VF count
    BIND = "bind"  # move a function to its desired driver
    VF = "vf"  # bring a VF's settings (MAC, VLAN, ...) to the persisted ones
    CHECK = "check"  # a desire looked at and not applied (absent, identity changed, held)


class Result(StrEnum):
    OK = "ok"
    FAILED = "failed"  # applied and the kernel (or a check just before it) refused
    NOT_APPLIED = "not-applied"  # planned away: the guard, a lease, a hold... said no


SKIPPED = "skipped"  # ``error`` of a desire left alone on purpose (held, waiting, retried later)


@dataclass(frozen=True)
class StepOutcome:
    """One device of a reconcile run: what was done, or not, and why."""

    address: str
    action: Action
    result: Result
    error: str = ""  # an error name of the contract, or SKIPPED; "" when ok
    message: str = ""  # ok: what was done ("now at 0000:3c:00.0"); else why not

    @classmethod
    def ok(cls, address: str, action: Action, message: str = "") -> "StepOutcome":
        return cls(address, action, Result.OK, "", message)

    @classmethod
    def failed(cls, address: str, action: Action, error: NicpassError) -> "StepOutcome":
        return cls(address, action, Result.FAILED, error.name, error.message)

    @property
    def succeeded(self) -> bool:
        return self.result is Result.OK

    @property
    def row(self) -> tuple[str, str, str]:
        """(address, action, summary): the contract's ``Reconcile`` row."""
        return self.address, self.action.value, self.summary

    @property
    def summary(self) -> str:
        """The contract's one-string form: "ok", "ok: <what>" or "<ErrorName>: <why>"."""
        if self.succeeded:
            return f"ok: {self.message}" if self.message else "ok"
        return f"{self.error}: {self.message}"

    def __str__(self) -> str:
        if self.result is Result.NOT_APPLIED:
            return f"{self.address}  {self.action.value:<6} not applied: {self.summary}"
        return f"{self.address}  {self.action.value:<6} {self.summary}"


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One line of ``Check``: a stable id, how bad, what was found, what to do."""

    id: str
    level: Level
    message: str
    remedy: str = ""


@dataclass(frozen=True)
class GroupMember:
    address: str
    driver: str


@dataclass(frozen=True)
class Explanation:
    """``Explain``: may this device be passed through, and everything that decides it."""

    address: str
    allowed: bool
    verdict: str
    protected: bool
    reasons: tuple[str, ...]
    iommu_group: int
    group_members: tuple[GroupMember, ...]
    group_viable: bool
    leased_to: str
    persisted: bool
    desired_driver: str
    driver: str
    interfaces: tuple[str, ...]
    drift: str
    overridable: bool = False
    last_violation: str = ""  # the last time someone else took it, and what nicpassd did
