"""The discard granularity at each layer of a disk, from the guest down to the host pool.

A discard frees space at a layer only when it covers that layer's unit whole: a qcow2
cluster, a dm-thin chunk, an RBD object, a zvol block. :func:`granularity_stack` lists,
top first, what each layer's unit is:

=========  ==================================================================
layer      what
=========  ==================================================================
guest      the guest kernel's ``queue/discard_granularity`` (``Disk.guest_queue``)
device     what the QEMU device tells the guest: its ``discard_granularity`` property,
           else QEMU's default for that device model
format     the qcow2 cluster (raw has no unit of its own and is left out)
host       the host filesystem's block (statfs ``f_bsize``), or a host block device's
           ``queue/discard_granularity`` (loop, dm, md, a disk)
pool       a dm-thin chunk, an RBD object or krbd's ``alloc_size``, a zvol's
           ``volblocksize``
=========  ==================================================================

``measured`` is True for a value read from the running system or from the disk's
configuration (a property that is set), False for a documented default. ``coarser`` marks
a layer whose unit is larger than the largest above it: discards the layers above send
may be smaller than it, and those free nothing there (or only part).

QEMU 7.2's defaults for what the guest is told (``discard_granularity`` is -1 unless set):

- virtio-blk: the logical block size, 512 B (hw/block/virtio-blk.c
  ``virtio_blk_update_config``: -1, or ``report-discard-granularity=off``, report
  ``blk_size``);
- scsi-hd: ``MAX(logical_block_size, DEFAULT_DISCARD_GRANULARITY)``, 4 KiB
  (hw/scsi/scsi-disk.c ``scsi_realize``);
- ide-hd: 512 B, and nothing else is allowed (hw/ide/qdev.c ``ide_dev_initfn``:
  "discard_granularity must be 512 for ide");
- nvme: ``MAX(logical_block_size, MIN_DISCARD_GRANULARITY)``, 4 KiB (hw/nvme/ns.c);
- ``backend_defaults=on``: the backend's ``pdiscard_alignment`` (the qcow2 cluster)
  instead (hw/block/block.c ``blkconf_blocksizes``); the default ``auto`` does not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmtrim.facts import FACTS, NOTES
from vmtrim.model import (
    DeviceType,
    Disk,
    Finding,
    GranularityLayer,
    GuestQueue,
    LayerGranularity,
    LayerKind,
    Severity,
    StorageKind,
)
from vmtrim.storage import rbd, zfs
from vmtrim.storage.block import StorageLayer
from vmtrim.storage.mounts import mount_of, parse_mountinfo
from vmtrim.storage.runner import LocalRunner

if TYPE_CHECKING:
    from vmtrim.audit.hostprobe import HostProbes
    from vmtrim.image.info import ImageInfo

__all__ = [
    "GranularityLayer",
    "LayerGranularity",
    "Misalignment",
    "granularity_stack",
    "misalignment",
    "suggested_device_granularity",
]

QCOW2_DEFAULT_CLUSTER = 64 << 10  # qemu-img create's default (docs/interop/qcow2.txt)
_UNSET = (-1, 0xFFFFFFFF)  # QEMU's "not set" (-1 as uint32, as `-device X,help` shows it)
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: object) -> int | None:
    """A QEMU size property (4096, "4096", "32K", "1M"); None when unset or not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if value in _UNSET or value < 0 else value
    text = str(value).strip().lower().removesuffix("b").removesuffix("i")
    scale = _SUFFIX.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in _SUFFIX else text
    if not digits.isdigit() or len(digits) > 20:
        return None
    number = int(digits) * scale
    return None if number in _UNSET else number


