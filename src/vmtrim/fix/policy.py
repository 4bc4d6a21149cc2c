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

import bisect
import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from vmtrim._util.versions import Version
from vmtrim.errors import BadInput
from vmtrim.facts import FORMATS, PROTOCOLS
from vmtrim.model import DeviceType, Disk, DiskReport, Layer, LayerKind, StorageKind, Verdict

if TYPE_CHECKING:
    from vmtrim.audit.hostprobe import HostProbes

SCHEMA = "vmtrim.fix/1"

LOGICAL_BLOCK = 512
# QEMU's discard_granularity is a uint32 (-device scsi-hd,help: default 4294967295, "not
# set"): the largest power of two it takes is 2 GiB.
GRANULARITY_MAX = 1 << 31
_SIZE = re.compile(r"(\d{1,19})\s*(?:([kmg])(?:i?b)?|b)?")
_SCALE = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
Granularity = int | Literal["auto"]


@dataclass(frozen=True)
class FixOptions:
    """What to change besides ``discard='unmap'``.

    ``bus='scsi'`` moves disks whose device cannot pass discard onto virtio-scsi
    (every disk with ``all_disks``). ``modernize`` rewrites legacy ``-drive if=...``
    into ``-drive if=none`` plus ``-device`` (QEMU command lines only).

    ``discard_granularity`` (bytes, or ``"auto"``: what the layers below the device
    free, :func:`vmtrim.audit.granularity.suggested_device_granularity`) and ``ssd``
    (``rotation_rate=1``) change what the QEMU device tells the guest. In libvirt XML
    how depends on the libvirt release: the running domain's, else ``libvirt_version``
    (the release an XML file is for).
    """

    detect_zeroes: str | None = None  # "unmap" (or "on"/"off"); None leaves it alone
    bus: str | None = None  # "scsi" or None
    all_disks: bool = False
    modernize: bool = False
    discard_granularity: Granularity | None = None
    ssd: bool = False
    libvirt_version: Version | None = None

    @property
    def device_settings(self) -> bool:
        """Whether the QEMU device itself is to change (granularity or SSD)."""
        return self.discard_granularity is not None or self.ssd

    def check(self, subject: str, *, command_line: bool) -> None:
        """Raise :class:`BadInput` for options the input kind cannot take."""
        if self.bus not in (None, "scsi"):
            raise BadInput(f"--bus {self.bus}: only 'scsi' is supported", subject=subject)
        if self.modernize and not command_line:
            raise BadInput("--modernize applies to QEMU command lines, not libvirt XML", subject)
        if isinstance(self.discard_granularity, int):
            check_granularity(self.discard_granularity, str(self.discard_granularity))


def parse_granularity(text: str) -> Granularity:
    """``--discard-granularity``: ``auto``, or bytes (4096, 64K, 64KiB, 1M, 1MiB).

    :raises BadInput: not a size, not a power of two, below the 512-byte logical block,
        or above what QEMU's property takes.
    """
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    match = _SIZE.fullmatch(word)
    if match is None:
        raise BadInput(
            f"{text!r} is not a size: give bytes (4096, 64K, 64KiB, 1M) or auto",
            subject="--discard-granularity",
        )
    value = int(match.group(1)) * _SCALE[match.group(2)]
    check_granularity(value, text)
    return value


def check_granularity(value: int, text: str) -> None:
    subject = "--discard-granularity"
    if value < LOGICAL_BLOCK:
        raise BadInput(
            f"{text}: smaller than the {LOGICAL_BLOCK}-byte logical block (QEMU refuses a"
            " discard_granularity that is not a multiple of logical_block_size)",
            subject=subject,
        )
    if value & (value - 1):
        raise BadInput(
            f"{_bytes(text, value)} is not a power of two (the guest kernel rounds discards"
            " with power-of-two masks)",
            subject=subject,
        )
    if value > GRANULARITY_MAX:
        raise BadInput(
            f"{text}: larger than 2G, the largest power of two QEMU's discard_granularity"
            " (a uint32) takes",
            subject=subject,
        )


