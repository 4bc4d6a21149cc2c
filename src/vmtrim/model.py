"""The discard-path model: what a disk is made of, and what the audit says about it.

Every input (libvirt domain XML, a QEMU command line, a running QEMU, a live libvirt
connection with guest-agent facts) is turned into the same objects:

::

    Domain                      one VM: name, machine type, versions, guest facts
     +-- Disk                   one guest-visible drive (disk, cdrom, lun, floppy)
          +-- BlockNode         the QEMU node the device points at (format node) ...
               +-- file         ... its protocol child (file, host_device, rbd, ...)
               +-- backing      ... and the backing chain (overlays)

The audit (:mod:`vmtrim.audit.engine`) walks a disk through five layers, top to bottom:

==============  ===========================================================
LayerKind       question
==============  ===========================================================
guest_fs        does the guest filesystem issue discards (mount -o discard, fstrim)?
guest_driver    does the guest's driver for this bus send TRIM/UNMAP/DISCARD?
device          does the emulated QEMU device accept them (machine type, properties)?
block_node      does every QEMU block node on the path have discard=unmap?
host_storage    can the host file punch holes / the block device or network discard?
==============  ===========================================================

Each layer gets a :class:`Verdict` and the disk's verdict is the worst of them
(``block`` > ``unknown`` > ``pass``). The model is plain data: it never reads
files or talks to QEMU, so every producer and consumer can share it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from vmtrim._util.versions import Version, machine_version, parse_version

NodeKind = Literal["-drive", "-blockdev", "<disk>", "<backingStore>", "qmp"]

# -- closed vocabularies: every producer narrows its text through as_* below ----------

Discard = Literal["unmap", "ignore"]
"""A node's discard setting, normalised (QEMU's on/off are unmap/ignore)."""
DiskDiscard = Discard | Literal["unknown"]
"""A disk's discard: ``unknown`` for a node seen only over QMP, which does not show it."""
Bus = Literal["ide", "sata", "scsi", "virtio", "usb", "fdc", "nvme", "xen", "uml", "sd"]
"""libvirt's ``<target bus=...>`` names (QEMU's devices are mapped onto them)."""
Format = Literal[
    "raw", "qcow2", "qcow", "qed", "luks", "vmdk", "vdi", "vpc", "vhdx", "parallels",
    "bochs", "cloop", "dmg", "iso", "ploop", "fat",
    # filter drivers that may sit on top of the format node and pass discards on
    "copy-on-read", "throttle", "blkdebug", "blkverify", "preallocate", "compress",
    "snapshot-access", "copy-before-write", "quorum", "replication", "null-co", "null-aio",
    "raw-slice",
]  # fmt: skip
"""Image format (or filter) drivers: libvirt's ``<driver type=...>``, QEMU's format=."""
DiskFormat = Format | Literal["unknown"]
"""A disk's format: ``unknown`` when the input names a driver vmtrim does not know."""

BUSES: tuple[Bus, ...] = get_args(Bus)
FORMATS: tuple[Format, ...] = get_args(Format)


def as_discard(text: object) -> Discard | None:
    """QEMU's and libvirt's spellings (on/unmap, off/ignore); None for unset or invalid."""
    value = str(text).lower() if text is not None else None
    if value in ("on", "unmap"):
        return "unmap"
    if value in ("off", "ignore"):
        return "ignore"
    return None


def as_bus(text: str | None) -> Bus | None:
    return next((bus for bus in BUSES if bus == text), None)


def as_format(text: str | None) -> DiskFormat | None:
    """None when no format is given; ``unknown`` for a name outside the vocabulary."""
    if text is None:
        return None
    return next((fmt for fmt in FORMATS if fmt == text), "unknown")


