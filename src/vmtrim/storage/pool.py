"""Pool-level reclaim: the data usage of the dm-thin pool under a disk, before and after.

A thin volume can give chunks back to its pool while the image, or the volume's own
numbers, say little; what the admin watches is the pool's ``data_percent`` (FIELD.md:
a pool from 94.85 % to 67.30 % after a manual trim). ``trim`` and ``run`` call
:func:`pool_usage` before and after a trim and record both; :func:`reclaimed` is the
difference in bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vmtrim.storage.block import block_stack
from vmtrim.storage.mounts import mount_of, parse_mountinfo
from vmtrim.storage.runner import LocalRunner, Runner


@dataclass(frozen=True)
class PoolUsage:
    """One reading of a thin pool."""

    pool: str  # vg/lv, or the dm name without lvm
    discards: str
    chunk_bytes: int
    data_percent: float | None
    metadata_percent: float | None
    used_bytes: int | None  # chunks in use x chunk size (dmsetup status)
    total_bytes: int | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # every field is a JSON scalar


def pool_usage(device: str, runner: Runner | None = None) -> PoolUsage | None:
    """The thin pool under the block device ``device`` now, or None when there is none
    (or it cannot be read: the reason is in the host_storage layer of the audit)."""
    stack = block_stack(runner or LocalRunner(), device)
    pool = stack.pool
    if pool is None:
        return None
    return PoolUsage(
        pool.name,
        pool.discards,
        pool.chunk_bytes,
        pool.data_percent,
        pool.metadata_percent,
        pool.used_bytes,
        pool.total_bytes,
    )


def device_under(path: str, runner: Runner | None = None) -> str | None:
    """The block device under ``path``: itself when it is one (``/dev/...``), else the
    source of the mount holding the file (an image on ext4 on a thin LV)."""
    runner = runner or LocalRunner()
    if path.startswith("/dev/"):
        return path
    mount = mount_of(parse_mountinfo(runner.read("/proc/self/mountinfo") or ""), path, None)
    if mount is None or not mount.source.startswith("/dev/"):
        return None
    return mount.source


def pool_under(path: str, runner: Runner | None = None) -> PoolUsage | None:
    """:func:`pool_usage` of the disk at ``path``, a block device or an image file: what
    ``trim`` and ``run`` record before and after a trim."""
    runner = runner or LocalRunner()
    device = device_under(path, runner)
    return None if device is None else pool_usage(device, runner)


def reclaimed(before: PoolUsage | None, after: PoolUsage | None) -> int | None:
    """Bytes the pool got back between two readings of the same pool (negative: it grew)."""
    if before is None or after is None or before.pool != after.pool:
        return None
    if before.used_bytes is None or after.used_bytes is None:
        return None
    return before.used_bytes - after.used_bytes
