"""Walk every disk of a :class:`~vmtrim.model.Domain` through the discard path.

:func:`audit_domain` gives one :class:`~vmtrim.model.DiskReport` per disk, with a
verdict, a reason and a fix for each layer (guest filesystem, guest driver, QEMU
device, QEMU block nodes, host storage), plus findings from the fact tables and
from the image header. It only reads: the image header (read-only) and a probe
file next to the image; it never opens an image for writing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vmtrim._util.versions import Version, format_version
from vmtrim.audit.granularity import parse_size
from vmtrim.audit.hostprobe import HostProbes, Probe
from vmtrim.errors import VmtrimError
from vmtrim.facts import (
    BUSES,
    DEVICES,
    FACTS,
    FILTERS,
    FORMATS,
    GUEST_FS,
    NOTES,
    PROTOCOLS,
    WINDOWS_NO_COUNTS,
    WINDOWS_TRIM_TIMEOUT,
    WINDOWS_TRIM_TIMEOUT_SOURCE,
)
from vmtrim.model import (
    BlockNode,
    DeviceType,
    Disk,
    DiskReport,
    Domain,
    Finding,
    GuestInfo,
    Layer,
    LayerKind,
    MachineType,
    Origin,
    Severity,
    StorageKind,
    Verdict,
)

if TYPE_CHECKING:
    from vmtrim.image.info import ImageInfo

_PASSTHROUGH = {"scsi-block", "scsi-generic"}
_LINUX_FIX = (
    "in the guest: mount with `-o discard`, or enable periodic trims"
    " (`systemctl enable --now fstrim.timer`)"
)
_WINDOWS_FIX = (
    "in the guest: nothing to enable, Windows trims by itself"
    " (`Optimize-Volume -DriveLetter C -ReTrim` trims now)"
)
_SSD_FIX = "vmtrim fix --ssd (sets <target rotation_rate='1'/>: the guest sees an SSD)"
_GRANULARITY_FIX = "vmtrim fix --discard-granularity 64K"
# When the guest's OS is not known (no agent, no libosinfo metadata), the advice covers both.
_GUEST_FIX = (
    "in the guest: Linux: mount with `-o discard`, or enable periodic trims"
    " (`systemctl enable --now fstrim.timer`); Windows trims by itself"
    " (`Optimize-Volume -ReTrim` trims now)"
)


def audit_domain(
    domain: Domain, probes: HostProbes | None = None, read_images: bool = True
) -> list[DiskReport]:
    """Audit every disk of ``domain``. ``probes`` is shared so its cache is too."""
    probes = probes or HostProbes()
    return [_DiskAudit(domain, disk, probes, read_images).run() for disk in domain.disks]


def qemu_lower_bound(domain: Domain) -> tuple[Version | None, bool]:
    """The QEMU version we can count on, and whether it is exact.

    A versioned machine type (pc-q35-7.2) only exists in QEMU >= 7.2, so it is a
    lower bound when the QEMU version itself is not known.
    """
    if domain.qemu_version:
        return domain.qemu_version, True
    if domain.machine:
        return MachineType.parse(domain.machine).version, False
    return None, False


class _DiskAudit:
    def __init__(self, domain: Domain, disk: Disk, probes: HostProbes, read_images: bool) -> None:
        self.domain = domain
        self.disk = disk
        self.probes = probes
        self.findings: list[Finding] = []
        self.image: ImageInfo | None = None
        if read_images:
            self.image = self._read_image()

    def run(self) -> DiskReport:
        layers = [
            self.guest_fs(),
            self.guest_driver(),
            self.device(),
            self.block_nodes(),
            self.host_storage(),
        ]
        for layer in layers:
            if layer.verdict is Verdict.BLOCK:
                self.findings.append(
                    Finding(
                        Severity.BLOCK,
                        layer.kind,
                        layer.reason,
                        layer.fix,
                        self._layer_source(layer.kind),
                    )
                )
        self.findings.extend(self._format_notes())
        from vmtrim.audit.granularity import granularity_stack, with_granularity

        granularity = granularity_stack(self.disk, self.image, self.probes)
        self.findings = with_granularity(self.findings, granularity, self.disk)
        return DiskReport(self.disk, layers, self.findings, self._exempt(), granularity)

    def _exempt(self) -> str | None:
        disk = self.disk
        if disk.device is DeviceType.CDROM:
            return "cdrom"
        if disk.empty:
            return "empty drive"
        if disk.read_only:
            return "read-only"
        if disk.shareable:
            # fix leaves it alone for the same reason: the run must not fail forever on it
            return "shareable: other domains use these blocks; discard is theirs to coordinate"
        return None

    def _libvirt_too_old(self, key: str) -> Version | None:
        """The libvirt release that ``FACTS[key]`` needs, when the connection's is older."""
        have = self.domain.libvirt_version
        need = FACTS[key].libvirt
        if self.domain.origin is not Origin.LIBVIRT_XML or have is None or need is None:
            return None
        return need if have < need else None

    def _libvirt_finding(self, key: str, what: str, fix: str) -> Finding | None:
        need = self._libvirt_too_old(key)
        if need is None:
            return None
        have = format_version(self.domain.libvirt_version)
        return Finding(
            Severity.WARNING,
            LayerKind.BLOCK_NODE,
            f"libvirt {have} is older than {format_version(need)}: {what}",
            fix,
            FACTS[key].source,
        )

    def _layer_source(self, kind: LayerKind) -> str | None:
        if kind is LayerKind.BLOCK_NODE:
            return FACTS["default_discard"].source
        if (
            kind is LayerKind.DEVICE
            and parse_size(self.disk.device_properties.get("discard_granularity")) == 0
            and self.disk.bus in ("scsi", "ide", "sata")
        ):
            return FACTS["scsi_dg0" if self.disk.bus == "scsi" else "ide_dg0"].source
        if kind is LayerKind.DEVICE and self.disk.bus == "virtio":
            return FACTS["virtio_blk_discard"].source
        if kind is LayerKind.GUEST_DRIVER:
            queue = self.disk.guest_queue
            if queue is not None and queue.discard_max_bytes is not None:
                return FACTS["guest_discard_max"].source  # measured in the guest
            rule = BUSES.get(self.disk.bus) if self.disk.bus else None
            return rule.source if rule else None
        return None

    # ------------------------------------------------------------ guest filesystem

    def guest_fs(self) -> Layer:
        kind = LayerKind.GUEST_FS
        guest = self.domain.guest
        filesystems = self.disk.guest_filesystems
        if (guest is None and filesystems is None) or (guest is not None and not guest.agent):
            if self.domain.os_hint == "mswindows":
                self._windows_hint(kind)
            if guest is not None:
                return Layer(
                    kind, Verdict.UNKNOWN, guest.reason or "no guest agent", self._guest_fix()
                )
            return Layer(
                kind,
                Verdict.UNKNOWN,
                "no guest information (audit the live domain with a guest agent to check mounts)",
                self._guest_fix(),
            )
        if guest is not None and guest.is_windows:
            return self._windows_fs(kind)
        if not filesystems:
            return Layer(
                kind, Verdict.UNKNOWN, "the guest reports no mounted filesystem on this disk", None
            )
        kernel = guest.kernel_version if guest else None
        timer = guest.fstrim_timer if guest else None
        results: list[Layer] = []
        for fs in filesystems:
            rule = GUEST_FS.get(fs.fstype)
            where = f"{fs.mountpoint} ({fs.fstype})"
            options = fs.mount_options
            covers = guest.timer_covers(fs.mountpoint) if guest else timer
            if rule is None:
                results.append(
                    Layer(
                        kind,
                        Verdict.UNKNOWN,
                        f"{where}: vmtrim does not know this filesystem",
                        _LINUX_FIX,
                    )
                )
                continue
            off = options is not None and "nodiscard" in options
            online = rule.mount_option or bool(
                rule.mount_option_since and kernel and kernel >= rule.mount_option_since
            )
            if options is not None and "discard" in options and online:
                results.append(Layer(kind, Verdict.PASS, f"{where} is mounted with discard"))
            elif not off and rule.default_since and kernel and kernel >= rule.default_since:
                results.append(
                    Layer(
                        kind,
                        Verdict.PASS,
                        f"{where} discards by default on Linux {format_version(kernel)}",
                    )
                )
            elif timer and rule.fstrim and covers:
                scope = " (it is in /etc/fstab)" if guest and guest.fstrim_scope == "fstab" else ""
                results.append(Layer(kind, Verdict.PASS, f"{where}: fstrim.timer trims it{scope}"))
            elif timer and rule.fstrim and covers is False and guest is not None:
                what = (
                    "only the filesystems in /etc/fstab"
                    if guest.fstrim_scope == "fstab"
                    else "only " + ", ".join(guest.fstrim_only)
                )
                results.append(
                    Layer(
                        kind,
                        Verdict.BLOCK,
                        f"{where} is mounted without discard, and fstrim.timer skips it:"
                        f" fstrim.service runs `{guest.fstrim_command}`, which trims {what}",
                        f"in the guest: list {fs.mountpoint} in /etc/fstab, or mount it with"
                        " `-o discard`",
                    )
                )
            elif options is None or timer is None or covers is None:
                results.append(
                    Layer(
                        kind,
                        Verdict.UNKNOWN,
                        f"{where}: mount options or fstrim.timer not known",
                        rule.needs,
                    )
                )
            else:
                results.append(
                    Layer(
                        kind,
                        Verdict.BLOCK,
                        f"{where} is mounted without discard and fstrim.timer is off",
                        f"in the guest: {rule.needs}",
                    )
                )
        return _worst(results)

    def _windows_fs(self, kind: LayerKind) -> Layer:
        """Windows trims by itself, but only a disk it sees as an SSD or as thin-provisioned."""
        disk = self.disk
        self.findings += [
            Finding(Severity.INFO, kind, WINDOWS_NO_COUNTS.summary, None, WINDOWS_NO_COUNTS.source),
            Finding(
                Severity.INFO,
                kind,
                "a Windows retrim (Optimize Drives) takes minutes: vmtrim trim waits"
                f" {WINDOWS_TRIM_TIMEOUT:g} s for a Windows guest unless --timeout is given",
                None,
                WINDOWS_TRIM_TIMEOUT_SOURCE,
            ),
        ]
        ssd = FACTS["windows_ssd"]
        if disk.bus == "virtio":
            return Layer(
                kind,
                Verdict.PASS,
                "Windows trims by itself; rotation_rate does not apply to virtio-blk:"
                " viostor reports discard support itself",
            )
        rate = parse_size(disk.device_properties.get("rotation_rate"))
        if rate == 1:
            return Layer(kind, Verdict.PASS, "Windows sees an SSD (rotation_rate=1) and retrims it")
        granularity = parse_size(disk.device_properties.get("discard_granularity"))
        if disk.bus == "scsi" and granularity != 0:
            self.findings.append(
                Finding(
                    Severity.WARNING,
                    kind,
                    "Windows sees a thin-provisioned disk, not an SSD (no rotation_rate=1):"
                    " Optimize Drives retrims it but also consolidates slabs, rewriting"
                    " data (virtio-win #666)",
                    _SSD_FIX,
                    f"{FACTS['windows_vioscsi'].source}; {ssd.source}",
                )
            )
            return Layer(kind, Verdict.PASS, "Windows retrims a thin-provisioned SCSI disk")
        return Layer(
            kind,
            Verdict.BLOCK,
            f"Windows sees a hard disk drive (this {disk.bus or '?'} disk has no"
            " rotation_rate=1): Optimize Drives defragments it and sends no TRIM",
            _SSD_FIX,
        )

    def _windows_hint(self, kind: LayerKind) -> None:
        """No agent, but the definition's libosinfo says Windows: what its disks show it,
        as warnings (the guest itself was not asked)."""
        layer = self._windows_fs(kind)
        if layer.verdict is Verdict.BLOCK:
            self.findings.append(
                Finding(
                    Severity.WARNING,
                    kind,
                    f"the definition says Windows (libosinfo): {layer.reason}",
                    layer.fix,
                    FACTS["windows_ssd"].source,
                )
            )

    def _guest_fix(self) -> str:
        """What to do in a guest vmtrim could not ask: for its OS, when the definition says."""
        hint = self.domain.os_hint
        if hint == "mswindows":
            return _WINDOWS_FIX
        return _LINUX_FIX if hint == "linux" else _GUEST_FIX

    # ------------------------------------------------------------ guest driver

    def guest_driver(self) -> Layer:
        kind = LayerKind.GUEST_DRIVER
        disk = self.disk
        queue = disk.guest_queue
        if queue is not None and queue.discard_max_bytes is not None:
            # The guest kernel's own view: proof, whatever the configuration says.
            read = f"the guest reads /sys/block/{queue.device}/queue/discard_max_bytes ="
            if queue.discard_max_bytes == 0:
                return Layer(
                    kind,
                    Verdict.BLOCK,
                    f"{read} 0: the guest sends this disk no discard at all",
                    "make the QEMU device offer discard (see the device layer: no"
                    " discard=off, no discard_granularity=0 on scsi-hd or ide-hd, a machine"
                    " type >= 4.0 for virtio-blk), or move the disk to virtio-scsi (bus='scsi')",
                )
            granularity = queue.discard_granularity
            return Layer(
                kind,
                Verdict.PASS,
                f"{read} {queue.discard_max_bytes}"
                + (f" (discard_granularity {granularity})" if granularity is not None else ""),
            )
        if disk.qemu_device in _PASSTHROUGH:
            return Layer(
                kind,
                Verdict.PASS,
                "passthrough LUN: the guest's sd driver sees the real device's UNMAP support",
            )
        rule = BUSES.get(disk.bus) if disk.bus else None
        if rule is None:
            return Layer(
                kind,
                Verdict.UNKNOWN,
                f"bus {disk.bus or '?'}: vmtrim does not know its guest driver",
                None,
            )
        if rule.bus == "virtio":
            return self._virtio_guest(kind, rule.reason)
        guest = self.domain.guest
        if guest is not None and guest.agent:
            windows = guest.is_windows
        else:  # no agent: the OS the definition names (virt-install's libosinfo)
            windows = self.domain.os_hint == "mswindows"
        if windows and rule.bus == "scsi":
            return self._vioscsi(kind, guest)
        fix = None
        if rule.guest is not Verdict.PASS:
            fix = "move the disk to a virtio-scsi controller (bus='scsi')"
        return Layer(kind, rule.guest, f"{rule.bus}: {rule.reason}", fix)

    def _virtio_guest(self, kind: LayerKind, what: str) -> Layer:
        need = FACTS["virtio_blk_guest"].linux or (5, 0)
        guest = self.domain.guest
        kernel = guest.kernel_version if guest else None
        if guest is not None and guest.is_windows:
            version = guest.driver_version("viostor")
            return Layer(
                kind,
                Verdict.UNKNOWN,
                f"Windows viostor{f' {version}' if version else ''}: it passes discard only"
                " since virtio-win PR #399 (2019), and a Windows guest's own view cannot be"
                " read",
                "update the virtio-win drivers, or move the disk to virtio-scsi (vioscsi)",
            )
        if kernel is None:
            return Layer(
                kind,
                Verdict.UNKNOWN,
                f"{what} needs guest Linux >="
                f" {format_version(need)}; the guest kernel is not known",
                f"make sure the guest runs Linux >= {format_version(need)}, or use"
                " virtio-scsi (bus='scsi')",
            )
        if kernel >= need:
            return Layer(
                kind,
                Verdict.PASS,
                f"{what}: guest Linux {format_version(kernel)} >= {format_version(need)}",
            )
        return Layer(
            kind,
            Verdict.BLOCK,
            f"guest Linux {format_version(kernel)} is older than"
            f" {format_version(need)}: virtio_blk sends no DISCARD",
            "move the disk to virtio-scsi (bus='scsi'), or upgrade the guest kernel",
        )

    def _vioscsi(self, kind: LayerKind, guest: GuestInfo | None) -> Layer:
        """Windows on a SCSI controller: vioscsi on virtio-scsi, and the May 2026 regression."""
        disk = self.disk
        if disk.controller_model != "virtio-scsi":
            return Layer(
                kind,
                Verdict.UNKNOWN,
                f"Windows on a {disk.controller_model or '?'} SCSI controller: vmtrim knows"
                " only vioscsi (virtio-scsi)",
                "move the disk to a virtio-scsi controller",
            )
        version = guest.driver_version("vioscsi") if guest else None
        granularity = parse_size(disk.device_properties.get("discard_granularity"))
        if granularity not in (32 << 10, 64 << 10):
            fact = FACTS["windows_retrim_2026"]
            shown = "not set" if granularity is None else f"{granularity} bytes"
            self.findings.append(
                Finding(
                    Severity.WARNING,
                    kind,
                    f"Windows vioscsi{f' {version}' if version else ''} with"
                    f" discard_granularity {shown}: {fact.summary}",
                    _GRANULARITY_FIX,
                    fact.source,
                )
            )
        return Layer(
            kind,
            Verdict.PASS,
            f"Windows vioscsi{f' {version}' if version else ''}: SCSI UNMAP (virtio-scsi)",
        )

    # ------------------------------------------------------------ QEMU device

    def device(self) -> Layer:
        kind = LayerKind.DEVICE
        disk = self.disk
        if disk.device is DeviceType.CDROM:
            return Layer(kind, Verdict.BLOCK, "cdrom: read-only media, nothing to discard")
        if disk.qemu_device is None:
            return Layer(kind, Verdict.UNKNOWN, f"bus {disk.bus or '?'}: no known QEMU device")
        name = disk.qemu_device
        rule = DEVICES.get(name)
        if rule is None:
            return Layer(kind, Verdict.UNKNOWN, f"{name}: vmtrim does not know this device")
        if not rule.discard:
            return Layer(
                kind,
                Verdict.BLOCK,
                f"{name} has no discard command",
                "move the disk to a virtio-scsi controller (bus='scsi')",
            )
        if name in _PASSTHROUGH:
            return Layer(
                kind, Verdict.PASS, f"{name}: SCSI commands, UNMAP included, go to the host device"
            )
        # Measured: 0 hides discard from the guest on scsi-hd and ide-hd, not on virtio-blk.
        granularity = parse_size(disk.device_properties.get("discard_granularity"))
        if granularity == 0 and rule.bus in ("scsi", "ide"):
            what = "LBPME: Linux sd" if rule.bus == "scsi" else "the TRIM bit: libata"
            return Layer(
                kind,
                Verdict.BLOCK,
                f"{name}: discard_granularity=0 clears {what} turns discard off"
                " (the guest reads discard_max_bytes = 0)",
                "remove discard_granularity=0 from the device",
            )
        if rule.bus == "virtio":
            return self._virtio_device(kind, name)
        if rule.bus == "nvme":
            return self._versioned(kind, name, "nvme_dsm", "NVMe Dataset Management")
        controller = f" on {disk.controller_model}" if disk.controller_model else ""
        what = {
            "scsi": "passes SCSI UNMAP",
            "ide": "passes ATA TRIM",
            "usb": "passes SCSI UNMAP (usb-storage)",
        }.get(rule.bus, "passes discard")
        return Layer(kind, Verdict.PASS, f"{name}{controller} {what}")

    def _virtio_device(self, kind: LayerKind, name: str) -> Layer:
        fact = FACTS["virtio_blk_discard"]
        need_qemu = fact.qemu or (4, 0)
        need_machine = fact.machine or (4, 0)
        explicit = self.disk.device_properties.get("discard")
        qemu, exact = qemu_lower_bound(self.domain)
        if explicit is not None and str(explicit).lower() in ("off", "false", "no"):
            return Layer(
                kind,
                Verdict.BLOCK,
                f"{name} has discard=off",
                "remove discard=off from the virtio-blk device",
            )
        if exact and qemu is not None and qemu < need_qemu:
            return Layer(
                kind,
                Verdict.BLOCK,
                f"QEMU {format_version(qemu)} is older than"
                f" {format_version(need_qemu)}: virtio-blk has no discard",
                f"upgrade QEMU to >= {format_version(need_qemu)}, or use virtio-scsi",
            )
        if explicit is not None:
            return Layer(kind, Verdict.PASS, f"{name} has discard=on set explicitly")
        machine = self.domain.machine
        if machine is None:
            if exact and qemu is not None:
                return Layer(
                    kind,
                    Verdict.PASS,
                    f"no machine type given: QEMU {format_version(qemu)} defaults to its newest",
                )
            return Layer(
                kind,
                Verdict.UNKNOWN,
                "no machine type given: virtio-blk discard"
                f" needs a machine type >= {format_version(need_machine)}",
                "give a versioned machine type >= 4.0 (e.g. -machine pc-q35-7.2)",
            )
        version = MachineType.parse(machine).version
        if version is None:
            if exact and qemu is not None:
                return Layer(
                    kind,
                    Verdict.PASS,
                    f"machine {machine} is an alias of QEMU"
                    f" {format_version(qemu)}'s newest machine type",
                )
            return Layer(
                kind,
                Verdict.UNKNOWN,
                f"machine {machine} is an alias: its version depends on the QEMU release",
            )
        if version < need_machine:
            return Layer(
                kind,
                Verdict.BLOCK,
                f"machine type {machine} is older than"
                f" {format_version(need_machine)}: QEMU turns virtio-blk discard off"
                " for it (hw_compat_3_1)",
                f"change the machine type to >= {format_version(need_machine)} (for"
                " example pc-q35-7.2; the guest sees new hardware), or move the disk"
                " to virtio-scsi (bus='scsi'), or set discard=on on the virtio-blk"
                " device",
            )
        return Layer(
            kind,
            Verdict.PASS,
            f"{name} on machine {machine} (>= {format_version(need_machine)}) has discard on",
        )

    def _versioned(self, kind: LayerKind, name: str, key: str, what: str) -> Layer:
        need = FACTS[key].qemu or (0,)
        qemu, exact = qemu_lower_bound(self.domain)
        if qemu is not None and qemu >= need:
            return Layer(kind, Verdict.PASS, f"{name}: {what} (QEMU >= {format_version(need)})")
        if exact:
            return Layer(
                kind,
                Verdict.BLOCK,
                f"{name}: QEMU {format_version(qemu)} is older"
                f" than {format_version(need)} ({what})",
                f"upgrade QEMU to >= {format_version(need)}",
            )
        return Layer(
            kind,
            Verdict.UNKNOWN,
            f"{name}: {what} needs QEMU >= {format_version(need)}; the QEMU version is not known",
        )

    # ------------------------------------------------------------ QEMU block nodes

    def block_nodes(self) -> Layer:
        kind = LayerKind.BLOCK_NODE
        disk = self.disk
        if disk.qemu_device in _PASSTHROUGH:
            return Layer(kind, Verdict.PASS, "passthrough: QEMU's discard option does not apply")
        if disk.empty:
            return Layer(kind, Verdict.UNKNOWN, "no medium")
        top = disk.node
        if top is None:
            return Layer(
                kind, Verdict.UNKNOWN, f"{disk.storage.value} disk: no QEMU block node to check"
            )
        if disk.read_only:
            return Layer(kind, Verdict.BLOCK, "read-only: nothing can be discarded")
        need = self._libvirt_too_old("libvirt_discard")
        if need is not None:
            return Layer(
                kind,
                Verdict.BLOCK,
                f"libvirt {format_version(self.domain.libvirt_version)} is older than"
                f" {format_version(need)}: it has no <driver discard=...>, so QEMU gets"
                " its default, discard=ignore",
                f"upgrade libvirt to >= {format_version(need)}",
            )
        results = [self._discard_chain(top), self._format_layer(top)]
        return _worst(results)

    def _discard_chain(self, top: BlockNode) -> Layer:
        kind = LayerKind.BLOCK_NODE
        unknown: Layer | None = None
        for node in top.file_chain():
            if node.discard == "unmap":
                continue
            if node.discard_unknown:  # a known block lower down still wins
                unknown = unknown or Layer(
                    kind,
                    Verdict.UNKNOWN,
                    f"{node.node_name or node.driver or 'node'}: {node.discard_unknown}",
                    "give the disk discard=unmap where it is"
                    ' defined (-drive/-blockdev, or blockdev-add "discard":"unmap")',
                )
                continue
            setting = (
                f"discard={node.discard}"
                if node.discard
                else "no discard setting (QEMU's default is ignore)"
            )
            label = str(node.defined_by or node.node_name or node.driver or "node")
            if node is top:
                what = "the node the device uses"
            else:
                what = f"{top.node_name or 'its parent'}'s file child"
            return Layer(
                kind,
                Verdict.BLOCK,
                f"{label} ({what}) has {setting}: guest discards are dropped here",
                self._discard_fix(node),
            )
        if unknown is not None:
            return unknown
        detail = " and its file child" if top.file else ""
        return Layer(
            kind,
            Verdict.PASS,
            f"discard=unmap on {top.node_name or top.driver or 'the'} node{detail}",
        )

    def _discard_fix(self, node: BlockNode) -> str:
        if self.domain.origin is Origin.LIBVIRT_XML:
            return "add discard='unmap' to the disk's <driver> element"
        origin = node.defined_by
        if origin is not None and origin.kind == "-blockdev":
            return f'add "discard":"unmap" to {origin}'
        if origin is not None and origin.kind == "-drive":
            return f"add discard=unmap to -drive {origin.name}"
        return "add discard=unmap to the drive"

    def _format_layer(self, top: BlockNode) -> Layer:
        kind = LayerKind.BLOCK_NODE
        fmt: str | None = self.disk.format
        if fmt is None and self.image is not None:
            fmt = str(self.image.format)
        if fmt is None:
            return Layer(
                kind,
                Verdict.UNKNOWN,
                "no format given (QEMU probes it) and the image is not readable here",
                "give the format explicitly (format=qcow2)",
            )
        if fmt in FILTERS:
            return Layer(kind, Verdict.PASS, f"{fmt} filter passes discards on")
        verdict, reason = FORMATS.get(fmt, (Verdict.UNKNOWN, f"format {fmt}: not known"))
        for node in top.file_chain():
            if str(node.options.get("pass-discard-request", "on")).lower() in ("off", "false"):
                return Layer(
                    kind,
                    Verdict.BLOCK,
                    f"{node.node_name or fmt}:"
                    " pass-discard-request=off keeps the space in the file",
                    "remove pass-discard-request=off",
                )
        return Layer(
            kind,
            verdict,
            reason,
            None
            if verdict is Verdict.PASS
            else "convert the image to qcow2 or raw (qemu-img convert -O qcow2)",
        )

    # ------------------------------------------------------------ host storage

    def host_storage(self) -> Layer:
        kind = LayerKind.HOST_STORAGE
        disk = self.disk
        probe: Probe
        if disk.storage is StorageKind.FILE and disk.source:
            probe = self.probes.file(disk.source)
        elif disk.storage is StorageKind.BLOCK and disk.source:
            probe = self.probes.block(disk.source)
        elif disk.storage in (StorageKind.NETWORK, StorageKind.NVME, StorageKind.DIR):
            probe = self.probes.network(disk.protocol, disk.source)
        elif disk.storage is StorageKind.VOLUME:
            probe = Probe(
                Verdict.UNKNOWN,
                f"storage pool volume {disk.source}: resolve it"
                " through a libvirt connection (-c URI)",
            )
        elif disk.storage is StorageKind.NONE:
            probe = Probe(Verdict.UNKNOWN, "no medium")
        else:
            probe = Probe(
                Verdict.UNKNOWN,
                f"{disk.storage.value} storage {disk.protocol or ''}: vmtrim cannot tell".replace(
                    "  ", " "
                ),
            )
        self.findings += [
            Finding(Severity.WARNING, kind, n.message, None, n.source) for n in probe.notes
        ]
        return Layer(kind, probe.verdict, probe.reason, probe.fix)

    # ------------------------------------------------------------ image facts

    def _read_image(self) -> ImageInfo | None:
        disk = self.disk
        if disk.storage is not StorageKind.FILE or not disk.source:
            return None
        if not os.path.isfile(disk.source):
            return None
        if disk.format not in (None, "qcow2", "raw"):
            return None  # a format vmtrim cannot read (vmdk, ...)
        from vmtrim.image.info import inspect  # numpy: only when there is an image to read

        try:
            # Only header facts are used here; the metadata scan is for `image info`.
            return inspect(disk.source, follow_backing=False, header_only=True)
        except (VmtrimError, OSError) as exc:
            text = exc.one_line() if isinstance(exc, VmtrimError) else str(exc)
            self.findings.append(
                Finding(
                    Severity.WARNING, LayerKind.BLOCK_NODE, f"cannot read the image header: {text}"
                )
            )
            return None

    def _format_notes(self) -> list[Finding]:
        notes: list[Finding] = []
        disk = self.disk
        layer = LayerKind.BLOCK_NODE
        info = self.image
        if disk.storage is StorageKind.FILE and not disk.read_only:
            note = NOTES["ls_size"]
            notes.append(
                Finding(Severity.INFO, LayerKind.HOST_STORAGE, note.message, None, note.source)
            )
        if disk.format_defaulted:
            looks_qcow2 = (disk.source or "").endswith(".qcow2") or (
                info is not None and info.format == "qcow2"
            )
            notes.append(
                Finding(
                    Severity.WARNING if looks_qcow2 else Severity.INFO,
                    layer,
                    "no <driver type=...>: libvirt opens the image as raw (it does not probe)",
                    "set <driver name='qemu' type='qcow2'/> (or 'raw') explicitly",
                )
            )
        if info is not None:
            if disk.format is None:
                notes.append(
                    Finding(
                        Severity.INFO,
                        layer,
                        f"no format given: QEMU probes it (the header says {info.format})",
                        f"give format={info.format} explicitly",
                    )
                )
            if disk.format and disk.format != info.format and disk.format in ("qcow2", "raw"):
                notes.append(
                    Finding(
                        Severity.WARNING,
                        layer,
                        f"configured as {disk.format} but the file is {info.format}",
                        f"set the format to {info.format}",
                    )
                )
            if info.format == "qcow2":
                cluster = int(info.cluster_size or 0)
                note = NOTES["qcow2_small_discard"]
                notes.append(
                    Finding(
                        Severity.INFO,
                        layer,
                        note.message.format(cluster=_size(cluster)),
                        None,
                        note.source,
                    )
                )
                if info.compat == "0.10" or info.version == 2:
                    note = NOTES["qcow2_compat010"]
                    notes.append(
                        Finding(
                            Severity.WARNING,
                            layer,
                            note.message,
                            "qemu-img amend -o compat=1.1 IMAGE (VM off)",
                            note.source,
                        )
                    )
                if info.snapshot_count:
                    note = NOTES["qcow2_snapshots"]
                    notes.append(
                        Finding(
                            Severity.WARNING,
                            layer,
                            note.message.format(count=info.snapshot_count),
                            "delete snapshots you no longer need (qemu-img snapshot -d)",
                            note.source,
                        )
                    )
                if info.backing_file and (disk.node is None or disk.node.backing is None):
                    notes.append(self._overlay(str(info.backing_file)))
            if info.virtual_size and info.allocated_bytes >= info.virtual_size:
                note = NOTES["preallocation_lost"]
                notes.append(
                    Finding(
                        Severity.INFO,
                        layer,
                        f"the image looks fully allocated (preallocated?): {note.message}",
                        None,
                        note.source,
                    )
                )
        elif disk.format == "qcow2" and disk.storage is StorageKind.FILE:
            note = NOTES["qcow2_small_discard"]
            notes.append(
                Finding(
                    Severity.INFO,
                    layer,
                    note.message.format(cluster="64 KiB by default"),
                    None,
                    note.source,
                )
            )
        if disk.node is not None and disk.node.backing is not None:
            backing = disk.node.backing
            notes.append(self._overlay(backing.filename or backing.node_name or "a backing file"))
        top = disk.node
        if top is not None:
            if top.detect_zeroes == "unmap" and top.discard != "unmap":
                notes.append(
                    Finding(
                        Severity.WARNING,
                        layer,
                        "detect_zeroes=unmap needs"
                        " discard=unmap; without it zeroes are only written",
                        "set discard='unmap' too",
                        FACTS["detect_zeroes"].source,
                    )
                )
            elif (
                top.discard == "unmap" and top.detect_zeroes in (None, "off") and not disk.read_only
            ):
                notes.append(
                    Finding(
                        Severity.INFO,
                        layer,
                        "detect_zeroes='unmap' would also free space when the guest writes zeroes",
                        "optional: add detect_zeroes='unmap'",
                        FACTS["detect_zeroes"].source,
                    )
                )
            if top.detect_zeroes not in (None, "off"):
                old = self._libvirt_finding(
                    "detect_zeroes",
                    f"it ignores detect_zeroes='{top.detect_zeroes}'",
                    f"upgrade libvirt to >= {format_version(FACTS['detect_zeroes'].libvirt)}",
                )
                notes += [old] if old else []
            if top.discard_no_unref is not None:
                old = self._libvirt_finding(
                    "discard_no_unref",
                    "it has no <driver discard_no_unref=...>",
                    f"upgrade libvirt to >= {format_version(FACTS['discard_no_unref'].libvirt)}",
                )
                notes += [old] if old else []
            if top.discard_no_unref:
                notes.append(
                    Finding(
                        Severity.INFO,
                        layer,
                        "discard-no-unref=on: qcow2 keeps"
                        " the clusters allocated (the file is still punched)",
                        None,
                        FACTS["discard_no_unref"].source,
                    )
                )
        if (
            disk.protocol
            and disk.protocol in PROTOCOLS
            and PROTOCOLS[disk.protocol].read_only
            and not disk.read_only
        ):
            notes.append(
                Finding(
                    Severity.WARNING,
                    LayerKind.HOST_STORAGE,
                    f"{disk.protocol} disks are read-only in QEMU",
                    None,
                    PROTOCOLS[disk.protocol].source,
                )
            )
        return notes

    def _overlay(self, backing: str) -> Finding:
        note = NOTES["qcow2_overlay"]
        return Finding(
            Severity.INFO,
            LayerKind.BLOCK_NODE,
            note.message.format(backing=backing),
            "to shrink the whole chain: qemu-img commit or a block-stream, then trim",
            note.source,
        )


def _worst(layers: list[Layer]) -> Layer:
    """The worst of several verdicts for one layer, keeping its reason and fix."""
    worst = layers[0]
    for layer in layers[1:]:
        if layer.verdict.rank > worst.verdict.rank:
            worst = layer
    return worst


def _size(n: int) -> str:
    """Cluster sizes are powers of two: 65536 -> '64 KiB'."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"