def _bytes(text: str, value: int) -> str:
    return f"{value} bytes" if text.strip() == str(value) else f"{text} = {value} bytes"


DeviceFamily = Literal["ide", "scsi", "virtio", "other"]


def device_family(disk: Disk, moved: bool) -> DeviceFamily:
    """The QEMU device model family a disk has after the fix (``moved``: to scsi-hd)."""
    if moved:
        return "scsi"
    name = disk.qemu_device or ""
    if name.startswith("ide-") or disk.bus in ("ide", "sata"):
        return "ide"
    if name.startswith("scsi-") or disk.bus == "scsi":
        return "scsi"
    if name.startswith("virtio-blk") or disk.bus == "virtio":
        return "virtio"
    return "other"


@dataclass(frozen=True)
class DeviceWants:
    """What one disk's QEMU device gets: ``discard_granularity`` and ``rotation_rate``
    (None: left as it is), and why something asked for is not set."""

    discard_granularity: int | None = None
    rotation_rate: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.discard_granularity is None and self.rotation_rate is None


def device_wants(
    report: DiskReport,
    name: str,
    options: FixOptions,
    *,
    moved: bool,
    probes: HostProbes | None,
    read_images: bool,
    logical_block: int | None = None,
) -> DeviceWants:
    """The device settings ``options`` ask of this disk that its device model takes.

    ide-hd takes no ``discard_granularity`` but 512 (qemu hw/ide/qdev.c
    ide_dev_initfn); ``rotation_rate`` exists on ide-hd and scsi-hd only (QEMU 7.2
    ``-device virtio-blk-pci,help`` has none), and libvirt sets it for SCSI, IDE and SATA
    disks only (formatdomain.rst ``<target rotation_rate>``).
    """
    family = device_family(report.disk, moved)
    notes: list[str] = []
    granularity: int | None = None
    wanted = options.discard_granularity
    if wanted == "auto":
        wanted = auto_granularity(report.disk, probes, read_images)
    if logical_block is None:
        from vmtrim.audit.granularity import parse_size

        logical_block = parse_size(report.disk.device_properties.get("logical_block_size"))
    logical = logical_block or LOGICAL_BLOCK
    if wanted is not None and family == "ide" and wanted != LOGICAL_BLOCK:
        notes.append(
            f"{name}: discard_granularity not set: ide-hd (IDE/SATA) takes only 512 (QEMU"
            f" refuses {wanted}: hw/ide/qdev.c); --bus scsi --all-disks moves it to virtio-scsi"
        )
    elif wanted is not None and wanted % logical:
        notes.append(
            f"{name}: discard_granularity not set: {wanted} is not a multiple of its"
            f" logical_block_size {logical} (QEMU refuses it: hw/block/block.c)"
        )
    elif wanted is not None:
        granularity = wanted
    rotation: int | None = None
    if options.ssd and family in ("ide", "scsi"):
        rotation = 1
    elif options.ssd:
        what = "virtio-blk" if family == "virtio" else f"{report.disk.qemu_device or 'this'} device"
        notes.append(
            f"{name}: --ssd not set: {what} has no rotation_rate (only ide-hd and scsi-hd do);"
            " --bus scsi --all-disks moves it to virtio-scsi"
        )
    return DeviceWants(granularity, rotation, tuple(notes))


def auto_granularity(disk: Disk, probes: HostProbes | None, read_images: bool) -> int | None:
    """``--discard-granularity auto``: the unit the layers below the device free, when
    it is coarser than what the guest is told (None: nothing to change)."""
    from vmtrim.audit.granularity import granularity_stack, suggested_device_granularity

    image = _image_header(disk) if read_images else None
    return suggested_device_granularity(granularity_stack(disk, image, probes))