def size_text(n: int) -> str:
    """65536 -> '64 KiB'; 512 -> '512 B'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def granularity_stack(
    disk: Disk, image: ImageInfo | None, host: HostProbes | None
) -> list[LayerGranularity]:
    """The discard unit of every layer of ``disk`` that vmtrim can tell, top first.

    ``host`` reads the host's storage (statfs, sysfs, dmsetup, zfs, rbd) through its
    runner; None or a probe that is off (``--no-probe``, a remote host) leaves the host
    and pool layers out. Empty for a cdrom, an empty or a read-only drive.
    """
    if disk.device is DeviceType.CDROM or disk.storage is StorageKind.NONE or disk.read_only:
        return []  # nothing is discarded there
    layers: list[LayerGranularity] = []
    queue = disk.guest_queue
    if queue is not None and queue.discard_granularity is not None:
        layers.append(
            LayerGranularity(
                "guest",
                f"{queue.device} queue/discard_granularity",
                queue.discard_granularity,
                True,
            )
        )
    device = _device_layer(disk, image)
    if device is not None:
        layers.append(device)
    cluster = _format_layer(disk, image)
    if cluster is not None:
        layers.append(cluster)
    if host is not None and host.local:
        layers += _host_layers(disk, host)
    return _mark_coarser(layers)


def _mark_coarser(layers: list[LayerGranularity]) -> list[LayerGranularity]:
    out: list[LayerGranularity] = []
    above: int | None = None
    for layer in layers:
        coarser = layer.bytes is not None and above is not None and layer.bytes > above
        out.append(
            LayerGranularity(
                layer.layer,
                layer.what,
                layer.bytes,
                layer.measured,
                coarser,
                layer.fixed,
                layer.source,
            )
        )
        if layer.bytes is not None:
            above = layer.bytes if above is None else max(above, layer.bytes)
    return out


def _device_layer(disk: Disk, image: ImageInfo | None) -> LayerGranularity | None:
    name = disk.qemu_device
    if name is None or name in ("scsi-block", "scsi-generic"):
        return None  # passthrough: the host device's own limits reach the guest
    props = disk.device_properties
    what = f"{name} discard_granularity"
    ide = name.startswith("ide-")
    logical = parse_size(props.get("logical_block_size")) or 512
    if "discard_granularity" in props:
        value = parse_size(props["discard_granularity"])
        if value == 0 and name.startswith("virtio-blk"):
            # alignment 0 on the wire: Linux virtio_blk uses the logical block size
            return LayerGranularity("device", f"{what}=0 (the logical block size)", logical, True)
        if value == 0:
            return None  # scsi-hd and ide-hd turn discard off: the device layer says so
        if value is not None:
            return LayerGranularity("device", what, value, True, fixed=ide)
    backend = str(props.get("backend_defaults", "auto")).lower() == "on"
    if backend and image is not None and image.format == "qcow2" and image.cluster_size:
        return LayerGranularity(
            "device",
            f"{what} (backend_defaults=on: the qcow2 cluster)",
            int(image.cluster_size),
            True,
            source="qemu hw/block/block.c blkconf_blocksizes (backend_defaults)",
        )
    if name.startswith("virtio-blk"):
        return LayerGranularity(
            "device",
            f"{what} (QEMU's default: the logical block size)",
            logical,
            False,
            source="qemu hw/block/virtio-blk.c virtio_blk_update_config",
        )
    if name in ("scsi-hd", "scsi-disk", "usb-storage", "usb-bot") or name.startswith("nvme"):
        src = (
            "qemu hw/nvme/ns.c (MIN_DISCARD_GRANULARITY)"
            if name.startswith("nvme")
            else "qemu hw/scsi/scsi-disk.c scsi_realize (DEFAULT_DISCARD_GRANULARITY)"
        )
        return LayerGranularity(
            "device", f"{what} (QEMU's default)", max(logical, 4096), False, source=src
        )
    if ide:
        return LayerGranularity(
            "device",
            f"{what} (IDE: always 512 B)",
            512,
            False,
            fixed=True,
            source="qemu hw/ide/qdev.c ide_dev_initfn",
        )
    return None


def _format_layer(disk: Disk, image: ImageInfo | None) -> LayerGranularity | None:
    if image is not None and image.format == "qcow2" and image.cluster_size:
        if image.features.get("extended_l2"):
            # QEMU 7.2 frees whole clusters (qcow2_refresh_limits: pdiscard_alignment =
            # cluster_size); qemu-devel patches that discard 1/32 subclusters are not in it
            what = "qcow2 cluster (extended_l2; QEMU 7.2 still frees whole clusters)"
        else:
            what = "qcow2 cluster"
        return LayerGranularity("format", what, int(image.cluster_size), True)
    # a file the audit did not read has qemu-img's default; a pool volume or a network
    # image may have been made by anything, so its cluster is left unknown
    if image is None and disk.format == "qcow2" and disk.storage is StorageKind.FILE:
        return LayerGranularity(
            "format",
            "qcow2 cluster (the default; the image was not read)",
            QCOW2_DEFAULT_CLUSTER,
            False,
            source="docs/interop/qcow2.txt (cluster_bits default 16)",
        )
    return None


def _host_layers(disk: Disk, host: HostProbes) -> list[LayerGranularity]:
    source = disk.source
    if not source:
        return []
    if disk.storage is StorageKind.FILE:
        return _file_layers(source, host)
    if disk.storage is StorageKind.BLOCK:
        return _block_layers(source, host)
    if disk.storage is StorageKind.NETWORK and disk.protocol == "rbd":
        return _rbd_layers(source, host)
    return []


def _file_layers(path: str, host: HostProbes) -> list[LayerGranularity]:
    target = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
    try:
        fs = os.statvfs(target)
        st_dev = os.stat(target).st_dev
    except OSError:
        return []
    mounts = parse_mountinfo(host.runner.read("/proc/self/mountinfo") or "")
    mount = mount_of(mounts, os.path.realpath(target), st_dev)
    fstype = mount.fstype if mount else "filesystem"
    layers = [LayerGranularity("host", f"{fstype} block", int(fs.f_bsize), True)]
    if mount is not None and mount.source.startswith("/dev/"):
        probe = host.filesystem_device(mount)
        layers += _storage_layers(probe.layers)
    return layers


def _block_layers(path: str, host: HostProbes) -> list[LayerGranularity]:
    if isinstance(host.runner, LocalRunner) and not os.path.exists(path):
        return []  # not on this host: no stat, dmsetup or zfs to run
    dataset = zfs.dataset_of(path)
    if dataset is not None:
        vol, _why = host.zvol(dataset)
        if vol is not None and vol.volblocksize:
            return [
                LayerGranularity("pool", f"zvol {dataset} volblocksize", vol.volblocksize, True)
            ]
    return _storage_layers(tuple(host.stack(path).layers))


def _storage_layers(layers: tuple[StorageLayer, ...]) -> list[LayerGranularity]:
    out: list[LayerGranularity] = []
    for layer in layers:
        if layer.kind == "file" or layer.granularity is None:
            continue
        if layer.kind == "dm-thin":
            pool = layer.facts.get("pool", layer.name)
            out.append(
                LayerGranularity("pool", f"dm-thin chunk (pool {pool})", layer.granularity, True)
            )
        elif layer.name.startswith("rbd"):
            out.append(
                LayerGranularity(
                    "pool",
                    f"{layer.name} krbd alloc_size (discard_granularity)",
                    layer.granularity,
                    True,
                )
            )
        else:
            out.append(
                LayerGranularity(
                    "host", f"{layer.name} queue/discard_granularity", layer.granularity, True
                )
            )
    return out


def _rbd_layers(source: str, host: HostProbes) -> list[LayerGranularity]:
    name = rbd.image_of(source)
    if name is None:
        return []
    image = host.rbd_image(name)
    what = f"RBD object ({name})" if image.measured else f"RBD object ({name}, the default)"
    return [
        LayerGranularity(
            "pool",
            what,
            image.object_size,
            image.measured,
            source=None if image.measured else "rbd(8) --object-size (default 4 MiB)",
        )
    ]


def suggested_device_granularity(layers: list[LayerGranularity]) -> int | None:
    """The ``discard_granularity`` to give the device so the guest sends discards in the
    unit the layers below free: the largest coarser unit below the device.

    None when nothing is to change: no device layer, a device that cannot change it (IDE),
    nothing below coarser than what the guest is told, or a unit that is not a power of
    two (the Linux block layer rounds discards with power-of-two masks).
    """
    index = next((i for i, layer in enumerate(layers) if layer.layer == "device"), None)
    if index is None or layers[index].fixed:
        return None
    above = [la.bytes for la in layers[: index + 1] if la.bytes is not None]
    below = [la.bytes for la in layers[index + 1 :] if la.bytes is not None and la.coarser]
    if not below:
        return None
    want = max(below)
    if above and want <= max(above):
        return None
    if want & (want - 1):
        return None
    return want


def _label(layer: LayerGranularity) -> str:
    if layer.layer in ("guest", "device"):
        return layer.layer
    first = layer.what.split()[0]
    return {"RBD": "RBD object", "zvol": "zvol"}.get(first, first)


def describe_stack(layers: list[LayerGranularity]) -> str | None:
    """One line for the text output: ``guest 512 B -> qcow2 64 KiB (coarser) -> ...``;
    None when fewer than two layers' units are known."""
    parts = []
    if sum(1 for layer in layers if layer.bytes is not None) < 2:
        return None  # one layer alone is no stack
    for layer in layers:
        if layer.bytes is None:
            continue
        tags = [t for t, on in (("default", not layer.measured), ("coarser", layer.coarser)) if on]
        parts.append(
            f"{_label(layer)} {size_text(layer.bytes)}" + (f" ({', '.join(tags)})" if tags else "")
        )
    return " -> ".join(parts) if parts else None


