"""What ``vmtrim fix`` does, independent of the input form.

:func:`vmtrim.fix.xml.fix_domain_xml` (libvirt XML) and
:func:`vmtrim.fix.qemu.fix_qemu_args` (a QEMU command line) both take
:class:`FixOptions` and return a :class:`FixResult`: the new text, the changes made
(one row per disk and setting), the disks left alone with the reason, and what the
audit still finds on the fixed configuration that no configuration can fix (the
guest, the host filesystem).

Fix changes what the audit finds blocking at the configuration layers (the QEMU
device and the block nodes) and nothing else: the decision which disks to touch is
the audit's (:mod:`vmtrim.audit.engine`), and the fixed text is audited again to prove it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vmtrim.errors import BadInput
from vmtrim.facts import FORMATS, PROTOCOLS
from vmtrim.model import DeviceType, Disk, DiskReport, Layer, LayerKind, StorageKind, Verdict

SCHEMA = "vmtrim.fix/1"


@dataclass(frozen=True)
class FixOptions:
    """What to change besides ``discard='unmap'``.

    ``bus='scsi'`` moves disks whose device cannot pass discard onto virtio-scsi
    (every disk with ``all_disks``). ``modernize`` rewrites legacy ``-drive if=...``
    into ``-drive if=none`` plus ``-device`` (QEMU command lines only).
    """

    detect_zeroes: str | None = None  # "unmap" (or "on"/"off"); None leaves it alone
    bus: str | None = None  # "scsi" or None
    all_disks: bool = False
    modernize: bool = False

    def check(self, subject: str, *, command_line: bool) -> None:
        """Raise :class:`BadInput` for options the input kind cannot take."""
        if self.bus not in (None, "scsi"):
            raise BadInput(f"--bus {self.bus}: only 'scsi' is supported", subject=subject)
        if self.modernize and not command_line:
            raise BadInput("--modernize applies to QEMU command lines, not libvirt XML", subject)


@dataclass(frozen=True)
class Change:
    """One setting changed on one disk (or on the domain, ``disk`` None)."""

    disk: str | None
    setting: str  # "discard", "detect_zeroes", "driver", "bus", "target", "address", ...
    old: str | None
    new: str | None

    def describe(self) -> str:
        where = f"{self.disk}: " if self.disk else ""
        if self.old is None:
            return f"{where}{self.setting}: add {self.new}"
        if self.new is None:
            return f"{where}{self.setting}: drop {self.old}"
        return f"{where}{self.setting}: {self.old} -> {self.new}"

    def to_json(self) -> dict[str, Any]:
        return {"disk": self.disk, "setting": self.setting, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class Skip:
    """A disk that fix left alone, and why.

    ``blocking`` is True when the disk is writable and its discard path still blocks
    at a layer the configuration decides, so the command exits 1 (a cdrom or a lun
    is left alone with ``blocking`` False: there is nothing to fix).
    """

    disk: str
    reason: str
    blocking: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"disk": self.disk, "reason": self.reason, "blocking": self.blocking}


@dataclass(frozen=True)
class Remaining:
    """A layer that still does not pass after the fix, which no configuration can change."""

    disk: str
    layer: str
    verdict: str
    reason: str
    fix: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "disk": self.disk,
            "layer": self.layer,
            "verdict": self.verdict,
            "reason": self.reason,
            "fix": self.fix,
        }


@dataclass
class FixResult:
    """The outcome of one fix: ``new_text`` equals ``original`` when nothing had to change."""

    subject: str
    original: str
    new_text: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # disks that needed nothing
    fixed: list[str] = field(default_factory=list)  # disks that were changed
    remaining: list[Remaining] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.new_text != self.original

    @property
    def diff(self) -> str:
        """A unified diff from the original to the new text ('' when unchanged)."""
        return "".join(
            difflib.unified_diff(
                self.original.splitlines(keepends=True),
                _with_newline(self.new_text.splitlines(keepends=True)),
                fromfile=self.subject,
                tofile=f"{self.subject} (fixed)",
            )
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.subject,
            "changed": self.changed,
            "changes": [change.to_json() for change in self.changes],
            "fixed": self.fixed,
            "already_enabled": self.already,
            "skipped": [skip.to_json() for skip in self.skipped],
            "remaining": [item.to_json() for item in self.remaining],
        }


def _with_newline(lines: list[str]) -> list[str]:
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def disk_name(disk: Disk) -> str:
    return disk.target or disk.ident


def leave_alone(disk: Disk) -> Skip | None:
    """Why fix must not touch this disk, or None when it may.

    These disks are not a configuration problem: the media is read-only, the guest
    talks to the device itself (lun), other guests share the blocks, or the storage
    cannot discard whatever the configuration says.
    """
    name = disk_name(disk)

    def skip(reason: str, blocking: bool = False) -> Skip:
        return Skip(name, reason, blocking)

    if disk.device is DeviceType.CDROM:
        return skip("cdrom: read-only media has nothing to discard")
    if disk.device is DeviceType.LUN:
        return skip("lun: SCSI passthrough, the guest's UNMAP already goes to the device")
    if disk.device is DeviceType.FLOPPY:
        return skip("floppy: the floppy controller has no discard command", True)
    if disk.empty:
        return skip("no media")
    if disk.read_only:
        return skip("read-only: the guest cannot discard")
    if disk.shareable:
        return skip("shareable: other domains use these blocks; discard is theirs to coordinate")
    if disk.storage is StorageKind.UNKNOWN:
        return skip("unknown disk type: vmtrim does not know how it reaches storage", True)
    if disk.storage is StorageKind.VHOSTUSER:
        return skip("vhostuser: the backend outside QEMU decides about discard")
    if disk.storage is StorageKind.DIR:
        return skip("dir: a host directory shown as FAT (vvfat) cannot discard")
    if disk.storage in (StorageKind.NETWORK, StorageKind.NVME):
        rule = PROTOCOLS.get(disk.protocol or "")
        if rule is None:
            return skip(f"network protocol '{disk.protocol}' is unknown to vmtrim", True)
        if rule.verdict is Verdict.BLOCK:
            return skip(
                f"network protocol '{disk.protocol}' cannot pass discard: {rule.reason}",
                not rule.read_only,
            )
    verdict, reason = FORMATS.get(disk.format or "", (Verdict.PASS, ""))
    if verdict is Verdict.BLOCK:
        return skip(f"format {disk.format}: {reason}; convert the image (qemu-img convert)", True)
    return None


def device_blocker(report: DiskReport) -> Layer | None:
    """The device layer when it blocks (e.g. virtio-blk on a machine type before 4.0)."""
    layer = report.layer(LayerKind.DEVICE)
    return layer if layer.verdict is Verdict.BLOCK else None


def move_to_scsi(report: DiskReport, options: FixOptions, name: str) -> bool | Skip:
    """Whether the disk moves to virtio-scsi, or why it is left alone (its device blocks
    discard and ``--bus scsi`` was not given)."""
    blocker = device_blocker(report)
    move = options.bus == "scsi" and (
        blocker is not None or (options.all_disks and report.disk.bus != "scsi")
    )
    if blocker is not None and not move:
        return Skip(name, f"{blocker.reason}; run with --bus scsi to move it to virtio-scsi", True)
    return move


def remaining_after(reports: Iterable[tuple[DiskReport, str]]) -> list[Remaining]:
    """Layers of the fixed (or already fine) disks, under their names, that still don't pass."""
    items: list[Remaining] = []
    for report, name in reports:
        for layer in report.layers:
            if layer.verdict is Verdict.PASS:
                continue
            items.append(
                Remaining(name, layer.kind.value, layer.verdict.value, layer.reason, layer.fix)
            )
    return items
