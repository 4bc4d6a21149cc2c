"""Read a QEMU command line into the :mod:`vmtrim.model`.

Accepted as shell text (quotes, ``\\`` line continuations even in the middle of an
argument, leading ``VAR=value`` assignments as ``virsh domxml-to-native`` prints
them) or NUL-separated as in ``/proc/PID/cmdline``. Understands:

- legacy ``-drive file=..,if=ide|scsi|virtio|floppy,discard=on`` and the ``-hda``/``-cdrom``
  shorthands, where the drive implies its device;
- ``-drive if=none,id=X`` attached with ``-device scsi-hd,drive=X,bus=scsi0.0``;
- ``-blockdev`` in key=value form (dotted keys such as ``file.filename``) and in JSON,
  following ``file`` and ``backing`` children given inline or by node name;
- ``-device`` in key=value form and in JSON; ``-global`` device defaults;
- ``-machine``/``-M`` with its version; QEMU's ``,,`` comma escaping.

An unknown option is bad input (it would also stop QEMU); unknown devices are ignored.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
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
    as_discard,
    as_format,
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Options without an argument (QEMU accepts -opt and --opt). Generous: includes
# options that older QEMU releases had, so old command lines still parse.
FLAG_OPTIONS = _words("""
h help version S s snapshot enable-kvm no-kvm nographic no-user-config nodefaults no-acpi
no-hpet no-reboot no-shutdown no-fd-bootchk full-screen daemonize mem-prealloc
only-migratable portrait singlestep usb win2k-hack xen-attach xen-domid-restrict preconfig
enable-sync-profile async-teardown audio-help curses no-quit alt-grab ctrl-grab no-frame
semihosting enable-fips no-kvm-irqchip no-kvm-pit no-kvm-pit-reinjection tdf show-cursor
sdl localtime enable-nesting no-shutdown-on-crash old-param nouserconfig nodefconfig
no-kvm-pit-reinjection
""")

# Options that take one argument.
ARG_OPTIONS = _words("""
machine M cpu accel smp numa add-fd set global boot m mem-path k audio audiodev soundhw device
name uuid fda fdb hda hdb hdc hdd cdrom blockdev drive mtdblock sd pflash fsdev virtfs iscsi
usbdevice display vga rotate g vnc spice monitor qmp qmp-pretty mon debugcon pidfile chardev
serial parallel rtc icount watchdog watchdog-action action echr incoming xen-domid loadvm
kernel append initrd dtb bios L D d dfilter seed trace plugin sandbox runas chroot readconfig
writeconfig msg overcommit object tpmdev fw_cfg smbios acpitable option-rom netdev nic net bt
gdb compat prom-env semihosting-config dump-vmstate run-with tb-size qtest qtest-log balloon
kvm-shadow-memory mem-merge xen-create hot-add virtioconsole clock redir smb tftp bootp
watchdog-action nvram cpu-throttle realtime mem-merge
""")

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


# ---------------------------------------------------------------- tokens and option values


def tokenize(data: bytes | str, subject: str = "<args>") -> list[str]:
    """Split a command line into argv. NUL-separated input is taken as is."""
    if isinstance(data, bytes):
        if b"\0" in data:
            parts = data.split(b"\0")
            if parts and parts[-1] == b"":
                parts.pop()
            return [part.decode("utf-8", "surrogateescape") for part in parts]
        text = data.decode("utf-8", "surrogateescape")
    else:
        text = data
    if "\0" in text:
        return tokenize(text.encode("utf-8", "surrogateescape"), subject)
    # A backslash-newline joins lines anywhere, also inside quotes: pasted command
    # lines are often wrapped in the middle of a long JSON argument.
    text = re.sub(r"\\\r?\n", "", text)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    try:
        return shlex.split(text, posix=True)
    except ValueError as exc:
        raise BadInput(f"cannot split the command line: {exc}", subject=subject) from exc


def split_commas(text: str) -> list[str]:
    """Split QEMU option text on ``,``; ``,,`` is a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return [part for part in parts if part]


