"""Typed errors of the engine.

The transport maps each class to ``org.nicpass.NicPass1.Error.<name>``; the CLI maps the D-Bus
name to an exit code. The engine never imports D-Bus: the names live here as plain strings.
"""

from __future__ import annotations


class NicpassError(Exception):
    """Base class. ``name`` is the stable error name of the external contract."""

    name = "Failed"

    def __init__(self, message: str, remedy: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def with_note(self, note: str) -> "NicpassError":
        """A new error of the same type with ``; note`` added (raised ones are never mutated)."""
        return type(self)(f"{self.message}; {note}", self.remedy) if note else self

    def extended(self, suffix: str) -> "NicpassError":
        return type(self)(self.message + suffix, self.remedy)

    def copy(self) -> "NicpassError":
        return type(self)(self.message, self.remedy)

    def __str__(self) -> str:
        if self.remedy:
            return f"{self.message}; {self.remedy}"
        return self.message


class InvalidArgument(NicpassError):
    name = "InvalidArgument"


class NotFound(NicpassError):
    name = "NotFound"


class Protected(NicpassError):
    name = "Protected"


class Busy(NicpassError):
    name = "Busy"


class NotSupported(NicpassError):
    name = "NotSupported"


class KernelError(NicpassError):
    name = "KernelError"


class Timeout(NicpassError):
    name = "Timeout"


class IdentityChanged(NicpassError):
    name = "IdentityChanged"


class NotPersisted(NicpassError):
    """nicpassd could not save its own state (EACCES, EROFS, ENOSPC...): the change was undone."""

    name = "NotPersisted"

    @classmethod
    def of(cls, exc: OSError, what: str = "the change was undone") -> "NotPersisted":
        import errno

        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return cls(f"cannot save nicpassd's state in {exc.filename or 'its directory'}: {exc.strerror or exc} "
                   f"({code}); {what}",
                   "make /var/lib/nicpassd and /run/nicpassd writable, with free space, then retry")


ALL_ERRORS: tuple[type[NicpassError], ...] = (
    InvalidArgument, NotFound, Protected, Busy, NotSupported, KernelError, Timeout, IdentityChanged, NotPersisted,
)
