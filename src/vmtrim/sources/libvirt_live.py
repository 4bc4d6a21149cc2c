"""Live libvirt domains into the model: live XML, connection versions and guest-agent facts.

The guest's filesystems (guest-get-fsinfo) are mapped to the host's disks by serial,
or by bus and address. Through guest-exec come the mount options, fstrim.timer and what
its fstrim.service trims (with /etc/fstab), and, in one ``sh -c`` for all disks, each
mapped disk's ``/sys/block/DEV/queue`` discard facts (:class:`~vmtrim.model.GuestQueue`).

The guest is not trusted: every answer is cut at :data:`OUTPUT_LIMIT` bytes before it is
parsed, names go to the guest as arguments (never into the script), and a value that is
not what sysfs would print becomes None with a note, never an exception.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vmtrim._util.deadline import call_with_deadline
from vmtrim._util.domxml import DriveAddress, PciAddress, controllers, disks
from vmtrim.channels.libvirt import (
    Connection,
    LibvirtAgent,
    connection,
    fetch_domain_xml,
    libvirt_module,
    select_domains,
)
from vmtrim.channels.qmp import ExecStatus, parse_fsinfo
from vmtrim.errors import AgentCommandFailed, AgentUnavailable
from vmtrim.model import (
    Domain,
    FstrimScope,
    GuestFilesystem,
    GuestInfo,
    GuestQueue,
)
from vmtrim.sources.libvirt_xml import parse_domain_xml

# --- live audit: the model from a running domain, its connection and its guest agent -------


@dataclass(frozen=True)
class _Address:
    """Where a disk sits, in the terms guest-get-fsinfo reports (bus-type, pci, b/t/u)."""

    bus: str | None
    pci: PciAddress | None  # the disk's own (virtio) or its controller's
    drive: DriveAddress | None  # (bus, target, unit) of a drive address
    serial: str | None


class AgentLike(Protocol):
    """What the guest facts need of an agent (:class:`~vmtrim.channels.libvirt.LibvirtAgent`)."""

    def execute(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any: ...

    def run(self, path: str, args: list[str], timeout: float) -> ExecStatus: ...


def disk_addresses(xml: str) -> dict[str, _Address]:
    """target dev -> address, with the controller's PCI address for drive addresses."""
    from lxml import etree

    from vmtrim._util.safexml import xml_parser

    root = etree.fromstring(xml.encode(), xml_parser())
    pci_of = {(c.type, c.index or "0"): c.pci() for c in controllers(root)}
    out = {}
    for disk in disks(root):
        dev = disk.target_dev
        if not dev:
            continue
        bus = disk.target_bus
        pci = disk.pci()
        drive = disk.drive()
        if drive is not None:
            kind = {"sata": "sata", "ide": "ide"}.get(bus or "", "scsi")
            pci = pci_of.get((kind, disk.address_controller or "0"))
        out[dev] = _Address(bus, pci, drive, disk.serial)
    return out


def _guest_pci(entry: dict[str, Any]) -> tuple[int, int, int, int] | None:
    pci = entry.get("pci-controller")
    if not isinstance(pci, dict):
        return None
    return (
        int(pci.get("domain", -1)),
        int(pci.get("bus", -1)),
        int(pci.get("slot", -1)),
        int(pci.get("function", -1)),
    )


def match_guest_disk(entry: dict[str, Any], addresses: dict[str, _Address]) -> str | None:
    """The target dev of the host disk behind one guest-get-fsinfo ``disk`` entry.

    By serial when both sides have one; otherwise by bus type and address: virtio-blk by
    the device's PCI address, SCSI by the controller's PCI address plus target and unit,
    IDE/SATA by the controller's PCI address plus bus and unit (every AHCI or IDE
    controller numbers its ports from 0). With one disk of that bus type, that disk.
    """
    serial = entry.get("serial")
    if serial:
        for dev, addr in addresses.items():
            if addr.serial == serial:
                return dev
    bus_type = entry.get("bus-type")
    same_bus = {dev: a for dev, a in addresses.items() if a.bus == bus_type}
    pci = _guest_pci(entry)
    for dev, addr in same_bus.items():
        if bus_type == "virtio" and addr.pci == pci:
            return dev
        if (
            bus_type == "scsi"
            and addr.pci == pci
            and addr.drive is not None
            and (addr.drive[1], addr.drive[2]) == (entry.get("target"), entry.get("unit"))
        ):
            return dev
        if (
            bus_type in ("ide", "sata")
            and addr.drive is not None
            and (addr.drive[0], addr.drive[2]) == (entry.get("bus"), entry.get("unit"))
            and (addr.pci is None or pci is None or addr.pci == pci)
        ):
            return dev
    return next(iter(same_bus)) if len(same_bus) == 1 else None


