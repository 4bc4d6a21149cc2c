"""Knowledge as data: every row of the fact tables says where it comes from."""

from __future__ import annotations

from vmtrim import facts
from vmtrim.model import Verdict


def test_every_row_has_a_source() -> None:
    rows: list[tuple[str, str]] = []
    rows += [(f.key, f.source) for f in facts.FACTS.values()]
    rows += [(n.key, n.source) for n in facts.NOTES.values()]
    rows += [(b.bus, b.source) for b in facts.BUSES.values()]
    rows += [(p.protocol, p.source) for p in facts.PROTOCOLS.values()]
    rows += [(g.fstype, g.source) for g in facts.GUEST_FS.values()]
    for key, source in rows:
        assert source and source != "-", key


def test_the_issue_facts_are_encoded() -> None:
    virtio = facts.FACTS["virtio_blk_discard"]
    assert (virtio.qemu, virtio.machine) == ((4, 0), (4, 0))
    assert facts.FACTS["virtio_blk_guest"].linux == (5, 0)
    assert facts.FACTS["discard_no_unref"].qemu == (8, 1)
    assert facts.FACTS["detect_zeroes"].libvirt == (2, 0, 0)
    for key in (
        "qcow2_small_discard",
        "qcow2_snapshots",
        "qcow2_compat010",
        "qcow2_overlay",
        "preallocation_lost",
        "ls_size",
    ):
        assert key in facts.NOTES
    assert {"ext4", "xfs", "ext3", "btrfs", "ntfs"} <= set(facts.GUEST_FS)
    assert not facts.GUEST_FS["ext3"].mount_option and facts.GUEST_FS["ext3"].fstrim
    assert {"luks", "lvm"} <= set(facts.GUEST_STACK)
    verdicts = {p: facts.PROTOCOLS[p].verdict for p in ("rbd", "iscsi", "nbd", "gluster", "ssh")}
    assert verdicts == {
        "rbd": Verdict.PASS,
        "iscsi": Verdict.PASS,
        "nbd": Verdict.UNKNOWN,
        "gluster": Verdict.PASS,
        "ssh": Verdict.BLOCK,
    }
    assert all(facts.PROTOCOLS[p].read_only for p in ("http", "https", "ftp"))
