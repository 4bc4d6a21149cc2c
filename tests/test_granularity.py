"""The discard granularity down the stack, over model objects read from real inputs:
libvirt XML and QEMU command lines, qcow2 images made by qemu-img, the real filesystem
the images sit on (statfs) and a real loop device."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import qemu_img, vmtrim
from vmtrim.audit.granularity import (
    LayerGranularity,
    granularity_stack,
    parse_size,
    suggested_device_granularity,
)
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.image.info import ImageInfo, inspect
from vmtrim.model import Disk, GuestQueue
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.sources.qemu_args import parse_qemu_command

DATA = Path(__file__).parent / "data" / "audit"


def image(tmp_path: Path, cluster: str) -> tuple[Path, ImageInfo]:
    path = tmp_path / f"c{cluster}.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, "1G")
    return path, inspect(str(path), follow_backing=False, header_only=True)


def xml_disk(name: str, path: Path) -> Disk:
    """The first disk of a tests/data/audit domain, its image replaced by ``path``."""
    text = (DATA / name).read_text()
    old = text.split("<source file='", 1)[1].split("'", 1)[0]
    return parse_domain_xml(text.replace(old, str(path))).disks[0]


def fs_block(path: Path) -> int:
    """What `stat -f` says is the filesystem's block size (statfs f_bsize)."""
    out = subprocess.run(["stat", "-f", "-c", "%s", str(path)], capture_output=True, text=True)
    return int(out.stdout)


def by_layer(layers: list[LayerGranularity]) -> dict[str, LayerGranularity]:
    return {layer.layer: layer for layer in layers}


def test_scsi_hd_on_2m_clusters(tmp_path: Path) -> None:
    path, info = image(tmp_path, "2M")
    disk = xml_disk("design-scsi.xml", path)
    layers = granularity_stack(disk, info, HostProbes())
    got = by_layer(layers)
    assert [la.layer for la in layers] == ["device", "format", "host"]
    # scsi-hd tells the guest 4 KiB unless set; qemu-img made 2 MiB clusters
    assert (got["device"].bytes, got["device"].measured, got["device"].coarser) == (
        4096,
        False,
        False,
    )
    assert (got["format"].bytes, got["format"].measured, got["format"].coarser) == (
        2 << 20,
        True,
        True,
    )
    assert got["host"].bytes == fs_block(path)
    assert got["host"].coarser is False  # a 4 KiB ext4 block under 2 MiB clusters
    assert suggested_device_granularity(layers) == 2 << 20


def test_virtio_with_guest_queue_and_64k(tmp_path: Path) -> None:
    path, info = image(tmp_path, "64K")
    disk = xml_disk("zoo.xml", path)
    assert disk.qemu_device and disk.qemu_device.startswith("virtio-blk")
    disk.guest_queue = GuestQueue("vda", discard_granularity=512, discard_max_bytes=1 << 30)
    layers = granularity_stack(disk, info, HostProbes())
    assert [(la.layer, la.bytes, la.coarser) for la in layers[:3]] == [
        ("guest", 512, False),
        ("device", 512, False),
        ("format", 64 << 10, True),
    ]
    assert layers[0].measured and not layers[1].measured
    assert suggested_device_granularity(layers) == 64 << 10


def test_ide_cannot_change(tmp_path: Path) -> None:
    path, info = image(tmp_path, "64K")
    disk = xml_disk("design-ide.xml", path)
    layers = granularity_stack(disk, info, HostProbes())
    assert by_layer(layers)["format"].coarser
    assert by_layer(layers)["device"].bytes == 512
    assert suggested_device_granularity(layers) is None  # ide-hd takes 512 only


def test_device_property_matches_cluster(tmp_path: Path) -> None:
    path, info = image(tmp_path, "64K")
    argv = (
        f"qemu-system-x86_64 -machine pc-q35-7.2 -drive file={path},if=none,id=d0,"
        "format=qcow2,discard=unmap -device virtio-blk-pci,drive=d0,discard_granularity=64K"
    )
    disk = parse_qemu_command(argv).disks[0]
    layers = granularity_stack(disk, info, HostProbes())
    got = by_layer(layers)
    assert (got["device"].bytes, got["device"].measured) == (64 << 10, True)
    assert not got["format"].coarser
    assert suggested_device_granularity(layers) is None


def test_no_image_no_probe(tmp_path: Path) -> None:
    """--no-probe: no host layers; an unread qcow2 is its documented default cluster."""
    disk = xml_disk("design-scsi.xml", tmp_path / "missing.qcow2")
    disk.format = "qcow2"
    layers = granularity_stack(disk, None, HostProbes.no_probe())
    assert [(la.layer, la.bytes, la.measured) for la in layers] == [
        ("device", 4096, False),
        ("format", 64 << 10, False),
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), (65536, 65536), ("32K", 32 << 10), ("2M", 2 << 20), (4294967295, None)],
)
def test_parse_size(text: object, value: int | None) -> None:
    assert parse_size(text) == value


