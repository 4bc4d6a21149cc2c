"""Backups and replacements under a full disk, SIGKILL and a second concurrent vmtrim.

The full disks are real: a small tmpfs (size=) filled to ENOSPC, then given back exactly
the pages a test wants free (tmpfs counts whole 4 KiB pages).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from files_support import fill, one_line, small_tmpfs, vmtrim
from fix_support import materialize

PAGE = 4096


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", "256k") as mountpoint:
        yield mountpoint


def domain_in(directory: Path, scratch: Path) -> Path:
    path = directory / "dom.xml"
    path.write_text(materialize("design-scsi-nodriver.xml", scratch, images=False))
    assert path.stat().st_size < PAGE  # one page for the backup, one for the new file
    return path


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "filler"}


def test_no_room_for_the_backup_leaves_no_bak_and_the_file_intact(
    full_fs: Path, tmp_path: Path
) -> None:
    path = domain_in(full_fs, tmp_path)
    fill(full_fs)
    before = listing(full_fs)
    result = vmtrim("fix", "--no-probe", "--xml", str(path), "--in-place")
    assert result.returncode == 3, result.stderr
    message = one_line(result, path)
    assert "backup" in message and "no space" in message
    assert listing(full_fs) == before  # no 0-byte .bak, no temporary file


def test_no_room_for_the_new_file_removes_the_backup_again(full_fs: Path, tmp_path: Path) -> None:
    path = domain_in(full_fs, tmp_path)
    fill(full_fs, leave=PAGE)  # room for the backup, none for the new text
    before = listing(full_fs)
    result = vmtrim("fix", "--no-probe", "--xml", str(path), "--in-place")
    assert result.returncode == 3, result.stderr
    message = one_line(result, path)
    assert "backup" not in message and "no space" in message  # the backup was written
    assert listing(full_fs) == before


def test_output_on_a_full_disk_creates_nothing(full_fs: Path, tmp_path: Path) -> None:
    source = domain_in(tmp_path, tmp_path)
    fill(full_fs)
    out = full_fs / "fixed.xml"
    result = vmtrim("fix", "--no-probe", "--xml", str(source), "-o", str(out))
    assert result.returncode == 3, result.stderr
    assert "no space" in one_line(result, out)
    assert listing(full_fs) == {}


def start_slow_in_place(path: Path) -> subprocess.Popen[bytes]:
    """`fix --in-place` writing 64-byte chunks a second apart: minutes, unless killed."""
    env = {**os.environ, "VMTRIM_TEST_WRITE_DELAY": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "fix", "--no-probe", "--xml", str(path), "--in-place"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_partial_backup(directory: Path, proc: subprocess.Popen[bytes]) -> Path:
    deadline = time.monotonic() + 120  # a hang guard, not a timing assertion
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in directory.glob(".dom.xml.vmtrim-*.bak-tmp") if p.stat().st_size]
        if partial:
            return partial[0]
        time.sleep(0.02)
    raise AssertionError(f"the backup never started (exit {proc.poll()})")


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_killed_during_the_backup_leaves_no_short_bak(tmp_path: Path) -> None:
    path = domain_in(tmp_path, tmp_path)
    original = path.read_bytes()
    proc = start_slow_in_place(path)
    try:
        partial = wait_for_partial_backup(tmp_path, proc)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < partial.stat().st_size < len(original)  # it really was midway
    assert path.read_bytes() == original
    assert sorted(tmp_path.glob("*.bak")) == []  # only the hidden .bak-tmp is left


def test_a_second_in_place_run_waits_for_nobody_and_changes_nothing(tmp_path: Path) -> None:
    path = domain_in(tmp_path, tmp_path)
    original = path.read_bytes()
    first = start_slow_in_place(path)
    try:
        wait_for_partial_backup(tmp_path, first)  # it holds the lock from its read on
        names = sorted(p.name for p in tmp_path.iterdir())
        second = vmtrim("fix", "--no-probe", "--xml", str(path), "--in-place")
        assert sorted(p.name for p in tmp_path.iterdir()) == names
    finally:
        kill(first)
    assert second.returncode == 3, second.stderr
    assert "another vmtrim" in one_line(second, path)
    assert path.read_bytes() == original
    again = vmtrim("fix", "--no-probe", "--xml", str(path), "--in-place")  # the lock died too
    assert again.returncode == 0, again.stderr
    assert b"discard='unmap'" in path.read_bytes()
