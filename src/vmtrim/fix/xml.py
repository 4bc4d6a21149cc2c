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
  alias stay;
- ``discard_granularity`` and ``ssd`` set the QEMU device's ``discard_granularity`` and
  ``rotation_rate`` the way the libvirt release takes them: ``<blockio
  discard_granularity>`` (libvirt >= 10.0) and ``<target rotation_rate>`` (>= 7.3);
  older, ``<qemu:override>`` (>= 8.2) or ``<qemu:commandline>`` ``-set device.ALIAS.PROP``,
  both by the disk's user alias (``ua-``, added when the disk has none).

Then the new XML is parsed and audited again, which is the proof the fix worked
and the source of what still does not pass (guest, host storage).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise

from lxml import etree

from vmtrim._util.domxml import Attr, DiskElement, disks
from vmtrim._util.versions import Version, format_version
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.granularity import parse_size
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.errors import BadInput
from vmtrim.facts import FACTS
from vmtrim.fix.policy import (
    BusMove,
    Change,
    FixOptions,
    FixResult,
    Remaining,
    Skip,
    bus_move_warnings,
    device_wants,
    disk_name,
    leave_alone,
    move_to_scsi,
    remaining_after,
)
from vmtrim.fix.xmledit import XmlEditor
from vmtrim.model import Disk, DiskReport, Domain, Locator, StorageKind, XmlDisk
from vmtrim.sources.libvirt_xml import parse_domain_xml

