"""Reading inputs and replacing files, safe against hostile paths, full disks and kills.

**Reading** (:func:`read_input`). vmtrim's text inputs (libvirt XML, QEMU command
lines) must be regular files, or ``-`` for stdin. The type is checked with ``stat``
before anything is opened (opening a FIFO blocks until a writer comes; opening a
device can have side effects), the open is ``O_NONBLOCK`` and the descriptor is checked
again with ``fstat``, so a file swapped in between is caught too. At most
:data:`MAX_INPUT_BYTES` (64 MiB) is read, from files and from stdin alike: a libvirt
domain with 10,000 disks is about 3 MiB of XML and Linux caps a command line at a few
MiB, so anything larger (``/dev/zero`` through a pipe, an image given by mistake) is not
such an input and is refused with one error naming it, before it fills memory.

**Replacing** (:func:`atomic_write`, :func:`update_file`). The new bytes go to a
temporary file in the same directory, are fsynced, and replace the file with
``os.replace`` (a rename, atomic on POSIX), so a crash or a kill at any moment leaves
either the old file or the new one. The rules, each a refusal with one line:

- the final path component must not be a symbolic link (``lstat``, then ``O_NOFOLLOW``):
  vmtrim never resolves a link itself, so a link that another user planted in a sticky
  directory such as ``/tmp`` cannot redirect root's write to a file elsewhere. Links
  among the directories are followed (``/var/run`` style), except one that another
  user owns in a sticky world-writable directory (the kernel's ``protected_symlinks``
  rule, which some hosts turn off);
- an existing file must be a regular file (not a directory, FIFO, device or socket);
- unless ``force=True`` (``--force``): it must be writable by its owner (a read-only
  mode says "do not change me"), and it must have a single hard link. A replacement is
  a new inode, so the other names of a hard-linked file would keep the old text: with
  ``force`` that is what happens (the link is broken);
- the mode, the owner and group (when we may set them) and every extended attribute
  (``security.selinux``, POSIX ACLs, ``user.*``) move to the new file; if one cannot
  be kept, nothing is written.

:func:`update_file` also takes an exclusive ``flock`` on the file for as long as the
caller works on it, and reads the bytes the caller then parses and changes. A second
vmtrim that tries to change the same file meanwhile gets :class:`EnvironmentProblem`
(exit 3) instead of overwriting the first one's result.

**Backups.** Before a file is changed, :func:`backup_beside` keeps the bytes it held
(the bytes that were parsed, passed in, never re-read) as
``NAME.vmtrim-YYYYmmddTHHMMSSZ.bak`` beside it, mode 0600 (libvirt XML can hold secrets
such as iSCSI CHAP or LUKS passphrase references). :func:`backup_to_state` keeps text
that has no file of its own (a live domain's XML) under
``$XDG_STATE_HOME/vmtrim/backups/``. A backup is written atomically too: a hidden
temporary file, fsynced, then hard-linked to a name that does not exist yet, so a full
disk leaves no ``.bak`` and a kill at most a hidden ``.*.bak-tmp``, never a short
``.bak``.

``VMTRIM_TEST_WRITE_DELAY`` (seconds, tests only) makes every write go in small chunks
with a sleep between them, so a test can kill the writer midway.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmtrim.errors import BadInput, EnvironmentProblem

MAX_INPUT_BYTES = 64 << 20
"""The most vmtrim reads from one text input (64 MiB); see the module docstring."""

_BACKUP_MODE = 0o600
_STATE_DIR_MODE = 0o700
_CHUNK_WHEN_SLOW = 64
_READ_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

PathArg = str | os.PathLike[str]


# ---------------------------------------------------------------- reading


def _kind(mode: int) -> str:
    kinds: tuple[tuple[Callable[[int], bool], str], ...] = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def _size_text(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"


def _too_big(limit: int, subject: str) -> BadInput:
    return BadInput(
        f"larger than {_size_text(limit)}: too big for a libvirt XML or QEMU command line",
        subject=subject,
    )


def _read_capped(read: Callable[[int], bytes], limit: int, subject: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = read(min(_READ_CHUNK, limit + 1 - total))
        except OSError as exc:
            raise BadInput(f"cannot read: {exc.strerror}", subject=subject) from exc
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:  # one byte past the cap is enough to know
            raise _too_big(limit, subject)
        chunks.append(chunk)


def _read_regular(fd: int, st: os.stat_result, limit: int, subject: str) -> bytes:
    if st.st_size > limit:  # refused without reading; /proc files say 0 and are capped below
        raise _too_big(limit, subject)
    return _read_capped(functools.partial(os.read, fd), limit, subject)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_regular(
    path: str, subject: str, *, follow: bool, purpose: str
) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without blocking; anything but a regular file is BadInput.

    ``FileNotFoundError`` passes through, so callers decide what a missing file means.
    ``follow=False`` refuses a symbolic link as the final component.
    """
    try:
        first = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BadInput(f"cannot stat: {exc.strerror}", subject=subject) from exc
    if stat.S_ISLNK(first.st_mode):
        raise _link_refused(subject)
    if stat.S_ISDIR(first.st_mode):
        raise BadInput("is a directory, not a file", subject=subject)
    if not stat.S_ISREG(first.st_mode):
        raise BadInput(f"is {_kind(first.st_mode)}, not a regular file; {purpose}", subject=subject)
    try:
        fd = os.open(path, _OPEN_FLAGS | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise _link_refused(subject) from exc
        raise BadInput(f"cannot open: {exc.strerror}", subject=subject) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not _same_file(st, first):
        os.close(fd)
        raise BadInput("changed while vmtrim opened it; try again", subject=subject)
    return fd, st


def _link_refused(subject: str) -> BadInput:
    return BadInput(
        "is a symbolic link; vmtrim does not write through links: give the file it points to",
        subject=subject,
    )


def read_input(path: str, *, limit: int = MAX_INPUT_BYTES) -> bytes:
    """Read a regular file (or stdin for ``-``), at most ``limit`` bytes; else BadInput.

    A FIFO, device, directory or socket is refused before it is opened (so a FIFO
    cannot block and a device's open has no side effects); a file or stream over
    ``limit`` is refused once one byte past it has been read. Symbolic links are
    followed: reading through one changes nothing.
    """
    if path == "-":
        stream = sys.stdin.buffer if sys.stdin is not None else None
        if stream is None:
            raise BadInput("stdin is closed", subject="<stdin>")
        return _read_capped(stream.read, limit, "<stdin>")
    try:
        fd, st = _open_regular(
            path, path, follow=True, purpose="give '-' to read a pipe from stdin"
        )
    except FileNotFoundError as exc:
        raise BadInput("no such file", subject=path) from exc
    try:
        return _read_regular(fd, st, limit, path)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- writing


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


def _write_error(action: str, exc: OSError, subject: str) -> EnvironmentProblem:
    reason = (
        "no space left on the filesystem"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else exc.strerror
    )
    return EnvironmentProblem(f"{action}: {reason}; the file is unchanged", subject=subject)


def _temporary(directory: Path, prefix: str, suffix: str, subject: str) -> tuple[int, Path]:
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise BadInput(f"no directory {directory} to write in", subject=subject) from exc
    except OSError as exc:
        raise _write_error(f"cannot create a temporary file in {directory}", exc, subject) from exc
    return fd, Path(name)


def _copy_xattrs(source: int, target: int, subject: str) -> None:
    """Every extended attribute of ``source`` onto ``target`` (SELinux label, ACLs, user.*)."""
    try:
        names = os.listxattr(source)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOSYS):
            return  # the filesystem has none to keep
        raise
    for name in names:
        try:
            os.setxattr(target, name, os.getxattr(source, name))
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot keep the extended attribute {name} on the new file: {exc.strerror};"
                " the file is unchanged",
                subject=subject,
            ) from exc