def _mount_options(agent: AgentLike, timeout: float) -> dict[str, tuple[str, ...]]:
    status = agent.run("cat", ["/proc/mounts"], timeout)
    options: dict[str, tuple[str, ...]] = {}
    for line in status.out_data.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) >= 4:
            options[fields[1]] = tuple(fields[3].split(","))
    return options


#: The most of a guest's guest-exec output that is parsed; the rest is ignored (with a note).
OUTPUT_LIMIT = 64 * 1024
_NUMBER = re.compile(r"[0-9]{1,20}\Z")
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}\Z")  # a kernel block device name

# Unit directories in systemd's order of precedence (systemd.unit(5), "Unit File Load Path").
_UNIT_DIRS = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)
# fstrim.timer enabled?, then fstrim.service and its drop-ins, then /etc/fstab: each file
# after a "vmtrim-file PATH" line. Read from disk: `systemctl cat` needs a running systemd.
_TIMER_SCRIPT = f"""command -v systemctl >/dev/null 2>&1 || exit 127
{{
systemctl is-enabled fstrim.timer >/dev/null 2>&1; echo "vmtrim-enabled $?"
for d in {" ".join(_UNIT_DIRS)}; do
  for f in "$d/fstrim.service" "$d"/fstrim.service.d/*.conf; do
    [ -f "$f" ] && {{ echo "vmtrim-file $f"; head -c 16384 "$f"; echo; }}
  done
done
echo "vmtrim-file /etc/fstab"; head -c 32768 /etc/fstab 2>/dev/null
}} | head -c {OUTPUT_LIMIT + 1}
"""


@dataclass(frozen=True)
class TimerFacts:
    """What the guest said about fstrim.timer, fstrim.service and /etc/fstab."""

    enabled: bool
    command: str | None  # the service's ExecStart command lines, joined with " ; "
    scope: FstrimScope | None
    only: tuple[str, ...]  # the mountpoints an "fstab" or "listed" scope trims
    notes: tuple[str, ...] = ()


def _text(out: bytes, notes: list[str], what: str) -> str:
    if len(out) > OUTPUT_LIMIT:
        notes.append(f"{what}: the guest answered more than {OUTPUT_LIMIT} bytes; read the first")
    return out[:OUTPUT_LIMIT].decode("utf-8", "replace")


