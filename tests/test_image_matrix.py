"""vmtrim image info/map agree exactly with qemu-img check/map on a matrix of real images.

Every image is made by qemu-img and qemu-io; qemu-img check --output=json and
qemu-img map --output=json are the oracle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import qemu_img
from image_support import (
    KiB,
    MiB,
    check_figures,
    create,
    qemu_check,
    qemu_io,
    qemu_map,
)
from vmtrim.image.info import ImageInfo, inspect
from vmtrim.image.map import map_image

# A scatter of writes that lands in several L2 tables for every cluster size.
SCATTER = (
    "write -P 0x11 0 4k",
    "write -P 0x22 96k 64k",
    "write -P 0x33 1M 192k",
    "write -P 0x44 3M 8k",
    "write -z 2M 64k",
    "write -P 0x55 2M 512",
)


def _scatter(cluster: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        size = max(4 * MiB, cluster * 4)
        img = create(d / f"c{cluster}.qcow2", size, cluster_size=str(cluster))
        qemu_io(img, *SCATTER, f"write -P 0x66 {size - cluster} {cluster}", "discard 1M 64k")
        return img

    return build


def _v2(d: Path) -> Path:
    img = create(d / "v2.qcow2", 4 * MiB, compat="0.10")
    qemu_io(img, *SCATTER, "discard 3M 64k")
    return img


def _extended_l2(d: Path) -> Path:
    img = create(d / "ext.qcow2", 4 * MiB, extended_l2="on", cluster_size="64k")
    qemu_io(
        img,
        "write -P 3 0 4k",
        "write -z 8k 4k",
        "write -P 4 1M 64k",
        "write 20k 2k",
        "write -z -u 2M 128k",
        "write -P 5 3M 32k",
        "discard 3M 64k",
        "write -c 256k 64k",
    )
    return img


def _extended_l2_backed(d: Path) -> Path:
    base = create(d / "extbase.qcow2", 4 * MiB)
    qemu_io(base, "write -P 9 0 4M")
    img = create(
        d / "exttop.qcow2",
        4 * MiB,
        extended_l2="on",
        cluster_size="32k",
        backing_file="extbase.qcow2",
        backing_fmt="qcow2",
    )
    qemu_io(img, "write -P 1 4k 2k", "write -z 40k 1k", "write -z 64k 32k", "discard 128k 32k")
    return img


def _lazy(d: Path) -> Path:
    img = create(d / "lazy.qcow2", 4 * MiB, lazy_refcounts="on")
    qemu_io(img, *SCATTER)
    return img


def _refcount_bits(bits: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = create(d / f"rc{bits}.qcow2", 4 * MiB, refcount_bits=str(bits), cluster_size="4k")
        qemu_io(img, *SCATTER, "discard 1M 64k")
        return img

    return build


def _prealloc(mode: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = create(d / f"pre-{mode}.qcow2", 4 * MiB, preallocation=mode)
        qemu_io(img, "write -P 7 64k 128k", "discard 1M 256k", "write -z -u 2M 64k")
        return img

    return build


def _compressed(kind: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = create(d / f"comp-{kind}.qcow2", 4 * MiB, compression_type=kind)
        qemu_io(
            img,
            "write -c -P 1 0 64k",
            "write -c -P 2 64k 64k",
            "write -c 1M 128k",
            "write -P 3 2M 64k",
            "write -c -P 4 3M 64k",
            "write -z 3M 64k",
        )
        return img

    return build


def _convert_compressed(d: Path) -> Path:
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        for i in range(0, 4 * MiB, 384 * KiB):
            f.seek(i)
            f.write(os.urandom(3000) + b"text" * 5000)
    out = d / "converted.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", raw, out)
    return out


def _chain(d: Path) -> Path:
    (d / "a" / "b").mkdir(parents=True)
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 4M")
    mid = create(d / "a" / "mid.qcow2", 4 * MiB, backing_file="../base.qcow2", backing_fmt="qcow2")
    qemu_io(mid, "write -P 2 1M 1M", "write -z 3M 64k", "discard 0 64k")
    top = create(
        d / "a" / "b" / "top.qcow2", 6 * MiB, backing_file="../mid.qcow2", backing_fmt="qcow2"
    )
    qemu_io(
        top, "write -P 3 1536k 64k", "write -z 128k 64k", "write -P 4 5M 64k", "discard 1600k 64k"
    )
    return top


def _raw_backed(d: Path) -> Path:
    base = d / "rb.raw"
    with open(base, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(512 * KiB)
        f.write(b"\1" * 64 * KiB)
    top = create(d / "rtop.qcow2", 4 * MiB, backing_file="rb.raw", backing_fmt="raw")
    qemu_io(top, "write -P 2 0 64k", "write -z -u 1M 64k")
    return top


def _snapshots(d: Path) -> Path:
    img = create(d / "snap.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 1M", "write -P 2 2M 256k")
    qemu_img("snapshot", "-c", "one", img)
    qemu_io(img, "write -P 3 0 128k", "discard 2M 64k")
    qemu_img("snapshot", "-c", "two", img)
    qemu_io(img, "write -P 4 64k 64k", "write -z 512k 64k", "write -z -u 768k 64k")
    return img


def _discarded(d: Path) -> Path:
    img = create(d / "disc.qcow2", 8 * MiB)
    qemu_io(
        img,
        "write -P 1 0 8M",
        "discard 1M 2M",
        "write -z -u 4M 1M",
        "write -z 6M 64k",
        "discard 7M 100k",
    )
    return img


def _bitmap(d: Path) -> Path:
    img = create(d / "bitmap.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "-g", "64k", img, "b1")
    qemu_io(img, "write -P 2 2M 64k")
    return img


def _data_file(d: Path) -> Path:
    # qemu-img creates a relative data file in its working directory, not beside the image.
    img = create(d / "meta.qcow2", 4 * MiB, data_file=str(d / "data.raw"))
    qemu_io(img, "write -P 1 0 64k", "write -z 1M 64k", "write -P 2 2M 128k", "discard 2M 64k")
    return img


def _leak_by_l2_edit(d: Path) -> Path:
    """Drop one L2 reference in a copy: its data cluster keeps refcount 1 -> a leak."""
    img = create(d / "leak.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 128k", "write -P 2 1M 64k")
    (l1_offset,) = struct.unpack(">Q", img.read_bytes()[40:48])
    with open(img, "r+b") as f:
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8)  # guest cluster 1
        f.write(b"\0" * 8)
    return img


def _leak_by_refcount_edit(d: Path) -> Path:
    """Raise the refcount of an unused cluster in a copy: a leak both tools must report."""
    img = create(d / "rcedit.qcow2", 4 * MiB)
    qemu_io(img, "write -P 1 0 64k")
    data = img.read_bytes()
    (rt_offset,) = struct.unpack(">Q", data[48:56])
    rb = struct.unpack(">Q", data[rt_offset : rt_offset + 8])[0]
    with open(img, "r+b") as f:
        f.truncate(max(len(data), 10 * 64 * KiB))  # cluster 9 inside the file
        f.seek(rb + 9 * 2)
        f.write(struct.pack(">H", 1))
    return img


def _lazy_crash(d: Path) -> Path:
    """qemu-io aborts with lazy refcounts: dirty bit set, refcounts never written."""
    img = create(d / "crash.qcow2", 4 * MiB, lazy_refcounts="on")
    proc = subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 192k",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "abort",
            str(img),
        ],
        capture_output=True,
        preexec_fn=_no_core,
    )
    assert proc.returncode < 0 or proc.returncode == 134
    return img


def _no_core() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


CASES: dict[str, Callable[[Path], Path]] = {
    **{f"cluster-{c}": _scatter(c) for c in (512, 4 * KiB, 64 * KiB, 2 * MiB)},
    "compat-0.10": _v2,
    "extended-l2": _extended_l2,
    "extended-l2-backed": _extended_l2_backed,
    "lazy-refcounts": _lazy,
    **{f"refcount-bits-{b}": _refcount_bits(b) for b in (1, 2, 4, 8, 16, 32, 64)},
    **{f"prealloc-{m}": _prealloc(m) for m in ("off", "metadata", "falloc", "full")},
    "compressed-zlib": _compressed("zlib"),
    "compressed-zstd": _compressed("zstd"),
    "convert-compressed": _convert_compressed,
    "chain-3-deep": _chain,
    "raw-backing": _raw_backed,
    "snapshots": _snapshots,
    "discard-and-zero": _discarded,
    "bitmaps": _bitmap,
    "external-data-file": _data_file,
    "leak-l2-edit": _leak_by_l2_edit,
    "leak-refcount-edit": _leak_by_refcount_edit,
    "lazy-refcounts-crash": _lazy_crash,
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    out = {}
    for name, build in CASES.items():
        d = root / name
        d.mkdir()
        out[name] = build(d)
    return out


def _layers(info: ImageInfo) -> list[ImageInfo]:
    return [layer for layer in info.chain() if layer.format == "qcow2"]


@pytest.mark.parametrize("case", list(CASES))
def test_info_agrees_with_qemu_img_check(images: dict[str, Path], case: str) -> None:
    info = inspect(images[case])
    for layer in _layers(info):
        expected = check_figures(qemu_check(Path(layer.path)))
        got = {key: getattr(layer, key) for key in expected}
        assert got == expected, layer.path


@pytest.mark.parametrize("case", list(CASES))
def test_map_agrees_with_qemu_img_map(images: dict[str, Path], case: str) -> None:
    assert list(map_image(images[case]).rows()) == qemu_map(images[case])


def test_leaks_are_found_by_both(images: dict[str, Path]) -> None:
    for case in ("leak-l2-edit", "leak-refcount-edit"):
        info = inspect(images[case])
        assert info.leaks == 1 == qemu_check(images[case])["leaks"]
        assert info.host.leaked_clusters == 1
        assert info.reclaim.wasted_bytes >= info.reclaim.leaked_bytes


def test_crash_with_lazy_refcounts_is_dirty(images: dict[str, Path]) -> None:
    info = inspect(images["lazy-refcounts-crash"])
    assert info.features["dirty"] is True
    assert info.corruptions == qemu_check(images["lazy-refcounts-crash"])["corruptions"] > 0


def test_header_facts_agree_with_qemu_img_info(images: dict[str, Path]) -> None:
    for case in CASES:
        info = inspect(images[case])
        for layer in info.chain():
            q = json.loads(qemu_img("info", "--output=json", "-U", layer.path).stdout)
            assert layer.virtual_size == q["virtual-size"]
            assert layer.allocated_bytes == q["actual-size"]
            assert layer.format == q["format"]
            if layer.format != "qcow2":
                continue
            spec = q["format-specific"]["data"]
            assert layer.cluster_size == q["cluster-size"]
            assert layer.compat == spec["compat"]
            assert layer.snapshot_count == len(q.get("snapshots", []))
            assert layer.backing_file == q.get("backing-filename")
            if "full-backing-filename" in q:
                assert os.path.realpath(str(layer.backing_path)) == os.path.realpath(
                    q["full-backing-filename"]
                )
            if layer.version == 3:
                assert layer.refcount_bits == spec["refcount-bits"]
                assert layer.features["lazy_refcounts"] == spec["lazy-refcounts"]
                assert layer.features["extended_l2"] == spec.get("extended-l2", False)
                assert layer.features["compression_type"] == spec["compression-type"]
                assert layer.features["corrupt"] == spec["corrupt"]
                assert layer.features["external_data_file"] == spec.get("data-file")


def test_chain_layers_and_relative_names(images: dict[str, Path]) -> None:
    info = inspect(images["chain-3-deep"])
    chain = info.chain()
    assert [Path(x.path).name for x in chain] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert chain[0].backing_file == "../mid.qcow2"
    assert chain[1].backing_file == "../base.qcow2"
    assert chain[0].guest.unallocated_ranges > 0


def test_snapshots_share_clusters(images: dict[str, Path]) -> None:
    info = inspect(images["snapshots"])
    assert info.snapshot_count == 2
    assert info.host.shared_clusters is not None and info.host.shared_clusters > 0
    # clusters still shared with a snapshot are not counted as reclaimable by a trim
    assert info.reclaim.max_trim_bytes < info.guest.data_bytes


def test_scan_zeros_finds_zero_data(tmp_path: Path) -> None:
    img = create(tmp_path / "z.qcow2", 4 * MiB)
    qemu_io(img, "write -P 0 0 256k", "write -P 1 1M 64k")
    plain = inspect(img)
    assert plain.reclaim.zero_data_bytes is None
    scanned = inspect(img, scan_zeros=True)
    assert scanned.reclaim.zero_data_bytes == 256 * KiB
    assert scanned.reclaim.wasted_bytes == plain.reclaim.wasted_bytes + 256 * KiB


def test_raw_sparse_map_and_info(tmp_path: Path) -> None:
    img = tmp_path / "sparse.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        for off in (0, 3 * MiB, 3 * MiB + 4 * KiB, 15 * MiB):
            f.seek(off)
            f.write(b"\xaa" * 4 * KiB)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    for path in (img, odd):
        assert list(map_image(path).rows()) == qemu_map(path)
        q = json.loads(qemu_img("info", "--output=json", path).stdout)
        info = inspect(path)
        assert (info.virtual_size, info.allocated_bytes) == (q["virtual-size"], q["actual-size"])
    assert inspect(img).guest.data_bytes == 16 * KiB


def test_cli_json_documents(images: dict[str, Path]) -> None:
    path = images["chain-3-deep"]
    exe = [sys.executable, "-m", "vmtrim"]
    info = json.loads(
        subprocess.run(
            [*exe, "image", "info", "--json", str(path)], check=True, capture_output=True, text=True
        ).stdout
    )
    assert info["schema"] == "vmtrim.image/1"
    expected = check_figures(qemu_check(path))
    assert {k: info[k] for k in expected} == expected
    assert info["backing"]["backing"]["path"].endswith("base.qcow2")
    doc = json.loads(
        subprocess.run(
            [*exe, "image", "map", "--json", str(path)], check=True, capture_output=True, text=True
        ).stdout
    )
    assert doc["schema"] == "vmtrim.image-map/1"
    assert doc["extents"] == qemu_map(path)
    human = subprocess.run(
        [*exe, "image", "info", str(path)], check=True, capture_output=True, text=True
    ).stdout
    assert "top.qcow2" in human and "base.qcow2" in human
    env = {**os.environ, "COLUMNS": "300"}
    human_map = subprocess.run(
        [*exe, "image", "map", str(path)], check=True, capture_output=True, text=True, env=env
    ).stdout
    ours = [
        tuple(int(x, 16) for x in re.findall(r"0x[0-9a-f]+", line))
        for line in human_map.splitlines()
        if ".qcow2" in line and "0x" in line
    ]
    theirs = [
        tuple(int(x, 0) for x in line.split()[:3])
        for line in qemu_img("map", path).stdout.splitlines()[1:]
    ]
    assert ours == theirs and len(ours) > 2


def test_cli_scan_zeros(tmp_path: Path) -> None:
    img = create(tmp_path / "z.qcow2", 4 * MiB)
    qemu_io(img, "write -P 0 0 128k", "write -P 1 1M 64k")
    proc = subprocess.run(
        [sys.executable, "-m", "vmtrim", "image", "info", "--scan-zeros", "--json", str(img)],
        check=True,
        capture_output=True,
        text=True,
    )
    doc = json.loads(proc.stdout)
    assert doc["reclaim"]["zero_data_bytes"] == 128 * KiB


def test_image_is_not_modified(images: dict[str, Path], tmp_path: Path) -> None:
    src = images["snapshots"]
    copy = tmp_path / "ro.qcow2"
    shutil.copy2(src, copy)
    before = (copy.read_bytes(), copy.stat().st_mtime_ns)
    inspect(copy, scan_zeros=True)
    map_image(copy)
    assert (copy.read_bytes(), copy.stat().st_mtime_ns) == before
