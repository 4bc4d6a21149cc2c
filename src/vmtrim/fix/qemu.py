"""``vmtrim fix`` for QEMU command lines.

:func:`fix_qemu_args` reads the command line once with
:func:`vmtrim.sources.qemu_args.parse_command_line`, asks :mod:`vmtrim.audit.engine`
which disks block discard at the configuration layers, and edits the options of those
disks only, in the user's own text (:class:`vmtrim.sources.qemu_opts.LineEditor`): the
layout, quoting, comments, environment prefix and NUL separators stay byte for byte,
so ``--dry-run``'s diff applies with ``patch`` and ``-o`` differs from the input only
where a value changed or an option was added. Disks carry the names the audit gives
them (``ide0-hd0``, as QEMU names it).

- ``discard=unmap`` on the ``-drive`` of a disk, or ``"discard":"unmap"`` on every
  ``-blockdev`` node between the device and host storage that lacks it (a node given
  inline inherits its parent's setting, so it is only touched when it overrides it).
  A JSON option stays JSON, a key=value option stays key=value.
- ``modernize``: a legacy ``-drive ...,if=ide|virtio|scsi`` becomes
  ``-drive ...,if=none,id=X`` plus ``-device ide-hd`` (on the bus and unit QEMU gave
  it), ``virtio-blk-pci``, or, with ``bus='scsi'`` (and for ``if=scsi``, which x86
  machine types refuse), ``-device virtio-scsi-pci`` plus ``-device scsi-hd``.
- ``bus='scsi'``: a disk whose device blocks discard (or every disk, ``all_disks``)
  moves to ``scsi-hd`` on virtio-scsi; its device keeps id, drive, bootindex, serial
  and the block-size/cache properties, and drops the bus address and virtio-only ones.
- ``discard_granularity`` and ``ssd``: the ``-device`` properties ``discard_granularity=N``
  and ``rotation_rate=1`` (a number in a JSON ``-device``). A legacy ``-drive if=...``
  has no ``-device`` to carry them until ``modernize`` gives it one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from vmtrim.audit.engine import audit_domain
from vmtrim.audit.granularity import parse_size
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.errors import BadInput
from vmtrim.fix.policy import (
    BusMove,
    Change,
    DeviceWants,
    FixOptions,
    FixResult,
    Skip,
    bus_move_warnings,
    device_wants,
    disk_name,
    leave_alone,
    move_to_scsi,
    remaining_after,
)
from vmtrim.model import ArgvOption, DiskReport, Locator
from vmtrim.sources.qemu_args import (
    DriveSpec,
    Option,
    OptionSpec,
    ParsedCommandLine,
    parse_command_line,
)
from vmtrim.sources.qemu_opts import (
    LineEditor,
    escape_commas,
    json_set,
    normalize_discard,
    opts_drop,
    opts_set,
    parse_json_option,
    parse_keyval,
    parse_opts,
)

# Properties a disk device keeps when it becomes scsi-hd (qdev properties common to
# ide-hd, virtio-blk and scsi-hd); everything else (addr, bus, num-queues, ...) goes.
_PORTABLE_DEVICE_PROPS = (
    "drive", "id", "bootindex", "serial", "logical_block_size", "physical_block_size",
    "min_io_size", "opt_io_size", "write-cache", "share-rw", "rerror", "werror",
    "discard_granularity",
)  # fmt: skip

_LEGACY_PLACEMENT = {"index", "bus", "unit", "addr"}
_SHORTHAND_IDE = ("hda", "hdb", "hdc", "hdd")


def _opts_text(pairs: list[tuple[str, str]]) -> str:
    return ",".join(escape_commas(f"{key}={value}") for key, value in pairs)


def _json_text(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _wanted_pairs(wants: DeviceWants) -> list[tuple[str, int]]:
    pairs = [("discard_granularity", wants.discard_granularity)]
    pairs.append(("rotation_rate", wants.rotation_rate))
    return [(key, value) for key, value in pairs if value is not None]


@dataclass
class _QemuFixer:
    parsed: ParsedCommandLine
    editor: LineEditor
    fix: FixOptions
    changes: list[Change] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    # disk name -> where its option ends: ("word", original index) or ("insert", word, group)
    where: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    moves: list[BusMove] = field(default_factory=list)  # disks put on virtio-scsi
    probes: HostProbes | None = None
    read_images: bool = True
    notes: list[str] = field(default_factory=list)  # device settings that were not made
    _scsi_bus: str | None = None

    def __post_init__(self) -> None:
        self.ids = self.parsed.ids()

    def _free_id(self, stem: str) -> str:
        candidate, n = stem, 0
        while candidate in self.ids:
            n += 1
            candidate = f"{stem}{n}"
        self.ids.add(candidate)
        return candidate

    def _value(self, option: Option) -> str:
        assert option.value_index is not None
        return self.editor.value(option.value_index)

    def _set(self, option: Option, text: str) -> None:
        assert option.value_index is not None
        self.editor.set_value(option.value_index, text)

    def _insert(self, after: int, words: list[str]) -> tuple[int, int]:
        self.editor.insert_after(after, words)
        return after, len(self.editor.inserts[after]) - 1

    # -- one disk ------------------------------------------------------------------

    def fix_disk(self, report: DiskReport, result: FixResult) -> None:
        disk = report.disk
        name = disk_name(disk)
        skip = leave_alone(disk)
        if skip is not None:
            result.skipped.append(replace(skip, disk=name))
            return
        locator = disk.locator
        option = self.parsed.option_at(locator) if isinstance(locator, ArgvOption) else None
        if option is None or option.name == "":
            result.skipped.append(Skip(name, "a bare image argument: give it as -drive", True))
            return
        move = move_to_scsi(report, self.fix, name)
        if isinstance(move, Skip):
            result.skipped.append(move)
            return
        before = len(self.changes)
        self.where[name] = (option.last, None)
        drive = self.parsed.drive_for(option)
        if drive is not None:
            if option.name in _SHORTHAND_IDE:
                self._shorthand_to_drive(option, drive, name)
            self._fix_drive(option, name)
            if drive.legacy and (self.fix.modernize or move or drive.interface == "scsi"):
                # --bus scsi puts every modernized drive on virtio-scsi; so does if=scsi,
                # which x86 machine types refuse ("does not support if=scsi").
                scsi = self.fix.bus == "scsi" or drive.interface == "scsi"
                wants = self._wants(report, name, moved=scsi)
                self._modernize(option, drive, name, scsi=scsi, wants=wants)
                if scsi and disk.bus != "scsi":
                    self.moves.append(BusMove(name, name, disk.bus))
            elif drive.legacy and self.fix.device_settings:
                self.notes.append(
                    f"{name}: discard_granularity/rotation_rate not set: -drive if="
                    f"{drive.interface} has no -device to carry them; add --modernize"
                )
        else:
            device = self.parsed.device_for(option)
            if device is not None:
                self._fix_blockdev_chain(device, name)
                if move:
                    self._device_to_scsi(option, device, name)
                    self.moves.append(BusMove(name, name, disk.bus))
                wants = self._wants(report, name, moved=bool(move))
                if not wants.empty:
                    self._device_properties(option, device.json, name, wants)
        (result.fixed if len(self.changes) > before else result.already).append(name)

    # -- device properties: discard_granularity, rotation_rate ---------------------

    def _wants(self, report: DiskReport, name: str, *, moved: bool) -> DeviceWants:
        if not self.fix.device_settings:
            return DeviceWants()
        wants = device_wants(
            report, name, self.fix, moved=moved, probes=self.probes, read_images=self.read_images
        )
        self.notes += wants.notes
        return wants

    def _device_properties(
        self, option: Option, json_form: bool, name: str, wants: DeviceWants
    ) -> None:
        text = self._value(option)
        spec = (
            parse_json_option(text, self.parsed.subject, "-device")
            if json_form
            else parse_opts(text, "driver")
        )
        for key, value in _wanted_pairs(wants):
            old = spec.get(key)
            if old is not None and parse_size(old) == value:
                continue
            text = json_set(text, (), key, value) if json_form else opts_set(text, key, str(value))
            self.changes.append(Change(name, f"device {key}", _str(old), str(value)))
        self._set(option, text)

    # -- -drive --------------------------------------------------------------------

    def _shorthand_to_drive(self, option: Option, drive: DriveSpec, name: str) -> None:
        old = f"-{option.name} {self._value(option)}"
        pairs = [("file", str(drive.opts["file"])), ("if", "ide"),
                 ("index", str(drive.opts["index"])), ("media", "disk")]  # fmt: skip
        self.editor.set_value(option.index, "-drive")
        self._set(option, _opts_text(pairs))
        self.changes.append(Change(name, "option", old, f"-drive {self._value(option)}"))

    def _fix_drive(self, option: Option, name: str) -> None:
        text = self._value(option)
        opts = parse_opts(text)
        wanted = [("discard", "unmap")]
        if self.fix.detect_zeroes:
            wanted.append(("detect-zeroes", self.fix.detect_zeroes))
        for key, value in wanted:
            current = opts.get(key)
            equal = normalize_discard(current) == value if key == "discard" else current == value
            if not equal:
                text = opts_set(text, key, value)
                self.changes.append(Change(name, key, _str(current), value))
        file_discard = opts.get("file.discard")
        if file_discard is not None and normalize_discard(file_discard) != "unmap":
            text = opts_set(text, "file.discard", "unmap")
            self.changes.append(Change(name, "file.discard", str(file_discard), "unmap"))
        self._set(option, text)

    def _modernize(
        self, option: Option, drive: DriveSpec, name: str, *, scsi: bool, wants: DeviceWants
    ) -> None:
        text = self._value(option)
        opts = parse_opts(text)
        drive_id = str(opts["id"]) if "id" in opts else self._free_id(f"drive-{name}")
        # if=ide becomes if=none where it stood; index/bus/unit/addr move to the -device.
        text = opts_set(opts_drop(text, _LEGACY_PLACEMENT), "if", "none")
        if "id" not in opts:
            text = opts_set(text, "id", drive_id)
        self._set(option, text)
        self.changes.append(
            Change(name, "drive", f"if={drive.interface}", f"if=none,id={drive_id}")
        )
        device: list[tuple[str, str]]
        if scsi:
            device = [("driver", "scsi-hd"), ("bus", self._scsi_controller(option, False)),
                      ("drive", drive_id)]  # fmt: skip
        elif drive.interface == "virtio":
            device = [("driver", "virtio-blk-pci"), ("drive", drive_id)]
            if "addr" in opts:
                device.append(("addr", str(opts["addr"])))
        else:
            device = [("driver", "ide-hd"), ("bus", f"ide.{drive.bus}")]
            if not self.parsed.q35:  # q35's AHCI ports take one drive each: no unit
                device.append(("unit", str(drive.unit)))
            device.append(("drive", drive_id))
        device += [(key, str(value)) for key, value in _wanted_pairs(wants)]
        value = device[0][1] + "," + _opts_text(device[1:])
        after, group = self._insert(option.last, ["-device", value])
        self.where[name] = (after, group)  # the disk is this device from now on
        self.changes.append(Change(name, "device", None, value))

    # -- -blockdev -----------------------------------------------------------------

    def _fix_blockdev_chain(self, device: OptionSpec, name: str) -> None:
        reference = device.spec.get("drive")
        if not isinstance(reference, str):
            return
        drive = self.parsed.drive_by_id(reference)
        if drive is not None:
            self._fix_drive(drive.option, name)
            return
        seen: set[str] = set()
        current: str | None = reference
        while current is not None and current not in seen:
            node = self.parsed.blockdev(current)
            if node is None:
                return
            seen.add(current)
            text = self._value(node.option)
            spec = (
                parse_json_option(text, self.parsed.subject, "-blockdev")
                if node.json
                else parse_keyval(text, self.parsed.subject, "-blockdev")
            )
            edits: list[tuple[tuple[str, ...], str, str]] = []
            current = self._ensure_discard(spec, None, name, current, (), edits)
            for path, key, value in edits:
                if node.json:
                    text = json_set(text, path, key, value)
                else:
                    text = opts_set(text, ".".join((*path, key)), value)
            self._set(node.option, text)

    def _ensure_discard(
        self,
        spec: dict[str, Any],
        inherited: str | None,
        disk: str,
        label: str,
        path: tuple[str, ...],
        edits: list[tuple[tuple[str, ...], str, str]],
    ) -> str | None:
        """Collect the edits that give ``spec`` (and inline ``file`` children) discard=unmap.

        Returns the name of a ``file`` child given by reference (the next node to walk).
        """
        own = normalize_discard(spec.get("discard"))
        if (own or inherited) != "unmap":
            self.changes.append(
                Change(disk, f"{label} discard", _str(spec.get("discard")), "unmap")
            )
            edits.append((path, "discard", "unmap"))
        zeroes = self.fix.detect_zeroes
        if zeroes and inherited is None and spec.get("detect-zeroes") != zeroes:
            self.changes.append(
                Change(disk, f"{label} detect-zeroes", _str(spec.get("detect-zeroes")), zeroes)
            )
            edits.append((path, "detect-zeroes", zeroes))
        child = spec.get("file")
        if isinstance(child, dict):
            return self._ensure_discard(
                child, "unmap", disk, f"{label}.file", (*path, "file"), edits
            )
        return child if isinstance(child, str) else None

    # -- moving to virtio-scsi -----------------------------------------------------

    def _scsi_controller(self, option: Option, json_form: bool) -> str:
        """The bus (``ID.0``) of a virtio-scsi-pci; one is added before ``option``."""
        if self._scsi_bus is not None:
            return self._scsi_bus
        for device in self.parsed.devices:
            if device.spec.get("driver") != "virtio-scsi-pci":
                continue
            ident = device.spec.get("id")
            if not isinstance(ident, str):
                ident = self._free_id("scsi")
                text = self._value(device.option)
                self._set(
                    device.option,
                    json_set(text, (), "id", ident) if device.json else opts_set(text, "id", ident),
                )
                self.changes.append(Change(None, "controller id", None, ident))
            self._scsi_bus = f"{ident}.0"
            return self._scsi_bus
        new_id = self._free_id("scsi")
        text = (
            _json_text({"driver": "virtio-scsi-pci", "id": new_id})
            if json_form
            else f"virtio-scsi-pci,id={new_id}"
        )
        self._insert(option.index - 1, ["-device", text])
        self.changes.append(Change(None, "controller", None, text))
        self._scsi_bus = f"{new_id}.0"
        return self._scsi_bus

    def _device_to_scsi(self, option: Option, device: OptionSpec, name: str) -> None:
        spec = device.spec
        bus = self._scsi_controller(option, device.json)
        kept = {key: spec[key] for key in _PORTABLE_DEVICE_PROPS if key in spec}
        new_spec = {"driver": "scsi-hd", "bus": bus, **kept}
        dropped = sorted(set(spec) - set(kept) - {"driver"})
        if device.json:
            self._set(option, _json_text(new_spec))
        else:
            pairs = [(k, str(v)) for k, v in new_spec.items() if k != "driver"]
            self._set(option, "scsi-hd," + _opts_text(pairs))
        self.changes.append(Change(name, "device", str(spec.get("driver")), "scsi-hd"))
        if dropped:
            self.changes.append(Change(name, "device properties", ",".join(dropped), None))

    def new_locators(self) -> dict[Locator, str]:
        """Each handled disk's locator in the edited argv, with its name."""
        index = self.editor.new_index()
        names: dict[Locator, str] = {}
        for name, (word, group) in self.where.items():
            at = index[word] if group is None else self.editor.inserted_at(word, group, index)
            names[ArgvOption(at)] = name
        return names


