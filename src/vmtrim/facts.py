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
    # --- what the guest kernel reads (sysfs queue/), measured through the agent -------------
    Fact(
        "guest_discard_max",
        "the guest's /sys/block/DEV/queue/discard_max_bytes is the largest discard its block"
        " layer sends to the device; 0 means it sends none at all",
        "Linux Documentation/ABI/stable/sysfs-block (queue/discard_max_bytes: 'A value of"
        " 0 means that the device does not support discard functionality')",
        checked="lab guest (Linux 6.1, QEMU 7.2, TCG), read through guest-exec:"
        " scsi-hd 4096/1073741824, virtio-blk 512/2147483136, ide-hd 512/2147450880 on IDE"
        " and on AHCI (discard_granularity/discard_max_bytes, discard_zeroes_data 0,"
        " rotational 1);"
        " virtio-blk discard=off, scsi-hd or ide-hd discard_granularity=0: 0/0 and fstrim"
        " 'trim not supported'",
    ),
    Fact(
        "scsi_dg0",
        "scsi-hd with discard_granularity=0 clears LBPME (the TPE bit of READ CAPACITY(16))"
        " and reports provisioning type 1 in VPD page 0xb2: Linux sd turns discard off"
        " (discard_max_bytes 0)",
        "qemu hw/scsi/scsi-disk.c (SAI_READ_CAPACITY_16: 'set TPE bit if the format supports"
        " discard' only when conf.discard_granularity != 0; VPD 0xb2: discard_granularity ? 2 : 1)",
        checked="lab guest, virtio-scsi + scsi-hd,discard_granularity=0 on QEMU 7.2, Linux 6.1:"
        " discard_granularity 0, discard_max_bytes 0, guest-fstrim 'trim not supported',"
        " the qcow2 stayed at 34611200 bytes (the default scsi-hd: 34611200 -> 1253376)",
    ),
    Fact(
        "ide_dg0",
        "ide-hd with discard_granularity=0 clears the DSM TRIM bit (IDENTIFY word 169):"
        " libata turns discard off (discard_max_bytes 0); 0 and 512 are the only values allowed",
        "qemu hw/ide/core.c (ide_identify: word 169 follows conf.discard_granularity);"
        " hw/ide/qdev.c ('discard_granularity must be 512 for ide')",
        checked="lab guest, pc + ide-hd,discard_granularity=0 on QEMU 7.2, Linux 6.1, on"
        " the IDE bus and on AHCI: discard_max_bytes 0, guest-fstrim 'trim not supported',"
        " qcow2 unchanged at 34611200 bytes (default ide-hd: 34611200 -> 1253376)",
    ),
    Fact(
        "virtio_blk_dg0",
        "virtio-blk with discard_granularity=0 still offers DISCARD: it reports"
        " discard_sector_alignment 0, and Linux virtio_blk then uses the logical block size",
        "qemu hw/block/virtio-blk.c virtio_blk_update_config (discard_sector_alignment ="
        " discard_granularity >> 9); Linux drivers/block/virtio_blk.c (alignment 0 -> the"
        " logical block size)",
        checked="lab guest, virtio-blk-pci,discard_granularity=0 on QEMU 7.2, Linux 6.1:"
        " discard_granularity 512, discard_max_bytes 2147483136, fstrim freed the qcow2"
        " 34611200 -> 1253376 bytes, the same as without the property",
    ),
    # --- Windows guests (no Windows guest was booted here: sources only) ------------------
    Fact(
        "windows_ssd",
        "Windows' Optimize Drives retrims a disk it sees as an SSD (or thin-provisioned);"
        " a rotating 'Hard disk drive' is defragmented and gets no TRIM. QEMU reports"
        " rotation_rate (1 = non-rotating) for scsi-hd and ide-hd; libvirt sets it with"
        " <target rotation_rate='1'/> on SCSI, IDE and SATA disks",
        "libvirt docs/formatdomain.rst (<target rotation_rate>, since 7.3.0); qemu"
        " hw/scsi/scsi-disk.c (VPD 0xb1 rotation_rate), hw/ide/core.c (IDENTIFY word 217);"
        " canonical/lxd #15518 (disks shown as HDD: Windows does not TRIM); virtio-win #666"
        " (rotation_rate=1 workaround); Microsoft docs Optimize-Volume (-ReTrim, -SlabConsolidate)",
        libvirt=(7, 3, 0),
        checked="QEMU 7.2 reports it: the lab guest (Linux 6.1) reads queue/rotational 0 for"
        " scsi-hd,rotation_rate=1 and for ide-hd,rotation_rate=1 on AHCI, 1 without it;"
        " discard still works on both (qcow2 34.7 MB -> 1.2 MB after fstrim). No Windows"
        " guest was booted.",
    ),
    Fact(
        "windows_viostor",
        "viostor (virtio-blk) passes discard since virtio-win PR #399 (2019; issue #392:"
        " before it, no trim at all); rotation_rate does not apply to virtio-blk (no such"
        " QEMU property; Proxmox: SSD emulation is not supported on VirtIO Block)",
        "virtio-win/kvm-guest-drivers-windows #392 and PR #399; pve-docs qm.adoc (Trim/Discard)",
    ),
    Fact(
        "windows_vioscsi",
        "vioscsi passes SCSI UNMAP and reports the provisioning type from the device's"
        " discard_granularity (thin when it is not 0); on a thin disk that is not an SSD,"
        " Optimize Drives also consolidates slabs, rewriting data",
        "virtio-win/kvm-guest-drivers-windows #666, PRs #824 and #858, PR #927 (RH bz 2133261)",
    ),
    Fact(
        "windows_retrim_2026",
        "Windows 11 KB5089549 (12 May 2026) with virtio-win 0.1.285 or later: retrim on"
        " vioscsi fails with Event 264 'Incorrect function (0x80070001)' until the device's"
        " discard_granularity is 32 KiB or 64 KiB (64 KiB on 64 KiB qcow2 clusters);"
        " 0.1.271 is the last release reported to work unchanged",
        "virtio-win/kvm-guest-drivers-windows #1574 (users confirm <blockio"
        " discard_granularity='32768'/> or 65536; Proxmox: -set"
        " device.scsi0.discard_granularity=32K); comment in #1614",
    ),
    # --- the discard unit down the stack (vmtrim.audit.granularity), measured ---------------
    Fact(
        "granularity_cost",
        "a layer frees only whole units of its own (qcow2 cluster, dm-thin chunk, RBD object,"
        " zvol block): a freed extent that covers no whole aligned unit gives nothing back;"
        " telling the guest the unit (discard_granularity) does not free more",
        "qemu block/qcow2.c qcow2_co_pdiscard (partial clusters: -ENOTSUP, ignored) and"
        " block/io.c bdrv_co_pdiscard (head and tail split at pdiscard_alignment); Linux"
        " fs/ext4/mballoc.c ext4_trim_fs (minlen raised to discard_granularity)",
        checked="bench/bench_granularity.py, 2026-12-01 (QEMU 7.2 TCG, Linux 6.1 guest, ext4 on"
        " virtio-blk, qcow2): scattered files (each between kept ones) come back only from a"
        " cluster up: 64 KiB files 95 % on 64 KiB clusters, 0 % on 512 KiB and 2 MiB; 1 MiB"
        " files 100 % on 512 KiB, 0 % on 2 MiB; 16 MiB 100 %; 4 KiB 0 %; online discard and"
        " fstrim alike. Adjacent files deleted one at a time: fstrim 98 % (4 KiB files, 64 KiB"
        " clusters), 94 % (64 KiB files, 512 KiB), 88 % (64 KiB, 2 MiB); online discard 39 %,"
        " 9 %, 0 %. Device discard_granularity=2M: the same bytes as its 512 B default",
    ),
    Fact(
        "alignment_cost",
        "a guest partition that starts part-way into a qcow2 cluster (MBR's sector 63, a"
        " 1 MiB start on 2 MiB clusters) shifts every extent the filesystem frees against the"
        " clusters: QEMU frees only the clusters a discard covers whole, so each freed extent"
        " loses up to a cluster at each end, and one no larger than a cluster frees nothing",
        "qemu block/io.c bdrv_co_pdiscard (head and tail split at pdiscard_alignment, the"
        " cluster: qcow2_refresh_limits) and block/qcow2.c qcow2_co_pdiscard (-ENOTSUP for"
        " the partial head and tail, ignored); the start read from the guest's"
        " /sys/class/block/PART/start, in 512-byte sectors whatever the logical block size"
        " (Linux block/partitions/core.c part_start_show: bd_start_sect)",
        checked="tests/test_alignment_lab.py, 2026-12-01 (QEMU 7.2 TCG, Linux 6.1 guest, ext4"
        " 4 KiB blocks in one DOS partition on virtio-blk, qcow2 fully allocated, 640 MiB"
        " disks, fstrim): scattered files (each between kept ones) freed in the guest, du of"
        " the image before and after: 256 x 64 KiB on 64 KiB clusters came back 0.4 % (64 KiB"
        " of 16 MiB) with the partition at sector 63, 100 % at sector 2048; 12 x 2 MiB on"
        " 2 MiB clusters 8.3 % (2 of 24 MiB) from a 1 MiB start, 100 % from 2 MiB. On 100 MiB"
        " disks (files also in the unaligned space after group 0's metadata): 0.8 % against"
        " 37.5 %, and 16.7 % against 58.3 %",
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


# --- why the host got back less than the guest trimmed (trim --explain) ------------------


@dataclass(frozen=True)
class TrimCause:
    """One reason a trim gives back less on the host than the guest reports.

    ``key`` is the stable id ``trim --explain`` prints and callers branch on; the
    evidence shown with it comes from the disk itself (its image header, the host probe).
    """

    key: str
    summary: str
    source: str


_TRIM_CAUSE_ROWS = [
    TrimCause(
        "internal_snapshots",
        "internal snapshots hold the clusters (refcount >= 2): a discard drops one reference"
        " and frees nothing a snapshot shares",
        "docs/interop/qcow2.txt (refcounts); qemu block/qcow2-refcount.c"
        " qcow2_free_any_clusters (a cluster is freed only when its refcount reaches 0)",
    ),
    TrimCause(
        "backing_chain",
        "an overlay: the guest's discards reach the top image only (zero clusters there);"
        " the data in its backing files never shrinks",
        "qemu block/qcow2-cluster.c discard_in_l2_slice (with a backing file a discarded"
        " cluster becomes a zero cluster)",
    ),
    TrimCause(
        "discard_no_unref",
        "discard-no-unref: qcow2 keeps the discarded clusters allocated (qemu-img map/check and"
        " the image's cluster counts do not drop) while the file itself is punched: only the"
        " host bytes (du) measure the reclaim",
        "qapi/block-core.json BlockdevOptionsQcow2 discard-no-unref (since 8.1); libvirt 9.5.0"
        " <driver discard_no_unref=...>; FIELD.md [Q3]",
    ),
    TrimCause(
        "granularity",
        "the qcow2 cluster is coarser than the discards the guest sends: a discard smaller"
        " than a cluster, or not aligned to one, is dropped",
        "qemu block/qcow2.c qcow2_co_pdiscard (-ENOTSUP for a partial cluster);"
        " block/qcow2-cluster.c qcow2_cluster_discard",
    ),
    TrimCause(
        "qcow2_compat_010",
        "qcow2 compat=0.10 (version 2) has no zero clusters: with a backing file QEMU refuses"
        " every discard, nothing is freed",
        "qemu block/qcow2-cluster.c qcow2_cluster_discard (-ENOTSUP for qcow_version < 3 with a"
        " backing file, QEMU 5.1); checked: qemu-io 7.2 discard of 8 MiB on such an overlay"
        " left du at 8452 KiB, the same image without a backing file went to 260 KiB",
    ),
    TrimCause(
        "host_fs_no_punch",
        "the host filesystem under the image cannot punch holes: QEMU's discards free nothing"
        " on the host",
        "fallocate(2) FALLOC_FL_PUNCH_HOLE; qemu block/file-posix.c handle_aiocb_discard"
        " (has_discard cleared on ENOTSUP); checked: ramfs here, qemu-io discard left du"
        " unchanged",
    ),
    TrimCause(
        "thin_pool_discards",
        "the dm-thin pool under the disk does not pass discards on: ignore drops them,"
        " nopassdown frees pool chunks but does not discard the pool's data device",
        "Linux Documentation/admin-guide/device-mapper/thin-provisioning.rst"
        " (ignore_discard, no_discard_passdown); lvmthin(7) 'Discard'",
    ),
    TrimCause(
        "ext4_already_trimmed",
        "ext4 trims only the block groups changed since the last trim in this mount: a second"
        " fstrim with nothing freed in between reports 0",
        "Linux fs/ext4/mballoc.c ext4_trim_all_free (skips a group with"
        " EXT4_MB_GRP_WAS_TRIMMED, ext4.h EXT4_GROUP_INFO_WAS_TRIMMED_BIT; cleared when a"
        " block of the group is freed); DESIGN.md: a second guest-fstrim reported 0",
    ),
    TrimCause(
        "alignment",
        "the guest partition starts part-way into a qcow2 cluster: every freed extent"
        " straddles clusters and QEMU frees only those it covers whole",
        "qemu block/io.c bdrv_co_pdiscard, block/qcow2.c qcow2_co_pdiscard; facts"
        " alignment_cost (measured)",
    ),
]

TRIM_CAUSES: dict[str, TrimCause] = {cause.key: cause for cause in _TRIM_CAUSE_ROWS}

#: guest-fstrim on Windows returns no byte counts: only the host figure measures a trim.
WINDOWS_NO_COUNTS = Fact(
    "windows_fstrim_counts",
    "Windows reports no byte counts; the host figure is the measurement",
    "qga/qapi-schema.json GuestFilesystemTrimResult (trimmed and minimum are optional);"
    " qga/commands-win32.c qmp_guest_fstrim (runs defrag.exe /L, sets path and error only);"
    " FIELD.md [S1]",
)

#: How long a trim of a Windows guest (guest-get-osinfo id ``mswindows``) may take by
#: default: its retrim (Optimize Drives, defrag /L) takes minutes.
WINDOWS_TRIM_TIMEOUT = 600.0
WINDOWS_TRIM_TIMEOUT_SOURCE = (
    "FIELD.md [W6]: Windows Server 2022 guest-fstrim takes more than 360 s (tp-qemu PR #3090);"
    " [P1]: Proxmox's guest-fstrim QMP timeout is 10 minutes"
)


# --- vmtrim fix: how a device property reaches QEMU (--discard-granularity, --ssd) -------

_FIX_ROWS = [
    Fact(
        "libvirt_blockio_granularity",
        "libvirt <blockio discard_granularity='N'/> on a <disk>: the device's"
        " discard_granularity (a multiple of logical_block_size)",
        "libvirt docs/formatdomain.rst (blockio discard_granularity); the patch by K. Hanicova"
        " (libvir-list msg238920); tp-libvirt virtual_disks.discard_granularity"
        " func_supported_since_libvirt_ver=(10, 0, 0)",
        libvirt=(10, 0, 0),
    ),
    Fact(
        "libvirt_qemu_override",
        "libvirt <qemu:override><qemu:device alias=...><qemu:frontend><qemu:property .../>:"
        " a property of the -device libvirt formats, found by the device's alias (user"
        " aliases start with ua-); unsupported, the domain is tainted",
        "libvirt docs/drvqemu.rst 'Overriding properties of QEMU devices' (since 8.2.0);"
        " docs/formatdomain.rst 'Devices' (user aliases: ua- prefix)",
        libvirt=(8, 2, 0),
        checked="libvirt 9.0 here (test_fix_libvirt_guest.py): discard_granularity 65536 on"
        " ua-vmtrim-sda, kept by defineXML; the lab guest's /sys/block/sda/queue/"
        "discard_granularity 4096 -> 65536 after the power cycle",
    ),
    Fact(
        "libvirt_qemu_set",
        "<qemu:commandline> -set device.ALIAS.PROP=VALUE changes only a -device written as"
        " key=value; once libvirt writes -device as JSON (QEMU 7.0 and later) QEMU answers"
        " 'there is no device ALIAS defined', which is why <qemu:override> exists",
        "libvirt docs/drvqemu.rst (qemu:commandline, since 0.8.3; qemu:override, 8.2.0);"
        " virt-manager/virt-manager #599; AshleyYakeley/NixVirt #36 ('-set device.hostdev0...:"
        " there is no device defined' on QEMU 7.0)",
        checked="libvirt 9.0 + QEMU 7.2 here: a domain with -set"
        " device.ua-vmtrim-sda.discard_granularity=65536 does not start ('there is no device"
        " ua-vmtrim-sda defined'); the same property through <qemu:override> reaches the"
        " guest (test_fix_libvirt_guest.py)",
    ),
    Fact(
        "libvirt_rotation_rate",
        "libvirt <target rotation_rate='N'/> on SCSI, IDE and SATA disks (1 = solid state)",
        "libvirt docs/formatdomain.rst (<target> rotation_rate, since 7.3.0)",
        libvirt=(7, 3, 0),
        checked="libvirt 9.0 here: a scsi-hd's /sys/block/sda/queue/rotational 1 -> 0 in the"
        " lab guest (Linux 6.1); QEMU 7.2 -device scsi-hd,rotation_rate=1 the same",
    ),
    Fact(
        "device_granularity_limits",
        "QEMU's discard_granularity is a uint32 size that must be a multiple of"
        " logical_block_size; ide-hd takes only 512 (or 0); rotation_rate is a property of"
        " scsi-hd and ide-hd only, not virtio-blk or nvme",
        "qemu hw/block/block.c blkconf_blocksizes ('discard_granularity must be a multiple of"
        " logical_block_size'); hw/ide/qdev.c ide_dev_initfn ('discard_granularity must be"
        " 512 for ide')",
        checked="QEMU 7.2.22 here: scsi-hd and virtio-blk-pci start with 512 B to 2 MiB,"
        " refuse 3000 and 4294967296; ide-hd refuses 4096 and 65536; `-device X,help` lists"
        " rotation_rate for scsi-hd, ide-hd and scsi-block only",
    ),
]

FACTS.update({fact.key: fact for fact in _FIX_ROWS})