_KIND = {
    "guest": LayerKind.GUEST_DRIVER,
    "device": LayerKind.DEVICE,
    "format": LayerKind.BLOCK_NODE,
    "host": LayerKind.HOST_STORAGE,
    "pool": LayerKind.HOST_STORAGE,
}
#: above this a coarse unit costs the frees of ordinary small files (measured, facts row)
_WARN_ABOVE = 64 << 10


def _advice(layer: LayerGranularity, suggested: int | None) -> str:
    """What the lab measured helps (FACTS["granularity_cost"].checked has the figures)."""
    unit = layer.bytes or 0
    parts = []
    if layer.layer == "format" and unit > QCOW2_DEFAULT_CLUSTER:
        parts.append(
            "make the clusters smaller: `qemu-img convert -O qcow2 -o cluster_size=64k OLD NEW`"
            " with the VM off (scattered 64 KiB files came back 95 % on 64 KiB clusters, 0 % on"
            " 512 KiB and 2 MiB)"
        )
    measured = (
        "4 KiB files on 64 KiB clusters: 98 % with fstrim, 39 % online"
        if unit <= _WARN_ABOVE
        else "64 KiB files on 2 MiB clusters: 88 % with fstrim, 0 % online"
    )
    parts.append(
        "trim with fstrim (fstrim.timer) rather than online discard: files deleted one by one"
        f" come back once their free space covers whole units ({measured})"
    )
    if layer.layer == "pool":
        parts.append(f"or a smaller {layer.what.split(' (')[0]} when you create the next one")
    if suggested and unit > _WARN_ABOVE:
        parts.append(
            f"`vmtrim fix --discard-granularity auto` ({size_text(suggested)}) spares the guest"
            " discards that free nothing here, but frees no more (measured: the same bytes)"
        )
    return "; ".join(parts)


