"""What vmtrim knows about discard, as data: every row says where the knowledge comes from.

The audit (:mod:`vmtrim.audit.engine`) only combines these rows; when a fact turns out to
be wrong, fix it here and the audit follows. ``source`` names the file in QEMU,
libvirt or Linux (or the document) that shows the fact; ``checked`` says how this
project checked it (for example against the QEMU 7.2 binary on the dev machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmtrim._util.versions import Version
from vmtrim.model import Bus, DeviceType, Verdict


@dataclass(frozen=True)
class Fact:
    """A versioned feature. Versions are the first release that has it (None: not versioned)."""

    key: str
    summary: str
    source: str
    qemu: Version | None = None
    libvirt: Version | None = None
    linux: Version | None = None
    machine: Version | None = None
    checked: str | None = None


_FACT_ROWS = [
    Fact(
        "discard_option",
        "QEMU drive option discard=ignore|unmap (raw files; IDE/AHCI TRIM; scsi-hd UNMAP,"
        " also behind virtio-scsi)",
        "qemu-options.hx (-drive discard=); OpenStack Nova spec hw_disk_discard",
        qemu=(1, 5),
    ),
    Fact(
        "qcow2_discard",
        "qcow2 frees clusters on discard",
        "OpenStack Nova spec hw_disk_discard",
        qemu=(1, 6),
    ),
    Fact(
        "virtio_blk_discard",
        "virtio-blk DISCARD and WRITE_ZEROES; machine types before 4.0 set discard=false",
        "qemu hw/core/machine.c: hw_compat_3_1 = { virtio-blk-device, discard, false }",
        qemu=(4, 0),
        machine=(4, 0),
        checked="hw_compat_3_1 read in qemu/qemu hw/core/machine.c; `qemu-system-x86_64"
        " -device virtio-blk-pci,help` (7.2) shows discard=<bool> default true",
    ),
    Fact(
        "virtio_blk_guest",
        "Linux virtio_blk sends DISCARD",
        "Linux commit 1f23816b8eb8 (virtio_blk: add discard and write zeroes support)",
        linux=(5, 0),
    ),
    Fact(
        "detect_zeroes",
        "detect-zeroes=off|on|unmap (unmap needs discard=unmap)",
        "qapi/block-core.json BlockdevDetectZeroesOptions; libvirt formatdomain detect_zeroes",
        qemu=(2, 1),
        libvirt=(2, 0, 0),
    ),
    Fact(
        "libvirt_discard",
        "libvirt <driver discard='unmap|ignore'/>",
        "libvirt formatdomain",
        libvirt=(1, 0, 6),
    ),
    Fact(
        "discard_no_unref",
        "qcow2 discard-no-unref: keep clusters allocated on discard;"
        " the file is still punched when pass-discard-request is on",
        "qapi/block-core.json BlockdevOptionsQcow2; libvirt formatdomain",
        qemu=(8, 1),
        libvirt=(9, 5, 0),
        checked="block-core.json doc comment '(since 8.1)', read with the code search",
    ),
    Fact(
        "default_discard",
        "discard defaults to ignore: a guest TRIM is dropped silently",
        "qemu-options.hx (-drive discard=ignore is the default)",
    ),
    Fact(
        "nvme_dsm",
        "emulated NVMe Dataset Management (deallocate)",
        "qemu hw/block/nvme.c 'add the dataset management command' (qemu-devel, 2020-11)",
        qemu=(6, 0),
    ),
    Fact(
        "scsi_unmap",
        "scsi-hd advertises UNMAP (logical block provisioning VPD page)",
        "qemu hw/scsi/scsi-disk.c (Block Limits / LBP VPD pages)",
    ),
    Fact(
        "ide_trim", "ide-hd and AHCI advertise DSM TRIM", "qemu hw/ide/core.c (IDENTIFY word 169)"
    ),
]

FACTS: dict[str, Fact] = {fact.key: fact for fact in _FACT_ROWS}


@dataclass(frozen=True)
class Note:
    """A behaviour that costs space even when discard passes (shown as a finding)."""

    key: str
    message: str
    source: str


_NOTE_ROWS = [
    Note(
        "qcow2_small_discard",
        "discards smaller than a qcow2 cluster ({cluster}), or not aligned to one, are dropped",
        "qemu block/qcow2-cluster.c qcow2_cluster_discard (whole clusters only);"
        " docs/interop/qcow2.txt",
    ),
    Note(
        "qcow2_snapshots",
        "{count} internal snapshot(s) keep their clusters (refcount >= 2): discard frees nothing"
        " they share",
        "docs/interop/qcow2.txt (refcounts); qemu block/qcow2-refcount.c",
    ),
    Note(
        "qcow2_compat010",
        "qcow2 compat=0.10 cannot store zero clusters; upgrade with `qemu-img amend -o compat=1.1`",
        "docs/interop/qcow2.txt (version 2 has no zero-cluster flag)",
    ),
    Note(
        "qcow2_overlay",
        "this image is an overlay on {backing}: a discard only writes zero clusters here,"
        " the backing file never shrinks",
        "qemu block/qcow2-cluster.c (discard with a backing file makes zero clusters)",
    ),
    Note(
        "preallocation_lost",
        "a discard undoes preallocation of the freed range",
        "qemu docs: qemu-img create -o preallocation",
    ),
    Note(
        "ls_size",
        "`ls -l` never shrinks: QEMU punches holes and keeps the length; measure"
        " with `du` or `vmtrim image info`",
        "fallocate(2) FALLOC_FL_KEEP_SIZE",
    ),
    Note(
        "punch_hole_sticky",
        "after the first ENOTSUP QEMU stops trying to punch holes until restarted",
        "qemu block/file-posix.c (s->has_discard cleared on ENOTSUP)",
    ),
]

NOTES: dict[str, Note] = {note.key: note for note in _NOTE_ROWS}


@dataclass(frozen=True)
class BusRule:
    """How the guest's driver for a bus handles discard, and which QEMU device it gets."""

    bus: Bus
    guest: Verdict
    reason: str
    disk_device: str | None  # QEMU device libvirt uses for device='disk'
    cdrom_device: str | None
    source: str
    needs: str | None = None  # FACTS key with version requirements


