"""Opening images: read-only, regular files only, OS errors as one-line ImageErrors."""

from __future__ import annotations

import os
import stat

from vmtrim.errors import ImageError


def open_readonly(path: str) -> int:
    """Open an image for reading only, turning OS errors into one-line ImageErrors.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer;
    fstat then refuses it like every other file that is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise ImageError("no such file", subject=path) from exc
    except PermissionError as exc:
        raise ImageError("permission denied (cannot open for reading)", subject=path) from exc
    except IsADirectoryError as exc:
        raise ImageError("is a directory, not an image", subject=path) from exc
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror}", subject=path) from exc
    try:
        _check_regular(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory, not an image", subject=path)
    if stat.S_ISFIFO(st.st_mode):
        raise ImageError("is a FIFO, not an image file", subject=path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (vmtrim reads image files)", subject=path)
    if st.st_size == 0:
        # /proc and /sys files say size 0 but read as something else (or fail, /proc/*/mem)
        try:
            first = os.pread(fd, 1, 0)
        except OSError as exc:
            raise ImageError(f"cannot read: {exc.strerror}", subject=path) from exc
        if first:
            raise ImageError(
                "has size 0 but reads data: a kernel pseudo file, not an image", subject=path
            )