@pytest.fixture()
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "loop.raw"
    with backing.open("wb") as f:
        f.truncate(64 << 20)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_raw_on_a_loop_device(loop_device: str) -> None:
    xml = (DATA / "design-scsi.xml").read_text()
    xml = xml.replace("<disk type='file'", "<disk type='block'").replace(
        "<source file='/tmp/scsidisk.qcow2'/>",
        f"<driver name='qemu' type='raw' discard='unmap'/><source dev='{loop_device}'/>",
    )
    disk = parse_domain_xml(xml).disks[0]
    layers = granularity_stack(disk, None, HostProbes())
    lsblk = subprocess.run(
        ["lsblk", "-bndo", "DISC-GRAN", loop_device], capture_output=True, text=True, check=True
    )
    host = by_layer(layers)["host"]
    assert host.what.startswith("loop")
    assert host.bytes == int(lsblk.stdout)


def scsi_xml(tmp_path: Path, cluster: str) -> Path:
    """design-scsi.xml with discard on and its image a real qcow2 of ``cluster`` here."""
    path, _ = image(tmp_path, cluster)
    text = (DATA / "design-scsi.xml").read_text().replace("/tmp/scsidisk.qcow2", str(path))
    text = text.replace(
        "<source file=", "<driver name='qemu' type='qcow2' discard='unmap'/><source file="
    )
    out = tmp_path / "domain.xml"
    out.write_text(text)
    return out


def test_audit_json_and_text_show_the_stack(tmp_path: Path) -> None:
    xml = scsi_xml(tmp_path, "2M")
    done = vmtrim("audit", "--json", "--xml", str(xml))
    assert done.returncode in (0, 1), done.stderr
    (disk,) = json.loads(done.stdout)["disks"]
    assert [(g["layer"], g["bytes"], g["coarser"]) for g in disk["granularity"]] == [
        ("device", 4096, False),
        ("format", 2 << 20, True),
        ("host", fs_block(tmp_path), False),
    ]
    (coarse,) = [f for f in disk["findings"] if "coarser" in f["message"]]
    assert coarse["severity"] == "warning" and coarse["layer"] == "block_node"
    assert "cluster_size=64k" in coarse["fix"] and "--discard-granularity auto" in coarse["fix"]
    assert "bench_granularity" in coarse["source"]
    # the generic "smaller than a cluster" note gave way to the measured one
    assert not [f for f in disk["findings"] if "smaller than a qcow2 cluster" in f["message"]]
    text = vmtrim("audit", "--xml", str(xml), env={**os.environ, "COLUMNS": "200"})
    assert (
        "granularity: device 4 KiB (default) -> qcow2 2 MiB (coarser)"
        f" -> {fs_type(tmp_path)} {fs_block(tmp_path) >> 10} KiB" in text.stdout
    ), text.stdout


def test_64k_cluster_under_a_4k_device_is_only_info(tmp_path: Path) -> None:
    done = vmtrim("audit", "--json", "--no-probe", "--xml", str(scsi_xml(tmp_path, "64K")))
    (disk,) = json.loads(done.stdout)["disks"]
    (coarse,) = [f for f in disk["findings"] if "coarser" in f["message"]]
    assert coarse["severity"] == "info"
    assert [g["layer"] for g in disk["granularity"]] == ["device", "format"]  # --no-probe


def fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return {"ext2/ext3": "ext4"}.get(out.stdout.strip(), out.stdout.strip())


def test_rbd_disk_without_the_rbd_tool_is_the_documented_default() -> None:
    """No ceph here: rbd info cannot answer, so the object size is the 4 MiB default."""
    disk = next(
        d for d in parse_domain_xml((DATA / "zoo.xml").read_bytes()).disks if d.protocol == "rbd"
    )
    layers = granularity_stack(disk, None, HostProbes())
    pool = by_layer(layers)["pool"]
    assert (pool.bytes, pool.measured, pool.coarser) == (4 << 20, False, True)
    assert "rbdpool/zoo-disk" in pool.what
    assert suggested_device_granularity(layers) == 4 << 20


def test_extended_l2_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ext.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=128K,extended_l2=on", path, "1G")
    info = inspect(str(path), follow_backing=False, header_only=True)
    layers = granularity_stack(xml_disk("design-scsi.xml", path), info, HostProbes.no_probe())
    fmt = by_layer(layers)["format"]
    assert fmt.bytes == 128 << 10 and "extended_l2" in fmt.what
