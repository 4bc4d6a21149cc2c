"""Read libvirt domain XML (as ``virsh dumpxml`` prints it) into the :mod:`vmtrim.model`.

The block nodes are built the way libvirt >= 7 renders a disk for QEMU (see
DESIGN.md): a protocol node ``libvirt-N-storage`` that always says discard=unmap,
under a format node ``libvirt-N-format`` that carries the disk's configured
``discard`` and ``detect_zeroes``. So an XML disk and the command line libvirt
generates for it give the same model, and the same verdict.

Entity resolution and network access are off: domain XML can come from anywhere.
Unknown elements and device types are skipped, never fatal.
"""

from __future__ import annotations

import itertools

from lxml import etree

from vmtrim._util.domxml import BackingStoreElement, DiskElement, Sourced, controllers
from vmtrim._util.files import read_input
from vmtrim._util.safexml import xml_parser
from vmtrim.errors import BadInput
from vmtrim.model import (
    BlockNode,
    Bus,
    DeviceType,
    Disk,
    Domain,
    NodeOrigin,
    Origin,
    StorageKind,
    XmlDisk,
    XmlHostdev,
    as_bus,
    as_discard,
    as_format,
)

# target dev prefix -> bus, when <target bus=...> is missing (libvirt does the same guess).
_PREFIX_BUS: tuple[tuple[str, Bus], ...] = (
    ("xvd", "xen"),
    ("hd", "ide"),
    ("sd", "scsi"),
    ("vd", "virtio"),
    ("fd", "fdc"),
    ("ubd", "uml"),
    ("nvme", "nvme"),
)

# libvirt's default SCSI controller model for x86 QEMU builds with the LSI controller.
DEFAULT_SCSI_MODEL = "lsilogic"
_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"  # <qemu:override>, <qemu:commandline>


def parse_domain_file(path: str) -> Domain:
    """Read a domain XML file (``-`` for stdin) into a :class:`Domain`."""
    return parse_domain_xml(read_input(path), subject="<stdin>" if path == "-" else path)