def _image_header(disk: Disk) -> Any:
    import os

    if disk.storage is not StorageKind.FILE or not disk.source or not os.path.isfile(disk.source):
        return None
    if disk.format not in (None, "qcow2", "raw"):
        return None
    from vmtrim.errors import VmtrimError
    from vmtrim.image.info import inspect

    try:
        return inspect(disk.source, follow_backing=False, header_only=True)
    except (VmtrimError, OSError):
        return None  # the audit of the same disk says why


@dataclass(frozen=True)
class Change:
    """One setting changed on one disk (or on the domain, ``disk`` None)."""

    disk: str | None
    setting: str  # "discard", "detect_zeroes", "driver", "bus", "target", "address", ...
    old: str | None
    new: str | None

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


@dataclass(frozen=True)
class BusMove:
    """A disk that ``--bus scsi`` moved: its old name and bus, its new name."""

    old: str
    new: str
    old_bus: str | None


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
    warnings: list[str] = field(default_factory=list)  # what the change does to the guest
    moves: list[BusMove] = field(default_factory=list)  # disks --bus scsi moved
    # The edits that made new_text, as (start, end, replacement) in the original; None
    # when the fixer does not keep them (the diff then compares the whole texts).
    edits: list[tuple[int, int, str]] | None = None

    @property
    def changed(self) -> bool:
        return self.new_text != self.original

    @property
    def diff(self) -> str:
        """A unified diff from the original to the new text ('' when unchanged)."""
        old = self.original.splitlines(keepends=True)
        new = self.new_text.splitlines(keepends=True)
        if self.edits is None:
            matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
        else:
            matcher = _EditMatcher(old, new, _edit_opcodes(self.original, old, self.edits))
        return unified_diff(matcher, old, new, self.subject, f"{self.subject} (fixed)")

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.subject,
            "changed": self.changed,
            "changes": [change.to_json() for change in self.changes],
            "fixed": self.fixed,
            "already_enabled": self.already,
            "skipped": [skip.to_json() for skip in self.skipped],
            "remaining": [item.to_json() for item in self.remaining],
            "warnings": self.warnings,
        }


Opcode = tuple[Literal["replace", "delete", "insert", "equal"], int, int, int, int]


class _EditMatcher(difflib.SequenceMatcher[str]):
    """difflib's grouping and context over opcodes we already know."""

    def __init__(self, old: list[str], new: list[str], opcodes: list[Opcode]) -> None:
        super().__init__(None, old, new, autojunk=False)
        self._known = opcodes

    def get_opcodes(self) -> list[Opcode]:
        return self._known


