"""The same disks as libvirt XML and as the QEMU command line libvirt makes of them agree.

tests/data/audit/pairs/NAME.xml goes with NAME.args: hand-written the way libvirt 9
renders disks (-blockdev JSON, storage nodes always "discard":"unmap"), except
design-*.args, which the real libvirt 9.0 generated (virsh domxml-to-native), and
legacy-libvirt.args, in the older -drive if=none form. test_audit_libvirt.py checks
the XMLs against what the real libvirtd generates today.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.model import DiskReport, Domain
from vmtrim.sources.libvirt_xml import parse_domain_file
from vmtrim.sources.qemu_args import read_args_file

PAIRS = Path(__file__).parent / "data" / "audit" / "pairs"
NAMES = sorted(path.stem for path in PAIRS.glob("*.xml"))
OFFLINE = HostProbes(local=False)


def signature(domain: Domain) -> list[tuple[object, ...]]:
    """What must agree, disk by disk, in device order."""
    reports: list[DiskReport] = audit_domain(domain, OFFLINE, read_images=False)
    return [
        (
            r.disk.device.value,
            r.disk.bus,
            r.disk.controller_model,
            r.disk.qemu_device,
            r.disk.source,
            r.disk.format,
            r.disk.discard,
            r.disk.read_only,
            r.exempt,
            tuple((layer.kind.value, layer.verdict.value) for layer in r.layers),
            r.verdict.value,
        )
        for r in reports
    ]


def test_there_are_pairs() -> None:
    assert len(NAMES) >= 6
    for name in NAMES:
        assert (PAIRS / f"{name}.args").exists(), name


@pytest.mark.parametrize("name", NAMES)
def test_xml_and_generated_command_line_agree(name: str) -> None:
    from_xml = signature(parse_domain_file(str(PAIRS / f"{name}.xml")))
    from_args = signature(read_args_file(str(PAIRS / f"{name}.args")))
    assert from_xml == from_args
    assert from_xml  # every pair has disks
