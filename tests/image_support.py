"""Helpers for the image tests (no tests here): build real images with qemu-img/qemu-io and
ask qemu-img what it thinks of them."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

from helpers import qemu_img

KiB = 1024
MiB = 1024 * KiB


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


def qemu_img_info(path: Path) -> subprocess.CompletedProcess[str]:
    """qemu-img info --output=json, not checked: a refused file is an answer too."""
    return subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
    )


def create_luks(path: Path, size: int | str, fmt: str = "qcow2") -> Path:
    """A LUKS-encrypted image (secret "hunter2").

    QEMU times PBKDF2 on the thread's CPU clock even with a fixed iter-time, and on a
    busy machine a measurement of 0 ms fails the create with "Unable to get accurate
    CPU usage"; that failure is about the clock, not the image, so it is retried.
    """
    opt = "encrypt." if fmt == "qcow2" else ""  # qcow2 nests the LUKS options
    luks = f"{opt}key-secret=s0,{opt}iter-time=10"
    if fmt == "qcow2":
        luks = f"encrypt.format=luks,{luks}"
    secret = "secret,id=s0,data=hunter2"
    cmd = ["qemu-img", "create", "-q", "--object", secret, "-f", fmt, "-o", luks, str(path)]
    cmd.append(str(size))
    for _ in range(20):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return path
        assert "accurate CPU usage" in proc.stderr, proc.stderr
    raise AssertionError(f"qemu-img could not time PBKDF2 in 20 tries: {proc.stderr}")


def poke(img: Path, offset: int, fmt: str, value: int) -> None:
    """Damage an image the way QEMU's iotests do: a big-endian value at a known offset."""
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, value))


def peek(img: Path, offset: int, fmt: str) -> int:
    with open(img, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">" + fmt, f.read(struct.calcsize(fmt)))[0]
    return value