def parse_opts(text: str, implied: str | None = None) -> dict[str, Any]:
    """QemuOpts syntax (``-drive``, ``-device``, ``-machine``): a flat dict of strings.

    A bare first word is the implied key (the device driver, the machine type); any
    other bare word is a boolean set to ``on``.
    """
    result: dict[str, Any] = {}
    for index, part in enumerate(split_commas(text)):
        key, sep, value = part.partition("=")
        if sep:
            result[key] = value
        elif index == 0 and implied:
            result[implied] = part
        else:
            result[part] = "on"
    return result


def parse_keyval(text: str, subject: str, option: str) -> dict[str, Any]:
    """``-blockdev`` key=value syntax: dotted keys make nested dicts."""
    result: dict[str, Any] = {}
    for part in split_commas(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise BadInput(f"{option} {text!r}: '{part}' is not key=value", subject=subject)
        target = result
        *path, last = key.split(".")
        for step in path:
            nested = target.setdefault(step, {})
            if not isinstance(nested, dict):
                raise BadInput(
                    f"{option}: '{key}' conflicts with '{step}={nested}'", subject=subject
                )
            target = nested
        if isinstance(target.get(last), dict):
            raise BadInput(f"{option}: '{key}' conflicts with '{last}.*'", subject=subject)
        target[last] = value
    return result


def parse_json_option(text: str, subject: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise BadInput(f"{option}: invalid JSON: {detail}", subject=subject) from exc
    if not isinstance(value, dict):
        raise BadInput(f"{option}: JSON must be an object", subject=subject)
    return value


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("on", "true", "yes", "1")


def normalize_discard(value: Any) -> Discard | None:
    """QEMU accepts discard=on|unmap|off|ignore; the model says unmap or ignore."""
    return as_discard(value)


# ---------------------------------------------------------------- the command line


@dataclass
class _Drive:
    opts: dict[str, Any]
    argv_index: int
    used: bool = False
    name: str = ""  # the id, or the one QEMU makes up (ide0-hd0, virtio0, floppy0)


@dataclass
class _Parsed:
    program: str | None = None
    name: str | None = None
    machine: str | None = None
    drives: list[_Drive] = field(default_factory=list)
    blockdevs: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    devices: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    globals: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshot: bool = False
    notes: list[str] = field(default_factory=list)


def read_args_file(path: str) -> Domain:
    """Parse a command line from a file (``-`` for stdin)."""
    subject = "<stdin>" if path == "-" else path
    return parse_qemu_command(read_input(path), subject=subject)


def read_pid(pid: int) -> Domain:
    """Parse the command line of a running process from ``/proc/PID/cmdline``."""
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
    domain.qemu_version = qemu_binary_version(f"/proc/{pid}/exe")
    return domain


def qemu_binary_version(binary: str) -> Version | None:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> (7, 2, 22); None if it cannot tell."""
    try:
        out = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"QEMU emulator version (\d+(?:\.\d+)*)", out)
    return parse_version(match.group(1)) if match else None


def parse_qemu_command(data: bytes | str | list[str], subject: str = "<args>") -> Domain:
    """Parse a QEMU command line (text, bytes or an argv list) into a :class:`Domain`."""
    argv = list(data) if isinstance(data, list) else tokenize(data, subject)
    parsed = _parse_argv(argv, subject)
    return _Builder(parsed, subject).domain()


def _parse_argv(argv: list[str], subject: str) -> _Parsed:
    parsed = _Parsed()
    i = 0
    while i < len(argv) and (_ENV_ASSIGNMENT.match(argv[i]) or argv[i] in ("env", "exec")):
        i += 1
    if i < len(argv) and not argv[i].startswith("-"):
        parsed.program = argv[i]
        base = os.path.basename(argv[i])
        if "qemu" not in base and "kvm" not in base:
            raise BadInput(f"not a QEMU command line: it runs '{base}'", subject=subject)
        i += 1
    if i >= len(argv) and parsed.program is None:
        raise BadInput("empty command line", subject=subject)
    positional_disk = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token == "-":
            # QEMU takes a bare argument as the first hard disk image.
            parsed.drives.append(
                _Drive(
                    {"file": token, "if": "ide", "index": str(positional_disk), "media": "disk"}, i
                )
            )
            positional_disk += 1
            i += 1
            continue
        name = token[2:] if token.startswith("--") else token[1:]
        if name in FLAG_OPTIONS:
            parsed.snapshot = parsed.snapshot or name == "snapshot"
            i += 1
            continue
        if name not in ARG_OPTIONS:
            raise BadInput(f"unknown QEMU option '{token}'", subject=subject)
        if i + 1 >= len(argv):
            raise BadInput(f"option '{token}' needs an argument", subject=subject)
        _option(parsed, name, argv[i + 1], i, subject)
        i += 2
    return parsed


def _option(parsed: _Parsed, name: str, value: str, index: int, subject: str) -> None:
    if name in ("machine", "M"):
        if value.lstrip().startswith("{"):
            machine = str(parse_json_option(value, subject, f"-{name}").get("type") or "")
        else:
            machine = str(parse_opts(value, implied="type").get("type") or "")
        if machine and machine != "help":
            parsed.machine = machine
    elif name == "name":
        parsed.name = str(parse_opts(value, implied="guest").get("guest") or "") or None
    elif name == "drive":
        parsed.drives.append(_Drive(parse_opts(value), index))
    elif name in _SHORTHANDS:
        interface, unit, media = _SHORTHANDS[name]
        parsed.drives.append(
            _Drive({"file": value, "if": interface, "index": str(unit), "media": media}, index)
        )
    elif name == "blockdev":
        spec = (
            parse_json_option(value, subject, "-blockdev")
            if value.lstrip().startswith("{")
            else parse_keyval(value, subject, "-blockdev")
        )
        parsed.blockdevs.append((spec, index))
    elif name == "device":
        device = (
            parse_json_option(value, subject, "-device")
            if value.lstrip().startswith("{")
            else parse_opts(value, implied="driver")
        )
        parsed.devices.append((device, index))
    elif name == "global":
        opts = parse_opts(value)
        if {"driver", "property", "value"} <= set(opts):
            parsed.globals.setdefault(str(opts["driver"]), {})[str(opts["property"])] = opts[
                "value"
            ]
        else:
            for key, item in opts.items():
                driver, _, prop = key.rpartition(".")
                if driver:
                    parsed.globals.setdefault(driver, {})[prop] = item
    elif name == "readconfig":
        parsed.notes.append(f"-readconfig {value}: devices defined in that file are not audited")


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
    def __init__(self, parsed: _Parsed, subject: str) -> None:
        self.parsed = parsed
        self.subject = subject
        self.name = parsed.name or subject
        self.specs: dict[str, tuple[dict[str, Any], int]] = {}
        for spec, index in parsed.blockdevs:
            node_name = spec.get("node-name")
            if isinstance(node_name, str):
                self.specs[node_name] = (spec, index)
        self.nodes: dict[str, BlockNode] = {}
        self.building: set[str] = set()
        _name_drives(parsed.drives)
        self.controllers: dict[str, str] = {}  # id -> QEMU controller driver
        for device, _ in parsed.devices:
            driver = str(device.get("driver", ""))
            if driver in CONTROLLERS:
                self.controllers[str(device.get("id", f"#{len(self.controllers)}"))] = driver

    def domain(self) -> Domain:
        domain = Domain(name=self.name, origin=Origin.QEMU_ARGS, machine=self.parsed.machine)
        drives_by_id = {str(d.opts["id"]): d for d in self.parsed.drives if "id" in d.opts}
        for device, index in self.parsed.devices:
            driver = str(device.get("driver", ""))
            if driver not in DEVICES:
                continue
            domain.disks.append(self._device_disk(device, index, drives_by_id))
        for drive in self.parsed.drives:
            if drive.used:
                continue
            disk = self._legacy_drive_disk(drive)
            if disk is not None:
                domain.disks.append(disk)
        domain.notes.extend(self.parsed.notes)
        return domain

    # -- devices attached to -drive if=none or to -blockdev nodes

    def _device_disk(
        self, device: dict[str, Any], index: int, drives_by_id: dict[str, _Drive]
    ) -> Disk:
        driver = str(device["driver"])
        rule = DEVICES[driver]
        properties = {**self.parsed.globals.get(driver, {}), **device}
        if rule.bus == "virtio":
            properties = {**self.parsed.globals.get("virtio-blk-device", {}), **properties}
        ref = device.get("drive")
        disk = Disk(
            domain=self.name,
            ident=str(device.get("id") or ref or f"argv[{index}]"),
            device=rule.device,
            bus=rule.bus,
            qemu_device=driver,
            device_properties=properties,
            locator=ArgvOption(index + 1),
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
        return (self.parsed.machine or "").startswith(("q35", "pc-q35"))

    # -- legacy drives that imply their own device

    def _legacy_drive_disk(self, drive: _Drive) -> Disk | None:
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
            self.parsed.notes.append(f"-drive {ident}: if=none and no -device uses it")
            return None
        if interface not in mapping:  # pflash, mtd: firmware, not a guest disk
            self.parsed.notes.append(f"-drive {ident}: if={interface} is not a guest disk")
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
            locator=ArgvOption(drive.argv_index + 1),
            storage=StorageKind.NONE,
            read_only=device is DeviceType.CDROM,
        )
        if "file" in opts or any(key.startswith("file.") for key in opts):
            fill_disk_from_nodes(disk, self._drive_nodes(drive))
        return disk

    # -- block nodes

    def _drive_nodes(self, drive: _Drive) -> BlockNode:
        """The nodes a -drive creates: a format node over a protocol node (discard inherited)."""
        opts = drive.opts
        ident = drive.name
        discard = normalize_discard(opts.get("discard"))
        read_only = (
            _flag(opts.get("readonly", opts.get("read-only", "off")))
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
            else _flag(opts["discard-no-unref"]),
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
                f"{context}: no -blockdev or -drive named '{name}'", subject=self.subject
            )
        if name in self.building:
            raise BadInput(f"-blockdev '{name}' refers to itself", subject=self.subject)
        self.building.add(name)
        spec, _index = self.specs[name]
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
            raise BadInput(f"{defined_by}: no 'driver'", subject=self.subject)
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
            else _flag(spec["discard-no-unref"]),
            cache=(
                ",".join(f"{k}={v}" for k, v in cache.items())
                if isinstance(cache, dict)
                else _opt_str(cache)
            ),
            read_only=_flag(spec.get("read-only", False)),
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


_UNITS_PER_BUS = {"ide": 2, "scsi": 7}
_MAX_NODE_DEPTH = 64  # real chains are a few nodes; this keeps recursion far from Python's limit


def _name_drives(drives: list[_Drive]) -> None:
    """Give each -drive its id, or the name QEMU gives a drive without one."""
    taken: dict[str, set[int]] = {}
    for drive in drives:
        if "index" in drive.opts and str(drive.opts["index"]).isdigit():
            taken.setdefault(str(drive.opts.get("if", "ide")), set()).add(int(drive.opts["index"]))
    for drive in drives:
        if "id" in drive.opts:
            drive.name = str(drive.opts["id"])
            continue
        interface = str(drive.opts.get("if", "ide"))
        used = taken.setdefault(interface, set())
        if str(drive.opts.get("index", "")).isdigit():
            index = int(drive.opts["index"])
        else:
            index = next(i for i in range(len(used) + 1) if i not in used)
            used.add(index)
        per_bus = _UNITS_PER_BUS.get(interface)
        media = ("-cd" if drive.opts.get("media") == "cdrom" else "-hd") if per_bus else ""
        if per_bus:
            drive.name = f"{interface}{index // per_bus}{media}{index % per_bus}"
        else:
            drive.name = f"{interface}{index}"


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
