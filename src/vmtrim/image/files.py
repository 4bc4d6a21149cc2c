"""Opening images: read-only, regular files only, OS errors as one-line ImageErrors."""

from __future__ import annotations

import os
import stat

from vmtrim.errors import ImageError


def open_readonly(path: str) -> int:
    """Open an image for reading only, turning OS errors into one-line ImageErrors."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ImageError("no such file", subject=path) from exc
    except PermissionError as exc:
        raise ImageError("permission denied (cannot open for reading)", subject=path) from exc
    except IsADirectoryError as exc:
        raise ImageError("is a directory, not an image", subject=path) from exc
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror}", subject=path) from exc
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise ImageError("is a directory, not an image", subject=path)
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError("not a regular file (vmtrim reads image files)", subject=path)
    return fd