_BUS_ROWS = [
    BusRule("ide", Verdict.PASS, "ATA TRIM (libata)", "ide-hd", "ide-cd", FACTS["ide_trim"].source),
    BusRule(
        "sata",
        Verdict.PASS,
        "ATA TRIM over AHCI (libata)",
        "ide-hd",
        "ide-cd",
        FACTS["ide_trim"].source,
    ),
    BusRule(
        "scsi", Verdict.PASS, "SCSI UNMAP (sd)", "scsi-hd", "scsi-cd", FACTS["scsi_unmap"].source
    ),
    BusRule(
        "virtio",
        Verdict.PASS,
        "virtio-blk DISCARD (virtio_blk)",
        "virtio-blk-pci",
        None,
        FACTS["virtio_blk_guest"].source,
        needs="virtio_blk_guest",
    ),
    BusRule(
        "nvme",
        Verdict.PASS,
        "NVMe Dataset Management deallocate",
        "nvme-ns",
        None,
        FACTS["nvme_dsm"].source,
        needs="nvme_dsm",
    ),
    BusRule(
        "usb",
        Verdict.UNKNOWN,
        "usb-storage: Linux usb-storage often skips the VPD pages that advertise UNMAP",
        "usb-storage",
        "usb-storage",
        "Linux drivers/usb/storage/scsiglue.c (skip_vpd_pages)",
    ),
    BusRule(
        "fdc",
        Verdict.BLOCK,
        "floppy controllers have no discard command",
        "floppy",
        None,
        "qemu hw/block/fdc.c",
    ),
    BusRule(
        "xen",
        Verdict.UNKNOWN,
        "Xen PV disks: not audited by vmtrim",
        None,
        None,
        "libvirt formatdomain (target bus='xen')",
    ),
    BusRule(
        "sd",
        Verdict.BLOCK,
        "SD cards are emulated without discard",
        "sd-card",
        None,
        "qemu hw/sd/sd.c",
    ),
]

