"""A running libvirt domain as a trim target: its agent through libvirt, its disks on the host.

Each target opens a libvirt connection of its own for its run. A hung agent call
stays inside libvirt until libvirt's own agent timeout, and an abandoned call on a
shared connection would hold one of the connection's requests (libvirtd serves at
most ``max_client_requests``, 5 by default, at once per connection): with several
hung guests the others would queue behind them.
"""

from __future__ import annotations

import threading
from typing import Any

from vmtrim.channels.libvirt import (
    Connection,
    LibvirtAgent,
    error_text,
    fetch_domain_xml,
    libvirt_module,
    open_connection,
)
from vmtrim.errors import EnvironmentProblem
from vmtrim.image.allocation import allocated_bytes
from vmtrim.model import DeviceType, Disk, StorageKind
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.storage.pool import PoolUsage
from vmtrim.trim.engine import NOT_RUNNING, Blocker, DiskRef, blocking_layers
from vmtrim.trim.explain import Evidence


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
        self.conn = conn  # the caller's: used to select domains, never for the run itself
        self.name = str(dom.name())
        self.uuid = str(dom.UUIDString())
        self._shared_dom = dom
        self._own: Connection | None = None
        self._dom: Any = None
        self._lock = threading.Lock()

    @property
    def dom(self) -> Any:
        """The domain on this target's own connection (opened on first use)."""
        with self._lock:
            if self._dom is None and self.conn.uri.startswith("test:"):
                # Each test-driver connection is a world of its own: stay on the caller's.
                self._dom = self._shared_dom
            if self._dom is None:
                libvirt = libvirt_module()
                self._own = open_connection(self.conn.uri)
                try:
                    self._dom = self._own.conn.lookupByUUIDString(self.uuid)
                except libvirt.libvirtError as exc:
                    raise EnvironmentProblem(error_text(exc), subject=self.name) from exc
            return self._dom

    def close(self) -> None:
        with self._lock:
            if self._own is not None:
                self._own.close()
            self._own, self._dom = None, None

    def skip_reason(self) -> str | None:
        libvirt = libvirt_module()
        try:
            active = bool(self._shared_dom.isActive())
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

    def blockers(self) -> list[Blocker]:
        """The audit of this domain's live XML, as ``vmtrim audit -c`` runs it (host
        probes on a local connection), without the guest: the trim just proved the guest
        side works."""
        from vmtrim.audit.engine import audit_domain
        from vmtrim.audit.hostprobe import HostProbes

        domain = parse_domain_xml(fetch_domain_xml(self.dom), subject=self.name)
        domain.qemu_version, domain.libvirt_version = self.conn.version_numbers()
        command = f"vmtrim fix -c {self.conn.uri} {self.name}"
        return blocking_layers(audit_domain(domain, HostProbes(local=self.conn.local)), command)

    def os_id(self, timeout: float) -> str | None:
        osinfo = LibvirtAgent(self.dom).execute("guest-get-osinfo", None, timeout)
        value = osinfo.get("id") if isinstance(osinfo, dict) else None
        return value[:64] if isinstance(value, str) else None

    def pool_usage(self, disk: DiskRef) -> PoolUsage | None:
        """The thin pool under the disk's file or block device; on a local connection only
        (a remote host's paths are not this host's)."""
        from vmtrim.storage.pool import pool_under

        path = disk.local_file or (disk.source if (disk.source or "").startswith("/dev/") else None)
        if not self.conn.local or path is None:
            return None
        return pool_under(path)

    def evidence(self, timeout: float) -> Evidence:
        """The live XML's disks, the images' headers and host storage (local only), and
        which guest filesystem sits on which disk (guest-get-fsinfo)."""
        from vmtrim.trim.explain import domain_evidence

        xml = fetch_domain_xml(self.dom)
        domain = parse_domain_xml(xml, subject=self.name)
        refs = {r.target: r for r in self.disks()}
        return domain_evidence(
            domain, refs, LibvirtAgent(self.dom), xml, timeout, local=self.conn.local, lazy=True
        )