def _check_replaceable(st: os.stat_result, subject: str) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if not mode & stat.S_IWUSR:
        raise BadInput(
            f"is read-only (mode {mode:04o}); give --force to replace it anyway", subject=subject
        )
    if st.st_nlink > 1:
        raise BadInput(
            f"has {st.st_nlink} hard links; replacing it would break the link and leave the"
            " other names with the old text: give --force to do that anyway",
            subject=subject,
        )


@dataclass
class FileUpdate:
    """A file opened (not through a link) to be replaced; see :func:`update_file`.

    ``data`` is what the file held when it was opened, or None when there was no file.
    """

    path: Path
    subject: str
    data: bytes | None
    _fd: int | None
    _stat: os.stat_result | None

    def replace(
        self, new: bytes | str, *, new_file_mode: int = 0o600, backup: bool = True
    ) -> Path | None:
        """Back up ``data`` (if it differs from ``new``) beside the file, then replace it.

        Returns the backup's path, or None when none was needed. If the replacement
        fails, the backup it made is removed again: nothing changed, nothing is left.
        """
        payload = new.encode() if isinstance(new, str) else new
        saved = None
        if backup and self.data is not None and self.data != payload:
            saved = backup_beside(self.path, self.data)
        try:
            self._replace(payload, new_file_mode)
        except BaseException:
            if saved is not None:
                saved.unlink(missing_ok=True)
            raise
        return saved

    def close(self) -> None:
        """Close the file (which drops the lock); :func:`update_file` does this."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _replace(self, payload: bytes, new_file_mode: int) -> None:
        directory = self.path.parent
        fd, tmp = _temporary(directory, f".{self.path.name}.", ".tmp", self.subject)
        try:
            try:
                old = self._stat
                if old is not None and self._fd is not None:
                    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                        with contextlib.suppress(PermissionError):
                            os.fchown(fd, old.st_uid, old.st_gid)
                    os.fchmod(
                        fd, stat.S_IMODE(old.st_mode)
                    )  # after chown, which clears set-id bits
                    _copy_xattrs(self._fd, fd, self.subject)
                else:
                    os.fchmod(fd, new_file_mode)
                _write_all(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._check_unchanged()
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _write_error("cannot write", exc, self.subject) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)

    def _check_unchanged(self) -> None:
        # Someone (not a vmtrim: those wait for the lock) replaced or created the file
        # meanwhile: do not overwrite their version with one made from older text.
        try:
            now: os.stat_result | None = os.lstat(self.path)
        except FileNotFoundError:
            now = None
        same = (
            (now is None)
            if self._stat is None
            else (now is not None and _same_file(now, self._stat))
        )
        if not same:
            raise EnvironmentProblem(
                "changed while vmtrim worked on it; nothing written", subject=self.subject
            )


def _check_parent_links(path: Path, subject: str) -> None:
    """Refuse a directory link that another user owns in a sticky world-writable directory.

    The kernel's fs.protected_symlinks rule, applied here because it is off on some
    hosts: root must not follow ``/tmp/x`` to ``/etc`` because user nobody made ``x``.
    """
    current = Path(path.anchor) if path.is_absolute() else Path()
    for part in path.parent.parts[1 if path.is_absolute() else 0 :]:
        holder, current = current, current / part
        try:
            link = os.lstat(current)
            if not stat.S_ISLNK(link.st_mode):
                continue
            where = os.stat(holder)
        except OSError:
            return  # a missing or unreadable directory fails later, with its own error
        shared = where.st_mode & stat.S_ISVTX and where.st_mode & stat.S_IWOTH
        if shared and link.st_uid not in (os.geteuid(), where.st_uid):
            raise BadInput(
                f"goes through {current}, a symbolic link that user {link.st_uid} owns in"
                f" the shared directory {holder}; give the real path",
                subject=subject,
            )


def _open_for_update(
    path: Path, subject: str, *, force: bool, lock: bool, read: bool
) -> FileUpdate | None:
    _check_parent_links(path, subject)
    for _ in range(10):
        try:
            fd, st = _open_regular(
                str(path), subject, follow=False, purpose="refusing to replace it"
            )
        except FileNotFoundError:
            return None
        try:
            if not force:
                _check_replaceable(st, subject)
            if lock:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise EnvironmentProblem(
                        "another vmtrim is changing this file; try again when it is done",
                        subject=subject,
                    ) from exc
                # The lock holder may have replaced the file before letting go:
                # then this descriptor is the old inode; open the new one.
                try:
                    if not _same_file(os.lstat(path), st):
                        os.close(fd)
                        continue
                except FileNotFoundError:
                    os.close(fd)
                    continue
            data = _read_regular(fd, st, MAX_INPUT_BYTES, subject) if read else None
        except BaseException:
            os.close(fd)
            raise
        return FileUpdate(path, subject, data, fd, st)
    raise EnvironmentProblem("keeps being replaced while vmtrim opens it", subject=subject)


@contextlib.contextmanager
def update_file(
    path: PathArg, *, force: bool = False, create: bool = False, lock: bool = True
) -> Iterator[FileUpdate]:
    """Open ``path`` to replace it, holding an exclusive lock until the block ends.

    Refuses (BadInput, exit 2) a symbolic link, anything but a regular file, more than
    :data:`MAX_INPUT_BYTES`, and unless ``force`` a read-only or hard-linked file; a
    missing file is BadInput unless ``create``. Another vmtrim holding the lock is
    EnvironmentProblem (exit 3). Call :meth:`FileUpdate.replace` inside the block.
    """
    target = Path(path)
    subject = str(path)
    update = _open_for_update(target, subject, force=force, lock=lock, read=True)
    if update is None:
        if not create:
            raise BadInput("no such file", subject=subject)
        update = FileUpdate(target, subject, None, None, None)
    try:
        yield update
    finally:
        update.close()


def atomic_write(
    path: PathArg, data: bytes | str, *, new_file_mode: int = 0o644, force: bool = False
) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + fsync + rename), no backup.

    The rules of :func:`update_file` apply (no link, a regular file, read-only and
    hard-linked files only with ``force``); it takes no lock. An existing file keeps its
    mode, owner and extended attributes; a new file gets ``new_file_mode``. On any
    failure the temporary file is removed and the original is untouched.
    """
    target = Path(path)
    update = _open_for_update(target, str(path), force=force, lock=False, read=False) or FileUpdate(
        target, str(path), None, None, None
    )
    try:
        update.replace(data, new_file_mode=new_file_mode, backup=False)
    finally:
        update.close()