VIRTIO_SCSI = "virtio-scsi"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"  # docs/drvqemu.rst
_ELEMENTS = {  # the libvirt element for a device property, where there is one
    "discard_granularity": "<blockio discard_granularity>",
    "rotation_rate": "<target rotation_rate>",
}
_USER_ALIAS = re.compile(r"ua-[A-Za-z0-9_-]+")  # libvirt's user aliases

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
    version = domain.libvirt_version or options.libvirt_version
    if options.device_settings and version is None:
        raise BadInput(
            "--discard-granularity and --ssd write libvirt XML by the libvirt release it is"
            " for: give --libvirt-version X.Y",
            subject=subject,
        )
    reports = audit_domain(domain, probes, read_images=read_images)
    fixer = _XmlFixer(
        editor, root, options, version=version, probes=probes, read_images=read_images
    )
    result = FixResult(subject=subject, original=xml_text, new_text=xml_text)
    for report in reports:
        fixer.fix_disk(report, result)
    fixer.qemu_namespace()
    result.new_text = editor.text()
    result.edits = editor.edits()
    editor.check()
    result.changes = fixer.changes
    result.warnings = [*bus_move_warnings(fixer.moves), *fixer.notes]
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
    version: Version | None = None  # the libvirt release the XML is for
    probes: HostProbes | None = None
    read_images: bool = True
    notes: list[str] = field(default_factory=list)  # how device settings were written, or not
    # alias -> [(disk, property, value)] for <qemu:override> or <qemu:commandline> -set
    _properties: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    _routes: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # -> disk names

    def __post_init__(self) -> None:
        self.devices = self.root.find("devices")
        self.disks = disks(self.root, self.editor)
        self.targets = {dev for dev in (d.target_dev for d in self.disks) if dev}
        self.aliases = {a.get("name") for a in self.root.iter("alias")} - {None}

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
        if self.options.device_settings:
            self._device(report, xml, name, moved=bool(move))
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

    # -- the QEMU device: discard_granularity and rotation_rate -----------------------

    def _device(self, report: DiskReport, xml: DiskElement, name: str, *, moved: bool) -> None:
        blockio = xml.find("blockio")
        logical = None if blockio is None else parse_size(blockio.get("logical_block_size"))
        wants = device_wants(
            report, name, self.options, moved=moved, probes=self.probes,
            read_images=self.read_images, logical_block=logical,
        )  # fmt: skip
        self.notes += wants.notes
        assert self.version is not None  # fix_domain_xml refused the options without it
        if wants.discard_granularity is not None:
            value = wants.discard_granularity
            if self._at_least("libvirt_blockio_granularity"):
                self._disk_attr(xml, name, DiskElement.blockio_discard_granularity, value)
                self._stale_override(xml, name, "discard_granularity", value)
            else:
                self._by_alias(
                    xml, name, "discard_granularity", value, "libvirt_blockio_granularity"
                )
        if wants.rotation_rate is not None:
            if self._at_least("libvirt_rotation_rate"):
                self._disk_attr(xml, name, DiskElement.target_rotation_rate, wants.rotation_rate)
            else:
                self._by_alias(
                    xml, name, "rotation_rate", wants.rotation_rate, "libvirt_rotation_rate"
                )

    def _disk_attr(self, xml: DiskElement, name: str, attr: Attr, value: int) -> None:
        old = xml.get(attr)
        if old != str(value):
            xml.update((attr, str(value)))
            self.changes.append(Change(name, f"{attr.child} {attr.name}", old, str(value)))

    def _stale_override(self, xml: DiskElement, name: str, prop: str, value: int) -> None:
        """An older fix's <qemu:override> of the same property wins over <blockio>: it gets
        the new value too (libvirt applies overrides to the -device it formats)."""
        self._stale_set(xml, name, prop)
        alias = xml.alias_name
        path = f"{{{QEMU_NS}}}override/{{{QEMU_NS}}}device"
        device = _by_attr(self.root, path, "alias", alias) if alias else None
        if device is None or not self._at_least("libvirt_qemu_override"):
            return
        props = device.iterfind(f"{{{QEMU_NS}}}frontend/{{{QEMU_NS}}}property")
        old = next((p for p in props if p.get("name") == prop), None)
        if old is not None and old.get("value") != str(value):
            assert alias is not None
            self._properties.setdefault(alias, []).append((name, prop, value))
            self.notes.append(
                f"{name}: its <qemu:override> {prop} {old.get('value')} would win over"
                f" {_ELEMENTS[prop]}: it is set to {value} too"
            )

    def _stale_set(self, xml: DiskElement, name: str, prop: str) -> None:
        """An older -set of the property in <qemu:commandline>: said, left to the user."""
        key = f"device.{xml.alias_name}.{prop}="
        for arg in self.root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
            if xml.alias_name and (arg.get("value") or "").startswith(key):
                self.notes.append(
                    f"{name}: <qemu:commandline> still has -set {arg.get('value')}: QEMU refuses"
                    " to start on it once libvirt writes -device as JSON (QEMU 7.0 and later),"
                    " and before that it overrides what this fix set; remove it"
                )

    def _by_alias(self, xml: DiskElement, name: str, prop: str, value: int, fact: str) -> None:
        """A device property that this libvirt has no element for: by the disk's alias."""
        alias = self._user_alias(xml, name)
        if self._at_least("libvirt_qemu_override"):
            self._stale_set(xml, name, prop)
        self._properties.setdefault(alias, []).append((name, prop, value))
        self._routes.setdefault((prop, fact), []).append(name)

    def _route_notes(self) -> list[str]:
        """Which mechanism carried each property, and what it costs: said once per route."""
        assert self.version is not None
        have = format_version(self.version)
        override = self._at_least("libvirt_qemu_override")
        notes = []
        for (prop, fact), names in self._routes.items():
            element = _ELEMENTS[prop]
            need = format_version(_need(fact))
            if override:
                notes.append(
                    f"{', '.join(names)}: {prop} through <qemu:override> (libvirt {have};"
                    f" {element} needs {need}): libvirt does not support overrides and marks"
                    " the domain tainted"
                )
            else:
                notes.append(
                    f"{', '.join(names)}: {prop} through <qemu:commandline> -set"
                    f" device.ALIAS.{prop} (libvirt {have}; {element} needs {need},"
                    " <qemu:override> 8.2.0): -set works only while libvirt writes -device as"
                    " key=value (QEMU before 7.0); on a JSON -device QEMU refuses to start"
                    " ('there is no device ALIAS defined')"
                )
        return notes

    def _at_least(self, fact: str) -> bool:
        assert self.version is not None
        have = (*self.version, 0, 0, 0)[:3]
        return have >= _need(fact)

    def _user_alias(self, xml: DiskElement, name: str) -> str:
        current = xml.alias_name
        if current and _USER_ALIAS.fullmatch(current):
            return current
        stem = "ua-vmtrim-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)
        alias, n = stem, 0
        while alias in self.aliases:
            n += 1
            alias = f"{stem}-{n}"
        self.aliases.add(alias)
        xml.update((DiskElement.alias_name, alias))
        self.changes.append(Change(name, "alias", current, alias))
        return alias

    def qemu_namespace(self) -> None:
        """Write the collected alias properties: <qemu:override> or <qemu:commandline>."""
        if not self._properties:
            return
        assert self.version is not None
        prefix = next((p for p, uri in self.root.nsmap.items() if uri == QEMU_NS and p), "qemu")
        if self._at_least("libvirt_qemu_override"):
            self._override(prefix)
        else:
            self._commandline(prefix)
        self.editor.declare_namespace(prefix, QEMU_NS)
        self.notes += self._route_notes()

    def _q(self, local: str) -> str:
        return f"{{{QEMU_NS}}}{local}"

    def _override(self, prefix: str) -> None:
        override = self.root.find(self._q("override"))
        new_devices: list[etree._Element] = []
        for alias, props in self._properties.items():
            device = None
            if override is not None:
                device = _by_attr(override, self._q("device"), "alias", alias)
            frontend = None if device is None else device.find(self._q("frontend"))
            existing: dict[str | None, etree._Element] = {}
            if frontend is not None:
                existing = {p.get("name"): p for p in frontend.iterfind(self._q("property"))}
            fresh: list[etree._Element] = []
            for disk, prop, value in props:
                setting, text = f"qemu:override {prop}", str(value)
                element = existing.get(prop)
                if element is None:
                    attrs = {"name": prop, "type": "unsigned", "value": text}
                    fresh.append(self._tree("property", prefix, [], **attrs))
                    self.changes.append(Change(disk, setting, None, text))
                elif element.get("value") != text or element.get("type") != "unsigned":
                    old = element.get("value")
                    self.editor.set_attribute(element, "type", "unsigned")
                    self.editor.set_attribute(element, "value", text)
                    self.changes.append(Change(disk, setting, old, text))
            if not fresh:
                continue
            if frontend is not None:
                self._insert(frontend, fresh)
            elif device is not None:
                self._insert(device, [self._tree("frontend", prefix, fresh)])
            else:
                frontend = self._tree("frontend", prefix, fresh)
                new_devices.append(self._tree("device", prefix, [frontend], alias=alias))
        if new_devices and override is not None:
            self._insert(override, new_devices)
        elif new_devices:
            self._insert(self.root, [self._tree("override", prefix, new_devices)])

    def _commandline(self, prefix: str) -> None:
        commandline = self.root.find(self._q("commandline"))
        args = [] if commandline is None else list(commandline.iterfind(self._q("arg")))
        sets = {
            str(arg.get("value")): arg
            for before, arg in pairwise(args)
            if before.get("value") == "-set"
        }
        fresh: list[etree._Element] = []
        for alias, props in self._properties.items():
            for disk, prop, value in props:
                key = f"device.{alias}.{prop}="
                text = f"{key}{value}"
                found = [arg for word, arg in sets.items() if word.startswith(key)]
                if found and found[-1].get("value") == text:
                    continue
                if found:
                    old = found[-1].get("value")
                    self.editor.set_attribute(found[-1], "value", text)
                    self.changes.append(Change(disk, "qemu:commandline -set", old, text))
                    continue
                fresh.append(self._tree("arg", prefix, [], value="-set"))
                fresh.append(self._tree("arg", prefix, [], value=text))
                self.changes.append(Change(disk, "qemu:commandline -set", None, text))
        if fresh and commandline is not None:
            self._insert(commandline, fresh)
        elif fresh:
            self._insert(self.root, [self._tree("commandline", prefix, fresh)])

    def _tree(
        self, local: str, prefix: str, children: list[etree._Element], **attributes: str
    ) -> etree._Element:
        element = etree.Element(self._q(local), attributes, nsmap={prefix: QEMU_NS})
        element.extend(children)
        return element

    def _insert(self, parent: etree._Element, news: list[etree._Element]) -> None:
        """Insert fresh subtrees at the end of ``parent``, laid out like the document."""
        outer = self.editor.indent_of(self.root) or ""
        inner = self.editor.child_indent(self.root)
        step = inner[len(outer) :] if inner.startswith(outer) and inner != outer else "  "
        indent = self.editor.child_indent(parent)
        for new in news:
            _layout(new, indent, step)
        self.editor.insert_children(parent, news)

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


def _need(fact: str) -> Version:
    version = FACTS[fact].libvirt
    assert version is not None and len(version) == 3
    return version


def _by_attr(parent: etree._Element, tag: str, name: str, value: str) -> etree._Element | None:
    return next((c for c in parent.iterfind(tag) if c.get(name) == value), None)


def _layout(element: etree._Element, indent: str, step: str) -> None:
    """Put a fresh element's children on their own lines, one ``step`` deeper."""
    children = list(element)
    if not children:
        return
    element.text = "\n" + indent + step
    for child in children:
        _layout(child, indent + step, step)
        child.tail = "\n" + indent + step
    children[-1].tail = "\n" + indent


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