class Verdict(enum.Enum):
    """A layer's (or a disk's) answer. Ordered: ``worst()`` picks block over unknown over pass."""

    PASS = "pass"
    UNKNOWN = "unknown"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        return _VERDICT_RANK[self]

    @staticmethod
    def worst(verdicts: Iterable[Verdict]) -> Verdict:
        """The worst of an iterable of verdicts; ``PASS`` for an empty one."""
        result = Verdict.PASS
        for verdict in verdicts:
            if verdict.rank > result.rank:
                result = verdict
        return result


_VERDICT_RANK = {Verdict.PASS: 0, Verdict.UNKNOWN: 1, Verdict.BLOCK: 2}


class LayerKind(enum.Enum):
    """The layers of the discard path, in order from the guest down to the host."""

    GUEST_FS = "guest_fs"
    GUEST_DRIVER = "guest_driver"
    DEVICE = "device"
    BLOCK_NODE = "block_node"
    HOST_STORAGE = "host_storage"

    @property
    def is_config(self) -> bool:
        """True for the layers that libvirt XML or the QEMU command line decide.

        ``vmtrim fix`` can change these; the guest and the host storage it cannot.
        """
        return self in (LayerKind.DEVICE, LayerKind.BLOCK_NODE)


class Severity(enum.Enum):
    """How much a finding matters. ``block`` findings explain a blocking layer."""

    INFO = "info"
    WARNING = "warning"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        return {Severity.INFO: 0, Severity.WARNING: 1, Severity.BLOCK: 2}[self]


class DeviceType(enum.Enum):
    """What the guest sees (libvirt's ``<disk device=...>``)."""

    DISK = "disk"
    CDROM = "cdrom"
    LUN = "lun"
    FLOPPY = "floppy"


class StorageKind(enum.Enum):
    """Where the bytes live on the host (libvirt's ``<disk type=...>``, or the protocol node)."""

    FILE = "file"
    BLOCK = "block"
    NETWORK = "network"
    VOLUME = "volume"  # a storage-pool volume: resolved only through a libvirt connection
    DIR = "dir"  # a host directory shown as a FAT disk (vvfat)
    NVME = "nvme"  # a host NVMe controller driven by QEMU's userspace driver
    VHOSTUSER = "vhostuser"  # a vhost-user-blk backend outside QEMU's block layer
    NONE = "none"  # an empty drive (a cdrom with no media)
    UNKNOWN = "unknown"


class Origin(enum.Enum):
    """Where the domain came from; decides how a fix is phrased."""

    LIBVIRT_XML = "libvirt-xml"
    QEMU_ARGS = "qemu-args"


@dataclass(frozen=True)
class NodeOrigin:
    """Where a block node was configured: the option or element, its name, the child role.

    ``kind`` is ``-drive``, ``-blockdev``, ``<disk>``, ``<backingStore>`` or ``qmp`` (a
    node seen only over QMP); ``name`` the drive id, node name, target dev or backing
    path; ``part`` the element (``<driver>``, ``<source>``) or child role (``file``).
    """

    kind: NodeKind
    name: str | None = None
    part: str | None = None

    def child(self, role: str) -> NodeOrigin:
        return replace(self, part=f"{self.part} {role}" if self.part else role)

    def __str__(self) -> str:
        words = ("node" if self.kind == "qmp" else self.kind, self.name, self.part)
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class XmlDisk:
    """The ``index``-th ``<disk>`` (from 1) under ``/domain/devices``."""

    index: int

    def __str__(self) -> str:
        return f"/domain/devices/disk[{self.index}]"


@dataclass(frozen=True)
class XmlHostdev:
    """The ``index``-th ``<hostdev>`` (from 1) under ``/domain/devices``."""

    index: int

    def __str__(self) -> str:
        return f"/domain/devices/hostdev[{self.index}]"


@dataclass(frozen=True)
class ArgvOption:
    """The option whose value is ``argv[index]`` on a QEMU command line."""

    index: int

    def __str__(self) -> str:
        return f"argv[{self.index}]"


@dataclass(frozen=True)
class QomDevice:
    """A device seen over QMP, by its QOM path."""

    path: str

    def __str__(self) -> str:
        return f"QOM {self.path}"