def _edit_opcodes(original: str, old: list[str], edits: list[tuple[int, int, str]]) -> list[Opcode]:
    """Line opcodes from the edits: only the lines an edit touches are compared.

    difflib on the whole texts is quadratic in the lines between changes (10,000 disks
    took minutes); here each changed region is matched on its own lines.
    """
    starts = [0]
    for line in old:
        starts.append(starts[-1] + len(line))
    # Merge the edits into regions of whole lines [first, last].
    regions: list[tuple[int, int, list[tuple[int, int, str]]]] = []
    for start, end, new in edits:
        first = bisect.bisect_right(starts, start) - 1
        last = max(first, bisect.bisect_right(starts, max(start, end - 1)) - 1)
        first, last = min(first, len(old) - 1), min(last, len(old) - 1)
        if regions and first <= regions[-1][1] + 1:
            regions[-1] = (
                regions[-1][0],
                max(last, regions[-1][1]),
                [*regions[-1][2], (start, end, new)],
            )
        else:
            regions.append((first, last, [(start, end, new)]))
    opcodes: list[Opcode] = []
    a = b = 0
    for first, last, group in regions:
        if first > a:
            opcodes.append(("equal", a, first, b, b + first - a))
            b += first - a
        base = starts[first]
        text, cursor = [], base
        for start, end, new in group:
            text += [original[cursor:start], new]
            cursor = end
        text.append(original[cursor : starts[last + 1]])
        region_new = "".join(text).splitlines(keepends=True)
        matcher = difflib.SequenceMatcher(None, old[first : last + 1], region_new, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            opcodes.append((tag, first + i1, first + i2, b + j1, b + j2))
        a, b = last + 1, b + len(region_new)
    if a < len(old) or not opcodes:
        opcodes.append(("equal", a, len(old), b, b + len(old) - a))
    # difflib trims context only off whole equal runs: join neighbouring ones.
    merged: list[Opcode] = []
    for op in opcodes:
        if merged and op[0] == "equal" == merged[-1][0]:
            merged[-1] = ("equal", merged[-1][1], op[2], merged[-1][3], op[4])
        elif op[1] != op[2] or op[3] != op[4]:
            merged.append(op)
    return merged


def unified_diff(
    matcher: difflib.SequenceMatcher[str], old: list[str], new: list[str], before: str, after: str
) -> str:
    """``diff -u`` text (difflib.unified_diff's format) from a matcher's grouped opcodes."""
    out: list[str] = []
    for group in matcher.get_grouped_opcodes(3):
        if not out:
            out += [f"--- {before}\n", f"+++ {after}\n"]
        first, last = group[0], group[-1]
        old_range = _range(first[1], last[2])
        new_range = _range(first[3], last[4])
        out.append(f"@@ -{old_range} +{new_range} @@\n")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += [_marked(" ", line) for line in old[i1:i2]]
                continue
            out += [_marked("-", line) for line in old[i1:i2]]
            out += [_marked("+", line) for line in new[j1:j2]]
    return "".join(out)


def _marked(prefix: str, line: str) -> str:
    # A last line without a newline gets diff's marker, or patch calls the diff malformed.
    return (
        prefix + line if line.endswith("\n") else f"{prefix}{line}\n\\ No newline at end of file\n"
    )


def _range(start: int, stop: int) -> str:
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start if length == 0 else start + 1},{length}"


def bus_move_warnings(moves: list[BusMove]) -> list[str]:
    """What moving disks to virtio-scsi does to the guest, said before it happens."""
    if not moves:
        return []
    what = ", ".join(f"{m.old} ({m.old_bus or '?'}) -> {m.new}" for m in moves)
    warnings = [
        f"--bus scsi changes the guest's hardware: {what} on virtio-scsi. The guest sees a"
        " new driver (Linux virtio_scsi, Windows vioscsi) and new device names (its own"
        " /dev/sdX order need not follow libvirt's target names)",
        "a Windows guest without the vioscsi driver (virtio-win) will not boot from a disk"
        " moved to virtio-scsi: install the driver before the restart",
    ]
    names = sorted({f"/dev/{m.old}" for m in moves if m.old[:2] in ("vd", "hd")})
    if names:
        warnings.append(
            f"lines in the guest's /etc/fstab (and crypttab, the boot loader) that name"
            f" {', '.join(names)} or /dev/disk/by-path break: use UUID= or LABEL= first"
        )
    return warnings


def fstab_warnings(fstab: str, moves: list[BusMove]) -> list[str]:
    """The guest's /etc/fstab lines that name a device the move renames."""
    virtio = any((m.old_bus or "") == "virtio" or m.old.startswith("vd") for m in moves)
    prefixes = ["/dev/disk/by-path/"]
    prefixes += [f"/dev/{m.old}" for m in moves if m.old[:2] in ("vd", "hd")]
    if virtio:  # udev's by-id names carry the bus: virtio-SERIAL becomes scsi-0QEMU_...
        prefixes.append("/dev/disk/by-id/virtio-")
    found = []
    for number, line in enumerate(fstab.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if any(fields[0].startswith(prefix) for prefix in prefixes):
            found.append(f"the guest's /etc/fstab line {number} mounts {fields[0]}: {line.strip()}")
    if found:
        found.append("change those lines to UUID= or LABEL= before the restart")
    return found


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
