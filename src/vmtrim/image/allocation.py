"""How much of a file the host really stores: ``du`` figures and data/hole extents.

``allocated_bytes`` is what ``du`` shows (st_blocks * 512). ``data_extents`` walks
the file with SEEK_DATA/SEEK_HOLE, the same calls QEMU's file-posix driver uses
for block status, so a punched hole here is a hole for ``qemu-img map`` too.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import numpy.typing as npt

from vmtrim.errors import ImageError

I64 = npt.NDArray[np.int64]


def _stat(path: str | os.PathLike[str]) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError as exc:
        raise ImageError("no such file", subject=os.fspath(path)) from exc
    except OSError as exc:
        raise ImageError(f"cannot stat: {exc.strerror}", subject=os.fspath(path)) from exc


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the host filesystem has allocated for ``path`` (what ``du`` shows)."""
    return _stat(path).st_blocks * 512


def extents_fd(fd: int, size: int | None = None) -> tuple[I64, I64]:
    """(starts, ends) of the data extents of an open file, as numpy arrays."""
    if size is None:
        size = os.fstat(fd).st_size
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here: all data
                starts.append(pos)
                ends.append(size)
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        starts.append(data)
        ends.append(min(hole, size))
        pos = hole
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


def data_extents(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """[(offset, length)] of the parts of ``path`` that hold data (not holes)."""
    from vmtrim.image.files import open_readonly

    fd = open_readonly(os.fspath(path))
    try:
        starts, ends = extents_fd(fd)
    finally:
        os.close(fd)
    return [(int(s), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


class Coverage:
    """Answers "how many data bytes lie in [a, b)" for many ranges at once."""

    def __init__(self, starts: I64, ends: I64) -> None:
        self.starts = starts
        self.ends = ends
        self.before = np.concatenate(([0], np.cumsum(ends - starts))).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.before[-1])

    def upto(self, x: I64) -> I64:
        """Data bytes in [0, x) for each x."""
        i = np.searchsorted(self.ends, x, side="right")  # extents wholly before x
        partial = np.zeros(len(x), dtype=np.int64)
        inside = i < len(self.starts)
        j = i[inside]
        partial[inside] = np.clip(x[inside] - self.starts[j], 0, None)
        return self.before[i] + partial

    def within(self, start: I64, length: I64) -> I64:
        return self.upto(start + length) - self.upto(start)