def _unescape(field: str) -> str:
    """fstab's octal escapes (\\040 is a space), as getmntent(3) reads them."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8) & 0xFF), field)


def parse_fstab(text: str) -> tuple[str, ...]:
    """The mountpoints /etc/fstab lists for fstrim: not swap, not ``X-fstrim.notrim``."""
    out: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        mountpoint = _unescape(fields[1])
        options = fields[3].split(",") if len(fields) > 3 else []
        if mountpoint.startswith("/") and "X-fstrim.notrim" not in options:
            out.append(mountpoint)
    return tuple(dict.fromkeys(out))


def parse_exec_start(units: Sequence[str]) -> list[str]:
    """The commands a unit's ExecStart= lines leave, fragment first, then drop-ins in order.

    An empty ``ExecStart=`` clears the list (how a drop-in replaces the command); the
    ``-@:+!`` prefixes are dropped.
    """
    commands: list[str] = []
    for text in units:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line.startswith("ExecStart="):
                value = line[len("ExecStart=") :].strip()
                if value:
                    commands.append(value.lstrip("-@:+!"))
                else:
                    commands.clear()
    return commands


def fstrim_scope(
    commands: Sequence[str], fstab: tuple[str, ...]
) -> tuple[FstrimScope, tuple[str, ...]]:
    """What these fstrim command lines trim (fstrim(8) of util-linux 2.38).

    ``--all`` every mounted filesystem; ``--fstab`` those in /etc/fstab (and / when fstab
    lacks it: fstrim takes it from the kernel command line); ``--listed-in A:B`` the
    first of A, B that is not empty (Debian 12 runs ``--listed-in
    /etc/fstab:/proc/self/mountinfo``: fstab's filesystems when fstab lists any, all
    otherwise); mountpoints named on the command line, those.
    """
    scopes: set[FstrimScope] = set()
    only: list[str] = []
    for command in commands:
        try:
            argv = shlex.split(command)
        except ValueError:
            return "unknown", ()
        if not argv or posixpath.basename(argv[0]) != "fstrim":
            return "unknown", ()
        listed: list[str] = []
        args = iter(argv[1:])
        for arg in args:
            if arg in ("-a", "--all"):
                scopes.add("all")
            elif arg in ("-A", "--fstab"):
                scopes.add("fstab")
            elif arg.startswith("--listed-in"):
                value = arg.partition("=")[2] if "=" in arg else next(args, "")
                listed.extend(value.split(":"))
            elif arg.startswith("--"):
                if arg in ("--offset", "--length", "--minimum", "--types"):
                    next(args, None)
            elif arg.startswith("-") and len(arg) > 1:
                for i, flag in enumerate(arg[1:], start=1):
                    if flag == "a":
                        scopes.add("all")
                    elif flag == "A":
                        scopes.add("fstab")
                    elif flag in "olmtI":  # takes a value: the rest, or the next argument
                        value = arg[i + 1 :] or next(args, "")
                        if flag == "I":
                            listed.extend(value.split(":"))
                        break
            else:
                scopes.add("listed")
                only.append(arg)
        for path in listed:
            if path == "/etc/fstab" and fstab:
                scopes.add("fstab")
                break
            if path in ("/proc/self/mountinfo", "/proc/mounts", "/proc/self/mounts"):
                scopes.add("all")
                break
            if path not in ("/etc/fstab", ""):
                return "unknown", ()  # a list file vmtrim did not read
    if not scopes or "all" in scopes:
        return ("all" if scopes else "unknown"), ()
    if "fstab" in scopes:
        only.extend(fstab)
        if "/" not in fstab:
            only.append("/")
    return ("fstab" if "fstab" in scopes else "listed"), tuple(dict.fromkeys(only))


def parse_timer(out: bytes, exitcode: int | None) -> TimerFacts:
    """The output of :data:`_TIMER_SCRIPT`. No systemctl (busybox, Alpine) is no timer."""
    notes: list[str] = []
    if exitcode == 127:
        return TimerFacts(False, None, None, ())
    text = _text(out, notes, "fstrim.timer")
    enabled = False
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("vmtrim-enabled "):
            enabled = line.split()[-1] == "0"
        elif line.startswith("vmtrim-file "):
            current = files.setdefault(line[len("vmtrim-file ") :], [])
        elif current is not None:
            current.append(line)
    fstab = parse_fstab("\n".join(files.pop("/etc/fstab", [])))
    fragment: str | None = None
    dropins: dict[str, str] = {}
    for path, lines in files.items():  # in the guest's precedence order
        name = posixpath.basename(path)
        if name == "fstrim.service":
            fragment = fragment if fragment is not None else "\n".join(lines)
        elif name.endswith(".conf"):
            dropins.setdefault(name, "\n".join(lines))
    if not enabled or fragment is None:
        return TimerFacts(enabled, None, "unknown" if enabled else None, (), tuple(notes))
    commands = parse_exec_start([fragment, *(dropins[k] for k in sorted(dropins))])
    scope, only = fstrim_scope(commands, fstab)
    # The guest wrote it and reasons quote it: printable characters only.
    command = "".join(c if c.isprintable() else "?" for c in " ; ".join(commands)[:1024])
    return TimerFacts(enabled, command or None, scope, only, tuple(notes))


def _fstrim_timer(agent: AgentLike, timeout: float) -> TimerFacts:
    status = agent.run("/bin/sh", ["-c", _TIMER_SCRIPT], timeout)
    return parse_timer(status.out_data, status.exitcode)


# One line per pair asked: "vmtrim-queue ASKED PART DISK key=value ...". ASKED is the
# disk as asked: a partition (qemu-ga gives a partition's own node as "dev"), or "-" (no
# "dev" before qemu-ga 3.1): the guest then finds the disk that holds it, DISK. The
# last value, start, is the partition's first sector: 0 for a filesystem on the disk,
# empty for one on something else (an LV, whose offset in its partition is not read).
_QUEUE_SCRIPT = f"""while [ $# -ge 2 ]; do
  asked=$1; p=$2; shift 2
  d=$asked
  [ "$d" = - ] && d=$p
  c=/sys/class/block/$d
  [ -e "$c/partition" ] && d=$(basename "$(dirname "$(readlink -f "$c")")")
  a=/sys/block/$d
  [ -e "$a/$p/partition" ] && a=$a/$p
  printf 'vmtrim-queue %s %s %s' "$asked" "$p" "$d"
  for f in discard_granularity discard_max_bytes discard_zeroes_data rotational; do
    printf ' %s=%s' "$f" "$(head -c 32 "/sys/block/$d/queue/$f" 2>/dev/null)"
  done
  for f in alignment_offset discard_alignment; do
    printf ' %s=%s' "$f" "$(head -c 32 "$a/$f" 2>/dev/null)"
  done
  s=
  if [ "$a" != "/sys/block/$d" ]; then s=$(head -c 32 "$a/start" 2>/dev/null)
  elif [ "$p" = "$d" ]; then s=0; fi
  printf ' start=%s' "$s"
  echo
done | head -c {OUTPUT_LIMIT + 1}
"""


def parse_queues(
    out: bytes, asked: Sequence[tuple[str, str]]
) -> tuple[dict[tuple[str, str], GuestQueue], list[str]]:
    """The output of :data:`_QUEUE_SCRIPT` for the ``(disk, partition)`` pairs asked.

    A line for a pair not asked, a name that is no kernel device name, or a value that is
    not a decimal number is left out with a note: the guest wrote it, not sysfs.
    """
    notes: list[str] = []
    text = _text(out, notes, "the guest's sysfs queue")
    wanted = set(asked)
    found: dict[tuple[str, str], GuestQueue] = {}
    odd: set[str] = set()
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 4 or fields[0] != "vmtrim-queue":
            continue
        key, disk = (fields[1], fields[2]), fields[3]
        if key not in wanted or key in found or not _DEVICE.match(disk):
            continue
        values: dict[str, int | None] = {}
        for item in fields[4:]:
            name, _, value = item.partition("=")
            if value and not _NUMBER.match(value):
                odd.add(name[:40])
            values[name] = int(value) if _NUMBER.match(value) else None
        rotational = values.get("rotational")
        found[key] = GuestQueue(
            device=disk,
            discard_granularity=values.get("discard_granularity"),
            discard_max_bytes=values.get("discard_max_bytes"),
            discard_zeroes_data=values.get("discard_zeroes_data"),
            rotational=None if rotational not in (0, 1) else bool(rotational),
            alignment_offset=values.get("alignment_offset"),
            discard_alignment=values.get("discard_alignment"),
            partition_start=_sectors(values.get("start")),
            partition=key[1],
        )
    if odd:
        notes.append(
            "the guest's sysfs gave values that are not numbers for "
            + ", ".join(sorted(repr(n) for n in odd))
            + "; they are left out"
        )
    for disk, part in asked:
        if (disk, part) not in found:
            notes.append(
                f"the guest did not report the sysfs queue of {part if disk == '-' else disk}"
            )
    return found, notes


def _sectors(value: int | None) -> int | None:
    """sysfs ``start`` (512-byte sectors, whatever the logical block size) in bytes; None
    past what a disk can hold (2**64 bytes)."""
    return value * 512 if value is not None and value < 1 << 55 else None


def guest_device(entry: dict[str, Any], fs_name: str) -> tuple[str, str] | None:
    """The (disk, partition) to read for one guest-get-fsinfo disk entry of a filesystem.

    The disk is the entry's ``dev`` (/dev/sda, or the partition's /dev/vdc1: qemu-ga >= 3.1),
    else "-"; the guest finds the disk that holds a partition. The partition is the
    filesystem's ``name`` (sda1, or sda for a filesystem on the whole disk). None when
    neither is a kernel device name.
    """
    dev = entry.get("dev")
    disk = posixpath.basename(dev) if isinstance(dev, str) and dev.startswith("/dev/") else "-"
    if disk != "-" and not _DEVICE.match(disk):
        disk = "-"
    part = fs_name if _DEVICE.match(fs_name) else disk
    if part == "-" or not _DEVICE.match(part):
        return None
    return disk, part


def read_queues(
    agent: AgentLike, pairs: Sequence[tuple[str, str]], timeout: float
) -> tuple[dict[tuple[str, str], GuestQueue], list[str]]:
    """The sysfs queues of the (disk, partition) pairs :func:`guest_device` gave: one
    guest-exec for all of them."""
    args = [a for pair in pairs for a in pair]
    status = agent.run("/bin/sh", ["-c", _QUEUE_SCRIPT, "vmtrim", *args], timeout)
    return parse_queues(status.out_data, pairs)


def parse_devices(ret: object) -> tuple[tuple[str, str], ...]:
    """guest-get-devices (Windows, qemu-ga >= 5.2): (driver-name, driver-version) pairs."""
    out: list[tuple[str, str]] = []
    for device in ret if isinstance(ret, list) else []:
        if len(out) >= 512:
            break
        name = device.get("driver-name") if isinstance(device, dict) else None
        if isinstance(name, str):
            version = device.get("driver-version")
            out.append((name[:64], version[:64] if isinstance(version, str) else ""))
    return tuple(out)


def _string(value: object, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def guest_facts(agent: AgentLike, domain: Domain, live_xml: str, timeout: float) -> None:
    """Fill ``domain.guest`` and each disk's ``guest_filesystems`` from the guest agent."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        return deadline - time.monotonic()

    osinfo = agent.execute("guest-get-osinfo", None, left())
    osinfo = osinfo if isinstance(osinfo, dict) else {}
    release = _string(osinfo.get("kernel-release"))
    guest = GuestInfo(
        os_id=_string(osinfo.get("id"), 64) or ("linux" if release else None),
        kernel_release=release,
        os_name=_string(osinfo.get("pretty-name")),
    )
    domain.guest = guest
    filesystems = parse_fsinfo(agent.execute("guest-get-fsinfo", None, left()))
    options: dict[str, tuple[str, ...]] | None = None
    if guest.is_windows:
        try:  # the virtio-win driver versions (viostor, vioscsi)
            guest.drivers = parse_devices(agent.execute("guest-get-devices", None, left()))
        except AgentCommandFailed:  # qemu-ga before 5.2
            guest.drivers = None
    else:
        try:
            options = _mount_options(agent, left())
            timer = _fstrim_timer(agent, left())
            guest.fstrim_timer = timer.enabled
            guest.fstrim_command, guest.fstrim_scope = timer.command, timer.scope
            guest.fstrim_only = timer.only
            domain.notes.extend(timer.notes)
        except AgentCommandFailed as exc:  # guest-exec disabled or missing tools
            domain.notes.append(
                f"guest-exec is not available, so mount options and fstrim.timer are unknown: {exc}"
            )
    addresses = disk_addresses(live_xml)
    by_target: dict[str, list[GuestFilesystem]] = {}
    device_of: dict[str, tuple[str, str]] = {}  # target -> (guest disk, partition) to read
    for fs in filesystems:
        for entry in fs.disks:
            target = match_guest_disk(entry, addresses)
            if target is None:
                continue
            pair = guest_device(entry, fs.name)
            if pair is not None:
                device_of.setdefault(target, pair)
            mounted = by_target.setdefault(target, [])
            if any(m.mountpoint == fs.mountpoint for m in mounted):
                continue  # one filesystem on several entries of the same disk
            mounted.append(
                GuestFilesystem(
                    mountpoint=fs.mountpoint,
                    fstype=fs.type,
                    mount_options=options.get(fs.mountpoint) if options is not None else None,
                )
            )
    for disk in domain.disks:
        if disk.target is not None:
            disk.guest_filesystems = by_target.get(disk.target, [])
    if options is not None and device_of:
        pairs = list(dict.fromkeys(device_of.values()))
        try:  # last, and with a second to spare: a slow guest keeps the facts above
            queues, notes = read_queues(agent, pairs, left() - 1.0)
        except (AgentCommandFailed, AgentUnavailable) as exc:
            domain.notes.append(
                f"guest-exec failed, so the guest's sysfs queues are unknown: {exc}"
            )
            return
        domain.notes.extend(notes)
        for disk in domain.disks:
            if disk.target in device_of:
                disk.guest_queue = queues.get(device_of[disk.target])


