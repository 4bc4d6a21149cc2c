"""One pass of a policy over the domains of each libvirt connection.

For each selected domain, in the order of a stable hash of host and domain name:

1. **survey** it: the live XML, the guest agent's ``guest-get-osinfo`` (is it
   Windows, for the longer timeout) and ``guest-get-fsinfo`` (which filesystem sits
   on which disk, and its ``used-bytes``), and the audit of its configuration and
   guest layers. Mount options and fstrim.timer (guest-exec round trips) are not
   asked: a host-driven trim is the remedy for both, so they decide nothing here.
2. decide: not running or no agent -> ``skipped``; every measurable disk blocked at
   a configuration or host layer (device, block_node, host_storage) and
   ``skip_if_blocked`` -> ``blocked``, with the layer and the audit's reason.
3. otherwise trim it with :func:`vmtrim.trim.engine.trim_target` (guest-fstrim,
   host allocation before and after).
4. estimate per disk what is still reclaimable: host allocation minus the used
   bytes of the guest filesystems on that disk, or a note saying why it cannot be
   estimated (no agent, no filesystem reported on the disk, a filesystem spanning
   several disks).

The results come back as :class:`~vmtrim.history.store.DomainRecord`, ready to record.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmtrim._util.deadline import call_with_deadline
from vmtrim._util.log import get_logger
from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.channels.libvirt import (
    Connection,
    LibvirtAgent,
    error_text,
    fetch_domain_xml,
    libvirt_module,
)
from vmtrim.channels.qmp import FsInfo, FstrimPath, parse_fsinfo
from vmtrim.errors import AgentCommandFailed, AgentUnavailable, EnvironmentProblem, VmtrimError
from vmtrim.history.store import DiskRecord, DomainRecord
from vmtrim.model import DiskReport, Domain, GuestFilesystem, GuestInfo, LayerKind, Verdict
from vmtrim.run.policy import Policy
from vmtrim.run.record import add_pool_and_causes
from vmtrim.sources.libvirt_live import disk_addresses, match_guest_disk
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.trim.engine import (
    NOT_RUNNING,
    Blocker,
    TrimOptions,
    TrimResult,
    blocking_layers,
    trim_target,
)
from vmtrim.trim.libvirt import LibvirtTarget, measurable

log = get_logger(__name__)

SCHEMA = "vmtrim.run/1"
SKIP_LAYERS = (LayerKind.DEVICE, LayerKind.BLOCK_NODE, LayerKind.HOST_STORAGE)
SURVEY_TIMEOUT = 30.0
PLANNED = "would_trim"  # dry run: the status a domain would get a trim


@dataclass
class Outcome:
    """One domain's result: the record for the history, and what the run shows."""

    record: DomainRecord
    offset: float = 0.0  # seconds after the run's start it was due (spread)
    paths: list[FstrimPath] = field(default_factory=list)
    record_seconds: float | None = None  # writing it to the history took this long
    survey_seconds: float | None = None  # of ``seconds``, waiting for the survey's agent calls

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "domain": r.domain,
            "uuid": r.uuid,
            "uri": r.uri,
            "status": r.status,
            "reason": r.reason,
            "blocking_layer": r.blocking_layer,
            "offset": round(self.offset, 3),
            "seconds": round(r.seconds, 3),
            "agent_seconds": _round(r.agent_seconds),
            "survey_seconds": _round(self.survey_seconds),
            "record_seconds": _round(self.record_seconds),
            "guest_trimmed": r.guest_trimmed,
            "reclaimed": r.reclaimed,
            "paths": [p.to_json() for p in self.paths],
            "disks": [_disk_json(d) for d in r.disks],
        }


