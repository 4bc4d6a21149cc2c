"""``vmtrim fix -c URI DOMAIN``: apply the XML fix to a defined domain through libvirt.

1. read the persistent definition with ``XMLDesc(INACTIVE|SECURE)`` (SECURE keeps
   secrets such as passwords, so the redefinition does not drop them);
2. save it, 0600, under ``$XDG_STATE_HOME/vmtrim/backups/``;
3. fix it with :func:`vmtrim.fix.xml.fix_domain_xml` (``--dry-run`` stops here);
4. ``defineXML`` the result;
5. read it back and fix it again: the diff must now be empty, or libvirt did not
   keep what we wrote;
6. a running domain keeps its old configuration until a full power cycle;
7. ``--restart`` shuts it down (guest agent, then ACPI) within a timeout and starts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vmtrim.channels.libvirt import Connection, error_text, fetch_domain_xml, libvirt_module
from vmtrim.errors import BadInput, EnvironmentProblem
from vmtrim.fix.policy import FixOptions, FixResult
from vmtrim.sources.libvirt_live import pending_restart
from vmtrim.sources.libvirt_xml import parse_domain_xml

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
            "diff": self.result.diff,
        }


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
) -> LiveFix:
    from vmtrim._util.files import backup_to_state
    from vmtrim.audit.hostprobe import HostProbes
    from vmtrim.fix.xml import fix_domain_xml

    name = str(dom.name())
    if not dom.isPersistent():
        raise BadInput("a transient domain has no definition to fix; define it first", subject=name)
    probes = HostProbes.choose(remote_uri=None if conn.local else conn.uri)
    original = fetch_domain_xml(dom, inactive=True, secure=True)
    result = fix_domain_xml(original, options, subject=name, probes=probes)
    outcome = LiveFix(domain=name, result=result, dry_run=dry_run, running=bool(dom.isActive()))
    if dry_run:
        return outcome
    if result.changed:
        outcome.backup = str(backup_to_state(name, original))
        _libvirt_call(name, "defineXML refused the fixed XML", conn.conn.defineXML, result.new_text)
        outcome.defined = True
        again = fix_domain_xml(
            fetch_domain_xml(dom, inactive=True, secure=True), options, subject=name, probes=probes
        )
        if again.changed:
            raise EnvironmentProblem(
                "libvirt did not keep the fix: after defineXML the definition still "
                f"differs: {' '.join(again.diff.split())[:300]}",
                subject=name,
            )
    if outcome.running:
        live = parse_domain_xml(fetch_domain_xml(dom), subject=name)
        outcome.pending = pending_restart(
            live, parse_domain_xml(fetch_domain_xml(dom, inactive=True), subject=name)
        )
        if restart and outcome.pending:
            power_cycle(dom, name, restart_timeout)
            outcome.restarted = True
            outcome.pending = []
    return outcome


def power_cycle(dom: Any, name: str, timeout: float) -> None:
    """Shut down (guest agent first, then ACPI) and start again; never forces power off."""
    libvirt = libvirt_module()
    flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT | libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
    _libvirt_call(name, "shutdown failed", dom.shutdownFlags, flags)
    deadline = time.monotonic() + timeout
    while dom.isActive():
        if time.monotonic() >= deadline:
            raise EnvironmentProblem(
                f"did not shut down within {timeout:g} s (neither the guest agent nor ACPI "
                "powered it off); it is still running with the old configuration, and the "
                "fixed definition is saved",
                subject=name,
            )
        time.sleep(0.2)
    _libvirt_call(name, "start failed", dom.create)