_COMPARED = ("target", "discard", "detect_zeroes", "bus", "source", "format")


def pending_restart(live: Domain, inactive: Domain) -> list[str]:
    """What the persistent definition changes about the running domain's disks.

    A disk is the same disk by its target, or by its source when the definition renamed
    it (``fix --bus scsi`` turns vda into sda).
    """
    by_target = {d.target: d for d in inactive.disks if d.target}
    by_source = {d.source: d for d in inactive.disks if d.source}
    live_targets = {d.target for d in live.disks}
    notes = []
    for disk in live.disks:
        other = by_target.get(disk.target) if disk.target else None
        if other is None and disk.source:
            other = by_source.get(disk.source)
            if other is not None and other.target in live_targets:
                other = None  # that definition disk is another running disk
        if other is None:
            continue
        diffs = [
            f"{name} {getattr(disk, name) or '(unset)'} -> {getattr(other, name) or '(unset)'}"
            for name in _COMPARED
            if getattr(disk, name) != getattr(other, name)
        ]
        if diffs:
            notes.append(
                f"{disk.target}: fix pending a restart: the definition has "
                f"{', '.join(diffs)}; it takes effect after a full power cycle "
                "(shut down and start, not a reboot)"
            )
    return notes


def live_domain(conn: Connection, dom: Any, timeout: float = 10.0) -> Domain:
    """The model of one libvirt domain: live XML, connection versions, guest facts."""
    name = str(dom.name())
    xml = fetch_domain_xml(dom)
    domain = parse_domain_xml(xml, subject=name)
    domain.qemu_version, domain.libvirt_version = conn.version_numbers()
    libvirt = libvirt_module()
    try:
        active = bool(dom.isActive())
    except libvirt.libvirtError:
        active = False
    if not active:
        domain.guest = GuestInfo(
            agent=False, reason="the domain is not running: no guest agent to ask"
        )
        return domain
    domain.notes.extend(
        pending_restart(
            domain, parse_domain_xml(fetch_domain_xml(dom, inactive=True), subject=name)
        )
    )
    try:
        call_with_deadline(
            lambda: guest_facts(LibvirtAgent(dom), domain, xml, timeout), timeout, "guest agent"
        )
    except (AgentUnavailable, AgentCommandFailed) as exc:
        domain.guest = GuestInfo(agent=False, reason=f"no answer from the guest agent: {exc}")
        for disk in domain.disks:
            disk.guest_filesystems = None
    return domain


