"""First check of the public API others build on: vmtrim.image.info.inspect and allocation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from vmtrim.image.allocation import allocated_bytes, data_extents
from vmtrim.image.info import inspect


def test_inspect_qcow2_agrees_with_qemu_img(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 1 0 64k", "-c", "write -z 1M 64k", str(img)],
        check=True,
        capture_output=True,
    )
    qinfo = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(img)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    info = inspect(img)
    assert info.format == "qcow2"
    assert info.virtual_size == qinfo["virtual-size"]
    assert info.cluster_size == qinfo["cluster-size"]
    assert info.allocated_bytes == qinfo["actual-size"] == allocated_bytes(img)
    assert info.file_size == img.stat().st_size
    assert sum(length for _, length in data_extents(img)) <= info.file_size


def test_inspect_sparse_raw(tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 4096)
    info = inspect(img)
    assert info.format == "raw"
    assert info.virtual_size == 8 << 20
    assert data_extents(img) == [(1 << 20, 4096)]
    assert info.guest.data_bytes == 4096


def test_header_only_keeps_header_facts_and_skips_the_scan(tmp_path: Path) -> None:
    img = tmp_path / "h.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "16M"],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-c", "write 0 1M", "-c", "write 4M 64k", str(img)],
        check=True,
        capture_output=True,
    )
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(img)], check=True)
    full = inspect(img)
    quick = inspect(img, header_only=True)
    for name in (
        "format",
        "virtual_size",
        "file_size",
        "allocated_bytes",
        "cluster_size",
        "version",
        "compat",
        "refcount_bits",
        "snapshot_count",
        "backing_file",
    ):
        assert getattr(quick, name) == getattr(full, name), name
    assert quick.snapshot_count == 1 and quick.cluster_size == 4096
    check = json.loads(
        subprocess.run(
            ["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True
        ).stdout
    )
    assert full.allocated_clusters == check["allocated-clusters"]
    assert quick.allocated_clusters is None
