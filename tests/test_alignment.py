"""The alignment finding and ``trim --explain``'s ``alignment`` cause over model objects:
a domain XML read by vmtrim's parser, real qemu-img images, the guest's partition start
as the sysfs read puts it on the disk (``GuestQueue.partition_start``). The lab proof is
test_alignment_lab.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import qemu_img
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.granularity import granularity_stack, misalignment, offset_text
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.image.info import inspect
from vmtrim.model import Disk, Domain, GuestQueue
from vmtrim.sources.libvirt_xml import parse_domain_file
from vmtrim.trim.engine import DiskRef
from vmtrim.trim.explain import disk_causes, domain_evidence

KiB, MiB = 1 << 10, 1 << 20


def domain(tmp_path: Path, cluster: int, fmt: str = "qcow2") -> tuple[Domain, Path]:
    image = tmp_path / f"d.{fmt}"
    options = ["-o", f"cluster_size={cluster}"] if fmt == "qcow2" else []
    qemu_img("create", "-q", "-f", fmt, *options, image, "64M")
    xml = tmp_path / "dom.xml"
    xml.write_text(
        "<domain type='kvm'><name>d</name><memory>1</memory><os><type>hvm</type></os>"
        "<devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='{fmt}' discard='unmap'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    return parse_domain_file(str(xml)), image


def queue(start: int | None, part: str = "vda1") -> GuestQueue:
    return GuestQueue("vda", 512, 2147450880, 0, True, 0, 0, start, part)


def alignment_findings(dom: Domain) -> list[str]:
    [report] = audit_domain(dom, HostProbes.no_probe())
    return [f.message for f in report.findings if " into a " in f.message]


def with_queue(dom: Domain, q: GuestQueue | None) -> Disk:
    [disk] = dom.disks
    disk.guest_queue = q
    return disk


def test_sector_63_on_64k_clusters_is_a_warning_with_the_measurement(tmp_path: Path) -> None:
    dom, _ = domain(tmp_path, 64 * KiB)
    with_queue(dom, queue(63 * 512))
    [report] = audit_domain(dom, HostProbes.no_probe())
    [finding] = [f for f in report.findings if " into a " in f.message]
    assert finding.severity.value == "warning"
    assert finding.message.startswith(
        "vda1 starts 31.5 KiB into a 64 KiB qcow2 cluster (sector 63): each freed extent"
        " loses up to a cluster at each end; measured: scattered 64 KiB files came back"
    )
    fix, source = finding.fix or "", finding.source or ""
    assert fix.startswith("re-partition with vda1 starting at a multiple of 1 MiB")
    assert "cluster_size" not in fix  # 512 B clusters are no advice
    assert "part_start_show" in source and "measured: " in source


@pytest.mark.parametrize(
    ("cluster", "start", "found"),
    [
        (64 * KiB, 2048 * 512, False),  # fdisk's default: aligned
        (64 * KiB, 0, False),  # a filesystem on the whole disk
        (2 * MiB, 1 * MiB, True),  # 1 MiB-aligned, 2 MiB clusters
        (2 * MiB, 2 * MiB, False),
        (512 * KiB, 63 * 512, True),
    ],
)
def test_only_a_start_off_the_cluster_grid_is_found(
    tmp_path: Path, cluster: int, start: int, found: bool
) -> None:
    dom, _ = domain(tmp_path, cluster)
    with_queue(dom, queue(start))
    assert bool(alignment_findings(dom)) is found


def test_a_smaller_cluster_is_advised_when_the_start_allows_one(tmp_path: Path) -> None:
    dom, image = domain(tmp_path, 2 * MiB)
    disk = with_queue(dom, queue(1 * MiB))
    found = misalignment(disk.guest_queue, granularity_stack(disk, inspect(str(image)), None))
    assert found is not None
    assert (found.offset, found.cluster, found.aligned_cluster) == (MiB, 2 * MiB, MiB)
    assert "cluster_size=1024k" in found.advice()
    assert found.evidence().startswith("vda1 starts 1 MiB into a 2 MiB qcow2 cluster")


def test_no_guest_facts_or_no_cluster_gives_nothing(tmp_path: Path) -> None:
    dom, _ = domain(tmp_path, 64 * KiB)
    with_queue(dom, None)
    assert alignment_findings(dom) == []
    with_queue(dom, queue(None))  # an older guest script: no start read
    assert alignment_findings(dom) == []
    (tmp_path / "raw").mkdir()
    raw, _ = domain(tmp_path / "raw", 0, "raw")
    with_queue(raw, queue(63 * 512))
    assert alignment_findings(raw) == []  # raw has no unit of its own


def test_explain_names_alignment_and_not_the_default_cluster(tmp_path: Path) -> None:
    dom, image = domain(tmp_path, 64 * KiB)
    disk = with_queue(dom, queue(63 * 512))
    refs = {"vda": DiskRef("vda", str(image), str(image))}
    evidence = domain_evidence(dom, refs, None, None, 10.0, local=True)
    causes = disk_causes(evidence.disks["vda"])
    assert [c.id for c in causes] == ["alignment"]
    [cause] = causes
    assert cause.facts == {
        "partition": "vda1",
        "partition_start": 32256,
        "cluster_size": 65536,
        "offset": 32256,
    }
    assert cause.sentence().startswith("vda: alignment: vda1 starts 31.5 KiB into a 64 KiB")
    disk.guest_queue = queue(2048 * 512)
    evidence = domain_evidence(dom, refs, None, None, 10.0, local=True)
    assert [c.id for c in disk_causes(evidence.disks["vda"])] == ["granularity"]


def test_offsets_read_as_an_admin_writes_them() -> None:
    assert [offset_text(n) for n in (512, 32256, 1 << 20, 3 << 19, 7 * 512)] == [
        "512 B",
        "31.5 KiB",
        "1 MiB",
        "1.5 MiB",
        "3.5 KiB",
    ]