def _disk_json(d: DiskRecord) -> dict[str, Any]:
    """A disk record as run's JSON: its columns, with the causes as a list, not JSON text."""
    doc: dict[str, Any] = {**vars(d), "reclaimed": d.reclaimed}
    doc["pool_reclaimed"] = d.pool_reclaimed
    doc["causes"] = json.loads(d.causes) if d.causes else None
    return doc


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class Survey:
    """What the run knows about a domain before it touches it."""

    domain: Domain
    reports: list[DiskReport]
    filesystems: list[FsInfo] | None  # None: no guest agent answer
    fs_targets: dict[str, set[str]]  # guest fs name -> host disk targets it sits on
    agent_seconds: float = 0.0  # waiting for the agent's fsinfo (and osinfo)

    @property
    def windows(self) -> bool:
        return bool(self.domain.guest and self.domain.guest.is_windows)


# --- ordering and timing --------------------------------------------------------------


def spread_offset(host: str, name: str, spread: float) -> float:
    """Where in [0, spread) this domain starts: from a hash, the same on every run."""
    digest = hashlib.sha256(f"{host}\0{name}".encode()).digest()
    return spread * int.from_bytes(digest[:8], "big") / 2**64


def window_open(policy: Policy, now: datetime | None = None) -> bool:
    if policy.window is None:
        return True
    return policy.window.contains((now or datetime.now()).time())


# --- survey ---------------------------------------------------------------------------


def survey(conn: Connection, dom: Any, probes: HostProbes, timeout: float) -> Survey:
    """The domain's live model, its guest filesystems and its audit (reads only)."""
    name = str(dom.name())
    xml = fetch_domain_xml(dom)
    domain = parse_domain_xml(xml, subject=name)
    domain.qemu_version, domain.libvirt_version = conn.version_numbers()
    filesystems: list[FsInfo] | None = None
    fs_targets: dict[str, set[str]] = {}
    waited = 0.0
    if not _active(dom):
        domain.guest = GuestInfo(agent=False, reason=NOT_RUNNING)
    else:
        asked = time.monotonic()
        try:
            filesystems = call_with_deadline(
                lambda: _guest(LibvirtAgent(dom), domain, timeout), timeout, "guest agent"
            )
        except (AgentUnavailable, AgentCommandFailed) as exc:
            domain.guest = GuestInfo(agent=False, reason=f"no answer from the guest agent: {exc}")
        else:
            fs_targets = _map_filesystems(domain, filesystems, xml)
        waited = time.monotonic() - asked
    survey = Survey(domain, audit_domain(domain, probes), filesystems, fs_targets)
    survey.agent_seconds = waited if filesystems is not None else 0.0
    return survey


def _active(dom: Any) -> bool:
    libvirt = libvirt_module()
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


_WINDOWS_FS = ("ntfs", "refs")


def _guest(agent: LibvirtAgent, domain: Domain, timeout: float) -> list[FsInfo]:
    """guest-get-fsinfo, and guest-get-osinfo only where the audit needs the kernel.

    The kernel version decides only virtio-blk's guest-driver layer; Windows (for its
    longer timeout) shows in the filesystem types. Under TCG each agent round trip is
    5-20 ms of guest time, so a SCSI/SATA guest is asked once, not twice.
    """
    deadline = time.monotonic() + timeout
    filesystems = parse_fsinfo(agent.execute("guest-get-fsinfo", None, timeout))
    if any(disk.bus == "virtio" for disk in domain.disks):
        osinfo = agent.execute("guest-get-osinfo", None, deadline - time.monotonic())
        osinfo = osinfo if isinstance(osinfo, dict) else {}
        domain.guest = GuestInfo(
            os_id=osinfo.get("id") or ("linux" if osinfo.get("kernel-release") else None),
            kernel_release=osinfo.get("kernel-release"),
        )
    else:
        windows = any(fs.type.lower() in _WINDOWS_FS for fs in filesystems)
        domain.guest = GuestInfo(os_id="mswindows" if windows else None)
    return filesystems


