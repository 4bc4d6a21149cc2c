"""Read a QEMU command line into a :class:`ParsedCommandLine` and the :mod:`vmtrim.model`.

Accepted as shell text (quotes, ``\\`` line continuations even in the middle of an
argument, comments, leading ``VAR=value`` assignments as ``virsh domxml-to-native``
prints them, ``env``/``exec``/``taskset`` wrappers) or NUL-separated as in
``/proc/PID/cmdline`` (the words: :mod:`vmtrim.sources.qemu_opts`). Understands:

- legacy ``-drive file=..,if=ide|scsi|virtio|floppy,discard=on`` and the ``-hda``/``-cdrom``
  shorthands, where the drive implies its device, named as QEMU names them
  (``ide0-hd0``, ``ide2-cd0`` on q35, ``virtio0``, ``scsi0-hd3``);
- ``-drive if=none,id=X`` attached with ``-device scsi-hd,drive=X,bus=scsi0.0``;
- ``-blockdev`` in key=value form (dotted keys such as ``file.filename``) and in JSON,
  following ``file`` and ``backing`` children given inline or by node name;
- ``-device`` in key=value form and in JSON; ``-global`` device defaults;
- ``-machine``/``-M`` with its version; QEMU's ``,,`` comma escaping.

An option vmtrim does not know (a downstream build's, such as Proxmox's ``-id``) is noted
on the domain and skipped; it never rejects the line. Unknown devices are ignored.

:class:`ParsedCommandLine` is what ``vmtrim fix`` edits: every option with the argv
index of its words, the drives with the names and slots QEMU gives them, the
``-blockdev`` and ``-device`` specs, and the :class:`~vmtrim.model.Domain` built from
them, whose disks point back at their options with :class:`~vmtrim.model.ArgvOption`.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtrim._util.files import read_input
from vmtrim._util.versions import Version, parse_version
from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.facts import CONTROLLERS, DEVICES, LOCAL_PROTOCOLS, PROTOCOLS
from vmtrim.model import (
    ArgvOption,
    BlockNode,
    Bus,
    DeviceType,
    Discard,
    Disk,
    Domain,
    NodeOrigin,
    Origin,
    StorageKind,
    as_format,
)
from vmtrim.sources.qemu_opts import (
    ARG_OPTIONS,
    DOWNSTREAM_OPTIONS,
    FLAG_OPTIONS,
    MAX_COMMAND_LINE,
    Line,
    flag,
    normalize_discard,
    option_name,
    parse_json_option,
    parse_keyval,
    parse_opts,
    shown,
    split_words,
)

__all__ = [
    "DriveSpec",
    "Option",
    "OptionSpec",
    "ParsedCommandLine",
    "binary_version",
    "fill_disk_from_nodes",
    "parse_command_line",
    "parse_qemu_command",
    "read_args_file",
    "read_pid",
    "tokenize",
]

# Disk shorthands: option -> (if, index, media).
_SHORTHANDS = {
    "hda": ("ide", 0, "disk"),
    "hdb": ("ide", 1, "disk"),
    "hdc": ("ide", 2, "disk"),
    "hdd": ("ide", 3, "disk"),
    "cdrom": ("ide", 2, "cdrom"),
    "fda": ("floppy", 0, "disk"),
    "fdb": ("floppy", 1, "disk"),
    "sd": ("sd", 0, "disk"),
    "mtdblock": ("mtd", 0, "disk"),
    "pflash": ("pflash", 0, "disk"),
}

_ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_URL_PROTOCOL = re.compile(r"([a-z][a-z0-9+]*)(?:://|:)(.*)", re.S)
_MENTIONS_DISK = re.compile(r"(?:^|[,{\"])(?:file|drive|filename|node-name)\b")


def tokenize(data: bytes | str, subject: str = "<args>") -> list[str]:
    """Split a command line into argv (see :func:`vmtrim.sources.qemu_opts.split_words`)."""
    return split_words(data, subject).argv


# ---------------------------------------------------------------- the parsed command line


@dataclass(frozen=True)
class Option:
    """One option: ``-name value`` or a flag (``value_index`` None), by argv index.

    ``name`` is without dashes; ``""`` for a bare image argument (its one word is both).
    """

    name: str
    index: int  # the option word
    value_index: int | None  # its argument's word

    @property
    def last(self) -> int:
        return self.index if self.value_index is None else self.value_index


@dataclass
class DriveSpec:
    """A ``-drive`` (or ``-hda``/``-cdrom``/a bare image) and what QEMU makes of it.

    ``name`` is its id, else the name QEMU gives it (``ide0-hd0``, ``virtio1``);
    ``bus``/``unit`` the slot QEMU assigns on its interface (None for ``if=none``).
    """

    opts: dict[str, Any]
    option: Option
    interface: str
    name: str = ""
    bus: int | None = None
    unit: int | None = None
    used: bool = False  # attached to a -device

    @property
    def legacy(self) -> bool:
        """The drive implies its own device (not ``if=none``)."""
        return self.interface != "none"


@dataclass
class OptionSpec:
    """A ``-blockdev`` or ``-device`` value as parsed; ``json`` says it was written as JSON."""

    spec: dict[str, Any]
    option: Option
    json: bool


@dataclass
class ParsedCommandLine:
    """A command line read once: its words, options, drives, nodes, devices and Domain."""

    line: Line
    subject: str
    options: list[Option] = field(default_factory=list)
    program: int | None = None  # argv index of the QEMU binary
    name: str | None = None
    machine: str | None = None
    drives: list[DriveSpec] = field(default_factory=list)
    blockdevs: list[OptionSpec] = field(default_factory=list)
    devices: list[OptionSpec] = field(default_factory=list)
    globals: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    domain: Domain | None = None
    _lookup: _Index | None = field(default=None, repr=False, compare=False)

    @property
    def argv(self) -> list[str]:
        return self.line.argv

    @property
    def q35(self) -> bool:
        # q35 machine types (also distro ones: pc-q35-rhel9.4.0, pc-q35-jammy) put one
        # IDE drive on each AHCI port: units_per_default_bus = 1.
        return "q35" in (self.machine or "")

    def option_at(self, locator: ArgvOption) -> Option | None:
        """The option whose last word is ``argv[locator.index]``."""
        return self._index().by_last.get(locator.index)

    def drive_for(self, option: Option) -> DriveSpec | None:
        return self._index().drives.get(option)

    def device_for(self, option: Option) -> OptionSpec | None:
        return self._index().devices.get(option)

    def drive_by_id(self, ident: str) -> DriveSpec | None:
        return self._index().drive_ids.get(ident)

    def blockdev(self, node_name: str) -> OptionSpec | None:
        return self._index().nodes.get(node_name)

    def _index(self) -> _Index:
        # Built once, after parsing: lookups stay O(1) on a 10,000-drive line.
        if self._lookup is None:
            self._lookup = _Index(
                by_last={option.last: option for option in self.options},
                drives={drive.option: drive for drive in self.drives},
                devices={device.option: device for device in self.devices},
                drive_ids={str(d.opts["id"]): d for d in reversed(self.drives) if "id" in d.opts},
                nodes={
                    str(b.spec["node-name"]): b
                    for b in reversed(self.blockdevs)
                    if isinstance(b.spec.get("node-name"), str)
                },
            )
        return self._lookup

    def ids(self) -> set[str]:
        """Every id and node name the line uses (a new one must differ from all)."""
        taken = {str(d.opts["id"]) for d in self.drives if "id" in d.opts}
        for spec in (*self.blockdevs, *self.devices):
            for key in ("id", "node-name"):
                if isinstance(spec.spec.get(key), str):
                    taken.add(spec.spec[key])
        for option in self.options:
            if option.value_index is not None and option.name in ("netdev", "object", "chardev"):
                taken.update(re.findall(r"(?:^|,)id=([^,]+)", self.argv[option.value_index]))
        return taken


@dataclass(frozen=True)
class _Index:
    by_last: dict[int, Option]
    drives: dict[Option, DriveSpec]
    devices: dict[Option, OptionSpec]
    drive_ids: dict[str, DriveSpec]
    nodes: dict[str, OptionSpec]


def read_args_file(path: str) -> Domain:
    """Parse a command line from a file (``-`` for stdin)."""
    subject = "<stdin>" if path == "-" else path
    return parse_qemu_command(read_input(path, limit=MAX_COMMAND_LINE), subject=subject)


def read_pid(pid: int, *, version: bool = True) -> Domain:
    """Parse the command line of a running process from ``/proc/PID/cmdline``.

    The QEMU version is read from ``/proc/PID/exe`` as a file (:func:`binary_version`),
    never by running it; ``version=False`` skips that (``audit --qmp`` asks QEMU).
    """
    subject = f"pid {pid}"
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError as exc:
        raise BadInput("no such process", subject=subject) from exc
    except PermissionError as exc:
        raise EnvironmentProblem(
            "cannot read /proc/PID/cmdline: permission denied", subject=subject
        ) from exc
    if not data:
        raise BadInput("process has no command line (a kernel thread or a zombie)", subject=subject)
    domain = parse_qemu_command(data, subject=subject)
    if version:
        domain.qemu_version = binary_version(f"/proc/{pid}/exe")
    return domain


def parse_qemu_command(data: bytes | str | list[str], subject: str = "<args>") -> Domain:
    """Parse a QEMU command line (text, bytes or an argv list) into a :class:`Domain`."""
    domain = parse_command_line(data, subject).domain
    assert domain is not None
    return domain


def parse_command_line(data: bytes | str | list[str], subject: str = "<args>") -> ParsedCommandLine:
    """Read a command line once: options, drives (named as QEMU names them), specs, Domain.

    :raises BadInput: the text does not split into words, it runs something other than
        QEMU, or an option QEMU understands is malformed.
    """
    if isinstance(data, list):
        if not data:
            raise BadInput("empty command line", subject=subject)
        data = "\0".join(data) + "\0"
    parsed = ParsedCommandLine(split_words(data, subject), subject)
    _read_options(parsed)
    _name_drives(parsed)
    parsed.domain = _Builder(parsed, subject).domain()
    return parsed


# ---------------------------------------------------------------- reading the options

# Wrappers a command line may start with, and how many words their options take.
_WRAPPERS = {"env": {"-u": 1, "-C": 1, "-S": 1}, "exec": {"-a": 1}, "taskset": {}}


def _skip_prefix(argv: list[str]) -> int:
    """The index of the first word after environment assignments and wrappers."""
    i = 0
    while i < len(argv):
        word = argv[i]
        base = os.path.basename(word)
        if _ENV_ASSIGNMENT.match(word):
            i += 1
        elif base in _WRAPPERS:
            takes = _WRAPPERS[base]
            i += 1
            while i < len(argv) and argv[i].startswith("-") and "qemu" not in argv[i]:
                i += 1 + takes.get(argv[i], 0)
            if base == "taskset" and i < len(argv):
                i += 1  # the CPU mask or list
        else:
            return i
    return i


def _read_options(parsed: ParsedCommandLine) -> None:
    argv, subject = parsed.argv, parsed.subject
    i = _skip_prefix(argv)
    if i < len(argv) and option_name(argv[i]) is None:
        base = os.path.basename(argv[i])
        if "qemu" not in base and "kvm" not in base:
            raise BadInput(f"not a QEMU command line: it runs {shown(base)!r}", subject)
        parsed.program = i
        i += 1
    if i >= len(argv) and parsed.program is None:
        raise BadInput("empty command line", subject=subject)
    positional = 0
    while i < len(argv):
        word = argv[i]
        name = option_name(word)
        if name is None:
            # QEMU takes a bare argument as the first hard disk image.
            option = Option("", i, i)
            parsed.options.append(option)
            opts = {"file": word, "if": "ide", "index": str(positional), "media": "disk"}
            parsed.drives.append(DriveSpec(opts, option, "ide"))
            positional += 1
            i += 1
            continue
        if name in FLAG_OPTIONS:
            parsed.options.append(Option(name, i, None))
            i += 1
            continue
        if name in ARG_OPTIONS or name in DOWNSTREAM_OPTIONS:
            if i + 1 >= len(argv):
                raise BadInput(f"option {shown(word)!r} needs an argument", subject=subject)
            option = Option(name, i, i + 1)
        else:
            option = _unknown(parsed, word, i)
        parsed.options.append(option)
        if option.value_index is not None and name in ARG_OPTIONS:
            _option(parsed, option, argv[option.value_index])
        i = option.last + 1


def _unknown(parsed: ParsedCommandLine, word: str, i: int) -> Option:
    """An option vmtrim does not know: noted, its argument guessed from the shape.

    QEMU itself would stop at an option it does not know, but downstream builds add
    their own (Proxmox's ``-id 100``), so the line is read on. Whether it takes an
    argument is guessed: it does when the next word does not start with ``-``. That is
    safe enough because a wrong guess cannot change what a known disk option says:
    taken for a flag, its argument becomes a bare word (read as an image, and named in
    the note); taken with an argument it did not have, it swallows a bare image
    argument, which modern command lines do not use and the note names; an argument
    that starts with ``-`` becomes an unknown option of its own, noted too.
    """
    argv = parsed.argv
    takes = i + 1 < len(argv) and not argv[i + 1].startswith("-")
    name = shown(word)
    if takes:
        value = argv[i + 1]
        note = f"unknown QEMU option {name!r} (taken with the argument {shown(value, 60)!r})"
        if _MENTIONS_DISK.search(value):
            note += ": if it defines a disk, vmtrim does not see it"
    else:
        note = f"unknown QEMU option {name!r} (taken as a flag)"
    parsed.notes.append(note + "; skipped")
    return Option(option_name(word) or word, i, i + 1 if takes else None)


def _option(parsed: ParsedCommandLine, option: Option, value: str) -> None:
    name, subject = option.name, parsed.subject
    is_json = value.lstrip().startswith("{")
    if name in ("machine", "M"):
        if is_json:
            machine = str(parse_json_option(value, subject, f"-{name}").get("type") or "")
        else:
            machine = str(parse_opts(value, implied="type").get("type") or "")
        if machine and machine != "help":
            parsed.machine = machine
    elif name == "name":
        parsed.name = str(parse_opts(value, implied="guest").get("guest") or "") or None
    elif name == "drive":
        opts = parse_opts(value)
        parsed.drives.append(DriveSpec(opts, option, str(opts.get("if", "ide"))))
    elif name in _SHORTHANDS:
        interface, unit, media = _SHORTHANDS[name]
        opts = {"file": value, "if": interface, "index": str(unit), "media": media}
        parsed.drives.append(DriveSpec(opts, option, interface))
    elif name == "blockdev":
        spec = (
            parse_json_option(value, subject, "-blockdev")
            if is_json
            else parse_keyval(value, subject, "-blockdev")
        )
        parsed.blockdevs.append(OptionSpec(spec, option, is_json))
    elif name == "device":
        device = (
            parse_json_option(value, subject, "-device")
            if is_json
            else parse_opts(value, implied="driver")
        )
        parsed.devices.append(OptionSpec(device, option, is_json))
    elif name == "global":
        opts = parse_opts(value)
        if {"driver", "property", "value"} <= set(opts):
            driver, prop = str(opts["driver"]), str(opts["property"])
            parsed.globals.setdefault(driver, {})[prop] = opts["value"]
        else:
            for key, item in opts.items():
                driver, _, prop = key.rpartition(".")
                if driver:
                    parsed.globals.setdefault(driver, {})[prop] = item
    elif name == "readconfig":
        parsed.notes.append(
            f"-readconfig {shown(value)}: devices defined in that file are not audited"
        )


# ---------------------------------------------------------------- drive names and slots

# Drives per bus (QEMU's if_max_devs); 0: one bus, numbered by unit.
_UNITS_PER_BUS = {"ide": 2, "scsi": 7}


def _name_drives(parsed: ParsedCommandLine) -> None:
    """Give each -drive the slot and name QEMU gives it (blockdev.c drive_new).

    QEMU reads the drives in command-line order; a drive without index, bus or unit
    takes the first free unit counting from bus 0, a taken slot is an error. Without
    an id the name is ``IF BUS -hd|-cd UNIT`` on IDE and SCSI, ``IF UNIT`` elsewhere.
    Checked against ``query-block`` of QEMU 7.2 on pc and q35.
    """
    taken: dict[str, set[tuple[int, int]]] = {}
    cursors: dict[str, tuple[int, int]] = {}  # the first slot from bus 0 that may be free
    for drive in parsed.drives:
        interface = drive.interface
        per_bus = _UNITS_PER_BUS.get(interface, 0)
        if interface == "ide" and parsed.q35:
            per_bus = 1
        used = taken.setdefault(interface, set())
        bus, unit = _slot(drive, per_bus, used, cursors.get(interface, (0, 0)), parsed.subject)
        drive.bus, drive.unit = bus, unit
        used.add((bus, unit))
        if "id" in drive.opts:
            drive.name = str(drive.opts["id"])
        elif per_bus:
            media = "-cd" if drive.opts.get("media") == "cdrom" else "-hd"
            drive.name = f"{interface}{bus}{media}{unit}"
        else:
            drive.name = f"{interface}{unit}"
        cursor = cursors.get(interface, (0, 0))
        while cursor in used:  # slots are only ever taken, so the cursor only moves on
            cursor = _next_slot(cursor, per_bus)
        cursors[interface] = cursor


def _next_slot(slot: tuple[int, int], per_bus: int) -> tuple[int, int]:
    bus, unit = slot[0], slot[1] + 1
    return (bus + 1, 0) if per_bus and unit >= per_bus else (bus, unit)


def _slot(
    drive: DriveSpec,
    per_bus: int,
    taken: set[tuple[int, int]],
    cursor: tuple[int, int],
    subject: str,
) -> tuple[int, int]:
    opts = drive.opts
    try:
        index = int(str(opts["index"])) if "index" in opts else None
        bus = int(str(opts.get("bus", 0)))
        unit = int(str(opts["unit"])) if "unit" in opts else None
    except ValueError as exc:
        raise BadInput(f"-drive {shown(opts)!r}: index, bus and unit are numbers", subject) from exc
    if index is not None:
        bus, unit = (index // per_bus, index % per_bus) if per_bus else (0, index)
    if unit is None:
        # The first free unit counting from (bus, 0); from bus 0, the cursor is that slot.
        slot = cursor if bus == 0 else (bus, 0)
        while slot in taken:
            slot = _next_slot(slot, per_bus)
        bus, unit = slot
    if (bus, unit) in taken:
        raise BadInput(
            f"two drives on if={shown(drive.interface)} bus={bus} unit={unit} (QEMU refuses this)",
            subject=subject,
        )
    return bus, unit


# ---------------------------------------------------------------- the QEMU version, unexecuted

_BANNER = b"QEMU emulator version "
_ELF_READ_LIMIT = 64 << 20  # QEMU's .rodata is a few MiB
_CHUNK = 1 << 20


def binary_version(path: str) -> Version | None:
    """The version a QEMU binary prints for ``--version``, read from its ELF read-only data.

    The file is opened and read (at most 64 MiB of it), never executed: ``/proc/PID/exe``
    of another user's process must not run as the caller. ``QEMU emulator version X.Y.Z``
    is one string in ``.rodata`` (vl.c prints it with a single printf). None when the
    file is not an ELF binary or holds no such string. A crafted binary can make up
    any version; that only changes the verdicts on its own command line.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        for start, size in _readonly_ranges(fd):
            found = _search(fd, start, min(size, _ELF_READ_LIMIT))
            if found is not None:
                return found
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def _readonly_ranges(fd: int) -> list[tuple[int, int]]:
    """File ranges of the allocated, non-writable, non-executable sections (else segments)."""
    header = os.pread(fd, 64, 0)
    if len(header) < 52 or header[:4] != b"\x7fELF" or header[4] not in (1, 2):
        return []
    wide, order = header[4] == 2, "little" if header[5] == 1 else "big"

    def num(data: bytes, at: int, size: int) -> int:
        return int.from_bytes(data[at : at + size], order)  # type: ignore[arg-type]

    word = 8 if wide else 4
    shoff = num(header, 0x28 if wide else 0x20, word)
    shentsize, shnum = (
        num(header, 0x3A if wide else 0x2E, 2),
        num(header, 0x3C if wide else 0x30, 2),
    )
    ranges = []
    if shoff and 0 < shnum <= 4096 and shentsize >= (64 if wide else 40):
        table = os.pread(fd, shnum * shentsize, shoff)
        for k in range(len(table) // shentsize):
            entry = table[k * shentsize : (k + 1) * shentsize]
            kind, flags = num(entry, 4, 4), num(entry, 8, word)
            offset = num(entry, 0x18 if wide else 0x10, word)
            size = num(entry, 0x20 if wide else 0x14, word)
            if kind == 1 and flags & 0x2 and not flags & 0x5:  # PROGBITS, ALLOC, !WRITE, !EXEC
                ranges.append((offset, size))
    if ranges:
        return ranges
    phoff = num(header, 0x20 if wide else 0x1C, word)
    phentsize, phnum = (
        num(header, 0x36 if wide else 0x2A, 2),
        num(header, 0x38 if wide else 0x2C, 2),
    )
    if not phoff or not 0 < phnum <= 4096 or phentsize < (56 if wide else 32):
        return []
    table = os.pread(fd, phnum * phentsize, phoff)
    for k in range(len(table) // phentsize):
        entry = table[k * phentsize : (k + 1) * phentsize]
        kind = num(entry, 0, 4)
        pflags = num(entry, 4 if wide else 0x18, 4)
        offset = num(entry, 8 if wide else 4, word)
        size = num(entry, 0x20 if wide else 0x10, word)
        if kind == 1 and pflags == 0x4:  # PT_LOAD, read-only
            ranges.append((offset, size))
    return ranges


def _search(fd: int, start: int, size: int) -> Version | None:
    overlap = len(_BANNER) + 32
    position, end = start, start + size
    while position < end:
        chunk = os.pread(fd, min(_CHUNK + overlap, end - position), position)
        if not chunk:
            return None
        at = chunk.find(_BANNER)
        if at >= 0:
            match = re.match(rb"\d+(?:\.\d+)*", chunk[at + len(_BANNER) : at + len(_BANNER) + 32])
            if match:
                return parse_version(match.group().decode())
        position += _CHUNK
    return None


# ---------------------------------------------------------------- building the model

_DRIVE_NODE_KEYS = {
    "file",
    "format",
    "discard",
    "detect-zeroes",
    "cache",
    "readonly",
    "read-only",
    "driver",
    "aio",
    "node-name",
    "discard-no-unref",
    "copy-on-read",
}


class _Builder:
    def __init__(self, parsed: ParsedCommandLine, subject: str) -> None:
        self.parsed = parsed
        self.subject = subject
        self.name = parsed.name or subject
        self.specs: dict[str, dict[str, Any]] = {}
        for blockdev in parsed.blockdevs:
            node_name = blockdev.spec.get("node-name")
            if isinstance(node_name, str):
                self.specs[node_name] = blockdev.spec
        self.nodes: dict[str, BlockNode] = {}
        self.building: set[str] = set()
        self.controllers: dict[str, str] = {}  # id -> QEMU controller driver
        for device in parsed.devices:
            driver = str(device.spec.get("driver", ""))
            if driver in CONTROLLERS:
                key = str(device.spec.get("id", f"#{len(self.controllers)}"))
                self.controllers[key] = driver

    def domain(self) -> Domain:
        domain = Domain(name=self.name, origin=Origin.QEMU_ARGS, machine=self.parsed.machine)
        drives_by_id = {str(d.opts["id"]): d for d in self.parsed.drives if "id" in d.opts}
        for device in self.parsed.devices:
            driver = str(device.spec.get("driver", ""))
            if driver not in DEVICES:
                continue
            assert device.option.value_index is not None
            index = device.option.value_index
            domain.disks.append(self._device_disk(device.spec, index, drives_by_id))
        for drive in self.parsed.drives:
            if drive.used:
                continue
            legacy = self._legacy_drive_disk(drive)
            if legacy is not None:
                domain.disks.append(legacy)
        domain.notes.extend(self.parsed.notes)
        return domain

    # -- devices attached to -drive if=none or to -blockdev nodes

    def _device_disk(
        self, device: dict[str, Any], index: int, drives_by_id: dict[str, DriveSpec]
    ) -> Disk:
        driver = str(device["driver"])
        rule = DEVICES[driver]
        properties = {**self.parsed.globals.get(driver, {}), **device}
        if rule.bus == "virtio":
            properties = {**self.parsed.globals.get("virtio-blk-device", {}), **properties}
        ref = device.get("drive")
        disk = Disk(
            domain=self.name,
            ident=str(device.get("id") or ref or f"{driver}-{index}"),
            device=rule.device,
            bus=rule.bus,
            qemu_device=driver,
            device_properties=properties,
            locator=ArgvOption(index),
            storage=StorageKind.NONE,
        )
        disk.bus, disk.controller_model = self._attachment(rule.bus, device)
        disk.read_only = disk.device is DeviceType.CDROM
        if ref is None:
            return disk
        ref = str(ref)
        top: BlockNode | None
        drive = drives_by_id.get(ref)
        if drive is not None:
            drive.used = True
            top = self._drive_nodes(drive)
            media = str(drive.opts.get("media", "disk"))
            if media == "cdrom" and disk.device is DeviceType.DISK:
                disk.device = DeviceType.CDROM
            if "file" not in drive.opts and not any(k.startswith("file.") for k in drive.opts):
                top = None
        else:
            top = self._node(ref, self.subject)
        if disk.device is DeviceType.CDROM:
            disk.read_only = True
        if top is not None:
            fill_disk_from_nodes(disk, top)
        return disk

    def _attachment(self, bus: Bus, device: dict[str, Any]) -> tuple[Bus, str | None]:
        """The libvirt bus name and controller model for a device's bus=... property."""
        if bus not in ("scsi", "ide"):
            return bus, None
        wanted = str(device.get("bus", "")).rpartition(".")[0] or None
        controller = self.controllers.get(wanted) if wanted else None
        if controller is None and wanted is None:
            kinds = [c for c in self.controllers.values() if CONTROLLERS[c][0] in (bus, "sata")]
            controller = kinds[0] if kinds else None
        if controller is None:
            if bus == "ide" and self._q35():  # q35's built-in ICH9 AHCI: buses ide.0-ide.5
                return "sata", "ahci"
            return bus, None
        kind, model = CONTROLLERS[controller]
        return (kind if kind in ("sata", "ide", "scsi") else bus), model

    def _q35(self) -> bool:
        return self.parsed.q35

    # -- legacy drives that imply their own device

    def _legacy_drive_disk(self, drive: DriveSpec) -> Disk | None:
        opts = drive.opts
        interface = str(opts.get("if", "ide"))
        ident = drive.name
        media = str(opts.get("media", "disk"))
        device = DeviceType.CDROM if media == "cdrom" else DeviceType.DISK
        q35 = self._q35()
        mapping: dict[str, tuple[Bus, str | None, str | None]] = {
            "ide": (
                "sata" if q35 else "ide",
                "ahci" if q35 else None,
                "ide-cd" if device is DeviceType.CDROM else "ide-hd",
            ),
            "scsi": ("scsi", "lsilogic", "scsi-cd" if device is DeviceType.CDROM else "scsi-hd"),
            "virtio": ("virtio", None, "virtio-blk-pci"),
            "floppy": ("fdc", None, "floppy"),
            "sd": ("sd", None, "sd-card"),
        }
        if interface == "none":
            self.parsed.notes.append(f"-drive {shown(ident)}: if=none and no -device uses it")
            return None
        if interface not in mapping:  # pflash, mtd: firmware, not a guest disk
            self.parsed.notes.append(
                f"-drive {shown(ident)}: if={shown(interface)} is not a guest disk"
            )
            return None
        bus, controller, qemu_device = mapping[interface]
        if interface == "floppy":
            device = DeviceType.FLOPPY
        disk = Disk(
            domain=self.name,
            ident=ident,
            device=device,
            bus=bus,
            controller_model=controller,
            qemu_device=qemu_device,
            device_properties=dict(self.parsed.globals.get(qemu_device or "", {})),
            locator=ArgvOption(drive.option.last),
            storage=StorageKind.NONE,
            read_only=device is DeviceType.CDROM,
        )
        if "file" in opts or any(key.startswith("file.") for key in opts):
            fill_disk_from_nodes(disk, self._drive_nodes(drive))
        return disk

    # -- block nodes

    def _drive_nodes(self, drive: DriveSpec) -> BlockNode:
        """The nodes a -drive creates: a format node over a protocol node (discard inherited)."""
        opts = drive.opts
        ident = drive.name
        discard = normalize_discard(opts.get("discard"))
        read_only = (
            flag(opts.get("readonly", opts.get("read-only", "off")))
            or str(opts.get("media", "")) == "cdrom"
        )
        file_opts: dict[str, Any] = {
            key[5:]: value for key, value in opts.items() if key.startswith("file.")
        }
        filename = opts.get("file")
        if isinstance(filename, str) and filename.startswith("json:"):
            file_opts.update(parse_json_option(filename[5:], self.subject, f"-drive {ident}"))
            filename = None
        protocol_node = self._protocol_from_filename(
            filename, file_opts, discard, read_only, NodeOrigin("-drive", ident)
        )
        fmt = opts.get("format") or opts.get("driver")
        if fmt is None or str(fmt) in LOCAL_PROTOCOLS or str(fmt) in PROTOCOLS:
            # No format layer given: QEMU probes (None), or the protocol is used directly.
            top_driver = None if fmt is None else str(fmt)
            if top_driver is not None:
                protocol_node.discard = discard
                protocol_node.inherited = False
                protocol_node.detect_zeroes = _opt_str(opts.get("detect-zeroes"))
                protocol_node.cache = _opt_str(opts.get("cache"))
                return protocol_node
        top = BlockNode(
            None if fmt is None else str(fmt),
            node_name=_opt_str(opts.get("node-name")),
            discard=discard,
            detect_zeroes=_opt_str(opts.get("detect-zeroes")),
            discard_no_unref=None
            if "discard-no-unref" not in opts
            else flag(opts["discard-no-unref"]),
            cache=_opt_str(opts.get("cache")),
            read_only=read_only,
            filename=protocol_node.filename,
            file=protocol_node,
            defined_by=NodeOrigin("-drive", ident),
            options={k: v for k, v in opts.items() if k not in _DRIVE_NODE_KEYS},
        )
        return top

    def _protocol_from_filename(
        self,
        filename: Any,
        extra: dict[str, Any],
        discard: Discard | None,
        read_only: bool,
        defined_by: NodeOrigin,
    ) -> BlockNode:
        driver = extra.get("driver")
        path: str | None = filename if isinstance(filename, str) else None
        if driver is None and path is not None:
            match = _URL_PROTOCOL.match(path)
            if match and match.group(1) in PROTOCOLS and not path.startswith("/"):
                driver = match.group(1)
            elif path.startswith("/dev/") or _is_block_device(path):
                driver = "host_device"
            else:
                driver = "file"
        if path is None:
            path = _describe_location(extra)
        node = BlockNode(
            None if driver is None else str(driver),
            discard=discard,
            read_only=read_only,
            filename=path,
            inherited=discard is not None,
            defined_by=defined_by,
            options={k: v for k, v in extra.items() if k != "driver"},
        )
        if "discard" in extra:
            node.discard = normalize_discard(extra["discard"])
            node.inherited = False
        return node

    def _node(self, name: str, context: str) -> BlockNode:
        """The node called ``name`` (built once; a missing or cyclic reference is bad input)."""
        if name in self.nodes:
            return self.nodes[name]
        if name not in self.specs:
            raise BadInput(
                f"{shown(context)}: no -blockdev or -drive named {shown(name)!r}",
                subject=self.subject,
            )
        if name in self.building:
            raise BadInput(f"-blockdev {shown(name)!r} refers to itself", self.subject)
        self.building.add(name)
        spec = self.specs[name]
        node = self._node_from_spec(spec, None, NodeOrigin("-blockdev", name))
        self.building.discard(name)
        self.nodes[name] = node
        return node

    def _node_from_spec(
        self,
        spec: dict[str, Any],
        inherited_discard: Discard | None,
        defined_by: NodeOrigin,
        depth: int = 0,
    ) -> BlockNode:
        if depth > _MAX_NODE_DEPTH or len(self.building) > _MAX_NODE_DEPTH:
            raise BadInput(
                f"{defined_by}: block node graph nested more than {_MAX_NODE_DEPTH} levels deep",
                subject=self.subject,
            )
        driver = spec.get("driver")
        if driver is None:
            raise BadInput(f"{shown(defined_by)}: no 'driver'", subject=self.subject)
        own = normalize_discard(spec.get("discard"))
        discard = own if own is not None else inherited_discard
        cache = spec.get("cache")
        node = BlockNode(
            str(driver),
            node_name=_opt_str(spec.get("node-name")),
            discard=discard,
            detect_zeroes=_opt_str(spec.get("detect-zeroes")),
            discard_no_unref=None
            if "discard-no-unref" not in spec
            else flag(spec["discard-no-unref"]),
            cache=(
                ",".join(f"{k}={v}" for k, v in cache.items())
                if isinstance(cache, dict)
                else _opt_str(cache)
            ),
            read_only=flag(spec.get("read-only", False)),
            filename=_location(spec),
            inherited=own is None and discard is not None,
            defined_by=defined_by,
            options={k: v for k, v in spec.items() if k not in ("file", "backing")},
        )
        for role in ("file", "backing"):
            child = spec.get(role)
            if isinstance(child, str):
                setattr(node, role, self._node(child, str(defined_by)))
            elif isinstance(child, dict):
                # Inline children inherit discard from their parent; backing files don't.
                setattr(
                    node,
                    role,
                    self._node_from_spec(
                        child,
                        discard if role == "file" else None,
                        defined_by.child(role),
                        depth + 1,
                    ),
                )
        if node.filename is None and node.file is not None:
            node.filename = node.file.filename
        return node


def fill_disk_from_nodes(disk: Disk, top: BlockNode) -> None:
    """Source, format, storage, discard and detect_zeroes of ``disk`` from its top node.

    Shared with :mod:`vmtrim.sources.qmp`, which fills disks from the live node graph.
    """
    disk.node = top
    protocol = top.protocol
    disk.read_only = disk.read_only or top.read_only
    disk.discard = top.discard
    disk.detect_zeroes = top.detect_zeroes
    disk.source = protocol.filename or top.filename
    chain = top.file_chain()
    formats = [node.driver for node in chain if node is not protocol]
    disk.format = as_format(
        next((f for f in formats if f not in ("copy-on-read", "throttle")), None)
    )
    if len(chain) == 1 and top.driver in LOCAL_PROTOCOLS:
        disk.format = "raw"  # a device straight on a protocol node sees the raw bytes
    kind = LOCAL_PROTOCOLS.get(protocol.driver or "")
    if kind is not None:
        disk.storage = StorageKind(kind)
    elif protocol.driver in PROTOCOLS:
        disk.storage = (
            StorageKind.NVME
            if protocol.driver == "nvme"
            else StorageKind.DIR
            if protocol.driver == "vvfat"
            else StorageKind.NETWORK
        )
        disk.protocol = protocol.driver
    else:
        disk.storage = StorageKind.UNKNOWN
        disk.protocol = protocol.driver


_MAX_NODE_DEPTH = 64  # real chains are a few nodes; this keeps recursion far from Python's limit


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _location(spec: dict[str, Any]) -> str | None:
    for key in ("filename", "path"):
        if isinstance(spec.get(key), str):
            return str(spec[key])
    if spec.get("driver") in PROTOCOLS or "server" in spec or "pool" in spec:
        return _describe_location(spec)
    return None


def _describe_location(spec: dict[str, Any]) -> str | None:
    """A protocol://host/name text for a network node given as options."""
    driver = spec.get("driver")
    if driver is None:
        return None
    server = spec.get("server")
    host = ""
    if isinstance(server, dict):
        host = str(server.get("host") or server.get("path") or "")
        if server.get("port"):
            host += f":{server['port']}"
    elif isinstance(server, list):
        host = ",".join(
            f"{item.get('host', '')}:{item['port']}"
            if item.get("port")
            else str(item.get("host", ""))
            for item in server
            if isinstance(item, dict)
        )
    name = "/".join(
        str(spec[k])
        for k in (
            "pool",
            "image",
            "target",
            "export",
            "volume",
            "path",
            "url",
            "device",
            "namespace",
        )
        if k in spec
    )
    return f"{driver}://{host}/{name}"


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
