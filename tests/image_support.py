"""Helpers for the image tests (no tests here): build real images with qemu-img/qemu-io and
ask qemu-img what it thinks of them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True)


def create(path: Path, size: int | str, fmt: str = "qcow2", **opts: str) -> Path:
    cmd: list[str | Path] = ["create", "-q", "-f", fmt]
    if opts:
        cmd += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    qemu_img(*cmd, path, str(size))
    return path


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True, text=True)


def qemu_check(path: Path) -> dict[str, Any]:
    """qemu-img check --output=json; it exits 2/3 on corruptions/leaks, so no check=True."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True
    )
    assert proc.stdout, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def qemu_map(path: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(qemu_img("map", "--output=json", path).stdout)
    return result


def check_figures(check: dict[str, Any]) -> dict[str, int]:
    """The figures of qemu-img check that vmtrim must match (absent means 0)."""
    return {
        "allocated_clusters": check.get("allocated-clusters", 0),
        "fragmented_clusters": check.get("fragmented-clusters", 0),
        "compressed_clusters": check.get("compressed-clusters", 0),
        "total_clusters": check.get("total-clusters", 0),
        "image_end_offset": check["image-end-offset"],
        "leaks": check.get("leaks", 0),
        "corruptions": check.get("corruptions", 0),
    }
