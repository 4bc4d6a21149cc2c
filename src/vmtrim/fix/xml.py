"""``vmtrim fix`` for libvirt domain XML.

:func:`fix_domain_xml` reads the XML with :mod:`vmtrim.sources.libvirt_xml`, asks
:mod:`vmtrim.audit.engine` which disks block discard at the configuration layers, and
edits only those, through :class:`~vmtrim.fix.xmledit.XmlEditor` so that every
byte it does not change stays as it was:

- ``<driver discard='unmap'/>`` (the ``<driver>`` is created, or given
  ``name='qemu'`` and ``type``, when missing), and ``detect_zeroes`` on request;
- with ``bus='scsi'``: disks whose device cannot pass discard (or every disk, with
  ``all_disks``) move to a virtio-scsi controller: the controller is added with a
  free index if there is none, the target is renamed ``sdX`` and the disk gets a
  ``<address type='drive'>`` with a free unit; the old PCI/CCW address and the
  driver attributes only virtio-blk accepts are dropped; boot order, serial, wwn and
  alias stay.

Then the new XML is parsed and audited again, which is the proof the fix worked
and the source of what still does not pass (guest, host storage).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from lxml import etree

from vmtrim._util.domxml import DiskElement, disks
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.fix.policy import (
    BusMove,
    Change,
    FixOptions,
    FixResult,
    Remaining,
    Skip,
    bus_move_warnings,
    disk_name,
    leave_alone,
    move_to_scsi,
    remaining_after,
)
from vmtrim.fix.xmledit import XmlEditor
from vmtrim.model import Disk, DiskReport, Domain, Locator, StorageKind, XmlDisk
from vmtrim.sources.libvirt_xml import parse_domain_xml

VIRTIO_SCSI = "virtio-scsi"

# libvirt gives a scsi disk without <address> controller = i // N, unit = i % N from
# its target name's index i; N is 7 (narrow bus) or 16 (wide), by controller model.
_IMPLICIT_UNITS_PER_CONTROLLER = (7, 16)


def fix_domain_xml(
    xml_text: str,
    options: FixOptions | None = None,
    *,
    subject: str = "<xml>",
    probes: HostProbes | None = None,
    read_images: bool = True,
    live: Domain | None = None,
) -> FixResult:
    """Fix one libvirt domain XML document. Raises only :class:`BadInput` on bad input.

    ``live`` is the running domain's model (:func:`vmtrim.sources.libvirt_live.live_domain`):
    its versions and guest-agent facts go into both audits, before and after the fix.
    """
    options = options or FixOptions()
    options.check(subject, command_line=False)
    probes = probes or HostProbes()
    domain = _with_live(parse_domain_xml(xml_text, subject), live)
    editor = XmlEditor(xml_text, subject)
    root = editor.root
    if root.tag == "domstatus":  # libvirt's status file: the domain is inside
        inner = root.find("domain")
        assert inner is not None  # parse_domain_xml accepted it
        root = inner
    reports = audit_domain(domain, probes, read_images=read_images)
    fixer = _XmlFixer(editor, root, options)
    result = FixResult(subject=subject, original=xml_text, new_text=xml_text)
    for report in reports:
        fixer.fix_disk(report, result)
    result.new_text = editor.text()
    result.edits = editor.edits()
    editor.check()
    result.changes = fixer.changes
    result.warnings = bus_move_warnings(fixer.moves)
    result.moves = fixer.moves
    result.remaining = _audit_again(result, fixer, subject, probes, read_images, live)
    return result


def _with_live(domain: Domain, live: Domain | None) -> Domain:
    """The definition's model with the running domain's versions and guest facts.

    A disk's guest filesystems follow its source: ``--bus scsi`` renames the target.
    """
    if live is None:
        return domain
    domain.qemu_version, domain.libvirt_version = live.qemu_version, live.libvirt_version
    domain.guest = live.guest
    by_source = {d.source: d.guest_filesystems for d in live.disks if d.source}
    by_target = {d.target: d.guest_filesystems for d in live.disks if d.target}
    for disk in domain.disks:
        if disk.source in by_source:
            disk.guest_filesystems = by_source[disk.source]
        elif disk.target in by_target:
            disk.guest_filesystems = by_target[disk.target]
    return domain


def _audit_again(
    result: FixResult,
    fixer: _XmlFixer,
    subject: str,
    probes: HostProbes,
    read_images: bool,
    live: Domain | None,
) -> list[Remaining]:
    if not result.changed:
        reports = fixer.reports
    else:
        fixed = _with_live(parse_domain_xml(result.new_text, subject), live)
        reports = audit_domain(fixed, probes, read_images)
    return remaining_after(
        (report, disk_name(report.disk))
        for report in reports
        if report.disk.locator in fixer.touched
    )


@dataclass
class _XmlFixer:
    editor: XmlEditor
    root: etree._Element
    options: FixOptions
    changes: list[Change] = field(default_factory=list)
    reports: list[DiskReport] = field(default_factory=list)
    touched: set[Locator] = field(default_factory=set)  # locators of fixed or already-fine disks
    moves: list[BusMove] = field(default_factory=list)
    _controller: str | None = None
    _slot_map: dict[etree._Element, list[tuple[int, int]]] | None = None
    _units: dict[int, Counter[int]] = field(default_factory=dict)  # controller -> unit uses
    _cursor: dict[int, int] = field(default_factory=dict)  # units below it are all taken
    _target_cursor: int = 0

    def __post_init__(self) -> None:
        self.devices = self.root.find("devices")
        self.disks = disks(self.root, self.editor)
        self.targets = {dev for dev in (d.target_dev for d in self.disks) if dev}

    # -- one disk ------------------------------------------------------------------

    def fix_disk(self, report: DiskReport, result: FixResult) -> None:
        self.reports.append(report)
        disk = report.disk
        name = disk_name(disk)
        xml = self._element(disk)
        if xml is None:
            result.skipped.append(Skip(name, "hostdev: a passthrough device, not a QEMU disk"))
            return
        skip = leave_alone(disk)
        if skip is not None:
            result.skipped.append(skip)
            return
        move = move_to_scsi(report, self.options, name)
        if isinstance(move, Skip):
            result.skipped.append(move)
            return
        if not xml.target_dev:
            # libvirt refuses such a disk, and without a bus there is no device to judge.
            result.skipped.append(Skip(name, "no <target dev=...>: libvirt needs one", True))
            return
        before = len(self.changes)
        self._driver(xml, disk, name)
        if move:
            name = self._move_to_scsi(xml, name)
        assert disk.locator is not None
        self.touched.add(disk.locator)
        (result.fixed if len(self.changes) > before else result.already).append(name)

    def _element(self, disk: Disk) -> DiskElement | None:
        if not isinstance(disk.locator, XmlDisk):
            return None
        return self.disks[disk.locator.index - 1]

    def _driver(self, xml: DiskElement, disk: Disk, name: str) -> None:
        wanted = [(DiskElement.driver_discard, "unmap")]
        if self.options.detect_zeroes:
            wanted.append((DiskElement.driver_detect_zeroes, self.options.detect_zeroes))
        # libvirt reads a disk without type as raw (image probing is off); say so.
        fmt = None if disk.storage is StorageKind.VOLUME else (disk.format or "raw")
        driver = xml.find("driver")
        if driver is None:
            created = [(DiskElement.driver_name, "qemu")]
            if fmt:
                created.append((DiskElement.driver_type, fmt))
            xml.update(*created, *wanted)
            text = " ".join(f"{attr.name}='{value}'" for attr, value in [*created, *wanted])
            self.changes.append(Change(name, "driver", None, f"<driver {text}/>"))
            for attr, value in wanted:
                self.changes.append(Change(name, attr.name, None, value))
            return
        missing = [(DiskElement.driver_name, "qemu")] if xml.driver_name is None else []
        if fmt and xml.driver_type is None:
            missing.append((DiskElement.driver_type, fmt))
        if missing:
            # libvirt's order puts name and type first
            self.editor.prepend_attributes(driver, [(a.name, v) for a, v in missing])
            for attr, value in missing:
                self.changes.append(Change(name, f"driver {attr.name}", None, value))
        for attr, value in wanted:
            old = xml.get(attr)
            if old != value:
                self.changes.append(Change(name, attr.name, old, value))
                xml.update((attr, value))

    # -- moving a disk to virtio-scsi --------------------------------------------------

    def _move_to_scsi(self, xml: DiskElement, name: str) -> str:
        controller = self._virtio_scsi_controller()
        old_dev = xml.target_dev or ""
        new_dev = old_dev if old_dev.startswith("sd") else self._free_target()
        if new_dev != old_dev:
            self.targets.discard(old_dev)
            self.targets.add(new_dev)
            xml.target_dev = new_dev
            self.changes.append(Change(name, "target", old_dev, new_dev))
        unit = self._free_unit(controller, exclude=xml.element)
        old_bus = xml.target_bus
        xml.target_bus = "scsi"
        self.changes.append(Change(new_dev, "bus", old_bus, "scsi"))
        self.moves.append(BusMove(old_dev, new_dev, old_bus))
        drive = (
            (DiskElement.address_type, "drive"),
            (DiskElement.address_controller, controller),
            (DiskElement.address_bus, "0"),
            (DiskElement.address_target, "0"),
            (DiskElement.address_unit, str(unit)),
        )
        address = xml.find("address")
        if address is not None and xml.address_type == "drive":
            old = _describe(address)
            xml.update(*drive)
            self.changes.append(Change(new_dev, "address", old, _describe(address)))
        else:
            if address is not None:
                self.changes.append(Change(new_dev, "address", _describe(address), None))
                self.editor.remove(address)
            xml.update(*drive)  # a new <address>, where libvirt puts it
            new = xml.find("address")
            assert new is not None
            self.changes.append(Change(new_dev, "address", None, _describe(new)))
        driver = xml.find("driver")
        if driver is not None:
            for key in DiskElement.VIRTIO_ONLY_DRIVER:
                if key in driver.attrib:
                    self.changes.append(Change(new_dev, f"driver {key}", driver.get(key), None))
                    self.editor.remove_attribute(driver, key)
        return new_dev

    def _virtio_scsi_controller(self) -> str:
        if self._controller is not None:
            return self._controller
        scsi = list(self.root.iterfind("devices/controller[@type='scsi']"))
        for controller in scsi:
            if controller.get("model") == VIRTIO_SCSI:
                self._controller = controller.get("index", "0")
                return self._controller
        used = {c.get("index", "0") for c in scsi}
        used |= {str(controller) for controller, _ in self._scsi_slots()}
        index = next(str(i) for i in range(len(used) + 1) if str(i) not in used)
        new = etree.Element("controller", type="scsi", index=index, model=VIRTIO_SCSI)
        assert self.devices is not None  # a disk to move was found under <devices>
        anchors = self.devices.findall("controller") or self.devices.findall("disk")
        self.editor.insert_child(self.devices, new, after=anchors[-1])
        self.changes.append(Change(None, "controller", None, f"scsi index={index} virtio-scsi"))
        self._controller = index
        return index

    def _scsi_slots(self) -> Iterator[tuple[int, int]]:
        """(controller, unit) of every SCSI disk and hostdev at bus 0 target 0, implicit too."""
        for slots in self._slots().values():
            yield from slots

    def _slots(self) -> dict[etree._Element, list[tuple[int, int]]]:
        """Each SCSI disk's and hostdev's slots, read once and kept up to date by moves."""
        if self._slot_map is not None:
            return self._slot_map
        self._slot_map = {}
        for xml in self.disks:
            if xml.target_bus == "scsi":
                self._slot_map[xml.element] = list(_disk_slots(xml))
        for element in self.root.iterfind("devices/hostdev[@type='scsi']"):
            address = element.find("address")
            if (
                address is not None
                and address.get("type") == "drive"
                and address.get("bus", "0") == "0"
                and address.get("target", "0") == "0"
            ):
                slot = (_int(address.get("controller")), _int(address.get("unit")))
                self._slot_map[element] = [slot]
        for slots in self._slot_map.values():
            for controller, unit in slots:
                self._units.setdefault(controller, Counter())[unit] += 1
        return self._slot_map

    def _free_unit(self, controller: str, exclude: etree._Element) -> int:
        """The lowest unit on ``controller`` that no other disk uses.

        Counted, with a cursor below which every unit is taken: a scan of every disk per
        moved disk made ``--all-disks`` on 2,000 disks take half a minute.
        """
        slots = self._slots()
        ctl = _int(controller)
        used = self._units.setdefault(ctl, Counter())
        cursor = self._cursor.get(ctl, 0)
        while used[cursor] > 0:
            cursor += 1
        self._cursor[ctl] = cursor
        # Below the cursor only a unit the disk itself holds alone can be free for it.
        mine = Counter(u for c, u in slots.get(exclude, []) if c == ctl)
        own = [u for u, times in mine.items() if used[u] == times and u < cursor]
        unit = min([*own, cursor])
        for old_ctl, old_unit in slots.get(exclude, []):
            count = self._units[old_ctl]
            count[old_unit] -= 1
            if count[old_unit] == 0 and old_unit < self._cursor.get(old_ctl, 0):
                self._cursor[old_ctl] = old_unit
        slots[exclude] = [(ctl, unit)]
        used[unit] += 1
        return unit

    def _free_target(self) -> str:
        # Names only ever get taken (a renamed disk gave up a vdX/hdX name), so the search
        # goes on from where it stopped.
        while (name := "sd" + index_to_letters(self._target_cursor)) in self.targets:
            self._target_cursor += 1
        return name


def _disk_slots(xml: DiskElement) -> Iterator[tuple[int, int]]:
    if xml.address_type == "drive":
        if (xml.address_bus or "0") == "0" and (xml.address_target or "0") == "0":
            yield _int(xml.address_controller), _int(xml.address_unit)
    elif xml.find("address") is None:
        index = disk_index(xml.target_dev or "")
        if index is not None:
            for per in _IMPLICIT_UNITS_PER_CONTROLLER:
                yield index // per, index % per


def _describe(address: etree._Element) -> str:
    return " ".join(f"{key!s}={value!s}" for key, value in address.attrib.items())


def _int(value: str | None) -> int:
    try:
        return int(value or "0", 0)
    except ValueError:
        return -1


def index_to_letters(index: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa' (libvirt's disk name suffixes)."""
    letters = ""
    index += 1
    while index > 0:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def disk_index(dev: str) -> int | None:
    """'sda' -> 0, 'sdaa' -> 26; None when the name has no letter suffix."""
    match = re.fullmatch(r"(?:sd|vd|hd|xvd|ubd|fd)([a-z]+)", dev)
    if match is None:
        return None
    index = 0
    for char in match.group(1):
        index = index * 26 + (ord(char) - ord("a") + 1)
    return index - 1