def granularity_findings(layers: list[LayerGranularity]) -> list[Finding]:
    """One finding for each coarser layer, with the advice the lab measurement supports."""
    fact = FACTS["granularity_cost"]
    suggested = suggested_device_granularity(layers)
    findings = []
    above = 0
    for layer in layers:
        if layer.coarser and layer.bytes is not None:
            findings.append(
                Finding(
                    Severity.WARNING if layer.bytes > _WARN_ABOVE else Severity.INFO,
                    _KIND[layer.layer],
                    f"{layer.what} is {size_text(layer.bytes)}, coarser than the"
                    f" {size_text(above)} above it: a discard frees space here only where it"
                    f" covers whole {size_text(layer.bytes)} units",
                    _advice(layer, suggested),
                    f"{fact.source}; measured: {fact.checked}",
                )
            )
        if layer.bytes is not None:
            above = max(above, layer.bytes)
    return findings


@dataclass(frozen=True)
class Misalignment:
    """A guest partition that starts part-way into a qcow2 cluster."""

    partition: str  # the guest's name: vda1
    start: int  # bytes from the disk's start
    cluster: int  # the format layer's unit
    cluster_what: str  # "qcow2 cluster", or its default when the image was not read

    @property
    def offset(self) -> int:
        """How far into a cluster the partition starts."""
        return self.start % self.cluster

    @property
    def aligned_cluster(self) -> int:
        """The largest cluster the start is a multiple of (a power of two, 512 B up)."""
        return self.start & -self.start

    def evidence(self) -> str:
        measured = ALIGNMENT_MEASURED.get(self.cluster)
        return (
            f"{self.partition} starts {offset_text(self.offset)} into a"
            f" {size_text(self.cluster)} {self.cluster_what} (sector {self.start // 512}):"
            " each freed extent loses up to a cluster at each end"
            + (f"; measured: {measured}" if measured else "")
        )

    def advice(self) -> str:
        parts = [
            f"re-partition with {self.partition} starting at a multiple of 1 MiB and of the"
            f" {size_text(self.cluster)} cluster (parted -a optimal, fdisk's default start"
            " 2048; the data must be moved, as when restoring from a backup)"
        ]
        smaller = self.aligned_cluster
        if smaller >= QCOW2_DEFAULT_CLUSTER:
            parts.append(
                f"or make the clusters {size_text(smaller)}, which the start is a multiple of:"
                f" `qemu-img convert -O qcow2 -o cluster_size={smaller // 1024}k OLD NEW` with"
                " the VM off"
            )
        return "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "partition_start": self.start,
            "cluster_size": self.cluster,
            "offset": self.offset,
        }


