"""Map D-Bus errors and connection failures to an exit code and one sentence.

Every failure nicpassctl reports ends up as a :class:`CliError`: an exit code from
:class:`~nicpassctl.exitcodes.ExitCode` and one sentence (reason; remedy) that ``main``
prints to stderr as ``nicpassctl: <sentence>``.
"""

from __future__ import annotations

from typing import NamedTuple

from .exitcodes import ExitCode
from .names import BUS_NAME

_NP = "org.nicpass.NicPass1.Error."
_FD = "org.freedesktop.DBus.Error."

ERROR_CODES: dict[str, ExitCode] = {
    _NP + "InvalidArgument": ExitCode.USAGE,
    _NP + "NotFound": ExitCode.NOT_FOUND,
    _NP + "Protected": ExitCode.PROTECTED,
    _NP + "Busy": ExitCode.BUSY,
    _NP + "NotSupported": ExitCode.FAILED,
    _NP + "KernelError": ExitCode.FAILED,
    _NP + "Timeout": ExitCode.FAILED,
    _NP + "IdentityChanged": ExitCode.FAILED,
    _NP + "NotPersisted": ExitCode.FAILED,
    _FD + "AccessDenied": ExitCode.NOT_AUTHORIZED,
    _FD + "InteractiveAuthorizationRequired": ExitCode.NOT_AUTHORIZED,
    _FD + "AuthFailed": ExitCode.NOT_AUTHORIZED,
    _FD + "InvalidArgs": ExitCode.USAGE,
    _FD + "ServiceUnknown": ExitCode.DAEMON_UNREACHABLE,
    _FD + "NameHasNoOwner": ExitCode.DAEMON_UNREACHABLE,
    _FD + "NoServer": ExitCode.DAEMON_UNREACHABLE,
    _FD + "Disconnected": ExitCode.DAEMON_UNREACHABLE,
}
# Bus activation of nicpassd failed (only if a D-Bus service file is installed).
_UNREACHABLE_PREFIXES = (_FD + "Spawn.", "org.freedesktop.systemd1.")
_VERSION_SKEW = {_FD + n for n in ("UnknownMethod", "UnknownInterface", "UnknownObject", "UnknownProperty")}

UNREACHABLE = "nicpassd is not running on the system bus"
START_IT = "start it with `systemctl start nicpassd`"


# What a locale that cannot encode them (LANG=C, PYTHONIOENCODING=ascii) shows instead.
ASCII_FALLBACK = str.maketrans({"→": "->", "←": "<-", "—": "-", "–": "-", "…": "...", "≤": "<=", "≥": ">=",
                                "×": "x", "✓": "ok", "✗": "x"})


def printable(text: str, stream) -> str:
    """``text`` as ``stream`` can encode it: the arrows of the guard's chains spelled in ASCII,
    anything else left replaced, never an exception (an admin on a serial console still reads why)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
        return text
    except (UnicodeEncodeError, LookupError):
        return text.translate(ASCII_FALLBACK).encode(encoding, "replace").decode(encoding)


class StdoutClosed(Exception):
    """Whoever reads our output stopped (``nicpassctl list | head -1``): not a failure of ours,
    and never "the daemon is unreachable" (a broken pipe to the bus is an OSError of its own)."""


class CliError(Exception):
    """A failure to report: exit code plus one sentence (without the program prefix)."""

    def __init__(self, code: ExitCode, sentence: str) -> None:
        super().__init__(sentence)
        self.code = ExitCode(code)
        self.sentence = sentence


class DaemonError(Exception):
    """An ERROR reply from the bus or from nicpassd."""

    def __init__(self, name: str, message: str = "", member: str = "") -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.member = member


class Action(NamedTuple):
    """What the user tried to do, for authorization messages.

    ``verb`` completes "not authorized to ..."; ``polkit`` is the polkit action that grants it
    (None for reads, which need no authorization). A NamedTuple, not a dataclass: importing
    dataclasses costs every command ~5 ms (~60 ms under TCG).
    """

    verb: str
    polkit: str | None = None


READ = Action("query nicpassd")


def exit_code_for(name: str) -> ExitCode:
    if name in ERROR_CODES:
        return ERROR_CODES[name]
    if name.startswith(_UNREACHABLE_PREFIXES):
        return ExitCode.DAEMON_UNREACHABLE
    return ExitCode.FAILED


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def unreachable(detail: str = "") -> CliError:
    detail = one_line(detail)
    where = f" ({detail})" if detail else ""
    return CliError(ExitCode.DAEMON_UNREACHABLE, f"{UNREACHABLE}{where}; {START_IT}")


def not_authorized(action: Action, interactive: bool = False) -> CliError:
    why = " without authentication" if interactive else ""
    if action.polkit:
        remedy = f"run as root or ask an administrator to grant {action.polkit}"
    else:
        remedy = f"run as root or ask an administrator to allow access to {BUS_NAME} in the D-Bus policy"
    return CliError(ExitCode.NOT_AUTHORIZED, f"not authorized to {action.verb}{why}; {remedy}")


def from_daemon_error(err: DaemonError, action: Action = READ) -> CliError:
    """Turn an ERROR reply into the exit code and sentence to print."""
    name, message = err.name, one_line(err.message)
    code = exit_code_for(name)
    if code == ExitCode.NOT_AUTHORIZED:
        return not_authorized(action, interactive=name.endswith("InteractiveAuthorizationRequired"))
    if code == ExitCode.DAEMON_UNREACHABLE:
        return unreachable("" if name.endswith(("ServiceUnknown", "NameHasNoOwner")) else message)
    if name in _VERSION_SKEW:
        what = err.member or "this request"
        return CliError(
            code,
            f"nicpassd does not support {what} ({message or name}); "
            "nicpassctl and nicpassd are probably different versions, install matching ones",
        )
    if name == _FD + "NoReply":
        return CliError(
            code,
            f"nicpassd did not answer ({message or 'no reply'}); "
            "check `systemctl status nicpassd` and its journal",
        )
    if not message:
        message = f"nicpassd failed with {name}"
    elif not name.startswith(_NP) and name != _FD + "InvalidArgs":
        message = f"{message} ({name})"
    return CliError(code, message)


def from_exception(exc: BaseException, action: Action = READ) -> CliError:
    """Map anything raised while talking to the bus."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, DaemonError):
        return from_daemon_error(exc, action)
    if isinstance(exc, (OSError, EOFError)):
        # no bus socket, connection refused, connection lost
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return unreachable(f"cannot reach the system bus: {detail}")
    name = type(exc).__name__
    if name == "AuthenticationError":  # jeepney's; the name keeps this module free of D-Bus imports
        return unreachable(f"the system bus refused the connection: {exc}")
    if name == "InvalidAddressError":
        return unreachable(f"invalid bus address: {exc}")
    return CliError(ExitCode.FAILED, f"unexpected error talking to nicpassd: {one_line(repr(exc))}")


def timed_out(seconds: float, mutating: bool) -> CliError:
    later = "the change may still complete, check the result" if mutating else "it may be overloaded or hung"
    return CliError(
        ExitCode.FAILED,
        f"nicpassd did not answer within {seconds:g} seconds; {later}, or retry with a larger --timeout",
    )