BUSES: dict[Bus, BusRule] = {rule.bus: rule for rule in _BUS_ROWS}


@dataclass(frozen=True)
class DeviceRule:
    """A QEMU device model that presents a drive to the guest."""

    name: str
    bus: Bus
    device: DeviceType
    discard: bool  # can the device pass discard at all?


_DEVICE_ROWS = [
    DeviceRule("ide-hd", "ide", DeviceType.DISK, True),
    DeviceRule("ide-drive", "ide", DeviceType.DISK, True),
    DeviceRule("ide-cd", "ide", DeviceType.CDROM, False),
    DeviceRule("scsi-hd", "scsi", DeviceType.DISK, True),
    DeviceRule("scsi-disk", "scsi", DeviceType.DISK, True),
    DeviceRule("scsi-cd", "scsi", DeviceType.CDROM, False),
    DeviceRule("scsi-block", "scsi", DeviceType.LUN, True),
    DeviceRule("scsi-generic", "scsi", DeviceType.LUN, True),
    DeviceRule("virtio-blk-pci", "virtio", DeviceType.DISK, True),
    DeviceRule("virtio-blk-pci-non-transitional", "virtio", DeviceType.DISK, True),
    DeviceRule("virtio-blk-pci-transitional", "virtio", DeviceType.DISK, True),
    DeviceRule("virtio-blk-device", "virtio", DeviceType.DISK, True),
    DeviceRule("virtio-blk-ccw", "virtio", DeviceType.DISK, True),
    DeviceRule("virtio-blk", "virtio", DeviceType.DISK, True),
    DeviceRule("nvme", "nvme", DeviceType.DISK, True),
    DeviceRule("nvme-ns", "nvme", DeviceType.DISK, True),
    DeviceRule("usb-storage", "usb", DeviceType.DISK, True),
    DeviceRule("usb-bot", "usb", DeviceType.DISK, True),
    DeviceRule("usb-uas", "usb", DeviceType.DISK, True),
    DeviceRule("floppy", "fdc", DeviceType.FLOPPY, False),
    DeviceRule("sd-card", "sd", DeviceType.DISK, False),
]

DEVICES: dict[str, DeviceRule] = {rule.name: rule for rule in _DEVICE_ROWS}

# QEMU controller device -> libvirt controller model name.
CONTROLLERS: dict[str, tuple[Bus, str]] = {
    "virtio-scsi-pci": ("scsi", "virtio-scsi"),
    "virtio-scsi-pci-non-transitional": ("scsi", "virtio-scsi"),
    "virtio-scsi-pci-transitional": ("scsi", "virtio-scsi"),
    "virtio-scsi-device": ("scsi", "virtio-scsi"),
    "virtio-scsi-ccw": ("scsi", "virtio-scsi"),
    "lsi53c895a": ("scsi", "lsilogic"),
    "lsi53c810": ("scsi", "lsilogic"),
    "megasas": ("scsi", "lsisas1078"),
    "megasas-gen2": ("scsi", "lsisas1078"),
    "mptsas1068": ("scsi", "lsisas1068"),
    "pvscsi": ("scsi", "vmpvscsi"),
    "am53c974": ("scsi", "am53c974"),
    "dc390": ("scsi", "dc390"),
    "spapr-vscsi": ("scsi", "ibmvscsi"),
    "ahci": ("sata", "ahci"),
    "ich9-ahci": ("sata", "ahci"),
    "piix3-ide": ("ide", "piix3"),
    "piix4-ide": ("ide", "piix4"),
    "nvme": ("nvme", "nvme"),
    "isa-fdc": ("fdc", "isa-fdc"),
}