# ---------------------------------------------------------------- backups


def _link_no_clobber(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target``; FileExistsError if that name is taken."""
    try:
        os.link(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here (vfat, some FUSE): a rename, after a check that is racy
        # only against someone choosing the very same timestamped name.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from exc
        os.rename(tmp, target)
        return
    tmp.unlink()


def _store_backup(directory: Path, stem: str, data: bytes, subject: str) -> Path:
    fd, tmp = _temporary(directory, f".{stem}.", ".bak-tmp", subject)
    try:
        try:
            os.fchmod(fd, _BACKUP_MODE)  # mkstemp's 0600, whatever the umask
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        for counter in range(100):
            target = directory / (f"{stem}.bak" if counter == 0 else f"{stem}-{counter}.bak")
            try:
                _link_no_clobber(tmp, target)
            except FileExistsError:
                continue  # an older backup or another writer has this name: take the next
            _fsync_dir(directory)
            return target
    except OSError as exc:
        raise _write_error(f"cannot write a backup in {directory}", exc, subject) from exc
    finally:
        tmp.unlink(missing_ok=True)
    raise EnvironmentProblem(f"no free backup name in {directory}", subject=subject)


def backup_beside(path: PathArg, data: bytes, *, now: datetime | None = None) -> Path:
    """Keep ``data`` (what ``path`` held) as a new 0600 ``NAME.vmtrim-<UTC time>.bak`` beside it."""
    source = Path(path)
    stem = f"{source.name}.vmtrim-{_timestamp(now)}"
    return _store_backup(source.parent, stem, data, str(path))


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
