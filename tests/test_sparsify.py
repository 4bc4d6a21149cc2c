"""vmtrim sparsify on a GPT disk made by real tools (tests/sparsify_support.py).

What a user checks: every kept file's sha256 read back through the appliance and, for
the filesystems its kernel modules mount, through the plain lab guest with the image as
its data disk; qemu-img check, the swap UUID and label by blkid, du before and after,
exit codes; an image a running QEMU holds is refused; a SIGKILL while the appliance
runs leaves the image consistent (leaked clusters at most) with every file intact; a
backing file is not touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_refused_in_use, du_bytes, qemu_img, vmtrim
from sparsify_support import (
    LAYOUT,
    Disk,
    MiB,
    lab_guest_checksums,
    lab_guest_with_data_disk,
    make_gpt_disk,
    sha256,
)
from vmtrim.sparsify.engine import checksums
from vmtrim.sparsify.inuse import qemu_lock_holder


def check(image: Path) -> str:
    """qemu-img check's output; it must find no errors (exit 0 clean, 3 leaks only)."""
    done = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert done.returncode in (0, 3), done.stdout + done.stderr
    assert "corrupt" not in done.stdout.lower() and "ERROR" not in done.stdout
    return done.stdout


def swap_id(image: Path, tmp: Path) -> tuple[str, str]:
    """(UUID, LABEL) of the swap partition, as blkid reads it from a raw copy."""
    raw = tmp / "swap-probe.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    start = 1 + sum(size for name, _, size in LAYOUT[: [n for n, _, _ in LAYOUT].index("swap")])
    try:
        out = subprocess.run(
            ["blkid", "-p", "-o", "export", "--offset", str(start * MiB), str(raw)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        raw.unlink()
    # blkid's export format escapes spaces and quotes with a backslash.
    fields = {k: v.replace("\\", "") for k, v in (ln.split("=", 1) for ln in out.splitlines())}
    return fields.get("UUID", ""), fields.get("LABEL", "")


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return make_gpt_disk(tmp_path_factory.mktemp("gpt"))


@pytest.fixture(scope="module")
def pristine(disk: Disk, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the disk before any sparsify, for the tests that need their own."""
    copy = tmp_path_factory.mktemp("pristine") / "disk.qcow2"
    shutil.copyfile(disk.path, copy)
    return copy


@pytest.fixture(scope="module")
def dry_run(disk: Disk, pristine: Path) -> subprocess.CompletedProcess[str]:
    return vmtrim("sparsify", "--dry-run", "--json", str(disk.path))


@pytest.fixture(scope="module")
def sparsified(disk: Disk, dry_run: object) -> tuple[int, dict[str, object], int]:
    before = du_bytes(disk.path)
    done = vmtrim("sparsify", "--json", str(disk.path))
    assert done.returncode == 0, done.stderr
    return before, json.loads(done.stdout), du_bytes(disk.path)


def test_dry_run_lists_and_changes_nothing(
    disk: Disk, pristine: Path, dry_run: subprocess.CompletedProcess[str]
) -> None:
    assert dry_run.returncode == 0, dry_run.stderr
    doc = json.loads(dry_run.stdout)
    assert doc["schema"] == "vmtrim.sparsify/1"
    assert {fs["action"] for fs in doc["filesystems"]} == {"would trim"}
    assert sha256(disk.path) == sha256(pristine)


def test_every_filesystem_trimmed_and_measured(
    disk: Disk, sparsified: tuple[int, dict[str, object], int]
) -> None:
    before, doc, after = sparsified
    found = {(fs["device"], fs["type"]) for fs in doc["filesystems"]}  # type: ignore[attr-defined]
    assert found == {
        ("sda1", "ext4"),
        ("sda2", "xfs"),
        ("sda3", "btrfs"),
        ("sda4", "vfat"),
        ("sda5", "swap"),
        ("vmtrimvg/data", "ext4"),
    }
    assert all(fs["action"] == "trimmed" for fs in doc["filesystems"])  # type: ignore[attr-defined]
    # Most of what was deleted comes back, measured by du on the host.
    assert before - after >= 0.8 * disk.deleted_bytes
    assert doc["allocated_before"] == before and doc["allocated_after"] == after
    for fs in doc["filesystems"]:  # type: ignore[attr-defined]
        assert fs["freed"] is not None and fs["freed"] <= fs["fitrim_bytes"] + MiB
    left = {(x["device"], x["type"]) for x in doc["left_alone"]}  # type: ignore[attr-defined]
    assert ("sda7", "unknown") in left
    assert sum(1 for _, kind in left if kind == "gap") >= 2


def test_files_check_and_swap_identity_kept(disk: Disk, sparsified: object, tmp_path: Path) -> None:
    out = check(disk.path)
    assert "No errors were found" in out and "leaked" not in out
    assert swap_id(disk.path, tmp_path) == (disk.swap_uuid, disk.swap_label)
    # Read back through the sparsify appliance: every filesystem, vfat and the LV too.
    assert checksums(disk.path) == disk.kept


def test_still_boots_as_the_lab_guests_data_disk(disk: Disk, sparsified: object) -> None:
    """The plain lab guest, the image as its second disk: mounted read-write there (its
    kernel modules have ext4, xfs and btrfs, not vfat or dm), every file's sha256 read by
    the guest's own sha256sum."""
    parts = {"sda1": "ext4", "sda2": "xfs", "sda3": "btrfs"}
    with lab_guest_with_data_disk(disk.path) as runner:
        assert lab_guest_checksums(runner, parts) == {part: disk.kept[part] for part in parts}
    assert "No errors were found" in check(disk.path)


def test_second_run_costs_at_most_the_mounts_metadata(disk: Disk, sparsified: object) -> None:
    before = du_bytes(disk.path)
    done = vmtrim("sparsify", str(disk.path))
    assert done.returncode == 0, done.stderr
    assert "sda1" in done.stdout and "left alone" in done.stdout
    # Mounting writes a little metadata (journal, xfs log, btrfs commit): at most 1 MiB.
    assert du_bytes(disk.path) <= before + MiB


def test_in_use_refused(pristine: Path) -> None:
    assert_refused_in_use("sparsify", pristine, "in use", "QEMU's image lock")


def _wait_unlocked(image: Path, timeout: float = 120) -> None:
    """A killed vmtrim's QEMU powers off when its guest sees the control port close."""
    deadline = time.monotonic() + timeout
    while qemu_lock_holder(image) is not None:
        assert time.monotonic() < deadline, "the orphaned QEMU still holds the image"
        time.sleep(0.5)


@pytest.mark.parametrize("point", ["booted", "trimmed", "mid-run"])
def test_sigkill_keeps_image_and_files(
    disk: Disk, pristine: Path, tmp_path: Path, point: str
) -> None:
    """Killed on an overlay over the pristine disk: top consistent, backing untouched."""
    base = tmp_path / "base.qcow2"
    shutil.copyfile(pristine, base)
    base_sum = sha256(base)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    env = {**os.environ}
    if point != "mid-run":
        env["VMTRIM_TEST_PAUSE"] = point
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "sparsify", "--json", str(top)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if point == "mid-run":
        deadline = time.monotonic() + 120
        while qemu_lock_holder(top) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(8)  # somewhere among the filesystems
    else:
        line = proc.stdout.readline()
        assert f"paused at {point}" in line, line + (proc.stderr.read() if proc.stderr else "")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait_unlocked(top)
    check(top)
    assert sha256(base) == base_sum
    assert checksums(top) == disk.kept
    # A later run finishes the job.
    done = vmtrim("sparsify", str(top))
    assert done.returncode == 0, done.stderr
    check(top)
    assert sha256(base) == base_sum  # QEMU opened the backing file read-only


def test_zeros_discards_all_zero_clusters(tmp_path: Path) -> None:
    image = tmp_path / "zeros.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "256M")
    subprocess.run(
        ["qemu-io", "-c", "write -P 0 0 32M", "-c", "write -P 7 32M 4M", str(image)],
        check=True,
        capture_output=True,
    )
    before = du_bytes(image)
    done = vmtrim("sparsify", "--zeros", "--json", str(image))
    assert done.returncode == 0, done.stderr
    assert before - du_bytes(image) >= 30 * MiB
    assert "No errors were found" in check(image)
    read = subprocess.run(
        ["qemu-io", "-c", "read -P 7 32M 4M", "-c", "read -P 0 0 32M", str(image)],
        capture_output=True,
        text=True,
    )
    assert "Pattern verification failed" not in read.stdout and read.returncode == 0