@dataclass(frozen=True)
class ProtocolRule:
    """Does a network (or special) protocol pass discard to the storage behind it?"""

    protocol: str
    verdict: Verdict
    reason: str
    source: str
    read_only: bool = False


_PROTOCOL_ROWS = [
    ProtocolRule(
        "rbd",
        Verdict.PASS,
        "Ceph RBD discards free objects in the pool",
        "qemu block/rbd.c (qemu_rbd_co_pdiscard)",
    ),
    ProtocolRule(
        "iscsi",
        Verdict.PASS,
        "libiscsi sends SCSI UNMAP to the target (if the LUN supports thin provisioning)",
        "qemu block/iscsi.c (iscsi_co_pdiscard)",
    ),
    ProtocolRule(
        "nbd",
        Verdict.UNKNOWN,
        "NBD passes NBD_CMD_TRIM only when the server advertises it",
        "qemu block/nbd.c (NBD_FLAG_SEND_TRIM)",
    ),
    ProtocolRule(
        "gluster",
        Verdict.PASS,
        "GlusterFS discards through glfs_discard",
        "qemu block/gluster.c (qemu_gluster_co_pdiscard)",
    ),
    ProtocolRule(
        "http", Verdict.BLOCK, "curl (http) is read-only", "qemu block/curl.c", read_only=True
    ),
    ProtocolRule(
        "https", Verdict.BLOCK, "curl (https) is read-only", "qemu block/curl.c", read_only=True
    ),
    ProtocolRule(
        "ftp", Verdict.BLOCK, "curl (ftp) is read-only", "qemu block/curl.c", read_only=True
    ),
    ProtocolRule(
        "ftps", Verdict.BLOCK, "curl (ftps) is read-only", "qemu block/curl.c", read_only=True
    ),
    ProtocolRule(
        "tftp", Verdict.BLOCK, "tftp is read-only", "libvirt formatdomain", read_only=True
    ),
    ProtocolRule(
        "ssh",
        Verdict.BLOCK,
        "the ssh block driver has no discard",
        "qemu block/ssh.c (no bdrv_co_pdiscard)",
    ),
    ProtocolRule(
        "sheepdog",
        Verdict.UNKNOWN,
        "sheepdog was removed in QEMU 6.0",
        "qemu docs/about/removed-features.rst",
    ),
    ProtocolRule(
        "vxhs",
        Verdict.UNKNOWN,
        "vxhs was removed in QEMU 5.1",
        "qemu docs/about/removed-features.rst",
    ),
    ProtocolRule(
        "nfs",
        Verdict.UNKNOWN,
        "libnfs: QEMU has no discard for nfs://",
        "qemu block/nfs.c (no bdrv_co_pdiscard)",
    ),
    ProtocolRule(
        "vhost-user-blk",
        Verdict.UNKNOWN,
        "the vhost-user backend decides",
        "qemu hw/block/vhost-user-blk.c",
    ),
    ProtocolRule(
        "vvfat",
        Verdict.BLOCK,
        "a host directory shown as FAT (vvfat) has no discard",
        "qemu block/vvfat.c",
        read_only=True,
    ),
    ProtocolRule(
        "nvme",
        Verdict.PASS,
        "QEMU's userspace NVMe driver sends Dataset Management",
        "qemu block/nvme.c (nvme_co_pdiscard)",
    ),
]

PROTOCOLS: dict[str, ProtocolRule] = {rule.protocol: rule for rule in _PROTOCOL_ROWS}

# QEMU protocol drivers that sit on host storage rather than the network.
LOCAL_PROTOCOLS = {"file": "file", "host_device": "block", "host_cdrom": "block"}

