"""Helpers for the file-handling tests: the CLI under a memory cap, small real filesystems."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# The old reads grew to 4.6 GB; vmtrim itself (with numpy and lxml loaded) needs well
# under this, so a read that is not bounded dies of MemoryError (exit 4), not exit 2.
MEMORY_CAP = 1 << 30
NOBODY = 65534


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def vmtrim(
    *args: str,
    stdin: IO[bytes] | int | None = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does, with its address space capped at :data:`MEMORY_CAP`.

    The timeout only turns a hang (the FIFO bug) into a failure instead of a stuck run.
    """
    return subprocess.run(
        [sys.executable, "-m", "vmtrim", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        preexec_fn=_cap_memory,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str], subject: str | Path) -> str:
    """The single stderr line, checked to name ``subject``; returns its message part."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"vmtrim: {subject}: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "256k") -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``where`` (created), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "vmtrim-test-small", str(where))
    try:
        yield where
    finally:
        run("umount", "-l", str(where))


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Write a filler file until the filesystem is full, then give back ``leave`` bytes."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        if leave:
            os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
    finally:
        os.close(fd)
    return filler


def as_nobody(*cmd: str) -> None:
    """Run ``cmd`` as user nobody (a different uid, no groups), as an attacker would."""
    run("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd)