def _map_filesystems(domain: Domain, filesystems: list[FsInfo], xml: str) -> dict[str, set[str]]:
    """Put each guest filesystem on its host disks (as the live audit does)."""
    addresses = disk_addresses(xml)
    fs_targets: dict[str, set[str]] = {}
    by_target: dict[str, list[GuestFilesystem]] = {}
    for fs in filesystems:
        targets = {t for t in (match_guest_disk(d, addresses) for d in fs.disks) if t}
        fs_targets[fs.name or fs.mountpoint] = targets
        for target in targets:
            by_target.setdefault(target, []).append(GuestFilesystem(fs.mountpoint, fs.type))
    for disk in domain.disks:
        if disk.target is not None:
            disk.guest_filesystems = by_target.get(disk.target, [])
    return fs_targets


def guest_used(s: Survey, target: str) -> tuple[int | None, str | None]:
    """(used bytes of the guest filesystems on disk ``target``, or None and why not)."""
    if s.filesystems is None:
        guest = s.domain.guest
        return None, (guest.reason if guest and guest.reason else "no guest agent")
    used, seen = 0, set()
    for fs in s.filesystems:
        key = fs.name or fs.mountpoint
        targets = s.fs_targets.get(key, set())
        if target not in targets or key in seen:
            continue  # another disk's, or a second mount (bind) of the same filesystem
        seen.add(key)
        if len(targets) > 1:
            return None, f"{fs.mountpoint} spans several disks; its used bytes cannot be split"
        if fs.used_bytes is None:
            return None, f"the guest agent reports no used-bytes for {fs.mountpoint}"
        used += fs.used_bytes
    if not seen:
        return None, "the guest reports no mounted filesystem on this disk"
    return used, None


def path_verdict(report: DiskReport) -> Verdict:
    """The discard path below the guest filesystem: the part a host-driven trim relies on.

    The guest filesystem layer is left out on purpose: its mount options decide whether
    the guest discards by itself, and the run's trim is the remedy when it does not.
    """
    return Verdict.worst(
        layer.verdict for layer in report.layers if layer.kind is not LayerKind.GUEST_FS
    )


def _blocking(report: DiskReport) -> tuple[str, str] | None:
    for layer in report.layers:
        if layer.verdict is Verdict.BLOCK and layer.kind in SKIP_LAYERS:
            return layer.kind.value, layer.reason
    return None


# --- one domain -----------------------------------------------------------------------


class SurveyedTarget(LibvirtTarget):
    """The trim target of a surveyed domain: when the trim engine asks which layer
    dropped the discards (a shortfall), the survey's audit answers; no second audit."""

    def __init__(self, conn: Connection, dom: Any, reports: list[DiskReport]) -> None:
        super().__init__(conn, dom)
        self.reports = reports

    def blockers(self) -> list[Blocker]:
        return blocking_layers(self.reports, f"vmtrim fix -c {self.conn.uri} {self.name}")


def _targets(s: Survey) -> list[DiskReport]:
    return [r for r in s.reports if not r.exempt and measurable(r.disk)]


def _disk_records(s: Survey, dom: Any, trim: TrimResult | None) -> list[DiskRecord]:
    measured = {d.target: d for d in trim.disks} if trim else {}
    trimmed = _guest_trimmed_by_disk(s, trim.paths) if trim else {}
    out = []
    for report in _targets(s):
        target = report.disk.target or report.disk.ident
        blocking = next(
            (
                (layer.kind.value, layer.reason)
                for layer in report.layers
                if layer.verdict is Verdict.BLOCK
            ),
            None,
        )
        disk = DiskRecord(
            target=target,
            source=report.disk.source,
            verdict=path_verdict(report).value,
            blocking_layer=blocking[0] if blocking else None,
            blocking_reason=blocking[1] if blocking else None,
            guest_trimmed=trimmed.get(target),
        )
        if target in measured:
            m = measured[target]
            disk.allocated_before, disk.allocated_after = m.allocated_before, m.allocated_after
            disk.measured_by, disk.error = m.measured_by, m.error
            disk.unmap_bytes, disk.unmap_operations = m.unmap_bytes, m.unmap_operations
            add_pool_and_causes(disk, m)
        else:
            _measure_untrimmed(dom, report, disk)
        disk.virtual_size = _capacity(dom, target)
        used, note = guest_used(s, target)
        disk.guest_used, disk.reclaimable_note = used, note
        if used is not None:
            if disk.allocated_before is not None:
                disk.reclaimable_before = max(0, disk.allocated_before - used)
            latest = disk.allocated_after if trim else disk.allocated_before
            if latest is not None:
                disk.reclaimable_after = max(0, latest - used)
        elif disk.allocated_before is None:
            disk.reclaimable_note = disk.error or note
        out.append(disk)
    return out


