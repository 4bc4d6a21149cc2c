"""Host storage probes and image-header findings, on real filesystems, devices and images."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import qemu_img
from vmtrim.audit import hostprobe
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes, block_device_probe
from vmtrim.model import DiskReport, LayerKind, Severity, Verdict
from vmtrim.sources.libvirt_xml import parse_domain_xml


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def ramfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real filesystem without FALLOC_FL_PUNCH_HOLE (ramfs); needs root, like the suite."""
    mountpoint = tmp_path_factory.mktemp("ramfs")
    run("mount", "-t", "ramfs", "vmtrim-test-ramfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("umount", str(mountpoint))


@pytest.fixture(scope="module")
def loop_devices(ramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Loop devices over a file on ramfs (no discard) and on the ext4 test disk (discard)."""
    backing = {"ramfs": ramfs / "lo.img", "ext4": tmp_path_factory.mktemp("lo") / "lo.img"}
    devices: dict[str, str] = {}
    try:
        for name, path in backing.items():
            path.write_bytes(b"\0" * (4 << 20))
            devices[name] = run("losetup", "--find", "--show", str(path))
        yield devices
    finally:
        for device in devices.values():
            run("losetup", "-d", device)


def xml_for(source: str, kind: str = "file", fmt: str = "qcow2", discard: str = "unmap") -> str:
    attr = "file" if kind == "file" else "dev"
    return (
        f"<domain><name>h</name><os><type machine='pc-q35-7.2'>hvm</type></os><devices>"
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'"
        f" discard='{discard}'/><source {attr}='{source}'/><target dev='sda' bus='scsi'/>"
        f"</disk><controller type='scsi' index='0' model='virtio-scsi'/></devices></domain>"
    )


def audit_one(xml: str, probes: HostProbes | None = None) -> DiskReport:
    (report,) = audit_domain(parse_domain_xml(xml), probes or HostProbes())
    return report


# ---------------------------------------------------------------- files


def test_ext4_punches_holes_and_the_image_is_not_touched(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "32M")
    before = (hashlib.sha256(image.read_bytes()).hexdigest(), image.stat().st_mtime_ns)
    report = audit_one(xml_for(str(image)))
    host = report.layer(LayerKind.HOST_STORAGE)
    assert host.verdict is Verdict.PASS and "punches holes" in host.reason
    assert (hashlib.sha256(image.read_bytes()).hexdigest(), image.stat().st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path)) == ["disk.qcow2"]  # the probe file is gone
    assert report.config_verdict is Verdict.PASS


def test_ramfs_cannot_punch_holes_so_the_disk_blocks(ramfs: Path) -> None:
    image = ramfs / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "8M")
    xml = ramfs / "dom.xml"
    xml.write_text(xml_for(str(image)))
    proc = subprocess.run(
        [sys.executable, "-m", "vmtrim", "audit", "--json", "--xml", str(xml)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    (disk,) = json.loads(proc.stdout)["disks"]
    host = next(item for item in disk["layers"] if item["layer"] == "host_storage")
    assert host["verdict"] == "block" and "ramfs" in host["reason"]
    assert disk["config_verdict"] == "pass"  # the configuration is fine; the host is not
    assert not [name for name in os.listdir(ramfs) if name.startswith(".vmtrim-probe")]


def test_probe_is_cached_per_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = hostprobe.punch_hole_probe

    def counting(directory: str) -> hostprobe.Probe:
        calls.append(directory)
        return real(directory)

    monkeypatch.setattr(hostprobe, "punch_hole_probe", counting)
    probes = HostProbes()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        assert probes.file(str(tmp_path / name / "x.img")).verdict is Verdict.PASS
    assert len(calls) == 1


def test_missing_directory_is_unknown_not_an_error() -> None:
    report = audit_one(xml_for("/nonexistent-vmtrim/dir/disk.qcow2"))
    host = report.layer(LayerKind.HOST_STORAGE)
    assert host.verdict is Verdict.UNKNOWN and "does not exist on this host" in host.reason


# ---------------------------------------------------------------- block devices


def test_loop_device_on_ext4_supports_discard(loop_devices: dict[str, str]) -> None:
    probe = block_device_probe(loop_devices["ext4"])
    sysfs = Path(f"/sys/block/{Path(loop_devices['ext4']).name}/queue/discard_max_bytes")
    assert probe.verdict is Verdict.PASS
    assert f"discard_max_bytes={sysfs.read_text().strip()}" in probe.reason


def test_loop_device_on_ramfs_does_not(loop_devices: dict[str, str]) -> None:
    report = audit_one(xml_for(loop_devices["ramfs"], kind="block", fmt="raw"))
    host = report.layer(LayerKind.HOST_STORAGE)
    assert host.verdict is Verdict.BLOCK and "discard_max_bytes=0" in host.reason
    assert report.blocks


# ---------------------------------------------------------------- image headers


def findings(report: DiskReport) -> dict[str, Severity]:
    return {f.message: f.severity for f in report.findings}


def test_qcow2_compat_010_with_snapshots(tmp_path: Path) -> None:
    image = tmp_path / "old.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=128k", str(image), "16M"
    )
    qemu_img("snapshot", "-c", "before-upgrade", str(image))
    found = findings(audit_one(xml_for(str(image))))
    assert any("128 KiB" in m for m in found)
    assert any("compat=0.10" in m and s is Severity.WARNING for m, s in found.items())
    assert any(m.startswith("1 internal snapshot") for m in found)


def test_overlay_found_from_the_header(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    found = findings(audit_one(xml_for(str(top))))
    assert any(str(base) in m and "never shrinks" in m for m in found)


def test_format_mismatch_and_preallocation(tmp_path: Path) -> None:
    image = tmp_path / "really-qcow2.img"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "16M")
    found = findings(audit_one(xml_for(str(image), fmt="raw")))
    assert found["configured as raw but the file is qcow2"] is Severity.WARNING
    full = tmp_path / "full.raw"
    qemu_img("create", "-q", "-f", "raw", "-o", "preallocation=full", str(full), "4M")
    found = findings(audit_one(xml_for(str(full), fmt="raw")))
    assert any("preallocat" in m for m in found)


def test_unreadable_image_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    image = tmp_path / "broken.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\xff" * 60)  # a qcow2 magic and a nonsense header
    report = audit_one(xml_for(str(image)))
    assert any("cannot read the image header" in f.message for f in report.findings)
