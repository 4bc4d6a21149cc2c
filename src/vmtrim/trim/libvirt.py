"""A running libvirt domain as a trim target: its agent through libvirt, its disks on the host."""

from __future__ import annotations

from typing import Any

from vmtrim.channels.libvirt import (
    Connection,
    LibvirtAgent,
    error_text,
    fetch_domain_xml,
    libvirt_module,
)
from vmtrim.image.allocation import allocated_bytes
from vmtrim.model import DeviceType, Disk, StorageKind
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.trim.engine import NOT_RUNNING, DiskRef


def measurable(disk: Disk) -> bool:
    """Writable disks with a host source: the ones whose allocation can change on trim."""
    return (
        disk.device in (DeviceType.DISK, DeviceType.LUN)
        and not disk.read_only
        and disk.storage is not StorageKind.NONE
        and disk.target is not None
    )


class LibvirtTarget:
    """A running libvirt domain, trimmed through its agent and measured on the host."""

    def __init__(self, conn: Connection, dom: Any) -> None:
        self.conn = conn
        self.dom = dom
        self.name = str(dom.name())

    def skip_reason(self) -> str | None:
        libvirt = libvirt_module()
        try:
            active = bool(self.dom.isActive())
        except libvirt.libvirtError as exc:
            return f"cannot query the domain: {error_text(exc)}"
        return None if active else NOT_RUNNING

    def disks(self) -> list[DiskRef]:
        domain = parse_domain_xml(fetch_domain_xml(self.dom), subject=self.name)
        refs = []
        for disk in domain.disks:
            if not measurable(disk):
                continue
            local = disk.source if self.conn.local and disk.storage is StorageKind.FILE else None
            refs.append(
                DiskRef(target=disk.target or disk.ident, source=disk.source, local_file=local)
            )
        return refs

    def measure(self, disk: DiskRef) -> tuple[int, str]:
        if disk.local_file:
            return allocated_bytes(disk.local_file), "du"
        # Block devices and remote hosts: libvirt knows the allocation, we cannot stat it.
        return int(self.dom.blockInfo(disk.target)[1]), "blockInfo"

    def agent(self, timeout: float) -> LibvirtAgent:
        return LibvirtAgent(self.dom)

    def unmap_counters(self) -> dict[str, tuple[int, int]] | None:
        # libvirt's block stats have no unmap counters; they come only over --qmp.
        return None
