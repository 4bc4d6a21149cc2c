"""The host probe on full, hole-less and remote storage: always an answer, never a crash."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from files_support import fill, run, small_tmpfs, vmtrim
from vmtrim.audit.hostprobe import HostProbes, block_device_probe, punch_hole_probe
from vmtrim.facts import NOTES
from vmtrim.model import Verdict


def domain_xml(image: Path) -> str:
    return (
        "<domain><name>full</name><os><type machine='pc-q35-7.2'>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw' discard='unmap'/>"
        f"<source file='{image}'/><target dev='sda' bus='scsi'/></disk>"
        "<controller type='scsi' index='0' model='virtio-scsi'/></devices></domain>"
    )


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs (which can punch holes) holding a sparse raw image, filled to ENOSPC."""
    with small_tmpfs(tmp_path / "full", "256k") as mountpoint:
        with (mountpoint / "disk.raw").open("wb") as f:
            f.truncate(16 << 20)
        fill(mountpoint)
        yield mountpoint


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem without FALLOC_FL_PUNCH_HOLE."""
    mountpoint = tmp_path / "ramfs"
    mountpoint.mkdir()
    run("mount", "-t", "ramfs", "vmtrim-test-ramfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("umount", "-l", str(mountpoint))


def host_layer(doc: dict[str, Any]) -> dict[str, str]:
    (disk,) = doc["disks"]
    layers: list[dict[str, str]] = disk["layers"]
    return next(item for item in layers if item["layer"] == "host_storage")


def test_full_filesystem_is_unknown_and_the_audit_goes_on(full_fs: Path, tmp_path: Path) -> None:
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml(full_fs / "disk.raw"))
    result = vmtrim("audit", "--json", "--xml", str(xml))
    assert result.returncode == 0, result.stderr  # nothing blocks: the host is unknown
    doc = json.loads(result.stdout)
    host = host_layer(doc)
    assert host["verdict"] == "unknown"
    assert "could not probe: no space" in host["reason"] and "tmpfs" in host["reason"]
    assert [d["name"] for d in doc["domains"]] == ["full"]
    assert sorted(p.name for p in full_fs.iterdir()) == ["disk.raw", "filler"]  # no probe file


def test_full_filesystem_does_not_stop_fix(full_fs: Path, tmp_path: Path) -> None:
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml(full_fs / "disk.raw").replace(" discard='unmap'", ""))
    result = vmtrim("fix", "--xml", str(xml))
    assert result.returncode == 0, result.stderr
    assert "discard='unmap'" in result.stdout


def test_punch_probe_reports_no_space_directly(full_fs: Path) -> None:
    probe = punch_hole_probe(str(full_fs))
    assert probe.verdict is Verdict.UNKNOWN and "could not probe: no space" in probe.reason


def test_no_holes_carries_the_sticky_enotsup_note(ramfs: Path) -> None:
    probe = punch_hole_probe(str(ramfs))
    sticky = NOTES["punch_hole_sticky"]
    assert probe.verdict is Verdict.BLOCK and "ramfs" in probe.reason
    assert sticky in probe.notes
    assert probe.fix is not None and sticky.message in probe.fix  # shown with the fix
    assert os.listdir(ramfs) == []


def test_a_filesystem_that_punches_holes_has_no_such_note(tmp_path: Path) -> None:
    probe = punch_hole_probe(str(tmp_path))
    assert probe.verdict is Verdict.PASS and probe.notes == ()


def test_remote_and_no_probe_say_their_own_reason(tmp_path: Path) -> None:
    image = str(tmp_path / "disk.qcow2")
    remote = HostProbes.choose(remote_uri="qemu+ssh://kvm7.example/system")
    off = HostProbes.choose(no_probe=True)
    for probe in (remote.file(image), remote.block("/dev/sdz")):
        assert probe.verdict is Verdict.UNKNOWN
        assert "kvm7.example" in probe.reason and "--no-probe" not in probe.reason
    assert "--no-probe" in off.file(image).reason
    # --no-probe wins over a remote URI: the user's own choice is the reason given.
    assert "--no-probe" in HostProbes.choose(no_probe=True, remote_uri="qemu+ssh://h/s").off_reason
    assert not os.listdir(tmp_path)  # neither touched the directory


def test_cli_no_probe_names_the_flag(tmp_path: Path) -> None:
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml(tmp_path / "disk.raw"))
    doc = json.loads(vmtrim("audit", "--json", "--no-probe", "--xml", str(xml)).stdout)
    assert "--no-probe" in host_layer(doc)["reason"]


def test_a_remote_live_audit_blames_the_host_not_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The -c URI path of `vmtrim audit` (cli.audit.report_domains) for a remote URI."""
    from vmtrim.cli.audit import report_domains
    from vmtrim.sources.libvirt_xml import parse_domain_xml

    domain = parse_domain_xml(domain_xml(tmp_path / "disk.raw"))
    report_domains([domain], remote_uri="qemu+ssh://kvm7.example/system", as_json=True)
    reason = host_layer(json.loads(capsys.readouterr().out))["reason"]
    assert "kvm7.example" in reason and "--no-probe" not in reason
    report_domains([domain], probe=False, remote_uri="qemu+ssh://kvm7.example/system", as_json=True)
    assert "--no-probe" in host_layer(json.loads(capsys.readouterr().out))["reason"]
    assert not os.listdir(tmp_path)


def test_a_device_without_discard_carries_the_sticky_note(ramfs: Path) -> None:
    backing = ramfs / "lo.img"
    backing.write_bytes(b"\0" * (1 << 20))
    device = run("losetup", "--find", "--show", str(backing))
    try:
        probe = block_device_probe(device)
    finally:
        run("losetup", "-d", device)
    assert probe.verdict is Verdict.BLOCK
    assert NOTES["punch_hole_sticky"] in probe.notes
