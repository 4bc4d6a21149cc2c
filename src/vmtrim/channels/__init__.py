"""How vmtrim talks to QEMU (QMP, guest agent) and to libvirt."""

from typing import TYPE_CHECKING

from vmtrim._util.lazy import lazy_exports

if TYPE_CHECKING:
    from vmtrim.channels.libvirt import (
        Connection,
        LibvirtAgent,
        connection,
        fetch_domain_xml,
        select_domains,
    )
    from vmtrim.channels.qmp import FstrimResult, GuestAgent, Monitor, SyncGuestAgent, SyncMonitor

__all__ = [
    "Connection",
    "FstrimResult",
    "GuestAgent",
    "LibvirtAgent",
    "Monitor",
    "SyncGuestAgent",
    "SyncMonitor",
    "connection",
    "fetch_domain_xml",
    "select_domains",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "FstrimResult": "vmtrim.channels.qmp",
        "GuestAgent": "vmtrim.channels.qmp",
        "Monitor": "vmtrim.channels.qmp",
        "SyncGuestAgent": "vmtrim.channels.qmp",
        "SyncMonitor": "vmtrim.channels.qmp",
        "Connection": "vmtrim.channels.libvirt",
        "LibvirtAgent": "vmtrim.channels.libvirt",
        "connection": "vmtrim.channels.libvirt",
        "fetch_domain_xml": "vmtrim.channels.libvirt",
        "select_domains": "vmtrim.channels.libvirt",
    },
)
