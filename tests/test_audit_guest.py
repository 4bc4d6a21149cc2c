"""The guest layers, filled the way a live audit fills them (guest agent facts in the model)."""

from __future__ import annotations

import pytest

from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.model import Domain, GuestFilesystem, GuestInfo, LayerKind, Verdict
from vmtrim.sources.libvirt_xml import parse_domain_xml

XML = """<domain><name>g</name><os><type machine='pc-q35-7.2'>hvm</type></os><devices>
<disk type='file'><driver name='qemu' type='raw' discard='unmap'/><source file='/x.img'/>
<target dev='{dev}' bus='{bus}'/></disk></devices></domain>"""


def layers(
    bus: str, guest: GuestInfo | None, filesystems: list[GuestFilesystem] | None
) -> tuple[Verdict, Verdict, str]:
    domain: Domain = parse_domain_xml(XML.format(dev="vda" if bus == "virtio" else "sda", bus=bus))
    domain.guest = guest
    domain.disks[0].guest_filesystems = filesystems
    (report,) = audit_domain(domain, HostProbes(local=False), read_images=False)
    fs = report.layer(LayerKind.GUEST_FS)
    return fs.verdict, report.layer(LayerKind.GUEST_DRIVER).verdict, fs.reason


LINUX_6 = GuestInfo(os_id="linux", kernel_release="6.1.0-26-cloud-amd64", fstrim_timer=False)
LINUX_4 = GuestInfo(os_id="linux", kernel_release="4.19.0-27-amd64", fstrim_timer=True)


def test_no_guest_information_is_unknown() -> None:
    fs, driver, reason = layers("virtio", None, None)
    assert (fs, driver) == (Verdict.UNKNOWN, Verdict.UNKNOWN)
    assert "guest agent" in reason


def test_no_agent_says_why() -> None:
    fs, _, reason = layers("scsi", GuestInfo(agent=False, reason="agent not responding"), None)
    assert (fs, reason) == (Verdict.UNKNOWN, "agent not responding")


@pytest.mark.parametrize(
    ("fs", "guest", "expected"),
    [
        (GuestFilesystem("/", "ext4", ("rw", "relatime", "discard")), LINUX_6, Verdict.PASS),
        (GuestFilesystem("/", "ext4", ("rw", "relatime")), LINUX_6, Verdict.BLOCK),
        (GuestFilesystem("/", "ext4", ("rw",)), LINUX_4, Verdict.PASS),  # fstrim.timer
        # the ext4 driver mounts ext3 and honours -o discard from 6.1 (DESIGN.md, measured)
        (GuestFilesystem("/srv", "ext3", ("rw", "discard")), LINUX_6, Verdict.PASS),
        (
            GuestFilesystem("/srv", "ext3", ("rw", "discard")),
            GuestInfo(os_id="linux", kernel_release="5.10.0", fstrim_timer=False),
            Verdict.BLOCK,
        ),
        (GuestFilesystem("/data", "btrfs", ("rw",)), LINUX_6, Verdict.BLOCK),  # 6.1 < 6.2
        (
            GuestFilesystem("/data", "btrfs", ("rw",)),
            GuestInfo(os_id="linux", kernel_release="6.2.0", fstrim_timer=False),
            Verdict.PASS,
        ),
        (
            GuestFilesystem("/data", "btrfs", ("rw", "nodiscard")),
            GuestInfo(os_id="linux", kernel_release="6.5.0", fstrim_timer=False),
            Verdict.BLOCK,
        ),
        (
            GuestFilesystem("/", "xfs", None),
            GuestInfo(os_id="linux", kernel_release="6.1"),
            Verdict.UNKNOWN,
        ),
        (GuestFilesystem("/", "zfs", ("rw",)), LINUX_6, Verdict.UNKNOWN),
    ],
)
def test_guest_filesystems(fs: GuestFilesystem, guest: GuestInfo, expected: Verdict) -> None:
    assert layers("scsi", guest, [fs])[0] is expected


def test_windows_trims_by_itself() -> None:
    fs, _, reason = layers("scsi", GuestInfo(os_id="mswindows"), None)
    assert fs is Verdict.PASS and "Windows" in reason


def test_worst_filesystem_on_the_disk_wins() -> None:
    filesystems = [
        GuestFilesystem("/", "ext4", ("discard",)),
        GuestFilesystem("/srv", "ext3", ("rw",)),
    ]
    fs, _, reason = layers("scsi", LINUX_6, filesystems)
    assert fs is Verdict.BLOCK and "/srv (ext3)" in reason


def test_virtio_blk_needs_linux_5() -> None:
    ok = GuestFilesystem("/", "ext4", ("discard",))
    assert layers("virtio", LINUX_6, [ok])[1] is Verdict.PASS
    assert layers("virtio", LINUX_4, [ok])[1] is Verdict.BLOCK
    assert layers("scsi", LINUX_4, [ok])[1] is Verdict.PASS
