"""One small interface to run a command where the storage is: here, or in a guest.

A :class:`Runner` runs an argv with a timeout and returns a :class:`Output`; it never
raises for a tool that is missing, hangs or fails: that is ``Output.error`` (one line),
and the probe turns it into an ``unknown`` reason. Output is cut at
:data:`MAX_OUTPUT` bytes: it comes from tools (or a guest) we do not trust.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmtrim.channels.qmp import ExecStatus
from vmtrim.errors import VmtrimError

#: The most stdout (and stderr) kept from one command; honest answers are a few KiB.
MAX_OUTPUT = 1 << 20
#: The most bytes read from one small file (sysfs, /proc/self/mountinfo).
MAX_FILE = 4 << 20


@dataclass(frozen=True)
class Output:
    """What one command did: exit status and output, or why it did not run."""

    argv: tuple[str, ...]
    exitcode: int | None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # it did not run or did not finish: the reason

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0

    def why(self) -> str:
        """One line: why this command gave no answer (for an ``unknown`` reason)."""
        if self.error is not None:
            return self.error
        lines = self.stderr.strip().splitlines()
        tail = lines[-1][:200] if lines else f"exit status {self.exitcode}"
        return f"{self.argv[0]} failed: {tail}"


class Runner(Protocol):
    """Where a probe's commands run."""

    #: shown in reasons: "this host", "guest vm1"
    where: str

    def run(self, argv: Sequence[str], *, timeout: float = 30.0) -> Output: ...

    def read(self, path: str) -> str | None:
        """A small text file (sysfs, procfs) there, or None when it cannot be read."""

    def device_number(self, path: str) -> tuple[int, int] | None:
        """(major, minor) of the block device at ``path`` there (symlinks followed)."""
        ...


def _text(data: bytes) -> str:
    return data[:MAX_OUTPUT].decode(errors="replace")


class LocalRunner:
    """Run on this host with subprocess."""

    where = "this host"

    def run(self, argv: Sequence[str], *, timeout: float = 30.0) -> Output:
        args = tuple(argv)
        try:
            proc = subprocess.run(
                args, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError:
            return Output(args, None, error=f"{args[0]} is not installed on {self.where}")
        except subprocess.TimeoutExpired:
            return Output(args, None, error=f"{args[0]} did not finish within {timeout:g} s")
        except OSError as exc:
            return Output(args, None, error=f"{args[0]}: {exc.strerror}")
        return Output(args, proc.returncode, _text(proc.stdout), _text(proc.stderr))

    def read(self, path: str) -> str | None:
        try:
            with Path(path).open("rb") as f:
                return _text(f.read(MAX_FILE))
        except OSError:
            return None

    def device_number(self, path: str) -> tuple[int, int] | None:
        # os.stat, not stat(1): an audit of 300 domains would otherwise fork 300 times.
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        return os.major(st.st_rdev), os.minor(st.st_rdev)


class ExecCapable(Protocol):
    """The guest-exec of :class:`vmtrim.channels.qmp.SyncGuestAgent` and
    :class:`vmtrim.channels.libvirt.LibvirtAgent`: ``run(path, args, timeout=)``."""

    def run(self, path: str, args: list[str], *, timeout: float) -> ExecStatus: ...


class AgentRunner:
    """Run inside a guest through its agent's guest-exec (the binary needs a full path
    or the guest agent's PATH; qemu-ga runs it without a shell)."""

    def __init__(self, agent: ExecCapable, where: str = "the guest") -> None:
        self.agent = agent
        self.where = where

    def run(self, argv: Sequence[str], *, timeout: float = 30.0) -> Output:
        args = tuple(argv)
        try:
            status = self.agent.run(args[0], list(args[1:]), timeout=timeout)
        except VmtrimError as exc:  # agent gone, guest-exec refused, did not exit in time
            return Output(args, None, error=f"{args[0]} in {self.where}: {exc.message}")
        if status.signal is not None:
            return Output(
                args, None, error=f"{args[0]} in {self.where}: killed by signal {status.signal}"
            )
        return Output(args, status.exitcode, _text(status.out_data), _text(status.err_data))

    def read(self, path: str) -> str | None:
        # busybox and coreutils both have cat; a sysfs file is one short line.
        out = self.run(["cat", path], timeout=15.0)
        return out.stdout if out.ok else None

    def device_number(self, path: str) -> tuple[int, int] | None:
        return stat_device_number(self, path)


def stat_device_number(runner: Runner, path: str) -> tuple[int, int] | None:
    """(major, minor) from stat(1) where ``runner`` runs; a regular file reads 0:0,
    which names no block device in sysfs."""
    out = runner.run(["stat", "-L", "-c", "%t:%T", path], timeout=15.0)
    words = out.stdout.strip().split(":") if out.ok else []
    if len(words) != 2:
        return None
    try:
        return int(words[0], 16), int(words[1], 16)
    except ValueError:
        return None
