"""A GPT disk made by real tools for the sparsify tests and bench.

sgdisk lays out ext4, xfs, btrfs, vfat, swap and an LVM physical volume, with gaps
between some partitions. The host (which has no device-mapper) makes the LVM
metadata with ``lvm --driverloaded n`` and the ext4 inside the logical volume on a
loop device at the volume's offset. Every filesystem gets kept files and a file of
random data that is deleted again, so its blocks are free in the filesystem but
still allocated in the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def sh(*argv: str | Path) -> str:
    out = subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True, env=ENV
    )
    return out.stdout


@dataclass
class Disk:
    path: Path
    kept: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> ./path -> sha256
    swap_uuid: str = ""
    swap_label: str = ""
    deleted_bytes: int = 0


@contextlib.contextmanager
def loop(path: Path, *extra: str) -> Iterator[str]:
    dev = sh("losetup", "--find", "--show", *extra, path).strip()
    try:
        yield dev
    finally:
        sh("losetup", "-d", dev)


@contextlib.contextmanager
def mounted(dev: str) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="vmtrim-mnt-"))
    sh("mount", dev, mnt)
    try:
        yield mnt
    finally:
        sh("umount", mnt)
        mnt.rmdir()


def _fill(directory: Path, tag: str, junk_mib: int, disk: Disk, device: str) -> None:
    """Kept files (random, and one text file with a space in its name); junk deleted."""
    kept: dict[str, str] = {}
    for i, size in enumerate((MiB, 3 * MiB + 123)):
        data = os.urandom(size)
        (directory / f"keep-{i}.bin").write_bytes(data)
        kept[f"./keep-{i}.bin"] = hashlib.sha256(data).hexdigest()
    (directory / "sub dir").mkdir()
    text = f"{tag} stays\n".encode()
    (directory / "sub dir" / "note.txt").write_bytes(text)
    kept["./sub dir/note.txt"] = hashlib.sha256(text).hexdigest()
    junk = directory / "junk.bin"
    with open(junk, "wb") as f:
        for _ in range(junk_mib):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    junk.unlink()
    disk.kept[device] = kept
    disk.deleted_bytes += junk_mib * MiB


# name, sgdisk type code, MiB; None is a gap of that many MiB left unpartitioned.
LAYOUT: list[tuple[str | None, str, int]] = [
    ("ext4", "8300", 128),
    (None, "", 8),
    ("xfs", "8300", 300),
    ("btrfs", "8300", 160),
    ("vfat", "0700", 64),
    (None, "", 4),
    ("swap", "8200", 32),
    ("lvm", "8e00", 144),
    ("unknown", "8300", 8),
]


def make_gpt_disk(directory: Path, fmt: str = "qcow2", junk_mib: int = 24) -> Disk:
    raw = directory / "disk.raw"
    total = 1 + sum(size for _, _, size in LAYOUT) + 2
    with open(raw, "wb") as f:
        f.truncate(total * MiB)
    args = ["sgdisk", "-Z"]
    pos = 1
    number = 0
    offsets: dict[str, tuple[int, int]] = {}
    for name, code, size in LAYOUT:
        if name is not None:
            number += 1
            args += [f"-n{number}:{pos}M:+{size}M", f"-t{number}:{code}", f"-c{number}:{name}"]
            offsets[name] = (pos * MiB, size * MiB)
        pos += size
    sh(*args, raw)
    disk = Disk(directory / f"disk.{fmt}")
    with contextlib.ExitStack() as stack:
        # No udev here to make /dev/loopNpM: one loop device per partition, at its offset.
        parts = {
            name: stack.enter_context(loop(raw, "--offset", str(start), "--sizelimit", str(size)))
            for name, (start, size) in offsets.items()
        }
        sh("mkfs.ext4", "-q", "-L", "root fs", parts["ext4"])
        sh("mkfs.xfs", "-q", "-f", "-L", "data", parts["xfs"])
        sh("mkfs.btrfs", "-q", "-f", "-L", "pool", parts["btrfs"])
        sh("mkfs.vfat", "-n", "EFI", parts["vfat"])
        for name, guest in (("ext4", "sda1"), ("xfs", "sda2"), ("btrfs", "sda3")):
            with mounted(parts[name]) as mnt:
                if name == "btrfs":
                    sh("btrfs", "subvolume", "create", mnt / "home")
                _fill(mnt, name, junk_mib, disk, guest)
        _fill_vfat(parts["vfat"], junk_mib, disk)
        # Swap over random data: the area behind the header is what a discard gives back.
        with open(parts["swap"], "wb") as f:
            for _ in range(32):
                f.write(os.urandom(MiB))
        sh("mkswap", "-L", "swap space", parts["swap"])
        disk.deleted_bytes += 31 * MiB
        disk.swap_uuid = sh("blkid", "-s", "UUID", "-o", "value", parts["swap"]).strip()
        disk.swap_label = "swap space"
        _make_lvm(parts["lvm"], junk_mib, disk)
        with open(parts["unknown"], "wb") as f:
            f.write(os.urandom(8 * MiB))  # no signature: left alone
    if fmt == "raw":
        raw.rename(disk.path)
    else:
        sh("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, disk.path)
        raw.unlink()
    return disk


def _fill_vfat(dev: str, junk_mib: int, disk: Disk) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        scratch = Disk(Path(tmp))
        _fill(src, "vfat", 0, scratch, "x")
        junk = src / "junk.bin"
        with open(junk, "wb") as f:
            for _ in range(junk_mib):
                f.write(os.urandom(MiB))
        sh("mcopy", "-i", dev, "-s", src / "keep-0.bin", src / "keep-1.bin", src / "sub dir", "::/")
        sh("mcopy", "-i", dev, junk, "::/junk.bin")
        sh("mdel", "-i", dev, "::/junk.bin")
        disk.kept["sda4"] = scratch.kept["x"]
        disk.deleted_bytes += junk_mib * MiB


def _make_lvm(dev: str, junk_mib: int, disk: Disk) -> None:
    lvm = ("lvm",)
    sh(*lvm, "pvcreate", "-y", "-q", dev)
    sh(*lvm, "vgcreate", "-q", "vmtrimvg", dev)
    sh(*lvm, "lvcreate", "--driverloaded", "n", "-an", "-Zn", "-L", "96M", "-n", "data", "vmtrimvg")
    pe_start = int(
        sh(*lvm, "pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", dev)
    )
    extent = int(
        sh(
            *lvm,
            "vgs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_extent_size",
            "vmtrimvg",
        )
    )
    ranges = sh(*lvm, "lvs", "--noheadings", "-o", "seg_pe_ranges", "vmtrimvg/data").strip()
    first = int(ranges.rsplit(":", 1)[1].split("-")[0])
    # Let the host forget the VG before the guest activates it (the PV is a loop device).
    sh(*lvm, "vgchange", "--driverloaded", "n", "-an", "vmtrimvg")
    with loop(
        Path(dev), "--offset", str(pe_start + first * extent), "--sizelimit", str(96 * MiB)
    ) as lv:
        sh("mkfs.ext4", "-q", "-L", "lv data", lv)
        with mounted(lv) as mnt:
            _fill(mnt, "lvm", junk_mib, disk, "vmtrimvg/data")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def qemu_holding(image: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real QEMU (paused, -S) with ``image`` as its disk, once it holds QEMU's image lock."""
    from vmtrim.sparsify.inuse import qemu_lock_holder

    qemu = ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg"]
    proc = subprocess.Popen(
        [*qemu, "-drive", f"file={image},format=qcow2,if=virtio"], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while qemu_lock_holder(image) is None:
            assert proc.poll() is None, "QEMU exited"
            assert time.monotonic() < deadline, "QEMU never locked the image"
            time.sleep(0.1)
        yield proc
    finally:
        proc.kill()
        proc.wait()
