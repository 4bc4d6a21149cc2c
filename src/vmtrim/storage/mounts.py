"""Which mount holds a file, its filesystem type and options: ``/proc/self/mountinfo``.

``os.statvfs`` has no filesystem type, so the type comes from mountinfo (proc(5),
"/proc/pid/mountinfo"): ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] -
FSTYPE SOURCE SUPEROPTIONS``. The mount is matched by the file's ``st_dev`` (its
MAJ:MIN), then by the longest mount point that contains the path (btrfs subvolumes
report an anonymous st_dev of their own). Parsing is bounded: lines past
:data:`MAX_LINES` or longer than :data:`MAX_LINE` are skipped, never a traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MAX_LINES = 100_000
MAX_LINE = 16_384
_ESCAPE = re.compile(r"\\([0-7]{3})")
_DEV = re.compile(r"^(\d{1,10}):(\d{1,10})$")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo (fs/proc_namespace.c).
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

    major: int
    minor: int
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: tuple[str, ...]  # the per-mount options, then the superblock's

    def option(self, name: str) -> str | None:
        """The value of ``name=value`` ("" for a bare flag), or None when absent."""
        for opt in self.options:
            key, _, value = opt.partition("=")
            if key == name:
                return value
        return None

    def has(self, name: str) -> bool:
        return self.option(name) is not None

    @property
    def label(self) -> str:
        return f"{self.fstype} at {self.mountpoint}"


def parse_line(line: str) -> Mount | None:
    """One mountinfo line, or None when it is not one."""
    if len(line) > MAX_LINE:
        return None
    head, sep, tail = line.partition(" - ")
    if not sep:
        return None
    fields = head.split()
    rest = tail.split()
    if len(fields) < 6 or len(rest) < 2:
        return None
    dev = _DEV.match(fields[2])
    if dev is None:
        return None
    supers = rest[2].split(",") if len(rest) > 2 else []
    return Mount(
        major=int(dev.group(1)),
        minor=int(dev.group(2)),
        root=_unescape(fields[3]),
        mountpoint=_unescape(fields[4]),
        fstype=rest[0],
        source=_unescape(rest[1]),
        options=tuple(fields[5].split(",")) + tuple(supers),
    )


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines()[:MAX_LINES]:
        mount = parse_line(line)
        if mount is not None:
            mounts.append(mount)
    return mounts


def _contains(mountpoint: str, path: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def mount_of(mounts: list[Mount], path: str, st_dev: int | None) -> Mount | None:
    """The mount holding ``path`` (absolute, symlinks resolved): the last-mounted one
    with the same device among those that contain it, else the longest that contains it."""
    inside = [m for m in mounts if _contains(m.mountpoint, path)]
    if st_dev is not None:
        same = [m for m in inside if (m.major, m.minor) == (os.major(st_dev), os.minor(st_dev))]
        if same:
            inside = same
    best: Mount | None = None
    for m in inside:  # mount order: a later mount on the same point hides an earlier one
        if best is None or len(m.mountpoint) >= len(best.mountpoint):
            best = m
    return best