def _measure_untrimmed(dom: Any, report: DiskReport, disk: DiskRecord) -> None:
    """Host allocation of a disk the run did not trim (blocked, skipped): for the history."""
    from vmtrim.image.allocation import allocated_bytes
    from vmtrim.model import StorageKind

    try:
        if report.disk.storage is StorageKind.FILE and report.disk.source:
            disk.allocated_before, disk.measured_by = allocated_bytes(report.disk.source), "du"
        else:
            disk.allocated_before = int(dom.blockInfo(disk.target)[1])
            disk.measured_by = "blockInfo"
    except VmtrimError as exc:
        disk.error = exc.one_line()
    except Exception as exc:  # a vanished domain or file: the record says so
        disk.error = f"{type(exc).__name__}: {exc}"


def _capacity(dom: Any, target: str) -> int | None:
    try:
        return int(dom.blockInfo(target)[0])
    except Exception:  # not running, or the disk went away: the size is unknown
        return None


def _guest_trimmed_by_disk(s: Survey, paths: Sequence[FstrimPath]) -> dict[str, int]:
    """guest-fstrim's per-path bytes, on the disk each path's filesystem sits on."""
    if s.filesystems is None:
        return {}
    out: dict[str, int] = {}
    for path in paths:
        for fs in s.filesystems:
            targets = s.fs_targets.get(fs.name or fs.mountpoint, set())
            if fs.mountpoint == path.path and len(targets) == 1 and path.trimmed is not None:
                [target] = targets
                out[target] = out.get(target, 0) + path.trimmed
                break
    return out


def process(
    conn: Connection,
    dom: Any,
    policy: Policy,
    probes: HostProbes,
    *,
    dry_run: bool = False,
) -> Outcome:
    """Survey, decide, trim (unless ``dry_run``), measure and estimate one domain."""
    start, wall = time.monotonic(), time.time()
    name = str(dom.name())
    record = DomainRecord(domain=name, status="failed", uri=conn.uri, started=wall)
    outcome = Outcome(record)
    try:
        record.uuid = str(dom.UUIDString())
        s = survey(conn, dom, probes, min(SURVEY_TIMEOUT, policy.timeout))
        outcome.survey_seconds = s.agent_seconds
        _decide(conn, dom, policy, s, outcome, dry_run, start)
    except VmtrimError as exc:
        record.status, record.reason = "failed", exc.one_line()
    except Exception as exc:  # a vanished domain, a libvirt error: report, go on
        text = error_text(exc) if type(exc).__name__ == "libvirtError" else str(exc)
        record.status, record.reason = "failed", f"{type(exc).__name__}: {text}"
    record.seconds = time.monotonic() - start
    log.debug("%s: %s in %.3f s (%s)", name, record.status, record.seconds, record.reason)
    return outcome


