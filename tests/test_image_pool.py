"""The pool view: `vmtrim image info DIR` / `PATH...` in one process, one row per image.

The pool is a directory of images made by qemu-img and qemu-io, with a corrupt one,
a VMDK, a FIFO and a subdirectory among them. qemu-img check, measure and snapshot
deletion (with du before and after) are the judges of the columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import du_bytes, qemu_img
from image_support import check_figures, create, peek, poke, qemu_check, qemu_io

VMTRIM = [sys.executable, "-m", "vmtrim", "image", "info"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pool")
    big = create(d / "big.qcow2", "256M")
    qemu_io(big, "write -P 1 0 16M", "write -P 2 100M 8M")
    small = create(d / "small.qcow2", "64M", cluster_size="4k")
    qemu_io(small, "write -P 3 0 1M")
    snap = create(d / "snapshotted.qcow2", "64M")
    qemu_io(snap, "write -P 4 0 4M")
    qemu_img("snapshot", "-c", "s1", snap)
    qemu_io(snap, "write -P 5 0 4M")
    raw = create(d / "disk.raw", "32M", "raw")
    qemu_io(raw, "write -P 6 0 2M", fmt="raw")
    bad = create(d / "corrupt.qcow2", "4M")
    poke(bad, 72, "Q", peek(bad, 72, "Q") | 1 << 3)  # QEMU refuses this header
    create(d / "other.vmdk", "4M", "vmdk")
    os.mkfifo(d / "pipe")
    (d / "subdir").mkdir()
    create(d / "subdir" / "not-listed.qcow2", "1M")
    return d


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMTRIM, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_pool_json_one_document_per_image(pool: Path) -> None:
    proc = _run("--json", pool)
    assert proc.returncode == 2, proc.stderr  # some images failed
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "vmtrim.image-pool/1"
    images = {Path(i["path"]).name: i for i in doc["images"]}
    assert set(images) == {
        "big.qcow2",
        "small.qcow2",
        "snapshotted.qcow2",
        "disk.raw",
        "corrupt.qcow2",
        "other.vmdk",
        "pipe",
    }
    assert all(i["schema"] == "vmtrim.image/1" for i in images.values())
    for name in ("big.qcow2", "small.qcow2", "snapshotted.qcow2"):
        expected = check_figures(qemu_check(pool / name))
        assert {k: images[name][k] or 0 for k in expected} == expected
    assert "compression-type" in images["corrupt.qcow2"]["error"]
    assert "not supported, use qemu-img" in images["other.vmdk"]["error"]
    assert "FIFO" in images["pipe"]["error"]
    # most reclaimable first, failures last
    order = [Path(i["path"]).name for i in doc["images"]]
    ok = [i for i in doc["images"] if "error" not in i]
    trims = [i["reclaim"]["max_trim_bytes"] for i in ok]
    assert trims == sorted(trims, reverse=True) and order[0] == "big.qcow2"
    assert all("error" in i for i in doc["images"][len(ok) :])


def test_pool_table_one_row_per_image(pool: Path) -> None:
    proc = _run(pool)
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith(str(pool))]
    assert len(rows) == 7
    assert rows[0].split()[0] == str(pool / "big.qcow2")
    failed = [r for r in rows if r.split()[1] == "error"]
    assert len(failed) == 3
    assert "3 of 7 images could not be read" in proc.stdout


def test_several_paths_are_a_pool_too(pool: Path) -> None:
    proc = _run("--json", pool / "big.qcow2", pool / "disk.raw")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["images"]) == 2


def test_measure_column_is_what_qemu_img_measure_says(pool: Path) -> None:
    doc = json.loads(_run("--json", pool).stdout)
    for image in doc["images"]:
        if "error" in image:
            continue
        opts = "cluster_size=65536,refcount_bits=16"
        if image["format"] == "qcow2":
            opts = f"cluster_size={image['cluster_size']},refcount_bits={image['refcount_bits']}"
        out = qemu_img("measure", "--output=json", "-O", "qcow2", "-o", opts, image["path"])
        assert image["measure_required"] == json.loads(out.stdout)["required"], image["path"]


def test_snapshot_only_space_is_what_deleting_the_snapshot_frees(
    pool: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work.qcow2"
    # a copy with no holes: QEMU rewrites whole refcount blocks, which would fill holes in them
    subprocess.run(["cp", "--sparse=never", pool / "snapshotted.qcow2", work], check=True)
    doc = json.loads(_run("--json", work, pool / "big.qcow2").stdout)
    held = next(i for i in doc["images"] if i["path"] == str(work))
    held_bytes = held["reclaim"]["snapshot_only_bytes"]
    assert held_bytes > 0
    os.sync()
    before = du_bytes(work)
    qemu_img("snapshot", "-d", "s1", work)
    os.sync()
    assert before - du_bytes(work) == held_bytes
