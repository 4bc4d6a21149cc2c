"""The fixed XML on the real libvirtd: `virsh define` accepts it, `virsh dumpxml` shows discard."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from lxml import etree

from fix_support import materialize
from helpers import vmtrim
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.fix.policy import FixOptions
from vmtrim.fix.xml import fix_domain_xml

pytestmark = pytest.mark.libvirt

CASES = [
    ("design-scsi-nodriver.xml", FixOptions()),
    ("old-virtio.xml", FixOptions(bus="scsi", detect_zeroes="unmap")),
    ("all-disks.xml", FixOptions(bus="scsi", all_disks=True)),
    ("mixed.xml", FixOptions()),
]


def virsh(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.mark.parametrize(("name", "options"), CASES, ids=[c[0] for c in CASES])
def test_libvirt_defines_fixed_xml(
    libvirtd: str, tmp_path: Path, name: str, options: FixOptions
) -> None:
    text = materialize(name, tmp_path)
    domain = f"vmtrim-fix-{uuid.uuid4().hex[:8]}"
    root = etree.fromstring(text.encode())
    name_element = root.find("name")
    assert name_element is not None
    text = text.replace(f"<name>{name_element.text}</name>", f"<name>{domain}</name>")
    text = text.replace(root.findtext("uuid") or "no-uuid", str(uuid.uuid4()))
    result = fix_domain_xml(text, options, probes=HostProbes())
    # Keyed by target: two disks may share a source (mixed.xml has a disk and a lun on /dev/null).
    fixed_targets = {
        _target(disk)
        for disk in etree.fromstring(result.new_text.encode()).iterfind("devices/disk")
        if _target(disk) in result.fixed or _target(disk) in result.already
    }
    assert fixed_targets
    path = tmp_path / "fixed.xml"
    path.write_text(result.new_text)
    defined = virsh(libvirtd, "define", str(path))
    assert defined.returncode == 0, defined.stderr
    try:
        dumped = virsh(libvirtd, "dumpxml", "--inactive", domain)
        assert dumped.returncode == 0, dumped.stderr
        live = etree.fromstring(dumped.stdout.encode())
        seen = set()
        for disk in live.iterfind("devices/disk"):
            target = _target(disk)
            if target not in fixed_targets:
                continue
            seen.add(target)
            driver = disk.find("driver")
            assert driver is not None and driver.get("discard") == "unmap", target
            if options.detect_zeroes:
                assert driver.get("detect_zeroes") == options.detect_zeroes
            if options.bus == "scsi" and options.all_disks:
                target_element = disk.find("target")
                assert target_element is not None and target_element.get("bus") == "scsi"
        assert seen == fixed_targets
        if options.bus:
            models = [c.get("model") for c in live.iterfind("devices/controller[@type='scsi']")]
            assert "virtio-scsi" in models
    finally:
        undefined = virsh(libvirtd, "undefine", domain)
        assert undefined.returncode == 0, undefined.stderr


def _target(disk: etree._Element) -> str | None:
    target = disk.find("target")
    return None if target is None else target.get("dev")


def test_fix_c_on_a_stopped_domain_says_what_it_could_not_ask(
    libvirtd: str, tmp_path: Path
) -> None:
    text = materialize("old-virtio.xml", tmp_path)
    domain = f"vmtrim-fix-{uuid.uuid4().hex[:8]}"
    text = text.replace("<name>fix-old-virtio</name>", f"<name>{domain}</name>")
    path = tmp_path / "domain.xml"
    path.write_text(text)
    defined = virsh(libvirtd, "define", str(path))
    assert defined.returncode == 0, defined.stderr
    try:
        result = vmtrim("fix", "-c", libvirtd, domain, "--bus", "scsi", "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        [doc] = json.loads(result.stdout)["domains"]
        assert any("could not read the guest's /etc/fstab" in w for w in doc["warnings"])
        assert any("vioscsi" in w for w in doc["warnings"])
        guest = {r["reason"] for r in doc["remaining"] if r["layer"] == "guest_fs"}
        assert guest == {"the domain is not running: no guest agent to ask"}
        # libvirt 9.0 has every <driver> attribute the fix writes: no version finding
        assert not any("libvirt" in r["reason"] for r in doc["remaining"])
    finally:
        undefined = virsh(libvirtd, "undefine", domain)
        assert undefined.returncode == 0, undefined.stderr
