"""Knowledge as data: every row says where it comes from, and the audit acts on the rows."""

from __future__ import annotations

import pytest

from vmtrim import facts
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.fix.policy import leave_alone
from vmtrim.model import DiskReport, LayerKind, Severity, Verdict
from vmtrim.sources.libvirt_xml import parse_domain_xml


def test_every_row_has_a_source() -> None:
    rows: list[tuple[str, str]] = []
    rows += [(f.key, f.source) for f in facts.FACTS.values()]
    rows += [(n.key, n.source) for n in facts.NOTES.values()]
    rows += [(b.bus, b.source) for b in facts.BUSES.values()]
    rows += [(p.protocol, p.source) for p in facts.PROTOCOLS.values()]
    rows += [(g.fstype, g.source) for g in facts.GUEST_FS.values()]
    for key, source in rows:
        assert source and source != "-", key


DISK_XML = """<domain type='kvm'>
  <name>old</name>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'{extra}/>
      <source file='/nonexistent/old.qcow2'/>
      <target dev='sda' bus='scsi'/>
    </disk>
  </devices>
</domain>"""


def format_version(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def live_style(libvirt: tuple[int, ...], extra: str = "") -> DiskReport:
    """A domain as live_domain builds it: the XML plus the connection's versions."""
    domain = parse_domain_xml(DISK_XML.format(extra=extra))
    domain.qemu_version, domain.libvirt_version = (7, 2, 0), libvirt
    (report,) = audit_domain(domain, HostProbes(local=False), read_images=False)
    return report


def test_libvirt_older_than_driver_discard_blocks_the_block_layer() -> None:
    need = facts.FACTS["libvirt_discard"].libvirt
    assert need is not None
    older = (*need[:-1], need[-1] - 1)
    layer = live_style(older).layer(LayerKind.BLOCK_NODE)
    assert layer.verdict is Verdict.BLOCK
    assert format_version(older) in layer.reason and "discard" in layer.reason
    assert layer.fix is not None and format_version(need) in layer.fix
    current = live_style((9, 0, 0)).layer(LayerKind.BLOCK_NODE)
    assert current.verdict is Verdict.PASS


@pytest.mark.parametrize(
    ("key", "extra"),
    [("detect_zeroes", " detect_zeroes='unmap'"), ("discard_no_unref", " discard_no_unref='on'")],
)
def test_libvirt_older_than_a_driver_attribute_is_a_warning(key: str, extra: str) -> None:
    need = facts.FACTS[key].libvirt
    assert need is not None
    older = (need[0] - 1, 0, 0)
    warned = [
        f
        for f in live_style(older, extra).findings
        if f.severity is Severity.WARNING and format_version(need) in f.message
    ]
    assert len(warned) == 1 and key.split("_")[0] in warned[0].message
    assert not [f for f in live_style(need, extra).findings if "libvirt" in f.message]
    # the setting unused: an old libvirt is not worth a word
    assert not [f for f in live_style(older).findings if f.severity is Severity.WARNING]


def test_a_file_without_a_connection_is_not_judged_by_libvirt_version() -> None:
    domain = parse_domain_xml(DISK_XML.format(extra=""))
    assert domain.libvirt_version is None
    (report,) = audit_domain(domain, HostProbes(local=False), read_images=False)
    assert report.layer(LayerKind.BLOCK_NODE).verdict is Verdict.PASS


def test_shareable_disk_is_exempt_as_fix_leaves_it_alone() -> None:
    xml = DISK_XML.format(extra="").replace(" discard='unmap'", "")
    xml = xml.replace("bus='scsi'/>", "bus='scsi'/><shareable/>")
    (report,) = audit_domain(parse_domain_xml(xml), HostProbes(local=False), read_images=False)
    assert report.layer(LayerKind.BLOCK_NODE).verdict is Verdict.BLOCK  # still shown
    assert report.exempt is not None and "shareable" in report.exempt
    assert not report.blocks
    skip = leave_alone(report.disk)
    assert skip is not None and not skip.blocking and "shareable" in skip.reason
