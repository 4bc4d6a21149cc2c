"""libvirt's ``<disk>`` (and ``<controller>``) elements, each fact declared once.

``DiskElement.driver_discard`` is ``Attr("driver", "discard")``: the attribute
``discard`` of the ``<driver>`` child. The same declaration reads it
(``disk.driver_discard``) and writes it (``disk.driver_discard = "unmap"``, or
:meth:`Element.update` for several at once), so the reader
(:mod:`vmtrim.sources.libvirt_xml`), the fixer (:mod:`vmtrim.fix.xml`), the guest-disk
matcher (:mod:`vmtrim.sources.libvirt_live`) and the lab's XML builder
(:mod:`vmtrim.vm.libvirt`) cannot disagree about where a fact lives.

Writes go through an :class:`Edit`: :class:`TreeEdit` changes the lxml tree (XML
vmtrim builds itself); the fixer passes its :class:`~vmtrim.fix.xmledit.XmlEditor`,
which keeps every byte it does not change. Values are the text of the XML; the
model's vocabularies (:mod:`vmtrim.model` ``Bus``, ``Discard``, ``Format``) narrow them.
"""

from __future__ import annotations

from typing import Protocol, Self, overload

from lxml import etree

PciAddress = tuple[int, int, int, int]  # domain, bus, slot, function
DriveAddress = tuple[int, int, int]  # bus, target, unit


class Edit(Protocol):
    """The edits an :class:`Element` makes; XmlEditor has the same methods."""

    def set_attribute(self, element: etree._Element, name: str, value: str) -> None: ...

    def remove_attribute(self, element: etree._Element, name: str) -> None: ...

    def insert_child(
        self,
        parent: etree._Element,
        new: etree._Element,
        *,
        after: etree._Element | None = None,
        before: etree._Element | None = None,
    ) -> None: ...


class TreeEdit:
    """Edits straight on the lxml tree (no original text to keep)."""

    def set_attribute(self, element: etree._Element, name: str, value: str) -> None:
        element.set(name, value)

    def remove_attribute(self, element: etree._Element, name: str) -> None:
        del element.attrib[name]

    def insert_child(
        self,
        parent: etree._Element,
        new: etree._Element,
        *,
        after: etree._Element | None = None,
        before: etree._Element | None = None,
    ) -> None:
        if after is not None:
            after.addnext(new)
        elif before is not None:
            before.addprevious(new)
        else:
            parent.append(new)


class Attr:
    """An attribute of the element itself (``child`` None) or of its first ``child``."""

    def __init__(self, child: str | None, name: str) -> None:
        self.child = child
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Attr: ...

    @overload
    def __get__(self, obj: Element, owner: type) -> str | None: ...

    def __get__(self, obj: Element | None, owner: type) -> Attr | str | None:
        if obj is None:
            return self
        element = obj.element if self.child is None else obj.element.find(self.child)
        return None if element is None else element.get(self.name)

    def __set__(self, obj: Element, value: str | None) -> None:
        obj.update((self, value))


class Flag:
    """An empty child whose presence is the fact (``<readonly/>``, ``<shareable/>``)."""

    def __init__(self, child: str) -> None:
        self.child = child

    def __get__(self, obj: Element, owner: type) -> bool:
        return obj.element.find(self.child) is not None


class Text:
    """A child's text (``<serial>``), stripped; None when absent or empty."""

    def __init__(self, child: str) -> None:
        self.child = child

    def __get__(self, obj: Element, owner: type) -> str | None:
        found = obj.element.find(self.child)
        if found is None or found.text is None:
            return None
        return found.text.strip() or None


class Element:
    """One element and how to edit it. ``ORDER``: libvirt's order of its children."""

    ORDER: tuple[str, ...] = ()
    TAG = ""

    def __init__(self, element: etree._Element, edit: Edit | None = None) -> None:
        self.element = element
        self.edit: Edit = edit or TreeEdit()

    @classmethod
    def new(cls, parent: etree._Element, **attributes: str) -> Self:
        """A new element at the end of ``parent`` (XML vmtrim builds itself)."""
        return cls(etree.SubElement(parent, cls.TAG, attributes))

    def get(self, attr: Attr) -> str | None:
        return attr.__get__(self, type(self))

    def update(self, *values: tuple[Attr, str | None]) -> None:
        """Set (None: remove) attributes; a missing child is created with all of its own."""
        by_child: dict[str | None, list[tuple[str, str | None]]] = {}
        for attr, value in values:
            by_child.setdefault(attr.child, []).append((attr.name, value))
        for child, items in by_child.items():
            element = self.element if child is None else self.element.find(child)
            if element is None:
                if child is None or "/" in child:
                    raise ValueError(f"cannot create <{child}>: give the parent's element")
                present = {name: value for name, value in items if value is not None}
                if present:
                    self.insert(etree.Element(child, present))
                continue
            for name, value in items:
                if value is None:
                    if name in element.attrib:
                        self.edit.remove_attribute(element, name)
                elif element.get(name) != value:
                    self.edit.set_attribute(element, name, value)

    def insert(self, new: etree._Element) -> None:
        """Insert a fresh child where libvirt puts it: after the children ``ORDER`` puts
        before it, else first."""
        rank = _rank(self.ORDER, str(new.tag))
        children = [c for c in self.element if isinstance(c.tag, str)]
        earlier = [c for c in children if _rank(self.ORDER, str(c.tag)) < rank]
        if earlier:
            self.edit.insert_child(self.element, new, after=earlier[-1])
        elif children:
            self.edit.insert_child(self.element, new, before=children[0])
        else:
            self.edit.insert_child(self.element, new)

    def find(self, child: str) -> etree._Element | None:
        return self.element.find(child)