#: cluster -> what the lab measured for partitions off and on it (FACTS["alignment_cost"])
ALIGNMENT_MEASURED = {
    64 << 10: "scattered 64 KiB files came back 0.4 % at sector 63, 100 % at sector 2048",
    2 << 20: "scattered 2 MiB files came back 8.3 % from a 1 MiB start, 100 % from 2 MiB",
}


def offset_text(n: int) -> str:
    """32256 -> '31.5 KiB'; 1048576 -> '1 MiB'; 512 -> '512 B'."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.6g} {unit}"
    return f"{n} B"


def misalignment(queue: GuestQueue | None, layers: list[LayerGranularity]) -> Misalignment | None:
    """The guest partition under a disk's filesystem (its ``guest_queue``), when it starts
    part-way into the qcow2 cluster (the granularity stack's format layer); None when
    aligned or unknown."""
    if queue is None or queue.partition_start is None:
        return None
    cluster = next((la for la in layers if la.layer == "format" and la.bytes), None)
    if cluster is None or cluster.bytes is None or queue.partition_start % cluster.bytes == 0:
        return None
    what = cluster.what if cluster.measured else f"{cluster.what.split(' (')[0]} (the default)"
    return Misalignment(queue.partition or queue.device, queue.partition_start, cluster.bytes, what)


def alignment_finding(disk: Disk, layers: list[LayerGranularity]) -> Finding | None:
    """A warning for a guest partition that is not aligned to the qcow2 cluster."""
    found = misalignment(disk.guest_queue, layers)
    if found is None:
        return None
    fact = FACTS["alignment_cost"]
    return Finding(
        Severity.WARNING,
        LayerKind.BLOCK_NODE,
        found.evidence(),
        found.advice(),
        f"{fact.source}; measured: {fact.checked}",
    )


def with_granularity(
    findings: list[Finding], layers: list[LayerGranularity], disk: Disk | None = None
) -> list[Finding]:
    """``findings`` and the coarser layers' findings, and (with the disk's guest facts)
    a misaligned partition's; a coarser qcow2 cluster's finding replaces the generic note
    about discards smaller than a cluster."""
    extra = granularity_findings(layers)
    if any(la.layer == "format" and la.coarser for la in layers):
        generic = NOTES["qcow2_small_discard"].source
        findings = [f for f in findings if f.source != generic]
    aligned = alignment_finding(disk, layers) if disk is not None else None
    return findings + extra + ([aligned] if aligned is not None else [])