def _decide(
    conn: Connection,
    dom: Any,
    policy: Policy,
    s: Survey,
    outcome: Outcome,
    dry_run: bool,
    start: float,
) -> None:
    record = outcome.record
    guest = s.domain.guest
    targets = _targets(s)
    blocked = [(r, b) for r in targets if (b := _blocking(r))]
    trim: TrimResult | None = None
    if guest is not None and guest.reason == NOT_RUNNING:
        record.status, record.reason = "skipped", NOT_RUNNING
    elif policy.skip_if_blocked and targets and len(blocked) == len(targets):
        record.status, record.blocking_layer = "blocked", blocked[0][1][0]
        record.reason = "; ".join(f"{r.disk.target}: {lay}: {why}" for r, (lay, why) in blocked) + (
            " (not trimmed: skip_if_blocked)"
        )
    elif guest is None or not guest.agent:
        record.status = "skipped"
        record.reason = (guest.reason if guest else None) or "no guest agent"
    elif dry_run:
        record.status = PLANNED
    else:
        timeout = policy.timeout_windows if s.windows else policy.timeout
        left = max(1.0, timeout - (time.monotonic() - start))
        # explain: the causes go into the record of each disk that fell short
        os_id = guest.os_id or ("mswindows" if s.windows else None)
        options = TrimOptions(minimum=policy.minimum, timeout=left, explain=True, os_id=os_id)
        trim = trim_target(SurveyedTarget(conn, dom, s.reports), options)
        record.status, record.reason = trim.status, trim.reason
        blockers = getattr(trim, "blockers", None)  # no_effect: the layer the audit names
        if blockers:
            record.blocking_layer = blockers[0].layer
        record.agent_seconds = trim.agent_seconds
        record.guest_trimmed = trim.guest_trimmed_bytes if trim.guest_counted else None
        outcome.paths = trim.paths
        if blocked and record.status == "trimmed":
            record.reason = "; ".join(
                f"{r.disk.target}: blocked at {lay}: {why}" for r, (lay, why) in blocked
            )
    record.disks = _disk_records(s, dom, trim)


# --- the whole pass -------------------------------------------------------------------


@dataclass
class Plan:
    """The domains of one connection, with their start offsets, in start order."""

    conn: Connection
    items: list[tuple[float, Any]]  # (offset, domain)


def plan(conn: Connection, policy: Policy, host: str) -> Plan:
    libvirt = libvirt_module()
    try:
        domains = list(conn.conn.listAllDomains(0))
    except libvirt.libvirtError as exc:
        raise EnvironmentProblem(error_text(exc), subject=conn.uri) from exc
    chosen = [d for d in domains if policy.selects(str(d.name()))]
    items = [(spread_offset(host, str(d.name()), policy.spread), d) for d in chosen]
    items.sort(key=lambda item: (item[0], str(item[1].name())))
    return Plan(conn, items)


def execute(
    plans: Sequence[Plan],
    policy: Policy,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> Iterator[Outcome]:
    """Run every plan, ``policy.parallel`` domains at a time; outcomes as they finish.

    Each domain waits for its spread offset (not in a dry run). One that comes due
    after the maintenance window closed is skipped with that reason, untouched.
    """
    stop = stop or threading.Event()
    probes = HostProbes(local=all(p.conn.local for p in plans))
    started = time.monotonic()

    def one(conn: Connection, offset: float, dom: Any) -> Outcome:
        if not dry_run:
            stop.wait(max(0.0, started + offset - time.monotonic()))
        if stop.is_set():
            return _untouched(conn, dom, offset, "the run was stopped before this domain")
        if not dry_run and not window_open(policy):
            return _untouched(conn, dom, offset, f"the maintenance window {policy.window} closed")
        outcome = process(conn, dom, policy, probes, dry_run=dry_run)
        outcome.offset = offset
        return outcome

    with ThreadPoolExecutor(max(1, policy.parallel), thread_name_prefix="vmtrim-run") as pool:
        futures = [pool.submit(one, p.conn, offset, dom) for p in plans for offset, dom in p.items]
        try:
            for future in as_completed(futures):
                outcome = future.result()
                if on_done is not None:
                    on_done(outcome)
                yield outcome
        finally:
            stop.set()  # a consumer that stops early releases the waiting workers


def _untouched(conn: Connection, dom: Any, offset: float, reason: str) -> Outcome:
    record = DomainRecord(str(dom.name()), "skipped", reason=reason, uri=conn.uri)
    return Outcome(record, offset=offset)
