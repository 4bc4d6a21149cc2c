"""Atomic file writes and 0600 backups.

Every write vmtrim makes to a user's file goes through :func:`atomic_write`: the new
bytes go to a temporary file in the same directory, are fsynced, and replace the
original with ``os.replace`` (a rename, atomic on POSIX), so a crash or a kill at any
moment leaves either the old file or the new one, never a mixture. The mode and owner
of the file being replaced are kept.

Before a file is changed in place, :func:`backup_beside` copies it to
``NAME.vmtrim-YYYYmmddTHHMMSSZ.bak`` beside it, mode 0600 (libvirt XML can hold
secrets such as iSCSI CHAP or LUKS passphrase references). :func:`backup_to_state`
keeps a copy of text that has no file of its own (a live domain's XML) under
``$XDG_STATE_HOME/vmtrim/backups/``.

``VMTRIM_TEST_WRITE_DELAY`` (seconds, tests only) makes :func:`atomic_write` write in
small chunks and sleep between them, so a test can kill the writer midway.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from vmtrim.errors import BadInput, EnvironmentProblem

_BACKUP_MODE = 0o600
_STATE_DIR_MODE = 0o700
_CHUNK_WHEN_SLOW = 64


def _timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    delay = float(os.environ.get("VMTRIM_TEST_WRITE_DELAY") or 0)
    step = _CHUNK_WHEN_SLOW if delay > 0 else len(data) or 1
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        offset += os.write(fd, view[offset : offset + step])
        if delay > 0:
            time.sleep(delay)


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow it
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(directory: Path, stem: str, suffix: str) -> Path:
    candidate = directory / f"{stem}{suffix}"
    counter = 1
    while candidate.exists() or candidate.is_symlink():
        candidate = directory / f"{stem}-{counter}{suffix}"
        counter += 1
    return candidate


def _store_backup(directory: Path, stem: str, data: bytes, subject: str) -> Path:
    for _ in range(100):
        target = _unique(directory, stem, ".bak")
        try:
            _create_exclusive(target, data, _BACKUP_MODE)
        except FileExistsError:
            continue  # lost a race with another writer; pick the next name
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot write backup {target}: {exc.strerror}", subject=subject
            ) from exc
        _fsync_dir(directory)
        return target
    raise EnvironmentProblem(f"no free backup name in {directory}", subject=subject)


def backup_beside(path: str | os.PathLike[str], *, now: datetime | None = None) -> Path:
    """Copy ``path`` to a new 0600 file ``NAME.vmtrim-<UTC timestamp>.bak`` beside it."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read: {exc.strerror}", subject=str(source)) from exc
    stem = f"{source.name}.vmtrim-{_timestamp(now)}"
    return _store_backup(source.parent, stem, data, str(source))


def state_backup_dir() -> Path:
    """``$XDG_STATE_HOME/vmtrim/backups`` (default ``~/.local/state``), created 0700."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    directory = Path(base) / "vmtrim" / "backups"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=_STATE_DIR_MODE)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot create backup directory: {exc.strerror}", subject=str(directory)
        ) from exc
    return directory


def backup_to_state(name: str, data: bytes | str, *, now: datetime | None = None) -> Path:
    """Keep ``data`` as a 0600 file ``NAME.<UTC timestamp>.bak`` in :func:`state_backup_dir`.

    ``name`` is a label such as a domain name; path separators are replaced.
    """
    payload = data.encode() if isinstance(data, str) else data
    safe = "".join(c if c.isalnum() or c in "-_.@+" else "_" for c in name).lstrip(".") or "x"
    return _store_backup(state_backup_dir(), f"{safe}.{_timestamp(now)}", payload, name)


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, new_file_mode: int = 0o644
) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + fsync + rename).

    An existing file keeps its permission bits and (when we may) its owner and group;
    a new file gets ``new_file_mode``. On any failure the temporary file is removed
    and the original is untouched.
    """
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    # Write through a symlink to the file it names, as an editor would.
    real = Path(os.path.realpath(target))
    directory = real.parent
    try:
        old = os.stat(real)
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot stat: {exc.strerror}", subject=str(target)) from exc
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise BadInput("not a regular file; refusing to replace it", subject=str(target))
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot create a temporary file in {directory}: {exc.strerror}", subject=str(target)
        ) from exc
    tmp = Path(tmp_name)
    try:
        try:
            if old is not None:
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, old.st_uid, old.st_gid)
            else:
                os.fchmod(fd, new_file_mode)
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, real)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EnvironmentProblem(f"cannot write: {exc.strerror}", subject=str(target)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def read_input(path: str) -> bytes:
    """Read ``path`` (or stdin for ``-``) as bytes; a missing file is bad input."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise BadInput("no such file", subject=path) from exc
    except IsADirectoryError as exc:
        raise BadInput("is a directory, not a file", subject=path) from exc
    except OSError as exc:
        raise BadInput(f"cannot read: {exc.strerror}", subject=path) from exc
