"""Probe the host storage under a disk: can it give space back?

- a file: can its filesystem punch holes? Probed on a temporary file in the image's
  directory (never the image itself), once per filesystem (``st_dev``);
- a block device: ``/sys/dev/block/MAJ:MIN/queue/discard_max_bytes`` > 0;
- a network protocol: from :data:`vmtrim.facts.PROTOCOLS`.

Every probe returns a :class:`Probe` (verdict + reason) and never raises for a
path that is missing or unreadable: that is an ``unknown`` answer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vmtrim.facts import PROTOCOLS
from vmtrim.model import Verdict

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(frozen=True)
class Probe:
    verdict: Verdict
    reason: str
    fix: str | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    func = libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if func(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def filesystem_of(path: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path``, from mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mountpoint = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(mountpoint) >= len(best[0])):
            best = (mountpoint, fstype)
    return best


def punch_hole_probe(directory: str) -> Probe:
    """Try FALLOC_FL_PUNCH_HOLE on a temporary file in ``directory`` and check st_blocks."""
    where = filesystem_of(directory)
    label = f"{where[1]} at {where[0]}" if where else directory
    try:
        fd, name = tempfile.mkstemp(prefix=".vmtrim-probe-", dir=directory)
    except OSError as exc:
        return Probe(
            Verdict.UNKNOWN, f"cannot create a probe file in {directory} ({label}): {exc.strerror}"
        )
    try:
        block = max(os.fstat(fd).st_blksize, 4096)
        os.write(fd, b"\xa5" * (block * 4))
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        try:
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, block, block * 2)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return Probe(
                    Verdict.BLOCK,
                    f"{label} cannot punch holes (fallocate:"
                    f" {exc.strerror}); QEMU's discards free nothing on the host",
                    "move the image to a filesystem that supports"
                    " FALLOC_FL_PUNCH_HOLE (ext4, xfs, btrfs, tmpfs)",
                )
            return Probe(Verdict.UNKNOWN, f"{label}: punch-hole probe failed: {exc.strerror}")
        os.fsync(fd)
        after = os.fstat(fd).st_blocks
        if after < before:
            return Probe(Verdict.PASS, f"{label} punches holes (probed in {directory})")
        return Probe(
            Verdict.BLOCK,
            f"{label} accepted a punch-hole but freed no blocks",
            "move the image to a filesystem that frees punched blocks",
        )
    finally:
        os.close(fd)
        os.unlink(name)


def block_device_probe(path: str) -> Probe:
    """Does the host block device at ``path`` support discard (sysfs discard_max_bytes)?"""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Probe(Verdict.UNKNOWN, f"{path} is not on this host ({exc.strerror})")
    if not stat.S_ISBLK(st.st_mode):
        return Probe(Verdict.UNKNOWN, f"{path} is not a block device on this host")
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    for queue in (sysdir / "queue", sysdir.resolve().parent / "queue"):  # partitions
        try:
            value = int((queue / "discard_max_bytes").read_text().strip())
        except (OSError, ValueError):
            continue
        if value > 0:
            return Probe(Verdict.PASS, f"{path} supports discard (discard_max_bytes={value})")
        return Probe(
            Verdict.BLOCK,
            f"{path} does not support discard (discard_max_bytes=0)",
            "put the disk on a device or LV that supports discard (thin LV, SSD)",
        )
    return Probe(Verdict.UNKNOWN, f"{path}: no queue/discard_max_bytes in {sysdir}")


def protocol_probe(protocol: str | None) -> Probe:
    rule = PROTOCOLS.get(protocol or "")
    if rule is None:
        return Probe(
            Verdict.UNKNOWN,
            f"protocol {protocol or '?'}: vmtrim does not know whether it passes discard",
        )
    return Probe(rule.verdict, f"{protocol}: {rule.reason}")


@dataclass
class HostProbes:
    """The host probes an audit runs, with a per-filesystem cache.

    ``local=False`` answers ``unknown`` for every local path without touching it:
    for XML or command lines that come from another host.
    """

    local: bool = True
    _punch_cache: dict[int, Probe] = field(default_factory=dict)

    def file(self, path: str) -> Probe:
        if not self.local:
            return Probe(Verdict.UNKNOWN, "host probes are off (--no-probe)")
        directory = os.path.dirname(os.path.abspath(path)) or "/"
        try:
            st = os.stat(directory)
        except OSError:
            return Probe(Verdict.UNKNOWN, f"{directory} does not exist on this host")
        cached = self._punch_cache.get(st.st_dev)
        if cached is None:
            cached = punch_hole_probe(directory)
            self._punch_cache[st.st_dev] = cached
        return cached

    def block(self, path: str) -> Probe:
        if not self.local:
            return Probe(Verdict.UNKNOWN, "host probes are off (--no-probe)")
        return block_device_probe(path)

    def network(self, protocol: str | None) -> Probe:
        return protocol_probe(protocol)
