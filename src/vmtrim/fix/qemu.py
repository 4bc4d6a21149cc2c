"""``vmtrim fix`` for QEMU command lines.

:func:`fix_qemu_args` reads the command line with :mod:`vmtrim.sources.qemu_args`, asks
:mod:`vmtrim.audit.engine` which disks block discard at the configuration layers, edits
the options of those disks only, and prints the result shell-quoted, one option per
line with ``\\`` continuations.

- ``discard=unmap`` on the ``-drive`` of a disk, or ``"discard":"unmap"`` on every
  ``-blockdev`` node between the device and host storage that lacks it (a node given
  inline inherits its parent's setting, so it is only touched when it overrides it).
  A JSON option stays JSON, a key=value option stays key=value.
- ``modernize``: a legacy ``-drive ...,if=ide|virtio|scsi`` becomes
  ``-drive ...,if=none,id=X`` plus ``-device ide-hd`` (with the bus and unit QEMU
  would have given it), ``virtio-blk-pci``, or, with ``bus='scsi'`` (and for
  ``if=scsi``, which x86 machine types refuse), ``-device virtio-scsi-pci`` plus
  ``-device scsi-hd``.
- ``bus='scsi'``: a disk whose device blocks discard (or every disk, ``all_disks``)
  moves to ``scsi-hd`` on virtio-scsi; its device keeps id, drive, bootindex, serial
  and the block-size/cache properties, and drops the bus address and virtio-only ones.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, replace
from typing import Any

from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.fix.policy import (
    Change,
    FixOptions,
    FixResult,
    Skip,
    disk_name,
    leave_alone,
    move_to_scsi,
    remaining_after,
)
from vmtrim.model import ArgvOption, DiskReport, Locator
from vmtrim.sources.qemu_args import (
    ARG_OPTIONS,
    normalize_discard,
    parse_json_option,
    parse_keyval,
    parse_opts,
    parse_qemu_command,
    split_commas,
    tokenize,
)

# Properties a disk device keeps when it becomes scsi-hd (qdev properties common to
# ide-hd, virtio-blk and scsi-hd); everything else (addr, bus, num-queues, ...) goes.
_PORTABLE_DEVICE_PROPS = (
    "drive", "id", "bootindex", "serial", "logical_block_size", "physical_block_size",
    "min_io_size", "opt_io_size", "write-cache", "share-rw", "rerror", "werror",
    "discard_granularity",
)  # fmt: skip

_LEGACY_PLACEMENT = ("index", "bus", "unit", "addr", "if")
_SHORTHAND_IDE = {"hda": 0, "hdb": 1, "hdc": 2, "hdd": 3}


@dataclass
class _Option:
    """One option of the command line: ``-name value``, a flag, or the program prefix."""

    tokens: list[str]

    @property
    def name(self) -> str | None:
        first = self.tokens[0]
        if not first.startswith("-") or first == "-":
            return None
        return first[2:] if first.startswith("--") else first[1:]

    @property
    def value(self) -> str:
        return self.tokens[1]

    @value.setter
    def value(self, text: str) -> None:
        self.tokens[1] = text


def _group(argv: list[str]) -> tuple[list[_Option], dict[int, int]]:
    """Split argv into options (the parser has already accepted it); map value index -> option."""
    options: list[_Option] = []
    where: dict[int, int] = {}
    i = 0
    prefix: list[str] = []
    while i < len(argv) and not argv[i].startswith("-"):
        prefix.append(argv[i])  # VAR=value assignments and the program
        i += 1
        if "qemu" in prefix[-1] or "kvm" in prefix[-1]:
            break
    if prefix:
        options.append(_Option(prefix))
    while i < len(argv):
        token = argv[i]
        name = token[2:] if token.startswith("--") else token[1:]
        if token.startswith("-") and token != "-" and name in ARG_OPTIONS and i + 1 < len(argv):
            where[i + 1] = len(options)
            options.append(_Option([token, argv[i + 1]]))
            i += 2
            continue
        where[i] = len(options)
        options.append(_Option([token]))
        i += 1
    return options, where


def render(options: list[_Option]) -> str:
    """Shell-quoted, one option per line, ``\\`` continuations."""
    lines = [" ".join(shlex.quote(token) for token in option.tokens) for option in options]
    return " \\\n  ".join(lines) + "\n"


# -- QemuOpts text: edit one key, keep the rest as written ---------------------------------


def _escape(part: str) -> str:
    return part.replace(",", ",,")


def _opts_set(text: str, key: str, value: str) -> str:
    parts = split_commas(text)
    for index, part in enumerate(parts):
        if part.partition("=")[0] == key:
            parts[index] = f"{key}={value}"
            break
    else:
        parts.append(f"{key}={value}")
    return ",".join(_escape(part) for part in parts)


def _opts_text(pairs: list[tuple[str, str]]) -> str:
    return ",".join(_escape(f"{key}={value}") for key, value in pairs)


def _is_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def _json_text(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class _QemuFixer:
    options: list[_Option]
    where: dict[int, int]
    fix: FixOptions
    subject: str
    machine: str | None
    changes: list[Change] = field(default_factory=list)
    inserts: dict[int, list[_Option]] = field(default_factory=dict)  # after option index
    ids: set[str] = field(default_factory=set)
    identity: dict[int, str] = field(default_factory=dict)  # id(option) -> disk name
    renamed: dict[str, str] = field(default_factory=dict)  # disk name -> drive id after it
    _identity_option: dict[int, _Option] = field(default_factory=dict)
    _scsi_bus: str | None = None
    _ide_slots: dict[int, int] = field(default_factory=dict)  # option index -> legacy index

    def __post_init__(self) -> None:
        self._collect_ids()
        self._legacy_ide_indexes()

    # -- bookkeeping ---------------------------------------------------------------

    def _collect_ids(self) -> None:
        for option in self.options:
            if option.name in ("drive", "device", "blockdev", "netdev", "object", "chardev"):
                spec = self._spec(option)
                for key in ("id", "node-name"):
                    if isinstance(spec.get(key), str):
                        self.ids.add(spec[key])

    def _free_id(self, stem: str) -> str:
        candidate, n = stem, 0
        while candidate in self.ids:
            n += 1
            candidate = f"{stem}{n}"
        self.ids.add(candidate)
        return candidate

    def _spec(self, option: _Option) -> dict[str, Any]:
        text = option.value
        if _is_json(text):
            return parse_json_option(text, self.subject, f"-{option.name}")
        if option.name == "blockdev":
            return parse_keyval(text, self.subject, "-blockdev")
        return parse_opts(text, implied="driver" if option.name == "device" else None)

    def _ide_units(self) -> int:
        # q35's AHCI ports take one drive each; the PIIX IDE buses master and slave.
        machine = self.machine or ""
        return 1 if machine.startswith(("q35", "pc-q35")) else 2

    def _legacy_ide_indexes(self) -> None:
        """The index QEMU gives each legacy IDE drive (explicit, else the first free)."""
        used: set[int] = set()
        pending: list[int] = []
        units = self._ide_units()
        for position, option in enumerate(self.options):
            if option.name in _SHORTHAND_IDE:
                used.add(_SHORTHAND_IDE[option.name])
                self._ide_slots[position] = _SHORTHAND_IDE[option.name]
            elif option.name == "drive":
                opts = parse_opts(option.value)
                if str(opts.get("if", "ide")) != "ide":
                    continue
                index = _explicit_index(opts, units)
                if index is None:
                    pending.append(position)
                    continue
                used.add(index)
                self._ide_slots[position] = index
        # QEMU assigns the drives without an index in command-line order, after
        # the explicit ones are known (drive_new looks for the first free unit).
        for position in pending:
            index = 0
            while index in used:
                index += 1
            used.add(index)
            self._ide_slots[position] = index

    # -- one disk ------------------------------------------------------------------

    def fix_disk(self, report: DiskReport, result: FixResult) -> None:
        disk = report.disk
        value_index = disk.locator.index if isinstance(disk.locator, ArgvOption) else -1
        position = self.where.get(value_index)
        option = self.options[position] if position is not None else None
        name = self._name(position, disk_name(disk))
        skip = leave_alone(disk)
        if skip is not None:
            result.skipped.append(replace(skip, disk=name))
            return
        if option is None or option.name is None or option.tokens[1:] == []:
            result.skipped.append(Skip(name, "a bare image argument: give it as -drive", True))
            return
        move = move_to_scsi(report, self.fix, name)
        if isinstance(move, Skip):
            result.skipped.append(move)
            return
        before = len(self.changes)
        assert position is not None
        if option.name in _SHORTHAND_IDE:
            self._shorthand_to_drive(option, name)
        if option.name == "drive":
            self._fix_drive(option, name)
            legacy = str(parse_opts(option.value).get("if", "ide")) != "none"
            if legacy and (self.fix.modernize or move or self._legacy_scsi(option)):
                # --bus scsi puts every modernized drive on virtio-scsi; so does if=scsi,
                # which x86 machine types refuse ("does not support if=scsi").
                scsi = self.fix.bus == "scsi" or self._legacy_scsi(option)
                self._modernize(position, option, name, scsi=scsi)
        elif option.name == "device":
            self._fix_blockdev_chain(option, name)
            if move:
                self._device_to_scsi(position, option, name)
        self.identity[id(self._identity_option.get(position, option))] = name
        (result.fixed if len(self.changes) > before else result.already).append(name)

    def _name(self, position: int | None, fallback: str) -> str:
        """A legacy drive without id is named by interface and index (ide0, ide1, virtio0)."""
        if position is None or self.options[position].name not in ("drive", *_SHORTHAND_IDE):
            return fallback
        option = self.options[position]
        if option.name == "drive":
            opts = parse_opts(option.value)
            if "id" in opts or str(opts.get("if", "ide")) == "none":
                return fallback
            interface = str(opts.get("if", "ide"))
        else:
            interface = "ide"
        if position in self._ide_slots:
            return f"{interface}{self._ide_slots[position]}"
        same = [
            p
            for p, o in enumerate(self.options[:position])
            if o.name == "drive" and str(parse_opts(o.value).get("if", "ide")) == interface
        ]
        return f"{interface}{len(same)}"

    def _legacy_scsi(self, option: _Option) -> bool:
        return str(parse_opts(option.value).get("if", "ide")) == "scsi"

    # -- -drive --------------------------------------------------------------------

    def _shorthand_to_drive(self, option: _Option, name: str) -> None:
        index = _SHORTHAND_IDE[str(option.name)]
        old = " ".join(option.tokens)
        pairs = [("file", option.value), ("if", "ide"), ("index", str(index)), ("media", "disk")]
        option.tokens = ["-drive", _opts_text(pairs)]
        self.changes.append(Change(name, "option", old, " ".join(option.tokens)))

    def _fix_drive(self, option: _Option, name: str) -> None:
        opts = parse_opts(option.value)
        wanted = [("discard", "unmap")]
        if self.fix.detect_zeroes:
            wanted.append(("detect-zeroes", self.fix.detect_zeroes))
        for key, value in wanted:
            current = opts.get(key)
            equal = normalize_discard(current) == value if key == "discard" else current == value
            if not equal:
                option.value = _opts_set(option.value, key, value)
                self.changes.append(Change(name, key, _str(current), value))
        file_discard = opts.get("file.discard")
        if file_discard is not None and normalize_discard(file_discard) != "unmap":
            option.value = _opts_set(option.value, "file.discard", "unmap")
            self.changes.append(Change(name, "file.discard", str(file_discard), "unmap"))

    def _modernize(self, position: int, option: _Option, name: str, *, scsi: bool) -> None:
        opts = parse_opts(option.value)
        interface = str(opts.get("if", "ide"))
        drive_id = str(opts["id"]) if "id" in opts else self._free_id(f"drive-{name}")
        # if=ide becomes if=none where it stood; index/bus/unit/addr move to the -device.
        parts = []
        for part in split_commas(option.value):
            key = part.partition("=")[0]
            if key == "if":
                parts.append("if=none")
                if "id" not in opts:
                    parts.append(f"id={drive_id}")
            elif key not in _LEGACY_PLACEMENT:
                parts.append(part)
        if "if" not in opts:
            parts += ["if=none"] + ([] if "id" in opts else [f"id={drive_id}"])
        option.value = ",".join(_escape(part) for part in parts)
        self.changes.append(Change(name, "drive", f"if={interface}", f"if=none,id={drive_id}"))
        self.renamed[name] = drive_id
        device: list[tuple[str, str]]
        if scsi:
            device = [("driver", "scsi-hd"), ("bus", self._scsi_controller(position, False)),
                      ("drive", drive_id)]  # fmt: skip
        elif interface == "virtio":
            device = [("driver", "virtio-blk-pci"), ("drive", drive_id)]
            if "addr" in opts:
                device.append(("addr", str(opts["addr"])))
        else:
            index = self._ide_slots[position]
            units = self._ide_units()
            device = [("driver", "ide-hd"), ("bus", f"ide.{index // units}")]
            if units > 1:
                device.append(("unit", str(index % units)))
            device.append(("drive", drive_id))
        text = device[0][1] + "," + _opts_text(device[1:])
        new = _Option(["-device", text])
        self._insert_after(position, new)
        self._identity_option[position] = new  # the disk is this device from now on
        self.changes.append(Change(name, "device", None, text))

    # -- -blockdev -----------------------------------------------------------------

    def _named_nodes(self) -> dict[str, int]:
        nodes: dict[str, int] = {}
        for position, option in enumerate(self.options):
            if option.name == "blockdev":
                node_name = self._spec(option).get("node-name")
                if isinstance(node_name, str):
                    nodes[node_name] = position
        return nodes

    def _fix_blockdev_chain(self, option: _Option, name: str) -> None:
        device = self._spec(option)
        reference = device.get("drive")
        if not isinstance(reference, str):
            return
        drives = {
            str(parse_opts(o.value).get("id")): o
            for o in self.options
            if o.name == "drive" and "id" in parse_opts(o.value)
        }
        if reference in drives:
            self._fix_drive(drives[reference], name)
            return
        nodes = self._named_nodes()
        seen: set[str] = set()
        current: str | None = reference
        while current is not None and current in nodes and current not in seen:
            seen.add(current)
            node_option = self.options[nodes[current]]
            spec = self._spec(node_option)
            changed, current = self._ensure_discard(
                spec, None, name, current, top=not seen - {current}
            )
            if changed:
                node_option.value = self._spec_text(node_option, spec)

    def _ensure_discard(
        self, spec: dict[str, Any], inherited: str | None, disk: str, label: str, *, top: bool
    ) -> tuple[bool, str | None]:
        """Give ``spec`` (and inline ``file`` children) discard=unmap where it is not.

        Returns whether it changed, and the name of a ``file`` child given by reference.
        """
        changed = False
        own = normalize_discard(spec.get("discard"))
        if (own or inherited) != "unmap":
            self.changes.append(
                Change(disk, f"{label} discard", _str(spec.get("discard")), "unmap")
            )
            spec["discard"] = "unmap"
            changed = True
        if (
            self.fix.detect_zeroes
            and inherited is None
            and (spec.get("detect-zeroes") != self.fix.detect_zeroes)
        ):
            self.changes.append(
                Change(
                    disk,
                    f"{label} detect-zeroes",
                    _str(spec.get("detect-zeroes")),
                    self.fix.detect_zeroes,
                )
            )
            spec["detect-zeroes"] = self.fix.detect_zeroes
            changed = True
        child = spec.get("file")
        if isinstance(child, dict):
            child_changed, reference = self._ensure_discard(
                child, "unmap", disk, f"{label}.file", top=False
            )
            return changed or child_changed, reference
        return changed, child if isinstance(child, str) else None

    def _spec_text(self, option: _Option, spec: dict[str, Any]) -> str:
        if _is_json(option.value):
            return _json_text(spec)
        return ",".join(_escape(f"{key}={value}") for key, value in _flatten(spec))

    # -- moving to virtio-scsi -----------------------------------------------------

    def _scsi_controller(self, position: int, json_form: bool) -> str:
        """The bus (``ID.0``) of a virtio-scsi-pci; one is added before ``position``."""
        if self._scsi_bus is not None:
            return self._scsi_bus
        for option in self.options:
            if option.name == "device" and self._spec(option).get("driver") == "virtio-scsi-pci":
                spec = self._spec(option)
                if "id" not in spec:
                    new_id = self._free_id("scsi")
                    option.value = (
                        _json_text({**spec, "id": new_id})
                        if _is_json(option.value)
                        else _opts_set(option.value, "id", new_id)
                    )
                    self.changes.append(Change(None, "controller id", None, new_id))
                    spec["id"] = new_id
                self._scsi_bus = f"{spec['id']}.0"
                return self._scsi_bus
        new_id = self._free_id("scsi")
        text = (
            _json_text({"driver": "virtio-scsi-pci", "id": new_id})
            if json_form
            else f"virtio-scsi-pci,id={new_id}"
        )
        self._insert_after(position - 1, _Option(["-device", text]))
        self.changes.append(Change(None, "controller", None, text))
        self._scsi_bus = f"{new_id}.0"
        return self._scsi_bus

    def _device_to_scsi(self, position: int, option: _Option, name: str) -> None:
        json_form = _is_json(option.value)
        spec = self._spec(option)
        bus = self._scsi_controller(position, json_form)
        kept = {key: spec[key] for key in _PORTABLE_DEVICE_PROPS if key in spec}
        new_spec = {"driver": "scsi-hd", "bus": bus, **kept}
        dropped = sorted(set(spec) - set(kept) - {"driver"})
        if json_form:
            option.value = _json_text(new_spec)
        else:
            option.value = "scsi-hd," + _opts_text(
                [(k, str(v)) for k, v in new_spec.items() if k != "driver"]
            )
        self.changes.append(Change(name, "device", str(spec.get("driver")), "scsi-hd"))
        if dropped:
            self.changes.append(Change(name, "device properties", ",".join(dropped), None))

    def _insert_after(self, position: int, new: _Option) -> None:
        self.inserts.setdefault(position, []).append(new)

    def result_options(self) -> list[_Option]:
        merged: list[_Option] = list(self.inserts.get(-1, []))
        for position, option in enumerate(self.options):
            merged.append(option)
            merged.extend(self.inserts.get(position, []))
        return merged


def _explicit_index(opts: dict[str, Any], units: int) -> int | None:
    try:
        if "index" in opts:
            return int(str(opts["index"]))
        if "unit" in opts or "bus" in opts:
            return int(str(opts.get("bus", 0))) * units + int(str(opts.get("unit", 0)))
    except ValueError:
        return None
    return None


def _flatten(spec: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A -blockdev dict back to dotted key=value pairs."""
    pairs: list[tuple[str, str]] = []
    for key, value in spec.items():
        if isinstance(value, dict):
            pairs.extend(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            pairs.append((f"{prefix}{key}", "on" if value else "off"))
        else:
            pairs.append((f"{prefix}{key}", str(value)))
    return pairs


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def fix_qemu_args(
    data: str | bytes,
    options: FixOptions | None = None,
    *,
    subject: str = "<args>",
    probes: HostProbes | None = None,
    read_images: bool = True,
) -> FixResult:
    """Fix a QEMU command line (shell text or NUL-separated). Raises only BadInput on bad input."""
    options = options or FixOptions()
    options.check(subject, command_line=True)
    probes = probes or HostProbes()
    argv = tokenize(data, subject)
    domain = parse_qemu_command(argv, subject)
    grouped, where = _group(argv)
    original = render(grouped)
    grouped = [_Option(list(option.tokens)) for option in grouped]
    reports = audit_domain(domain, probes, read_images=read_images)
    fixer = _QemuFixer(grouped, where, options, subject, domain.machine)
    result = FixResult(subject=subject, original=original, new_text=original)
    for report in reports:
        fixer.fix_disk(report, result)
    result.new_text = render(fixer.result_options())
    result.changes = fixer.changes
    if result.changed:
        reports = audit_domain(
            parse_qemu_command(tokenize(result.new_text, subject), subject), probes,
            read_images=read_images,
        )  # fmt: skip
    # Match the new audit's disks to ours by where their option stands in the new argv.
    names: dict[Locator, str] = {}
    start = 0
    for option in fixer.result_options():
        name = fixer.identity.get(id(option))
        if name is not None:
            names[ArgvOption(start + len(option.tokens) - 1)] = name
        start += len(option.tokens)
    result.remaining = remaining_after(
        (report, names[report.disk.locator])
        for report in reports
        if report.disk.locator is not None and report.disk.locator in names
    )
    return result
