"""``vmtrim fix -c URI DOMAIN``: apply the XML fix to a defined domain through libvirt.

1. read the persistent definition with ``XMLDesc(INACTIVE|SECURE)`` (SECURE keeps
   secrets such as passwords, so the redefinition does not drop them);
2. save it, 0600, under ``$XDG_STATE_HOME/vmtrim/backups/``;
3. fix it with :func:`vmtrim.fix.xml.fix_domain_xml` (``--dry-run`` stops here);
4. ``defineXML`` the result;
5. read it back and fix it again: the diff must now be empty, or libvirt did not
   keep what we wrote;
6. a running domain keeps its old configuration until a full power cycle;
7. ``--restart`` shuts it down (guest agent, then ACPI) within a timeout and starts it;
   with ``force`` a domain still running at the timeout is destroyed (powered off).

A running domain's guest agent is asked as ``audit -c`` asks it (its OS, filesystems and
mount options go into the audit of the fixed definition), and before ``--bus scsi``
renames disks its ``/etc/fstab`` is read for lines that name them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from vmtrim._util.versions import Version, from_libvirt
from vmtrim.channels.libvirt import (
    Connection,
    LibvirtAgent,
    error_text,
    fetch_domain_xml,
    libvirt_module,
)
from vmtrim.errors import AgentCommandFailed, AgentUnavailable, BadInput, EnvironmentProblem
from vmtrim.fix.policy import FixOptions, FixResult, fstab_warnings
from vmtrim.model import Domain
from vmtrim.sources.libvirt_live import live_domain, pending_restart
from vmtrim.sources.libvirt_xml import parse_domain_xml

Progress = Callable[[str, float, float], None]  # (domain, seconds waited, timeout)

POWER_CYCLE_NOTE = (
    "the running domain keeps its old disk configuration until a full power "
    "cycle (shut down, then start; a reboot inside the guest is not enough); "
    "use --restart to do it now"
)


@dataclass
class LiveFix:
    domain: str
    result: FixResult
    dry_run: bool
    backup: str | None = None
    defined: bool = False
    running: bool = False
    pending: list[str] | None = None  # what still differs between running and defined
    restarted: bool = False
    forced: bool = False  # --force: destroyed after the shutdown timeout

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            **self.result.to_json(),
            "mode": "dry-run" if self.dry_run else "libvirt",
            "backup": self.backup,
            "defined": self.defined,
            "running": self.running,
            "pending_restart": self.pending or [],
            "restarted": self.restarted,
            "forced": self.forced,
            "diff": self.result.diff,
        }


def local_libvirt_version() -> Version | None:
    """This host's libvirt library release (libvirt-python's getVersion), or None."""
    try:
        return from_libvirt(int(libvirt_module().getVersion()))
    except Exception:  # no libvirt-python, or a library that cannot say
        return None


def _libvirt_call(subject: str, what: str, call: Any, *args: Any) -> Any:
    libvirt = libvirt_module()
    try:
        return call(*args)
    except libvirt.libvirtError as exc:
        raise EnvironmentProblem(f"{what}: {error_text(exc)}", subject=subject) from exc


def fix_live(
    conn: Connection,
    dom: Any,
    options: FixOptions,
    *,
    dry_run: bool = False,
    restart: bool = False,
    restart_timeout: float = 120.0,
    force: bool = False,
    agent_timeout: float = 10.0,
    warn: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> LiveFix:
    """Fix one defined domain. ``warn`` gets each warning before the definition changes."""
    from vmtrim._util.files import backup_to_state
    from vmtrim.audit.hostprobe import HostProbes
    from vmtrim.fix.xml import fix_domain_xml

    name = str(dom.name())
    if not dom.isPersistent():
        raise BadInput("a transient domain has no definition to fix; define it first", subject=name)
    probes = HostProbes.choose(remote_uri=None if conn.local else conn.uri)
    live = live_domain(conn, dom, agent_timeout)  # what audit -c sees: versions, guest facts
    original = fetch_domain_xml(dom, inactive=True, secure=True)
    result = fix_domain_xml(original, options, subject=name, probes=probes, live=live)
    outcome = LiveFix(domain=name, result=result, dry_run=dry_run, running=bool(dom.isActive()))
    if result.moves:
        result.warnings += _guest_fstab(dom, live, result, agent_timeout)
    if warn is not None:
        for warning in result.warnings:
            warn(warning)
    if dry_run:
        return outcome
    if result.changed:
        outcome.backup = str(backup_to_state(name, original))
        _libvirt_call(name, "defineXML refused the fixed XML", conn.conn.defineXML, result.new_text)
        outcome.defined = True
        again = fix_domain_xml(
            fetch_domain_xml(dom, inactive=True, secure=True),
            options,
            subject=name,
            probes=probes,
            live=live,  # the same libvirt release decides the same device settings
        )
        if again.changed:
            raise EnvironmentProblem(
                "libvirt did not keep the fix: after defineXML the definition still "
                f"differs: {' '.join(again.diff.split())[:300]}",
                subject=name,
            )
    if outcome.running:
        running_xml, defined_xml = fetch_domain_xml(dom), fetch_domain_xml(dom, inactive=True)
        outcome.pending = pending_restart(
            parse_domain_xml(running_xml, subject=name),
            parse_domain_xml(defined_xml, subject=name),
        ) + device_pending(running_xml, defined_xml, name)
        if restart and outcome.pending:
            outcome.forced = power_cycle(dom, name, restart_timeout, force=force, progress=progress)
            outcome.restarted = True
            outcome.pending = []
    return outcome


def device_pending(running_xml: str, defined_xml: str, subject: str) -> list[str]:
    """What --discard-granularity/--ssd changed in the definition that the running QEMU
    does not have yet: a disk's <blockio>/<target rotation_rate>, or <qemu:override> and
    <qemu:commandline> (QEMU reads all of them only when it starts)."""
    from vmtrim._util.domxml import DiskElement, disks
    from vmtrim._util.safexml import parse
    from vmtrim.fix.xml import QEMU_NS

    running, defined = parse(running_xml, subject).getroot(), parse(defined_xml, subject).getroot()

    def device(root: Any) -> dict[str, tuple[str | None, str | None]]:
        return {
            str(d.source_file or d.source_dev or d.target_dev): (
                d.get(DiskElement.blockio_discard_granularity),
                d.get(DiskElement.target_rotation_rate),
            )
            for d in disks(root)
        }

    def qemu(root: Any, local: str) -> list[bytes]:
        found = root.find(f"{{{QEMU_NS}}}{local}")
        return [] if found is None else [etree.tostring(e) for e in found.iter() if e is not found]

    notes = []
    live, wanted = device(running), device(defined)
    for key, (granularity, rotation) in wanted.items():
        if key in live and live[key] != (granularity, rotation):
            notes.append(
                f"{key}: fix pending a restart: the definition has discard_granularity"
                f" {granularity or '(unset)'}, rotation_rate {rotation or '(unset)'}"
            )
    for local in ("override", "commandline"):
        if qemu(running, local) != qemu(defined, local):
            notes.append(f"fix pending a restart: <qemu:{local}> differs from the running QEMU's")
    return notes


def _guest_fstab(dom: Any, live: Domain, result: FixResult, timeout: float) -> list[str]:
    """Warnings from the guest's /etc/fstab (guest-exec), or why it could not be read."""
    guest = live.guest
    if guest is None or not guest.agent:
        why = guest.reason if guest is not None and guest.reason else "no guest agent"
        return [f"could not read the guest's /etc/fstab ({why}): check it for such names"]
    if guest.is_windows:
        return []
    try:
        status = LibvirtAgent(dom).run("cat", ["/etc/fstab"], timeout)
    except (AgentUnavailable, AgentCommandFailed) as exc:
        return [f"could not read the guest's /etc/fstab: {exc.one_line()}"]
    if status.exitcode != 0:
        return ["the guest has no readable /etc/fstab: check its mounts for such names"]
    found = fstab_warnings(status.out_data.decode("utf-8", "replace"), result.moves)
    return found or ["the guest's /etc/fstab names none of the moved disks by device"]


def power_cycle(
    dom: Any, name: str, timeout: float, *, force: bool = False, progress: Progress | None = None
) -> bool:
    """Shut down (guest agent first, then ACPI) and start again; True when it was forced.

    Without ``force`` a domain still running at the timeout is left running and this
    raises; with it the domain is destroyed (powered off, as pulling the plug).
    """
    libvirt = libvirt_module()
    flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT | libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
    start = time.monotonic()
    _libvirt_call(name, "shutdown failed", dom.shutdownFlags, flags)
    forced = False
    while dom.isActive():
        waited = time.monotonic() - start
        if progress is not None:
            progress(name, waited, timeout)
        if waited >= timeout:
            if not force:
                raise EnvironmentProblem(
                    f"did not shut down within {timeout:g} s (neither the guest agent nor ACPI"
                    " powered it off); it is still running with the old configuration, and the"
                    " fixed definition is saved; --force destroys it after the timeout",
                    subject=name,
                )
            _libvirt_call(name, "destroy failed", dom.destroy)
            forced = True
            break
        time.sleep(0.2)
    _libvirt_call(name, "start failed", dom.create)
    return forced