def _rank(order: tuple[str, ...], tag: str) -> int:
    return order.index(tag) if tag in order else len(order)


def pci_address(element: etree._Element | None) -> PciAddress | None:
    """An ``<address type='pci'>`` as numbers; None for another type or bad numbers."""
    if element is None or element.get("type") != "pci":
        return None
    try:
        domain, bus, slot, function = (
            int(element.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function")
        )
    except ValueError:
        return None
    return domain, bus, slot, function


class Sourced(Element):
    """What ``<disk>`` and ``<backingStore>`` share: a type and a ``<source>``."""

    type = Attr(None, "type")
    source_file = Attr("source", "file")
    source_dev = Attr("source", "dev")
    source_dir = Attr("source", "dir")
    source_protocol = Attr("source", "protocol")
    source_name = Attr("source", "name")
    source_pool = Attr("source", "pool")
    source_volume = Attr("source", "volume")
    source_path = Attr("source", "path")
    source_namespace = Attr("source", "namespace")
    # an NVMe source's controller: <source><address domain= bus= slot= function=>
    source_pci_domain = Attr("source/address", "domain")
    source_pci_bus = Attr("source/address", "bus")
    source_pci_slot = Attr("source/address", "slot")
    source_pci_function = Attr("source/address", "function")


class BackingStoreElement(Sourced):
    TAG = "backingStore"
    ORDER = ("format", "source", "backingStore")
    format_type = Attr("format", "type")


class DiskElement(Sourced):
    """``<disk>``: the facts vmtrim reads and writes."""

    TAG = "disk"
    ORDER = (
        "driver", "source", "backingStore", "geometry", "blockio", "target", "iotune", "boot",
        "encryption",
        "readonly", "shareable", "transient", "serial", "wwn", "vendor", "product",
        "alias", "address",
    )  # fmt: skip
    # <driver> attributes libvirt accepts only on virtio disks (qemu_validate.c refuses
    # them on bus='scsi').
    VIRTIO_ONLY_DRIVER = (
        "queues", "queue_size", "iothread", "ioeventfd", "event_idx", "iommu", "ats",
        "packed", "page_per_vq",
    )  # fmt: skip

    device = Attr(None, "device")
    driver_name = Attr("driver", "name")
    driver_type = Attr("driver", "type")
    driver_discard = Attr("driver", "discard")
    driver_detect_zeroes = Attr("driver", "detect_zeroes")
    driver_discard_no_unref = Attr("driver", "discard_no_unref")
    driver_cache = Attr("driver", "cache")
    target_dev = Attr("target", "dev")
    target_bus = Attr("target", "bus")
    target_rotation_rate = Attr("target", "rotation_rate")
    blockio_discard_granularity = Attr("blockio", "discard_granularity")
    address_type = Attr("address", "type")
    address_controller = Attr("address", "controller")
    address_bus = Attr("address", "bus")
    address_target = Attr("address", "target")
    address_unit = Attr("address", "unit")
    alias_name = Attr("alias", "name")
    serial = Text("serial")
    readonly = Flag("readonly")
    shareable = Flag("shareable")

    @property
    def backing_store(self) -> BackingStoreElement | None:
        found = self.element.find("backingStore")
        return None if found is None else BackingStoreElement(found, self.edit)

    def pci(self) -> PciAddress | None:
        """The disk's own PCI address (virtio-blk)."""
        return pci_address(self.element.find("address"))

    def drive(self) -> DriveAddress | None:
        """(bus, target, unit) of an ``<address type='drive'>``; None for another type."""
        if self.address_type != "drive":
            return None
        try:
            return (
                int(self.address_bus or "0"),
                int(self.address_target or "0"),
                int(self.address_unit or "0"),
            )
        except ValueError:
            return None


class ControllerElement(Element):
    """``<controller>``: which model sits at a type and index, and where."""

    TAG = "controller"
    ORDER = ("driver", "alias", "address")
    type = Attr(None, "type")
    index = Attr(None, "index")
    model = Attr(None, "model")

    def pci(self) -> PciAddress | None:
        return pci_address(self.element.find("address"))


def disks(root: etree._Element, edit: Edit | None = None) -> list[DiskElement]:
    """Every ``<domain><devices><disk>``, in document order."""
    return [DiskElement(element, edit) for element in root.iterfind("devices/disk")]


def controllers(root: etree._Element) -> list[ControllerElement]:
    return [ControllerElement(element) for element in root.iterfind("devices/controller")]
