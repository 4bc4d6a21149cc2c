"""Exceptions raised by vmtrim, and the exit code each maps to.

::

    VmtrimError                 base; exit 3 unless a subclass says otherwise
     +-- BadInput               exit 2: a file, argument or domain the user gave is wrong
     |    +-- ImageError        an image that cannot be read as what it claims to be
     +-- EnvironmentProblem     exit 3: a tool, service or connection is missing or failing
          +-- AgentUnavailable  no agent (or QMP monitor) on the channel, or no answer in time
          +-- AgentCommandFailed  it answered, with an error (``command``, ``error_class``)
          +-- GuestFailed       a throwaway guest failed to boot, panicked or reported an error
          +-- HistoryUnavailable  the history database is corrupt, locked or unwritable
          +-- LockHeld          another ``vmtrim run`` holds the run lock
          +-- ImageInUse        a process (QEMU's image lock) or a running domain uses an image
          +-- HostUnreachable   one host of a fleet: no connection, refused, timed out, dropped

Callers sort failures by class, never by message text: a trim whose agent is
unavailable is *skipped*, one whose agent answered with an error *failed*.

Anything else that escapes is a bug in vmtrim: the CLI prints one line and exits
:data:`EXIT_INTERNAL`; an interrupt (Ctrl-C, SIGTERM) exits :data:`EXIT_INTERRUPTED`.

Every error carries ``subject`` (the file, domain or socket it is about) so the CLI
can print one line: ``vmtrim: SUBJECT: MESSAGE``. The original exception, if any,
is kept as ``__cause__`` (raise ... from ...).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


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


class AgentUnavailable(EnvironmentProblem):
    """No agent (or monitor) on the channel, or no answer within the time limit."""


class AgentCommandFailed(EnvironmentProblem):
    """The agent or QEMU's monitor answered ``command`` with an error.

    ``error_class`` is QMP's error class (``GenericError``, ``CommandNotFound``, ...), or
    None when the reply itself was unusable (malformed, out of range, too large).
    """

    def __init__(
        self,
        message: str,
        subject: str | None = None,
        *,
        command: str | None = None,
        error_class: str | None = None,
    ) -> None:
        super().__init__(message, subject)
        self.command = command
        self.error_class = error_class


class GuestFailed(EnvironmentProblem):
    """A throwaway guest failed: QEMU exited, the kernel panicked, or init reported an error."""


class HistoryUnavailable(EnvironmentProblem):
    """The history database cannot be opened, read or written (corrupt, locked, newer)."""


class LockHeld(EnvironmentProblem):
    """Another run holds the run lock (``flock``); ``pid`` is its process, when known."""

    def __init__(self, message: str, subject: str | None = None, *, pid: int | None = None):
        super().__init__(message, subject)
        self.pid = pid


class ImageInUse(EnvironmentProblem):
    """Another process holds QEMU's image lock on the image, or a running domain uses it."""


class HostUnreachable(EnvironmentProblem):
    """One libvirt host of a fleet could not be reached, refused us, did not answer within
    ``--connect-timeout``, or dropped the connection; the other hosts carry on."""