Locator = XmlDisk | XmlHostdev | ArgvOption | QomDevice


@dataclass
class BlockNode:
    """One QEMU block-layer node (a ``-blockdev``, or a node implied by ``-drive`` or by libvirt).

    ``discard`` is normalised to ``"unmap"`` or ``"ignore"``, or None when not set
    (QEMU's default is ignore). ``detect_zeroes`` is ``"off"``, ``"on"`` or ``"unmap"``.
    ``file`` is the protocol child (for a format or filter node); ``backing`` the next
    image down the chain. ``inherited`` says that ``discard`` came from a parent node
    (QEMU copies it into inline children, not into nodes referenced by name).
    ``discard_unknown`` says why ``discard`` is not known (a node seen only over QMP,
    which does not show discard); None when it is known, or known to be unset.
    """

    driver: str | None
    node_name: str | None = None
    discard: Discard | None = None
    detect_zeroes: str | None = None
    discard_no_unref: bool | None = None
    cache: str | None = None
    read_only: bool = False
    filename: str | None = None
    file: BlockNode | None = None
    backing: BlockNode | None = None
    inherited: bool = False
    defined_by: NodeOrigin | None = None
    discard_unknown: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # everything else, for findings

    def file_chain(self) -> list[BlockNode]:
        """This node and its ``file`` children down to the protocol node (no backing files)."""
        chain: list[BlockNode] = []
        node: BlockNode | None = self
        seen: set[int] = set()
        while node is not None and id(node) not in seen:
            seen.add(id(node))
            chain.append(node)
            node = node.file
        return chain

    @property
    def protocol(self) -> BlockNode:
        """The bottom of the file chain: the node that talks to host storage."""
        return self.file_chain()[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "node_name": self.node_name,
            "driver": self.driver,
            "discard": self.discard,
            "discard_unknown": self.discard_unknown,
            "detect_zeroes": self.detect_zeroes,
            "discard_no_unref": self.discard_no_unref,
            "cache": self.cache,
            "read_only": self.read_only,
            "filename": self.filename,
            "file": self.file.to_json() if self.file else None,
            "backing": self.backing.to_json() if self.backing else None,
        }


@dataclass
class GuestFilesystem:
    """A filesystem mounted in the guest, as the guest agent reports it.

    ``mount_options`` is None when unknown (no ``guest-exec``).
    """

    mountpoint: str
    fstype: str
    mount_options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class GuestQueue:
    """What the guest kernel says about one disk's discard support (its sysfs ``queue/``).

    Read in the guest through the agent (``guest-exec``); a field is None when the
    guest has no such file. ``discard_max_bytes == 0`` proves that the guest driver or
    bus passes no discard at all, whatever the configuration says.
    """

    device: str  # the guest's name for the disk: vda, sda
    discard_granularity: int | None = None
    discard_max_bytes: int | None = None
    discard_zeroes_data: int | None = None
    rotational: bool | None = None
    alignment_offset: int | None = None  # of the partition that holds the filesystem
    discard_alignment: int | None = None
    #: where that partition starts on the disk, in bytes (sysfs ``start`` x 512); 0 for a
    #: filesystem on the whole disk; None for one on a device-mapper volume (not read)
    partition_start: int | None = None
    partition: str | None = None  # the guest's name of what holds the filesystem: vda1

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "discard_granularity": self.discard_granularity,
            "discard_max_bytes": self.discard_max_bytes,
            "discard_zeroes_data": self.discard_zeroes_data,
            "rotational": self.rotational,
            "alignment_offset": self.alignment_offset,
            "discard_alignment": self.discard_alignment,
            "partition": self.partition,
            "partition_start": self.partition_start,
        }


FstrimScope = Literal["all", "fstab", "listed", "unknown"]


