"""Atomic writes and 0600 backups (vmtrim._util.files), checked on the real filesystem."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vmtrim._util.files import atomic_write, backup_beside, backup_to_state, state_backup_dir
from vmtrim.errors import BadInput

ORIGINAL = b"<domain type='qemu'>\n  <name>keep</name>\n</domain>\n"


def test_atomic_write_replaces_and_keeps_mode_and_owner(tmp_path: Path) -> None:
    target = tmp_path / "dom.xml"
    target.write_bytes(ORIGINAL)
    os.chmod(target, 0o640)
    os.chown(target, 4321, 4322)
    inode_before = target.stat().st_ino
    atomic_write(target, "new text\n")
    info = target.stat()
    assert target.read_bytes() == b"new text\n"
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert (info.st_uid, info.st_gid) == (4321, 4322)
    assert info.st_ino != inode_before  # replaced by rename, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dom.xml"]  # no temp left


def test_atomic_write_new_file_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.xml"
    atomic_write(target, b"x", new_file_mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_atomic_write_refuses_a_symlink_and_touches_neither(tmp_path: Path) -> None:
    real = tmp_path / "real.xml"
    real.write_bytes(ORIGINAL)
    link = tmp_path / "link.xml"
    link.symlink_to(real)
    with pytest.raises(BadInput, match="symbolic link") as caught:
        atomic_write(link, b"changed")
    assert caught.value.subject == str(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == ORIGINAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.xml", "real.xml"]


def test_atomic_write_refuses_directory(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        atomic_write(tmp_path, b"x")


def test_backup_beside_is_0600_and_identical(tmp_path: Path) -> None:
    target = tmp_path / "dom.xml"
    target.write_bytes(ORIGINAL)
    os.chmod(target, 0o644)
    when = datetime(2026, 11, 26, 10, 15, 30, tzinfo=UTC)
    first = backup_beside(target, ORIGINAL, now=when)
    second = backup_beside(target, ORIGINAL, now=when)
    assert first.name == "dom.xml.vmtrim-20261126T101530Z.bak"
    assert second.name == "dom.xml.vmtrim-20261126T101530Z-1.bak"
    for backup in (first, second):
        assert backup.parent == tmp_path
        assert backup.read_bytes() == ORIGINAL
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["dom.xml", first.name, second.name]
    )


def test_backup_is_of_the_bytes_given_not_a_reread(tmp_path: Path) -> None:
    target = tmp_path / "dom.xml"
    target.write_bytes(b"<domain>changed on disk since it was parsed</domain>")
    backup = backup_beside(target, ORIGINAL)
    assert backup.read_bytes() == ORIGINAL


def test_backup_to_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = backup_to_state("../evil/dom", "<domain/>")
    assert path.parent == tmp_path / "state" / "vmtrim" / "backups" == state_backup_dir()
    assert "/" not in path.name and not path.name.startswith(".")
    assert path.read_text() == "<domain/>"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_killed_writer_leaves_original_intact(tmp_path: Path) -> None:
    target = tmp_path / "dom.xml"
    target.write_bytes(ORIGINAL)
    payload = "Z" * 64 * 200  # 200 chunks of 64 bytes at 20 ms each: 4 s if not killed
    script = (
        "import sys; from vmtrim._util.files import atomic_write; "
        f"atomic_write(sys.argv[1], {payload!r})"
    )
    env = {**os.environ, "VMTRIM_TEST_WRITE_DELAY": "0.02"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], env=env)
    try:
        deadline = time.monotonic() + 30
        partial: list[Path] = []
        while time.monotonic() < deadline:
            partial = [p for p in tmp_path.glob(".dom.xml.*.tmp") if p.stat().st_size > 0]
            if partial:
                break
            time.sleep(0.01)
        assert partial, "the writer never started writing its temporary file"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < partial[0].stat().st_size < len(payload)  # it really was midway
    assert target.read_bytes() == ORIGINAL
