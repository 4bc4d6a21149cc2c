"""How much of a file the host really stores: ``du`` figures and data/hole extents.

``allocated_bytes`` is what ``du`` shows (st_blocks * 512). ``data_extents`` walks
the file with SEEK_DATA/SEEK_HOLE, the same calls QEMU's file-posix driver uses
for block status, so a punched hole here is a hole for ``qemu-img map`` too.

SEEK_HOLE is the guest's view, not the disk's: ext4 and xfs report *unwritten*
extents (space fallocate() reserved, as QEMU does for the rest of every new
cluster) as holes although they use disk space. ``stored_extents`` asks FIEMAP
instead, which lists every extent the filesystem has allocated, written or not;
that is what a discard can give back and what ``du`` counts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

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


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_HEADER = 32  # struct fiemap before its extents
FIEMAP_EXTENT = 56  # struct fiemap_extent
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_EXTENT = np.dtype(
    [
        ("logical", "<u8"),
        ("physical", "<u8"),
        ("length", "<u8"),
        ("reserved", "<u8", 2),
        ("flags", "<u4"),
        ("reserved2", "<u4", 3),
    ]
)


@dataclass
class Stored:
    """The extents a file has on disk within [0, size), and which part is unwritten."""

    starts: I64
    ends: I64
    unwritten_bytes: int
    fiemap: bool  # False: the filesystem has no FIEMAP, SEEK_DATA answered


def stored_extents(fd: int, size: int | None = None, batch: int = 4096) -> Stored:
    """Extents the filesystem allocated for ``fd`` (FIEMAP, with unwritten ones).

    Falls back to SEEK_DATA/SEEK_HOLE where FIEMAP is missing (tmpfs, some network
    filesystems); those have no unwritten extents for SEEK_HOLE to hide.
    """
    if size is None:
        size = os.fstat(fd).st_size
    starts: list[I64] = []
    ends: list[I64] = []
    unwritten = 0
    pos = 0
    buf = bytearray(FIEMAP_HEADER + FIEMAP_EXTENT * batch)
    while pos < size:
        struct.pack_into("=QQIIII", buf, 0, pos, size - pos, 0, 0, batch, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL) and not starts:
                s, e = extents_fd(fd, size)
                return Stored(s, e, 0, fiemap=False)
            raise
        mapped = struct.unpack_from("=I", buf, 20)[0]
        if not mapped:
            break
        ext = np.frombuffer(buf, dtype=_EXTENT, count=mapped, offset=FIEMAP_HEADER)
        lo = np.minimum(ext["logical"], size).astype(np.int64)
        hi = np.minimum(ext["logical"] + ext["length"], size).astype(np.int64)
        starts.append(lo)
        ends.append(hi)
        unwritten += int((hi - lo)[(ext["flags"] & FIEMAP_EXTENT_UNWRITTEN) != 0].sum())
        if int(ext["flags"][-1]) & FIEMAP_EXTENT_LAST:
            break
        pos = int(hi[-1])
    if not starts:
        empty = np.zeros(0, np.int64)
        return Stored(empty, empty.copy(), 0, fiemap=True)
    s_all, e_all = np.concatenate(starts), np.concatenate(ends)
    keep = e_all > s_all
    return Stored(s_all[keep], e_all[keep], unwritten, fiemap=True)


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
