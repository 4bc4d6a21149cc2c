"""Damaged and hostile qcow2 images, made the way QEMU's iotests make them.

Each image is written by qemu-img/qemu-io and then damaged at a known offset.
``qemu-img check --output=json`` judges the figures, ``qemu-img info``/``map`` judge
what must be refused, and hostile shapes (fan-out, 65,536 snapshots, deep chains,
FIFOs) must end with figures or one line, in bounded memory.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import qemu_img
from image_support import (
    MiB,
    check_figures,
    create,
    peek,
    poke,
    qemu_check,
    qemu_img_info,
    qemu_io,
    qemu_map,
)
from vmtrim.image.info import ImageInfo, inspect
from vmtrim.image.map import map_image

L2_MASK = 0x00FF_FFFF_FFFF_FE00
EXT_BITMAPS = 0x23852875


def _base(path: Path, size: str = "4M", **opts: str) -> Path:
    img = create(path, size, **opts)
    qemu_io(img, "write -P 1 0 64k", "write -P 2 1M 64k")
    return img


def _first_l2(img: Path) -> int:
    return peek(img, peek(img, 40, "Q"), "Q") & L2_MASK


def _first_refblock(img: Path) -> int:
    return peek(img, peek(img, 48, "Q"), "Q")


def _with_snapshot(img: Path) -> Path:
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 3 0 64k")
    return img


def _figures(info: ImageInfo) -> dict[str, int]:
    return {
        "allocated_clusters": info.allocated_clusters or 0,
        "fragmented_clusters": info.fragmented_clusters or 0,
        "compressed_clusters": info.compressed_clusters or 0,
        "total_clusters": info.total_clusters or 0,
        "image_end_offset": info.image_end_offset or 0,
        "leaks": info.leaks or 0,
        "corruptions": info.corruptions or 0,
    }


def _run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmtrim", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _refcount64(value: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = _base(d / f"rc64-{value:x}.qcow2", refcount_bits="64")
        # the first data cluster's refcount: huge, and unsigned in QEMU
        data = peek(img, _first_l2(img), "Q") & L2_MASK
        poke(img, _first_refblock(img) + 8 * (data >> 16), "Q", value)
        return img

    return build


def _incomplete_snapshot(d: Path) -> Path:
    img = _with_snapshot(_base(d / "snap-incomplete.qcow2"))
    poke(img, peek(img, 64, "Q") + 36, "I", 8)  # v3 entries need >= 16 bytes of extra data
    return img


def _refblock_overlaps_data(d: Path) -> Path:
    img = _base(d / "refblock-overlap.qcow2")
    l2 = _first_l2(img)
    entry = peek(img, l2, "Q")
    poke(img, l2, "Q", (entry & ~L2_MASK) | _first_refblock(img))
    return img


def _bogus_far_offset(d: Path) -> Path:
    img = _base(d / "far-offset.qcow2")
    l2 = _first_l2(img)
    poke(img, l2, "Q", (peek(img, l2, "Q") & ~L2_MASK) | (1 << 40))  # 1 TiB
    return img


def _bogus_far_compressed(d: Path) -> Path:
    img = create(d / "far-compressed.qcow2", "4M")
    qemu_io(img, "write -c -P 1 0 64k")
    l2 = _first_l2(img)
    entry = peek(img, l2, "Q")
    # compressed host offsets are bits 0..(61 - (cluster_bits - 8)) = 0..53 for 64 KiB
    poke(img, l2, "Q", (entry & ~((1 << 54) - 1)) | (1 << 44))
    return img


def _unaligned_entry(d: Path) -> Path:
    img = _base(d / "unaligned.qcow2")
    l2 = _first_l2(img)
    poke(img, l2, "Q", peek(img, l2, "Q") + 512)
    return img


def _shared_l2(bits: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = _base(d / f"shared-l2-{bits}.qcow2", "2G", refcount_bits=bits)
        l1 = peek(img, 40, "Q")
        for i in range(1, 4):  # all four L1 entries name the first L2 table
            poke(img, l1 + 8 * i, "Q", peek(img, l1, "Q"))
        return img

    return build


def _bitmap_directory(img: Path) -> tuple[int, int, int, int]:
    """(extension data offset, count, directory size, directory offset)."""
    data = img.read_bytes()
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        assert kind, "no bitmaps extension"
        if kind == EXT_BITMAPS:
            nb, _, size, offset = struct.unpack_from(">IIQQ", data, pos + 8)
            return pos + 8, nb, size, offset
        pos += 8 + ((length + 7) & ~7)


def _fan_bitmaps(img: Path, copies: int) -> None:
    """Replace the directory by ``copies`` entries (names 0000, 0001...) sharing one table."""
    ext, _, size, offset = _bitmap_directory(img)
    data = img.read_bytes()
    entry = data[offset : offset + size]
    name_len, extra_len = struct.unpack_from(">HI", entry, 18)
    assert name_len == 4
    fixed = entry[: 24 + extra_len]
    pad = entry[24 + extra_len + 4 : (24 + extra_len + 4 + 7) & ~7]
    directory = b"".join(fixed + f"{i:04x}".encode() + pad for i in range(copies))
    end = -(-len(data) // 65536) * 65536
    with open(img, "r+b") as f:
        f.seek(end)
        f.write(directory.ljust(-(-len(directory) // 65536) * 65536, b"\0"))
        f.seek(ext)
        f.write(struct.pack(">IIQQ", copies, 0, len(directory), end))


def _bitmaps_sharing_a_table(d: Path) -> Path:
    img = _base(d / "bitmap-fan.qcow2")
    qemu_img("bitmap", "--add", img, "b000")
    _fan_bitmaps(img, 3)
    return img


CHECKED: dict[str, Callable[[Path], Path]] = {
    "refcount64-2^63": _refcount64(1 << 63),
    "refcount64-2^63+1": _refcount64((1 << 63) + 1),
    "refcount64-max": _refcount64((1 << 64) - 1),
    "snapshot-entry-incomplete": _incomplete_snapshot,
    "refblock-overlaps-data": _refblock_overlaps_data,
    "data-offset-1TiB": _bogus_far_offset,
    "compressed-offset-16TiB": _bogus_far_compressed,
    "l2-entry-unaligned": _unaligned_entry,
    "shared-l2-16bit": _shared_l2("16"),
    "shared-l2-1bit-overflow": _shared_l2("1"),
    "bitmaps-share-a-table": _bitmaps_sharing_a_table,
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    return {name: build(root) for name, build in CHECKED.items()}


@pytest.mark.parametrize("case", list(CHECKED))
def test_damaged_image_figures_equal_qemu_img_check(damaged: dict[str, Path], case: str) -> None:
    img = damaged[case]
    theirs = check_figures(qemu_check(img))
    assert theirs["leaks"] or theirs["corruptions"], "the damage must be visible to qemu-img"
    assert _figures(inspect(img)) == theirs


def test_bogus_offset_does_not_move_image_end(damaged: dict[str, Path]) -> None:
    for case in ("data-offset-1TiB", "compressed-offset-16TiB"):
        info = inspect(damaged[case])
        assert info.image_end_offset == qemu_check(damaged[case])["image-end-offset"]
        assert info.image_end_offset is not None
        assert info.image_end_offset <= damaged[case].stat().st_size + 65536


def test_unaligned_l2_entry_is_refused_by_map_like_qemu_img(damaged: dict[str, Path]) -> None:
    img = damaged["l2-entry-unaligned"]
    theirs = subprocess.run(
        ["qemu-img", "map", "--output=json", str(img)], capture_output=True, text=True
    )
    assert theirs.returncode != 0 and "unaligned" in theirs.stderr
    ours = _run("image", "map", "--json", img)
    assert (ours.returncode, ours.stdout) == (2, "")
    assert ours.stderr.count("\n") == 1 and "not aligned" in ours.stderr and str(img) in ours.stderr


def test_shared_l2_table_map_is_one_line(damaged: dict[str, Path]) -> None:
    img = damaged["shared-l2-16bit"]
    ours = _run("image", "map", img)
    assert ours.returncode == 2
    assert ours.stderr.count("\n") == 1 and "corrupt" in ours.stderr


# -- headers QEMU refuses ------------------------------------------------------


def _too_much_extra(d: Path) -> Path:
    img = _with_snapshot(_base(d / "snap-extra.qcow2"))
    poke(img, peek(img, 64, "Q") + 36, "I", 1025)  # QCOW_MAX_SNAPSHOT_EXTRA_DATA + 1
    return img


def _snapshot_table_too_big(d: Path) -> Path:
    """Entries whose id and name are 65,535 bytes each: 512 of them pass 64 MiB."""
    img = _with_snapshot(_base(d / "snap-big.qcow2"))
    first = peek(img, 64, "Q")
    with open(img, "rb") as f:
        f.seek(first)
        head = bytearray(f.read(40))
    struct.pack_into(">HH", head, 12, 65535, 65535)  # id and name sizes
    table = -(-img.stat().st_size // 65536) * 65536
    extra = struct.unpack_from(">I", head, 36)[0]
    step = -(-(40 + extra + 2 * 65535) // 8) * 8  # entries start 8-byte aligned
    count = 520
    with open(img, "r+b") as f:
        for i in range(count):
            f.seek(table + i * step)
            f.write(bytes(head))
        f.truncate(table + count * step)
    poke(img, 60, "I", count)
    poke(img, 64, "Q", table)
    return img


def _compression_bit_with_zlib(d: Path) -> Path:
    img = _base(d / "zlib-bit.qcow2")
    poke(img, 72, "Q", peek(img, 72, "Q") | 1 << 3)
    return img


def _duplicate_bitmap_names(d: Path) -> Path:
    img = _base(d / "bitmap-dup.qcow2")
    qemu_img("bitmap", "--add", img, "b000")
    ext, _, size, offset = _bitmap_directory(img)
    data = img.read_bytes()
    entry = data[offset : offset + size]
    end = -(-len(data) // 65536) * 65536
    with open(img, "r+b") as f:
        f.seek(end)
        f.write((entry * 2).ljust(65536, b"\0"))
        f.seek(ext)
        f.write(struct.pack(">IIQQ", 2, 0, 2 * size, end))
    return img


REFUSED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "snapshot-extra-data": (_too_much_extra, "too much extra data"),
    "snapshot-table-too-big": (_snapshot_table_too_big, "too big"),
    "compression-bit-zlib": (_compression_bit_with_zlib, "compression-type feature bit"),
    "bitmap-names-twice": (_duplicate_bitmap_names, "exists twice"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_headers_qemu_refuses_exit_2(tmp_path: Path, case: str) -> None:
    build, words = REFUSED[case]
    img = build(tmp_path)
    assert qemu_img_info(img).returncode != 0  # QEMU will not open it either
    for command in ("info", "map"):
        proc = _run("image", command, "--json", img)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr.count("\n") == 1
        assert proc.stderr.startswith(f"vmtrim: {img}: ") and words in proc.stderr


# -- zero-size images ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_zero_size_map_is_one_empty_extent_like_qemu_img(tmp_path: Path, fmt: str) -> None:
    img = create(tmp_path / f"empty.{fmt}", 0, fmt)
    assert list(map_image(img).rows()) == qemu_map(img)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", img.name, "-F", fmt, top, "0")
    assert list(map_image(top).rows()) == qemu_map(top)


# -- bounded memory and time ---------------------------------------------------


def _peak_rss(cmd: list[str]) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of a child, from wait4."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


def test_l1_fanning_out_to_one_l2_table_stays_small(tmp_path: Path) -> None:
    """A 1.6 MB file: 163,840 L1 entries name one L2 table whose 8,192 entries name one cluster."""
    img = create(tmp_path / "fan.qcow2", "80T")
    qemu_io(img, "write -P 1 0 64k")
    l1, n = peek(img, 40, "Q"), peek(img, 36, "I")
    l1_entry = peek(img, l1, "Q")
    l2 = l1_entry & L2_MASK
    l2_entry = peek(img, l2, "Q")
    with open(img, "r+b") as f:
        f.seek(l1)
        f.write(struct.pack(">Q", l1_entry) * n)
        f.seek(l2)
        f.write(struct.pack(">Q", l2_entry) * 8192)
    assert img.stat().st_size < 2 * MiB
    vmtrim = [sys.executable, "-m", "vmtrim", "image"]
    code, rss = _peak_rss([*vmtrim, "info", "--json", str(img)])
    assert code == 0 and rss < 150 * MiB
    info = inspect(img)
    # every L1 reference to the table is one reference qemu-img check counts
    assert info.corruptions is not None and info.corruptions >= 2
    assert info.reclaim.max_trim_bytes <= img.stat().st_size
    code, rss = _peak_rss([*vmtrim, "map", "--json", str(img)])
    assert code == 2 and rss < 150 * MiB


def test_bitmap_directory_fanning_out_stays_small(tmp_path: Path) -> None:
    """40,000 bitmaps sharing one table of 2,560 entries that all name one cluster."""
    img = create(tmp_path / "bfan.qcow2", "80T")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("bitmap", "--add", img, "b000")
    offset = _bitmap_directory(img)[3]
    table_offset, table_size = struct.unpack_from(">QI", img.read_bytes(), offset)
    data_cluster = peek(img, _first_l2(img), "Q") & L2_MASK
    with open(img, "r+b") as f:
        f.seek(table_offset)
        f.write(struct.pack(">Q", data_cluster) * table_size)
    _fan_bitmaps(img, 40_000)
    assert img.stat().st_size < 4 * MiB
    code, rss = _peak_rss([sys.executable, "-m", "vmtrim", "image", "info", "--json", str(img)])
    assert code == 0 and rss < 150 * MiB
    assert (inspect(img).corruptions or 0) > 0


def test_65536_snapshots_sharing_one_l1_table(tmp_path: Path) -> None:
    img = _with_snapshot(_base(tmp_path / "many-snapshots.qcow2", refcount_bits="32"))
    first = peek(img, 64, "Q")
    with open(img, "rb") as f:
        f.seek(first)
        head = f.read(40)
    extra_len = struct.unpack_from(">I", head, 36)[0]
    with open(img, "rb") as f:
        f.seek(first)
        one = f.read(-(-(40 + extra_len + 1 + 2) // 8) * 8)
    id_len, name_len = struct.unpack_from(">HH", one, 12)
    assert (id_len, name_len) == (1, 2)
    table = -(-img.stat().st_size // 65536) * 65536
    with open(img, "r+b") as f:
        f.seek(table)
        f.write(one * 65536)
    poke(img, 60, "I", 65536)
    poke(img, 64, "Q", table)
    assert _figures(inspect(img)) == check_figures(qemu_check(img))


def test_backing_chain_1200_deep_is_one_line(tmp_path: Path) -> None:
    # one real qcow2 with a fixed-width backing name, copied 1,200 times
    create(tmp_path / "l0000.qcow2", "1M")
    template = tmp_path / "template"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", "lXXXX.qcow2", "-F", "qcow2", template, "1M"
    )
    raw = template.read_bytes()
    for i in range(1, 1201):
        (tmp_path / f"l{i:04d}.qcow2").write_bytes(raw.replace(b"lXXXX", f"l{i - 1:04d}".encode()))
    top = tmp_path / "l1200.qcow2"
    for command in ("info", "map"):
        proc = _run("image", command, "--json", top)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-500:]
        assert proc.stderr.count("\n") == 1 and "deeper than" in proc.stderr


# -- files that are not image files --------------------------------------------


def test_fifo_as_image_or_backing_file_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.qcow2"
    os.mkfifo(fifo)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", fifo.name, "-F", "qcow2", top, "1M")
    for path in (fifo, top):
        for command in ("info", "map"):
            # the timeout only turns a hang into a failure; nothing here is timed
            proc = _run("image", command, path, timeout=60)
            assert (proc.returncode, proc.stdout) == (2, "")
            assert proc.stderr.strip() == f"vmtrim: {fifo}: is a FIFO, not an image file"


@pytest.mark.parametrize("path", ["/proc/self/mem", "/proc/self/status", "/dev/zero", "/dev/null"])
def test_kernel_files_are_one_line(path: str) -> None:
    proc = _run("image", "info", path, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"vmtrim: {path}: ")


def test_copies_of_damaged_images_are_not_written(damaged: dict[str, Path], tmp_path: Path) -> None:
    for img in damaged.values():
        copy = tmp_path / img.name
        shutil.copy2(img, copy)
        before = copy.read_bytes()
        try:
            inspect(copy)
        finally:
            assert copy.read_bytes() == before
