"""One run at a time: ``flock`` on a lock file, with the holder's PID written inside.

The kernel drops a flock when its holder exits, however it exits, so a crashed or
killed run needs no clean-up: the file stays, the lock does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from vmtrim.errors import EnvironmentProblem, LockHeld


def default_lock_path() -> Path:
    """/run/vmtrim/run.lock for root, else $XDG_RUNTIME_DIR (or /tmp) /vmtrim-UID/run.lock."""
    if os.geteuid() == 0:
        return Path("/run/vmtrim/run.lock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "vmtrim" if runtime else Path("/tmp") / f"vmtrim-{os.geteuid()}"
    return base / "run.lock"


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def run_lock(path: str | os.PathLike[str] | None = None, wait: float = 0.0) -> Iterator[Path]:
    """Hold the run lock; LockHeld (exit 3) if another process holds it after ``wait`` s."""
    where = Path(path) if path is not None else default_lock_path()
    try:
        where.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot open the run lock: {exc.strerror}", subject=str(where)
        ) from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid = _holder(fd)
                    who = f" (PID {pid})" if pid else ""
                    raise LockHeld(
                        f"another run holds the lock{who}", subject=str(where), pid=pid
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield where
    finally:
        os.close(fd)  # releases the flock