# Format drivers and whether they free space on discard.
FORMATS: dict[str, tuple[Verdict, str]] = {
    "raw": (Verdict.PASS, "raw passes discards straight to the protocol node"),
    "qcow2": (Verdict.PASS, "qcow2 frees the clusters and punches them in the file"),
    "luks": (Verdict.PASS, "the LUKS format driver passes discards through"),
    "qed": (Verdict.BLOCK, "QED has no discard"),
    "vmdk": (Verdict.UNKNOWN, "VMDK discard depends on the subformat"),
    "vdi": (Verdict.UNKNOWN, "VDI: QEMU frees nothing on discard"),
    "vpc": (Verdict.UNKNOWN, "VHD (vpc): QEMU frees nothing on discard"),
    "vhdx": (Verdict.UNKNOWN, "VHDX: discard support is partial"),
    "qcow": (Verdict.BLOCK, "qcow (version 1) has no discard"),
    "parallels": (Verdict.UNKNOWN, "parallels: discard support depends on the QEMU version"),
}

# Filter drivers: sit between the device and the format node and pass requests on.
FILTERS = {
    "copy-on-read",
    "throttle",
    "blkdebug",
    "blkverify",
    "preallocate",
    "compress",
    "snapshot-access",
    "copy-before-write",
    "quorum",
    "replication",
    "null-co",
    "null-aio",
    "raw-slice",
}


@dataclass(frozen=True)
class GuestFsRule:
    """What a guest filesystem needs before it issues discards."""

    fstype: str
    mount_option: bool  # does `-o discard` (or the default) make it trim online?
    fstrim: bool  # does periodic fstrim work?
    needs: str
    source: str
    default_since: Version | None = None  # Linux version that trims without any option
    mount_option_since: Version | None = None  # Linux version from which `-o discard` works


_GUEST_FS_ROWS = [
    GuestFsRule(
        "ext4",
        True,
        True,
        "`-o discard` or a periodic fstrim (fstrim.timer)",
        "Linux Documentation/admin-guide/ext4.rst (discard/nodiscard)",
    ),
    GuestFsRule(
        "xfs",
        True,
        True,
        "`-o discard` or a periodic fstrim (fstrim.timer)",
        "Linux Documentation/admin-guide/xfs.rst (discard)",
    ),
    GuestFsRule(
        "ext3",
        False,
        True,
        "a periodic fstrim (fstrim.timer); `-o discard` on Linux >= 6.1",
        "Linux fs/ext4 mounts ext3 (its discard option then works); DESIGN.md: measured"
        " on the lab's Linux 6.1",
        mount_option_since=(6, 1),
    ),
    GuestFsRule("ext2", False, True, "fstrim only", "Linux fs/ext2 (no discard mount option)"),
    GuestFsRule(
        "btrfs",
        True,
        True,
        "discard=async (the default since Linux 6.2) or fstrim",
        "Linux 6.2 btrfs: discard=async by default",
        default_since=(6, 2),
    ),
    GuestFsRule(
        "f2fs",
        True,
        True,
        "discard (the default) or fstrim",
        "Linux Documentation/filesystems/f2fs.rst",
        default_since=(3, 8),
    ),
    GuestFsRule("vfat", True, True, "`-o discard` or fstrim", "Linux fs/fat (discard option)"),
    GuestFsRule(
        "ntfs",
        True,
        True,
        "Windows trims by itself; `Optimize-Volume -ReTrim`",
        "Microsoft Optimize-Volume docs",
        default_since=(0,),
    ),
    GuestFsRule(
        "refs",
        True,
        True,
        "Windows trims by itself; `Optimize-Volume -ReTrim`",
        "Microsoft Optimize-Volume docs",
        default_since=(0,),
    ),
    GuestFsRule("swap", True, False, "swapon --discard", "Linux swapon(8)"),
]

GUEST_FS: dict[str, GuestFsRule] = {rule.fstype: rule for rule in _GUEST_FS_ROWS}
