"""`vmtrim fix` as a user runs it: output modes, backups, exit codes, bad input."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fix_support import AUDIT_DATA, materialize
from helpers import vmtrim


@pytest.fixture
def scsi_xml(tmp_path: Path) -> Path:
    path = tmp_path / "dom.xml"
    path.write_text(materialize("design-scsi-nodriver.xml", tmp_path, images=False))
    os.chmod(path, 0o640)
    return path


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".vmtrim-*.bak"))


def test_default_prints_new_xml_and_writes_nothing(scsi_xml: Path) -> None:
    before = scsi_xml.read_bytes()
    result = vmtrim("fix", "--xml", str(scsi_xml), "--no-probe")
    assert result.returncode == 0, result.stderr
    assert "<driver name='qemu' type='raw' discard='unmap'/>" in result.stdout
    assert "discard" in result.stderr  # the summary table
    assert scsi_xml.read_bytes() == before and backups(scsi_xml) == []


def test_dry_run_prints_a_unified_diff(scsi_xml: Path) -> None:
    before = scsi_xml.read_bytes()
    result = vmtrim("fix", "--xml", str(scsi_xml), "--dry-run", "--no-probe")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"--- {scsi_xml}" and lines[1] == f"+++ {scsi_xml} (fixed)"
    assert [line for line in lines if line.startswith("+") and not line.startswith("+++")] == [
        "+      <driver name='qemu' type='raw' discard='unmap'/>"
    ]
    assert scsi_xml.read_bytes() == before and backups(scsi_xml) == []


def test_output_file_is_new_and_0600(scsi_xml: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed.xml"
    result = vmtrim("fix", "--xml", str(scsi_xml), "-o", str(out), "--no-probe")
    assert result.returncode == 0
    assert result.stdout == ""
    assert "discard='unmap'" in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_in_place_backs_up_then_second_run_is_already_enabled(scsi_xml: Path) -> None:
    original = scsi_xml.read_bytes()
    first = vmtrim("fix", "--xml", str(scsi_xml), "--in-place", "--no-probe")
    assert first.returncode == 0, first.stderr
    (backup,) = backups(scsi_xml)
    assert backup.read_bytes() == original
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(scsi_xml.stat().st_mode) == 0o640  # the file keeps its mode
    fixed = scsi_xml.read_bytes()
    assert b"discard='unmap'" in fixed
    second = vmtrim("fix", "--xml", str(scsi_xml), "--in-place", "--no-probe")
    assert second.returncode == 0
    assert "already enabled" in second.stderr
    assert scsi_xml.read_bytes() == fixed and backups(scsi_xml) == [backup]


def test_json_document(scsi_xml: Path) -> None:
    result = vmtrim("fix", "--xml", str(scsi_xml), "--json", "--no-probe")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["schema"] == "vmtrim.fix/1"
    assert doc["changed"] is True and doc["fixed"] == ["sda"]
    assert {"disk": "sda", "setting": "discard", "old": None, "new": "unmap"} in doc["changes"]
    assert doc["skipped"] == [] and doc["mode"] == "stdout"
    assert "discard='unmap'" in doc["text"]


def test_exit_1_when_a_writable_disk_still_blocks(tmp_path: Path) -> None:
    path = tmp_path / "old.xml"
    path.write_text(materialize("old-virtio.xml", tmp_path, images=False))
    result = vmtrim("fix", "--xml", str(path), "--json", "--no-probe")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert {s["disk"] for s in doc["skipped"] if s["blocking"]} == {"vda", "vdb"}
    assert vmtrim("fix", "--xml", str(path), "--bus", "scsi", "--no-probe").returncode == 0


def test_nothing_to_fix_exits_0(tmp_path: Path) -> None:
    result = vmtrim("fix", "--xml", str(AUDIT_DATA / "readonly-only.xml"), "--no-probe")
    assert result.returncode == 0
    assert "nothing to fix" in result.stderr


def test_qemu_args_from_stdin(tmp_path: Path) -> None:
    legacy = (AUDIT_DATA / "design-legacy.args").read_text()
    result = vmtrim("fix", "--qemu-args", "-", "--modernize", "--bus", "scsi", stdin=legacy)
    assert result.returncode == 0, result.stderr
    assert "-device virtio-scsi-pci,id=scsi \\\n" in result.stdout
    assert result.stdout.count("-device scsi-hd,bus=scsi.0,drive=") == 2


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("<domain><devices>", (), "malformed XML"),
        ("<network/>", (), "not a libvirt domain"),
        (b"\xff\xfe<domain/>", (), "not UTF-8"),
    ],
)
def test_bad_xml_one_line_exit_2_nothing_written(
    tmp_path: Path, content: str | bytes, extra: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "bad.xml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = path.read_bytes()
    result = vmtrim("fix", "--xml", str(path), "--in-place", *extra)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"vmtrim: {path}: ") and message in result.stderr
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "args",
    [
        ("fix", "--xml", "/nonexistent/dom.xml"),
        ("fix", "--qemu-args", "-", "--in-place"),
        ("fix", "--xml", "x.xml", "--qemu-args", "y.args"),
        ("fix", "--xml", "x.xml", "--modernize"),
        ("fix", "--xml", "x.xml", "--all-disks"),
        ("fix", "--xml", "x.xml", "--dry-run", "--in-place"),
    ],
)
def test_bad_usage_exit_2(args: tuple[str, ...]) -> None:
    result = vmtrim(*args, stdin="")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bad_qemu_args_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cmd.args"
    path.write_text("qemu-system-x86_64 -m 1 | tee log\n")
    result = vmtrim("fix", "--qemu-args", str(path), "--in-place")
    assert result.returncode == 2
    assert result.stderr.startswith(f"vmtrim: {path}: cannot split the command line: shell syntax")
    assert sorted(tmp_path.iterdir()) == [path]


def test_killed_in_place_write_leaves_the_original_intact(tmp_path: Path) -> None:
    """SIGKILL `vmtrim fix --in-place` while it writes: the file is the original or the new one."""
    path = tmp_path / "dom.xml"
    path.write_text(materialize("mixed.xml", tmp_path, images=False))
    original = path.read_bytes()
    env = {**os.environ, "VMTRIM_TEST_WRITE_DELAY": "0.05"}  # 64-byte chunks, 50 ms apart
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmtrim", "fix", "--xml", str(path), "--in-place", "--no-probe"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial: list[Path] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not partial:
            partial = [p for p in tmp_path.glob(".dom.xml.*.tmp") if p.stat().st_size > 0]
            time.sleep(0.01)
        assert partial, "vmtrim never started writing the temporary file"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < partial[0].stat().st_size < len(original)
    assert path.read_bytes() == original
    (backup,) = backups(path)  # the backup was complete before the write began
    assert backup.read_bytes() == original


def test_bus_scsi_warns_before_the_write_and_in_json(tmp_path: Path) -> None:
    path = tmp_path / "dom.xml"
    path.write_text(materialize("old-virtio.xml", tmp_path, images=False))
    out = tmp_path / "fixed.xml"
    human = vmtrim("fix", "--xml", str(path), "--bus", "scsi", "-o", str(out), "--no-probe")
    assert human.returncode == 0, human.stderr
    err = human.stderr
    warnings = [line for line in err.splitlines() if line.startswith("! warning: ")]
    assert len(warnings) == 3
    assert "vda (virtio) -> sd" in warnings[0] and "new driver" in warnings[0]
    assert "Windows" in warnings[1] and "vioscsi" in warnings[1]
    assert "/dev/vda" in warnings[2] and "fstab" in warnings[2]
    assert err.index("! warning: ") < err.index(f"wrote {out}")  # said before the change
    doc = json.loads(
        vmtrim("fix", "--xml", str(path), "--bus", "scsi", "--json", "--no-probe").stdout
    )
    assert [f"! warning: {w}" for w in doc["warnings"]] == warnings
    plain = json.loads(vmtrim("fix", "--xml", str(path), "--json", "--no-probe").stdout)
    assert plain["warnings"] == []  # no --bus scsi: the hardware stays as it is


def test_guest_advice_is_said_once_for_every_disk(tmp_path: Path) -> None:
    path = tmp_path / "dom.xml"
    path.write_text(materialize("all-disks.xml", tmp_path, images=False))
    result = vmtrim("fix", "--xml", str(path), "--dry-run", "--no-probe")
    guest = [line for line in result.stderr.splitlines() if "at guest_fs" in line]
    assert len(guest) == 1
    assert "fstrim.timer" in guest[0] and "Optimize-Volume -ReTrim" in guest[0]


def test_hostile_names_after_in_place_print_escaped(tmp_path: Path) -> None:
    """Nothing printed after the write reads untrusted text as markup or controls."""
    path = tmp_path / "dom.xml"
    text = materialize("design-scsi-nodriver.xml", tmp_path, images=False)
    text = text.replace("<target dev='sda'", "<target dev='[bold]sda\u202e\x9b31m'")
    path.write_text(text)
    result = vmtrim("fix", "--xml", str(path), "--in-place", "--no-probe")
    assert result.returncode == 0, result.stderr
    assert "[bold]sda\\u202e\\x9b31m" in result.stderr
    assert "\u202e" not in result.stderr and "\x9b" not in result.stderr
    assert "discard='unmap'" in path.read_text()


WINDOWS_METADATA = """  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://microsoft.com/win/2k22"/>
    </libosinfo:libosinfo>
  </metadata>
"""


def test_guest_advice_follows_the_os_the_definition_names(tmp_path: Path) -> None:
    """virt-install records the OS: a Windows guest is not told about fstrim.timer."""
    path = tmp_path / "dom.xml"
    text = materialize("design-scsi-nodriver.xml", tmp_path, images=False)
    path.write_text(text.replace("  <memory", WINDOWS_METADATA + "  <memory", 1))
    result = vmtrim("fix", "--xml", str(path), "--dry-run", "--no-probe")
    [guest] = [line for line in result.stderr.splitlines() if "at guest_fs" in line]
    assert "Windows trims by itself" in guest and "Optimize-Volume" in guest
    assert "fstrim" not in guest
