"""``<disk>`` declared once: the lab builder, the reader, the fixer and the guest-disk
matcher read and write the same attributes, so what one writes the others see."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fix_support import materialize
from vmtrim._util.domxml import DiskElement
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.fix.policy import FixOptions
from vmtrim.fix.xml import fix_domain_xml
from vmtrim.fix.xmledit import XmlEditor
from vmtrim.lab.build import Appliance
from vmtrim.sources.libvirt_live import disk_addresses
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.vm.guest import BUSES, DiskSpec, GuestSpec, RunPaths
from vmtrim.vm.libvirt import lab_domain_xml


def validate(path: Path) -> None:
    done = subprocess.run(
        ["virt-xml-validate", str(path), "domain"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("bus", BUSES)
@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_the_reader_sees_what_the_lab_builder_wrote(tmp_path: Path, bus: str, discard: str) -> None:
    files = Appliance(tmp_path / "k", tmp_path / "i", "6.1", "key", "test", False, tmp_path / "b")
    image = tmp_path / "d.qcow2"
    spec = GuestSpec(files, disk=DiskSpec(image, "qcow2", bus, discard))
    xml = lab_domain_xml(spec, "lab", RunPaths(tmp_path), files.kernel, files.initrd)
    (tmp_path / "lab.xml").write_text(xml)
    validate(tmp_path / "lab.xml")
    (disk,) = parse_domain_xml(xml).disks
    assert (disk.discard, disk.format, disk.source) == (discard, "qcow2", str(image))
    assert not disk.format_defaulted
    assert disk.target is not None
    assert disk_addresses(xml)[disk.target].bus == disk.bus
    devices = {"ide": "ide-hd", "sata": "ide-hd", "virtio-scsi": "scsi-hd"}
    assert disk.qemu_device == devices.get(bus, "virtio-blk-pci")


def test_the_matcher_and_reader_see_the_fixers_scsi_move(tmp_path: Path) -> None:
    text = materialize("old-virtio.xml", tmp_path)
    result = fix_domain_xml(text, FixOptions(bus="scsi"), probes=HostProbes(local=False))
    (tmp_path / "fixed.xml").write_text(result.new_text)
    validate(tmp_path / "fixed.xml")
    moved = {c.old: c.new for c in result.changes if c.setting == "target" and c.new}
    assert moved  # vda/vdb left virtio-blk on a machine type that cannot pass discard
    addresses = disk_addresses(result.new_text)
    disks = {d.target: d for d in parse_domain_xml(result.new_text).disks}
    for new in moved.values():
        assert disks[new].bus == "scsi" and disks[new].discard == "unmap"
        assert addresses[new].bus == "scsi" and addresses[new].drive is not None
    # every moved disk got its own unit on the one controller
    units = [addresses[new].drive for new in moved.values()]
    assert len(set(units)) == len(units)
    # the serial stayed where the matcher reads it
    assert any(a.serial == "root-serial" for a in addresses.values())


def test_a_declared_attribute_is_written_in_the_users_bytes() -> None:
    text = (
        "<domain>\n  <devices>\n    <disk type='file'>\n"
        "      <driver  name = 'qemu'   type='raw' />\n"
        "      <target dev='sda' bus='scsi'/>\n    </disk>\n"
        '    <disk type="file">\n      <target dev="sdb"/>\n    </disk>\n'
        "  </devices>\n</domain>\n"
    )
    editor = XmlEditor(text)
    first, second = (DiskElement(e, editor) for e in editor.root.iterfind("devices/disk"))
    first.driver_discard = "unmap"
    second.update((DiskElement.driver_name, "qemu"), (DiskElement.driver_discard, "unmap"))
    second.target_bus = "scsi"
    editor.check()
    assert editor.text() == text.replace("type='raw' />", "type='raw' discard='unmap' />").replace(
        '      <target dev="sdb"/>',
        '      <driver name="qemu" discard="unmap"/>\n      <target dev="sdb" bus="scsi"/>',
    )
    assert (first.driver_discard, second.driver_discard, second.target_bus) == (
        "unmap",
        "unmap",
        "scsi",
    )
