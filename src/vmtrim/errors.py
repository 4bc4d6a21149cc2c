"""Exceptions raised by vmtrim, and the exit code each maps to.

::

    VmtrimError                 base; exit 3 unless a subclass says otherwise
     +-- BadInput               exit 2: a file, argument or domain the user gave is wrong
     |    +-- ImageError        an image that cannot be read as what it claims to be
     +-- EnvironmentProblem     exit 3: a tool, service or connection is missing or failing
     +-- VerificationFailed     exit 1: the check ran and the answer is "no"

Every error carries ``subject`` (the file, domain or socket it is about) so the CLI
can print one line: ``vmtrim: SUBJECT: MESSAGE``. The original exception, if any,
is kept as ``__cause__`` (raise ... from ...).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


class VmtrimError(Exception):
    """Base of every error vmtrim raises on purpose."""

    exit_code: int = EXIT_ENVIRONMENT

    def __init__(self, message: str, subject: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.subject = subject

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        return f"{self.subject}: {text}" if self.subject else text


class BadInput(VmtrimError):
    """The user's input is wrong: a malformed file, an unknown option, a missing path."""

    exit_code = EXIT_BAD_INPUT


class ImageError(BadInput):
    """A disk image that is truncated, corrupt, encrypted or otherwise unreadable."""


class EnvironmentProblem(VmtrimError):
    """Something outside the input failed: a missing tool, a dead daemon, a timeout."""

    exit_code = EXIT_ENVIRONMENT


class VerificationFailed(VmtrimError):
    """A check ran to the end and failed."""

    exit_code = EXIT_FINDINGS