@dataclass
class GuestInfo:
    """Facts about the guest OS (from the guest agent, when there is one)."""

    os_id: str | None = None  # "linux", "mswindows", ...
    kernel_release: str | None = None  # "5.10.0-26-cloud-amd64"
    fstrim_timer: bool | None = None  # systemd fstrim.timer enabled?
    agent: bool = True
    reason: str | None = None  # why facts are missing (e.g. "agent not responding")
    # What fstrim.service runs ("/sbin/fstrim --listed-in /etc/fstab:..."), and what that
    # trims: "all" mounted filesystems, only those in "fstab", only the "listed" ones, or
    # "unknown" (not fstrim itself); None when the service was not read.
    fstrim_command: str | None = None
    fstrim_scope: FstrimScope | None = None
    fstrim_only: tuple[str, ...] = ()  # the mountpoints an "fstab" or "listed" scope trims
    os_name: str | None = None  # guest-get-osinfo pretty-name ("Microsoft Windows 11 Pro")
    drivers: tuple[tuple[str, str], ...] | None = None  # Windows guest-get-devices: name, version

    @property
    def kernel_version(self) -> Version | None:
        return parse_version(self.kernel_release)

    def timer_covers(self, mountpoint: str) -> bool | None:
        """Does the enabled fstrim.timer trim ``mountpoint``? None when not known."""
        if not self.fstrim_timer:
            return self.fstrim_timer
        if self.fstrim_scope in ("fstab", "listed"):
            return mountpoint in self.fstrim_only
        return None if self.fstrim_scope == "unknown" else True

    def driver_version(self, name: str) -> str | None:
        """The version guest-get-devices reports for a Windows driver (viostor, vioscsi)."""
        for driver, version in self.drivers or ():
            if driver.lower() == name.lower():
                return version
        return None

    @property
    def is_windows(self) -> bool:
        return (self.os_id or "").lower() in ("mswindows", "windows")


@dataclass
class Disk:
    """One guest-visible drive and the path from its QEMU device down to host storage.

    ``target`` is the libvirt target (``sda``, ``vdb``); for a QEMU command line it is
    None and ``ident`` is the device id, drive id or node name. ``discard`` is the
    setting as configured on the node the device points at (``"unmap"``, ``"ignore"``,
    None when unset, or ``"unknown"`` for a node seen only over QMP). ``bus`` uses
    libvirt's names (ide, sata, scsi, virtio, usb, fdc, nvme, ...); ``qemu_device``
    QEMU's (ide-hd, scsi-hd, virtio-blk-pci, ...).
    ``guest_filesystems`` is None when nothing is known about the guest side.
    """

    domain: str
    ident: str
    target: str | None = None
    device: DeviceType = DeviceType.DISK
    bus: Bus | None = None
    controller_model: str | None = None
    qemu_device: str | None = None
    device_properties: dict[str, Any] = field(default_factory=dict)
    storage: StorageKind = StorageKind.UNKNOWN
    protocol: str | None = None  # network disks: rbd, iscsi, nbd, gluster, http, ...
    source: str | None = None  # path, device, or protocol://host/name
    format: DiskFormat | None = None
    discard: DiskDiscard | None = None
    detect_zeroes: str | None = None
    read_only: bool = False
    shareable: bool = False
    node: BlockNode | None = None
    locator: Locator | None = None  # where it was defined
    format_defaulted: bool = False  # no format given: libvirt and QEMU then use raw
    guest_filesystems: list[GuestFilesystem] | None = None
    guest_queue: GuestQueue | None = None  # the guest's sysfs view of this disk

    @property
    def empty(self) -> bool:
        return self.storage is StorageKind.NONE

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "target": self.target or self.ident,
            "device": self.device.value,
            "bus": self.bus,
            "controller_model": self.controller_model,
            "qemu_device": self.qemu_device,
            "storage": self.storage.value,
            "protocol": self.protocol,
            "source": self.source,
            "format": self.format,
            "discard": self.discard,
            "detect_zeroes": self.detect_zeroes,
            "read_only": self.read_only,
            "shareable": self.shareable,
            "nodes": self.node.to_json() if self.node else None,
        }