def audit_live(
    uri: str | None, specs: Sequence[str], every: bool, timeout: float
) -> tuple[list[Domain], dict[str, Any], bool]:
    """The domains to audit, the ``live`` JSON section, and whether their files are local."""
    with connection(uri) as conn:
        domains = [live_domain(conn, dom, timeout) for dom in select_domains(conn, specs, every)]
        hv, lib = conn.versions()
        extra = {
            "connection": {"uri": conn.uri, "qemu_version": hv, "libvirt_version": lib},
            "guests": [_guest_json(d) for d in domains],
        }
        return domains, extra, conn.local


def _guest_json(domain: Domain) -> dict[str, Any]:
    guest = domain.guest
    return {
        "domain": domain.name,
        "agent": bool(guest and guest.agent),
        "reason": guest.reason if guest else None,
        "os_id": guest.os_id if guest else None,
        "kernel_release": guest.kernel_release if guest else None,
        "fstrim_timer": guest.fstrim_timer if guest else None,
        "fstrim_command": guest.fstrim_command if guest else None,
        "fstrim_scope": guest.fstrim_scope if guest else None,
        "os_name": guest.os_name if guest else None,
        "drivers": [{"name": n, "version": v} for n, v in guest.drivers]
        if guest and guest.drivers is not None
        else None,
        "queues": [
            {"target": disk.target, **disk.guest_queue.to_json()}
            for disk in domain.disks
            if disk.guest_queue is not None
        ],
        "filesystems": [
            {
                "target": disk.target,
                "mountpoint": fs.mountpoint,
                "fstype": fs.fstype,
                "mount_options": list(fs.mount_options) if fs.mount_options is not None else None,
            }
            for disk in domain.disks
            for fs in disk.guest_filesystems or []
        ],
    }
