"""`image info`'s reclaim figures against what a real full discard gives back.

Images live on ext4 and xfs filesystems made for the test on loop devices, written
by qemu-io the way a guest writes (4 KiB random writes: QEMU allocates a whole
cluster and fallocate()s the rest of it, leaving unwritten extents). The judge is
``du`` (st_blocks) before and after ``qemu-io -c "discard 0 SIZE"``.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import du_bytes, qemu_img
from image_support import MiB, create, qemu_io
from vmtrim.image.info import ImageInfo, inspect

GiB = 1024 * MiB


@pytest.fixture(scope="module", params=["ext4", "xfs"])
def host_fs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    fs: str = request.param
    root = tmp_path_factory.mktemp(fs)
    backing = root / "fs.img"
    mnt = root / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(1 * GiB)
    mkfs = ["mkfs.ext4", "-q", "-F"] if fs == "ext4" else ["mkfs.xfs", "-q", "-f"]
    subprocess.run([*mkfs, str(backing)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        backing.unlink()


def du(path: Path) -> int:
    """What ``du -B1`` says, once the filesystem has allocated delayed writes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return du_bytes(path)


def discard_all(img: Path, size: int) -> None:
    # qemu-io takes at most 2 GiB - 512 per request
    qemu_io(img, *(f"discard {lo} {min(GiB, size - lo)}" for lo in range(0, size, GiB)))


def slack(estimate: int) -> int:
    # the filesystem's own extent-tree blocks come and go with the punches: 1% + 1 MiB
    return estimate // 100 + 1 * MiB


def random_writes(img: Path, size: int, count: int, seed: int = 16) -> None:
    rng = random.Random(seed)
    offsets = rng.sample(range(size // 4096), count)
    commands = [f"write -P {i % 250 + 1} {o * 4096} 4k" for i, o in enumerate(offsets)]
    for lo in range(0, len(commands), 500):
        qemu_io(img, *commands[lo : lo + 500])


def test_full_discard_frees_what_info_estimates(host_fs: Path) -> None:
    size = 8 * GiB
    img = create(host_fs / "guest.qcow2", size)
    random_writes(img, size, 3000)
    before = du(img)
    info = inspect(img)
    ls = img.stat().st_size
    # QEMU left the rest of each 64 KiB cluster fallocated: stored, though SEEK_HOLE says hole
    assert info.host.unwritten_bytes > 0
    # a punched hole is space ls counts and du does not; du also counts the fs's own blocks
    assert 0 <= info.host.punched_hole_bytes - (ls - before) <= slack(before)
    estimate = info.reclaim.max_trim_bytes
    assert estimate > before // 2  # the data clusters are most of the file
    discard_all(img, size)
    freed = before - du(img)
    assert abs(freed - estimate) <= slack(estimate), (freed, estimate)
    assert inspect(img).reclaim.max_trim_bytes <= slack(0)


def test_compressed_image_full_discard(host_fs: Path) -> None:
    plain = create(host_fs / "plain.qcow2", 256 * MiB)
    qemu_io(plain, *(f"write -P {i + 1} {i * 4 * MiB} 4M" for i in range(16)))  # 64 MiB
    img = host_fs / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, img)
    info = inspect(img)
    assert info.compressed_clusters
    before = du(img)
    estimate = info.reclaim.max_trim_bytes
    assert estimate > 0
    discard_all(img, 256 * MiB)
    assert abs((before - du(img)) - estimate) <= slack(estimate)


def test_backing_file_never_shrinks(host_fs: Path) -> None:
    base = create(host_fs / "base.qcow2", 128 * MiB)
    qemu_io(base, "write -P 7 0 64M")
    top = host_fs / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "128M")
    qemu_io(top, "write -P 8 0 1M")
    info = inspect(top)
    lower: ImageInfo | None = info.backing
    assert lower is not None
    assert lower.reclaim.max_trim_bytes == 0 and lower.reclaim.max_trim_note
    # the proof: a discard of the whole disk through the top leaves the base as it was
    base_before = du(base)
    discard_all(top, 128 * MiB)
    assert du(base) == base_before