@dataclass
class Domain:
    """One VM as far as discard is concerned."""

    name: str
    origin: Origin
    machine: str | None = None  # "pc-q35-7.2", "pc-i440fx-3.1", "pc", ...
    arch: str | None = None
    disks: list[Disk] = field(default_factory=list)
    qemu_version: Version | None = None
    libvirt_version: Version | None = None
    guest: GuestInfo | None = None
    notes: list[str] = field(default_factory=list)  # things skipped while reading the input
    os_hint: str | None = None  # the OS the definition names (libosinfo metadata): "mswindows"


@dataclass(frozen=True)
class MachineType:
    """A QEMU machine type split into family and version (None for aliases like ``pc``)."""

    name: str
    family: str
    version: Version | None

    @classmethod
    def parse(cls, name: str) -> MachineType:
        version = machine_version(name)
        if version is None:
            return cls(name, name, None)
        return cls(name, name.rsplit("-", 1)[0], version)


@dataclass
class Layer:
    """One layer's verdict, why, and what to change (None when nothing to change)."""

    kind: LayerKind
    verdict: Verdict
    reason: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.kind.value,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "fix": self.fix,
        }


@dataclass
class Finding:
    """Something the user should know about a disk, with the fact table's source."""

    severity: Severity
    layer: LayerKind
    message: str
    fix: str | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "layer": self.layer.value,
            "message": self.message,
            "fix": self.fix,
            "source": self.source,
        }


GranularityLayer = Literal["guest", "device", "format", "host", "pool"]
"""Where a discard unit is (see :mod:`vmtrim.audit.granularity`)."""


@dataclass(frozen=True)
class LayerGranularity:
    """One layer's discard unit: a discard frees space there only when it covers it whole.

    ``measured``: read from the running system or the configuration (True), or a
    documented default (False). ``coarser``: larger than every layer above, so smaller
    discards from above free nothing here. ``fixed``: it cannot be changed (IDE's 512 B).
    """

    layer: GranularityLayer
    what: str  # "vda queue/discard_granularity", "qcow2 cluster", "ext4 block", ...
    bytes: int | None  # None: not known
    measured: bool
    coarser: bool = False
    fixed: bool = False
    source: str | None = None  # where a default comes from

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "what": self.what,
            "bytes": self.bytes,
            "measured": self.measured,
            "coarser": self.coarser,
        }


@dataclass
class DiskReport:
    """The audit of one disk: its layers, its findings, and the verdicts.

    ``exempt`` names why the disk does not count towards the exit code (a cdrom,
    a read-only or empty drive); it is still listed with its layers.
    """

    disk: Disk
    layers: list[Layer]
    findings: list[Finding] = field(default_factory=list)
    exempt: str | None = None
    granularity: list[LayerGranularity] = field(default_factory=list)  # top layer first

    @property
    def verdict(self) -> Verdict:
        """The worst layer."""
        return Verdict.worst(layer.verdict for layer in self.layers)

    @property
    def config_verdict(self) -> Verdict:
        """The worst of the layers the configuration decides (device and block nodes)."""
        return Verdict.worst(layer.verdict for layer in self.layers if layer.kind.is_config)

    @property
    def blocks(self) -> bool:
        """True when this disk should fail the run (exit code 1)."""
        return self.exempt is None and self.verdict is Verdict.BLOCK

    def layer(self, kind: LayerKind) -> Layer:
        for layer in self.layers:
            if layer.kind is kind:
                return layer
        raise KeyError(kind)

    def sorted_findings(self) -> list[Finding]:
        return sorted(self.findings, key=lambda finding: -finding.severity.rank)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.disk.to_json(),
            "verdict": self.verdict.value,
            "config_verdict": self.config_verdict.value,
            "exempt": self.exempt,
            "layers": [layer.to_json() for layer in self.layers],
            "findings": [finding.to_json() for finding in self.sorted_findings()],
            "granularity": [layer.to_json() for layer in self.granularity],
        }