def fix_qemu_args(
    data: str | bytes,
    options: FixOptions | None = None,
    *,
    subject: str = "<args>",
    probes: HostProbes | None = None,
    read_images: bool = True,
) -> FixResult:
    """Fix a QEMU command line (shell text or NUL-separated), editing it in place.

    :raises BadInput: the command line cannot be read, or is not UTF-8 text.
    """
    options = options or FixOptions()
    options.check(subject, command_line=True)
    probes = probes or HostProbes()
    parsed = parse_command_line(data, subject)
    original = parsed.line.text
    try:
        original.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(
            f"not UTF-8 text at offset {exc.start}: cannot write it back", subject
        ) from exc
    assert parsed.domain is not None
    reports = audit_domain(parsed.domain, probes, read_images=read_images)
    fixer = _QemuFixer(
        parsed, LineEditor(parsed.line), options, probes=probes, read_images=read_images
    )
    result = FixResult(subject=subject, original=original, new_text=original)
    for report in reports:
        fixer.fix_disk(report, result)
    result.new_text = fixer.editor.render(subject)
    result.edits = fixer.editor.edits()  # the diff shows these, each on its own lines
    result.changes = fixer.changes
    result.moves = fixer.moves
    result.warnings = [
        *(note for note in parsed.domain.notes if note.startswith("unknown QEMU option")),
        *bus_move_warnings(fixer.moves),
        *fixer.notes,
    ]
    if result.changed:
        fixed = parse_command_line(result.new_text, subject).domain
        assert fixed is not None
        reports = audit_domain(fixed, probes, read_images=read_images)
    names = fixer.new_locators()
    result.remaining = remaining_after(
        (report, names[report.disk.locator])
        for report in reports
        if report.disk.locator is not None and report.disk.locator in names
    )
    return result
