"""Live libvirt domains into the model: live XML, connection versions and guest-agent facts.

The guest's filesystems (guest-get-fsinfo) are mapped to the host's disks by serial,
or by bus and address; mount options and fstrim.timer come through guest-exec.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
from vmtrim.channels.qmp import parse_fsinfo
from vmtrim.errors import AgentCommandFailed, AgentUnavailable
from vmtrim.model import (
    Domain,
    GuestFilesystem,
    GuestInfo,
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


def _mount_options(agent: LibvirtAgent, timeout: float) -> dict[str, tuple[str, ...]]:
    status = agent.run("cat", ["/proc/mounts"], timeout)
    options: dict[str, tuple[str, ...]] = {}
    for line in status.out_data.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) >= 4:
            options[fields[1]] = tuple(fields[3].split(","))
    return options


def _fstrim_timer(agent: LibvirtAgent, timeout: float) -> bool:
    """systemd's fstrim.timer enabled? No systemctl (busybox, Alpine) means no timer."""
    status = agent.run(
        "/bin/sh",
        ["-c", "command -v systemctl >/dev/null || exit 127; systemctl is-enabled fstrim.timer"],
        timeout,
    )
    return status.exitcode == 0


def guest_facts(agent: LibvirtAgent, domain: Domain, live_xml: str, timeout: float) -> None:
    """Fill ``domain.guest`` and each disk's ``guest_filesystems`` from the guest agent."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        return deadline - time.monotonic()

    osinfo = agent.execute("guest-get-osinfo", None, left())
    osinfo = osinfo if isinstance(osinfo, dict) else {}
    guest = GuestInfo(
        os_id=osinfo.get("id") or ("linux" if osinfo.get("kernel-release") else None),
        kernel_release=osinfo.get("kernel-release"),
    )
    domain.guest = guest
    filesystems = parse_fsinfo(agent.execute("guest-get-fsinfo", None, left()))
    options: dict[str, tuple[str, ...]] | None = None
    if not guest.is_windows:
        try:
            options = _mount_options(agent, left())
            guest.fstrim_timer = _fstrim_timer(agent, left())
        except AgentCommandFailed as exc:  # guest-exec disabled or missing tools
            domain.notes.append(
                f"guest-exec is not available, so mount options and fstrim.timer are unknown: {exc}"
            )
    addresses = disk_addresses(live_xml)
    by_target: dict[str, list[GuestFilesystem]] = {}
    for fs in filesystems:
        targets = {match_guest_disk(d, addresses) for d in fs.disks}
        for target in targets - {None}:
            assert target is not None
            by_target.setdefault(target, []).append(
                GuestFilesystem(
                    mountpoint=fs.mountpoint,
                    fstype=fs.type,
                    mount_options=options.get(fs.mountpoint) if options is not None else None,
                )
            )
    for disk in domain.disks:
        if disk.target is not None:
            disk.guest_filesystems = by_target.get(disk.target, [])


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
