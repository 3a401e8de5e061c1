"""Exit codes of nicpassctl (the contract in spec/interface.md)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    PROTECTED = 3
    BUSY = 4
    NOT_AUTHORIZED = 5
    DAEMON_UNREACHABLE = 6
    NOT_FOUND = 7
    # `check`: the command worked, and a finding is `fail` (beyond the contract's 0-7, so that
    # monitoring tells "the host is not ready" from "the check could not run")
    CHECK_FAILED = 8
