"""Real filesystems on loop devices for the host-storage tests (root, like the suite)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """``backing`` attached to a free /dev/loopN, detached afterwards."""
    device = run("losetup", "--find", "--show", str(backing))
    try:
        yield device
    finally:
        run("losetup", "-d", device)


@contextlib.contextmanager
def mounted(
    source: str, mountpoint: Path, *options: str, fstype: str | None = None
) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    args = [
        "mount",
        *(["-t", fstype] if fstype else []),
        *(["-o", ",".join(options)] if options else []),
    ]
    run(*args, source, str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("umount", str(mountpoint))


@contextlib.contextmanager
def filesystem(fstype: str, where: Path, *options: str, size_mib: int = 320) -> Iterator[Path]:
    """A fresh ``fstype`` on a sparse file, on a loop device, mounted at ``where/mnt``."""
    image = where / f"{fstype}.img"
    with image.open("wb") as f:
        f.truncate(size_mib << 20)
    run(*MKFS[fstype], str(image))
    with loop_device(image) as device, mounted(device, where / "mnt", *options) as mnt:
        yield mnt