def parse_domain_xml(data: bytes | str, subject: str = "<xml>") -> Domain:
    """Parse domain XML text. Raises :class:`BadInput` for malformed or non-domain XML."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        root = etree.fromstring(data, xml_parser())
    except etree.XMLSyntaxError as exc:
        raise BadInput(f"malformed XML: {exc}", subject=subject) from exc
    except ValueError as exc:  # e.g. an unsupported encoding declaration
        raise BadInput(f"malformed XML: {exc}", subject=subject) from exc
    if root is None:
        raise BadInput("empty XML document", subject=subject)
    if root.tag == "domstatus":  # libvirt's status file wraps the live domain
        inner = root.find("domain")
        if inner is not None:
            root = inner
    if root.tag != "domain":
        raise BadInput(
            f"not a libvirt domain: the root element is <{_tag(root)}>, not <domain>",
            subject=subject,
        )
    return _DomainReader(root).domain()


def _tag(element: etree._Element) -> str:
    tag = element.tag
    return tag if isinstance(tag, str) else "?"


def _text(element: etree._Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    return element.text.strip() or None


class _DomainReader:
    def __init__(self, root: etree._Element) -> None:
        self.root = root
        self.name = _text(root.find("name")) or "(unnamed)"
        self.controllers: dict[tuple[str, str], str | None] = {
            (ctl.type or "", ctl.index or "0"): ctl.model for ctl in controllers(root)
        }
        self.notes: list[str] = []

    def domain(self) -> Domain:
        os_type = self.root.find("os/type")
        domain = Domain(
            name=self.name,
            origin=Origin.LIBVIRT_XML,
            machine=os_type.get("machine") if os_type is not None else None,
            arch=os_type.get("arch") if os_type is not None else None,
            os_hint=_os_hint(self.root),
        )
        for index, element in enumerate(self.root.iterfind("devices/disk"), start=1):
            domain.disks.append(self.disk(element, index))
        for index, element in enumerate(self.root.iterfind("devices/hostdev"), start=1):
            disk = self.hostdev(element, index)
            if disk is not None:
                domain.disks.append(disk)
        domain.notes.extend(self.notes)
        return domain

    def disk(self, element: etree._Element, index: int) -> Disk:
        xml = DiskElement(element)
        device = _device_type(xml.device or "disk")
        dev = xml.target_dev
        bus = _bus(xml.target_bus, dev)
        if xml.target_bus and bus is None:
            self.notes.append(f"{dev or f'disk[{index}]'}: bus '{xml.target_bus}' is unknown")
        ident = dev or xml.alias_name or f"disk[{index}]"
        storage, protocol, source, storage_driver = _source(xml, device)
        fmt = as_format(xml.driver_type)
        if fmt == "unknown":
            self.notes.append(f"{ident}: driver type '{xml.driver_type}' is not a known format")
        discard = as_discard(xml.driver_discard)
        if xml.driver_discard and discard is None:
            self.notes.append(f"{ident}: discard='{xml.driver_discard}' is not unmap or ignore")
        read_only = xml.readonly or device is DeviceType.CDROM
        disk = Disk(
            domain=self.name,
            ident=ident,
            target=dev,
            device=device,
            bus=bus,
            storage=storage,
            protocol=protocol,
            source=source,
            format=None if storage is StorageKind.NONE else (fmt or "raw"),
            discard=discard,
            detect_zeroes=xml.driver_detect_zeroes,
            read_only=read_only,
            shareable=xml.shareable,
            locator=XmlDisk(index),
            # no <driver type=...>: libvirt uses raw; it never probes
            format_defaulted=storage is not StorageKind.NONE and xml.driver_type is None,
        )
        disk.controller_model, disk.qemu_device = self._device(disk, xml)
        # libvirt passes these to the QEMU device as its properties (formatdomain.rst).
        for tag, prop in (("target", "rotation_rate"), ("blockio", "discard_granularity")):
            child = element.find(tag)
            if child is not None and child.get(prop) is not None:
                disk.device_properties[prop] = child.get(prop)
        disk.device_properties.update(self._qemu_properties(xml.alias_name))
        if storage is not StorageKind.NONE:
            disk.node = self._nodes(disk, xml, storage_driver, index)
        return disk

    def _qemu_properties(self, alias: str | None) -> dict[str, str]:
        """Device properties set for ``alias`` by <qemu:override> (libvirt >= 8.2) or by
        <qemu:commandline> ``-set device.ALIAS.PROP=VALUE`` (docs/drvqemu.rst)."""
        if not alias:
            return {}
        ns = f"{{{_QEMU_NS}}}"
        out: dict[str, str] = {}
        for device in self.root.iterfind(f"{ns}override/{ns}device"):
            if device.get("alias") == alias:
                for prop in device.iterfind(f"{ns}frontend/{ns}property"):
                    name, value = prop.get("name"), prop.get("value")
                    if name and value is not None and prop.get("type") != "remove":
                        out[name] = value
        args = [a.get("value", "") for a in self.root.iterfind(f"{ns}commandline/{ns}arg")]
        for flag, setting in itertools.pairwise(args):
            if flag == "-set" and setting.startswith(f"device.{alias}."):
                name, _, value = setting[len(f"device.{alias}.") :].partition("=")
                out[name] = value
        return out

    def _device(self, disk: Disk, xml: DiskElement) -> tuple[str | None, str | None]:
        """The controller model and the QEMU device libvirt would use."""
        controller = xml.address_controller or "0"
        bus = disk.bus
        if bus == "scsi":
            model = self.controllers.get(("scsi", controller)) or DEFAULT_SCSI_MODEL
            if disk.device is DeviceType.LUN:
                return model, "scsi-block" if disk.storage is StorageKind.BLOCK else "scsi-generic"
            return model, "scsi-cd" if disk.device is DeviceType.CDROM else "scsi-hd"
        if bus == "sata":
            return "ahci", "ide-cd" if disk.device is DeviceType.CDROM else "ide-hd"
        if bus == "ide":
            return None, "ide-cd" if disk.device is DeviceType.CDROM else "ide-hd"
        simple = {
            "virtio": "virtio-blk-pci",
            "usb": "usb-storage",
            "fdc": "floppy",
            "nvme": "nvme-ns",
            "sd": "sd-card",
        }
        return None, simple.get(bus or "")

    def _nodes(
        self, disk: Disk, xml: DiskElement, storage_driver: str | None, index: int
    ) -> BlockNode:
        cache = xml.driver_cache
        no_unref = xml.driver_discard_no_unref
        storage = BlockNode(
            storage_driver,
            node_name=f"libvirt-{index}-storage",
            discard="unmap",
            cache=cache,
            read_only=disk.read_only,
            filename=disk.source,
            defined_by=NodeOrigin("<disk>", disk.ident, "<source>"),
        )
        top = BlockNode(
            disk.format,
            node_name=f"libvirt-{index}-format",
            discard=as_discard(disk.discard),
            detect_zeroes=disk.detect_zeroes,
            discard_no_unref=None if no_unref is None else no_unref == "on",
            cache=cache,
            read_only=disk.read_only,
            filename=disk.source,
            file=storage,
            defined_by=NodeOrigin("<disk>", disk.ident, "<driver>"),
        )
        top.backing = _backing(xml.backing_store, 0)
        return top

    def hostdev(self, element: etree._Element, index: int) -> Disk | None:
        """A SCSI hostdev is a passthrough LUN; other hostdevs are not disks."""
        kind = element.get("type", "?")
        if kind != "scsi":
            address = element.find("source/address")
            attrs: dict[str, str] = {}
            if address is not None:
                attrs = {str(k): str(v) for k, v in address.attrib.items()}
            where = " ".join(f"{k}={v}" for k, v in attrs.items())
            self.notes.append(
                f"hostdev {kind} {where}".strip()
                + ": passthrough device, not a QEMU disk; not audited"
            )
            return None
        source = element.find("source")
        protocol = source.get("protocol") if source is not None else None
        if protocol:
            name = source.get("name", "").lstrip("/") if source is not None else ""
            where = f"{protocol}://{_hosts(source)}/{name}"
        else:
            adapter = element.find("source/adapter")
            address = element.find("source/address")
            parts = [adapter.get("name", "?") if adapter is not None else "?"]
            if address is not None:
                parts.append(":".join(address.get(k, "?") for k in ("bus", "target", "unit")))
            where = ":".join(parts)
        alias = element.find("alias")
        return Disk(
            domain=self.name,
            ident=alias.get("name", f"hostdev[{index}]")
            if alias is not None
            else f"hostdev[{index}]",
            device=DeviceType.LUN,
            bus="scsi",
            controller_model=self.controllers.get(("scsi", "0")) or DEFAULT_SCSI_MODEL,
            qemu_device="scsi-generic",
            storage=StorageKind.NETWORK if protocol else StorageKind.BLOCK,
            protocol=protocol,
            source=where,
            read_only=element.find("readonly") is not None,
            shareable=element.find("shareable") is not None,
            locator=XmlHostdev(index),
        )


_LIBOSINFO = "{http://libosinfo.org/xmlns/libvirt/domain/1.0}"


def _os_hint(root: etree._Element) -> str | None:
    """The guest OS virt-install recorded (``<libosinfo:os id='http://microsoft.com/win/10'/>``)."""
    found = root.find(f"metadata/{_LIBOSINFO}libosinfo/{_LIBOSINFO}os")
    os_id = found.get("id", "") if found is not None else ""
    if "microsoft.com/win" in os_id:
        return "mswindows"
    return "linux" if os_id else None


def _device_type(value: str) -> DeviceType:
    try:
        return DeviceType(value)
    except ValueError:
        return DeviceType.DISK


def _bus(bus: str | None, dev: str | None) -> Bus | None:
    if not bus and dev:
        return next((b for prefix, b in _PREFIX_BUS if dev.startswith(prefix)), None)
    return as_bus(bus)


def _hosts(source: etree._Element | None) -> str:
    if source is None:
        return ""
    hosts = []
    for host in source.iterfind("host"):
        name = host.get("name") or host.get("socket") or ""
        port = host.get("port")
        hosts.append(f"{name}:{port}" if port else name)
    return ",".join(hosts)


def _source(
    xml: Sourced, device: DeviceType
) -> tuple[StorageKind, str | None, str | None, str | None]:
    """(storage kind, protocol, source text, QEMU protocol driver) for a <disk>'s <source>."""
    if xml.find("source") is None:
        return StorageKind.NONE, None, None, None
    disk_type = xml.type or "file"
    if disk_type == "file":
        path = xml.source_file
        return (StorageKind.FILE, None, path, "file") if path else _empty()
    if disk_type == "block":
        path = xml.source_dev
        driver = "host_cdrom" if device is DeviceType.CDROM else "host_device"
        return (StorageKind.BLOCK, None, path, driver) if path else _empty()
    if disk_type == "network":
        protocol = xml.source_protocol or "unknown"
        name = (xml.source_name or "").lstrip("/")
        where = f"{protocol}://{_hosts(xml.find('source'))}/{name}"
        return StorageKind.NETWORK, protocol, where, protocol
    if disk_type == "volume":
        pool, volume = xml.source_pool, xml.source_volume
        if not (pool or volume):
            return _empty()
        return StorageKind.VOLUME, None, f"{pool}/{volume}", None
    if disk_type == "dir":
        path = xml.source_dir
        return (StorageKind.DIR, "vvfat", path, "vvfat") if path else _empty()
    if disk_type == "nvme":
        pci = ""
        if xml.find("source/address") is not None:
            parts = (xml.source_pci_domain, xml.source_pci_bus, xml.source_pci_slot,
                     xml.source_pci_function)  # fmt: skip
            pci = "{}:{}:{}.{}".format(*(part or "0" for part in parts))
        return StorageKind.NVME, "nvme", f"nvme://{pci}/{xml.source_namespace or '1'}", "nvme"
    if disk_type == "vhostuser":
        return StorageKind.VHOSTUSER, "vhost-user-blk", xml.source_path, None
    return StorageKind.UNKNOWN, None, None, None


def _empty() -> tuple[StorageKind, str | None, str | None, str | None]:
    return StorageKind.NONE, None, None, None


def _backing(xml: BackingStoreElement | None, depth: int) -> BlockNode | None:
    """Follow <backingStore> elements into a chain of format nodes (depth-limited)."""
    if xml is None or depth > 64 or len(xml.element) == 0:
        return None
    storage, _protocol, source, driver = _source(xml, DeviceType.DISK)
    if storage is StorageKind.NONE:
        return None
    node = BlockNode(
        xml.format_type,
        filename=source,
        read_only=True,
        file=BlockNode(driver, filename=source, read_only=True),
        defined_by=NodeOrigin("<backingStore>", source),
    )
    inner = xml.element.find("backingStore")
    node.backing = _backing(None if inner is None else BackingStoreElement(inner), depth + 1)
    return node
