"""The trim engine: ask guests to trim through their agent, and measure what the host got back.

For each target (a libvirt domain, or a QEMU started without libvirt) the engine

1. measures every disk's host allocation (``du`` of a local file; libvirt's
   ``blockInfo`` allocation for block devices and remote hosts);
2. sends ``guest-fstrim`` through the guest agent and keeps the per-path results
   (``virDomainFSTrim`` throws them away), or, with ``--mountpoint``, runs the
   guest's ``fstrim`` on that one mountpoint through ``guest-exec`` (guest-fstrim
   has no mountpoint argument);
3. measures again. The guest's "trimmed" numbers are upper bounds (FITRIM reports
   what it asked for, not what the host freed); only the host measurement counts.

4. when the host got back far less than the guest says it trimmed
   (:func:`shortfall`), asks the target which configuration layer drops the
   discards (the audit's own verdicts, :meth:`Target.blockers`): a layer that blocks
   makes the status ``no_effect``, with that layer and the ``vmtrim fix`` command.

``timeout`` bounds each target's whole run (disks, measurements, agent, QMP), from
the moment a worker starts it: the work runs in a daemon thread that is abandoned
at the deadline, and the target is *skipped* with a reason. A target without an
agent, or whose agent does not answer, is skipped too; an agent that answers with
an error, or with a reply that is not what the command returns (too long, too
deep, a number out of range), *failed*. One target never stops the others
(``--parallel`` runs them on a thread pool; a libvirt target uses a connection of
its own, so a hung agent call holds no resource another domain needs).

Statuses: ``trimmed`` (the host measured the result), ``no_effect`` (the guest
trimmed, a configuration layer dropped it), ``skipped``, ``failed``.

With ``timeout_windows`` the engine first asks ``guest-get-osinfo``: a Windows guest
(id ``mswindows``) gets that longer timeout (its retrim takes minutes), and its
guest-fstrim has no byte counts (:data:`vmtrim.facts.WINDOWS_NO_COUNTS`): only the host
figure counts, and nothing is compared with a guest figure that does not exist.

Each disk's thin pool (``Target.pool_usage``) is read before and after the trim, beside
the disk's own allocation. With ``explain`` the causes that apply to each disk that fell
short are listed (:mod:`vmtrim.trim.explain`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from vmtrim._util.deadline import call_with_deadline
from vmtrim._util.log import get_logger
from vmtrim.channels.qmp import ExecStatus, FstrimPath, FstrimResult
from vmtrim.errors import AgentCommandFailed, AgentUnavailable, VmtrimError
from vmtrim.facts import WINDOWS_NO_COUNTS
from vmtrim.model import DiskReport, LayerKind, Verdict
from vmtrim.storage.pool import PoolUsage
from vmtrim.storage.pool import reclaimed as pool_reclaimed
from vmtrim.trim.explain import (
    Cause,
    Evidence,
    already_trimmed,
    disk_causes,
    guest_by_disk,
    paths_on,
)

SCHEMA = "vmtrim.trim/1"
UPPER_BOUND_NOTE = (
    "guest_trimmed_bytes and paths[].trimmed are what the guest asked to discard "
    "(upper bounds); reclaimed_bytes is what the host measured"
)

TRIMMED = "trimmed"
NO_EFFECT = "no_effect"
SKIPPED = "skipped"
FAILED = "failed"
NOT_RUNNING = "the domain is not running"

#: How long after ``timeout`` a target's run is abandoned (see trim_target).
GRACE = 0.2
#: Below this the guest had (about) nothing left to trim: no verdict on the host side.
NOTHING_TO_TRIM = 1024 * 1024
#: The host got back less than this share of what the guest says: ask the audit why.
SHORTFALL_RATIO = 0.1

T = TypeVar("T")
log = get_logger(__name__)


@dataclass(frozen=True)
class TrimOptions:
    minimum: int = 0
    mountpoint: str | None = None
    timeout: float = 60.0
    parallel: int = 1
    explain: bool = False
    #: the timeout of a guest whose guest-get-osinfo says Windows (None: do not ask)
    timeout_windows: float | None = None
    os_id: str | None = None  # already known (run's survey): not asked again


@dataclass(frozen=True)
class DiskRef:
    """A disk to measure: its guest-visible name, host source, and the local file if any."""

    target: str
    source: str | None
    local_file: str | None = None  # set when the image is a file on this host
    key: str | None = None  # QMP device/qdev name, for the unmap counters


@dataclass
class DiskResult:
    target: str
    source: str | None
    allocated_before: int | None = None
    allocated_after: int | None = None
    measured_by: str | None = None  # "du" or "blockInfo"
    error: str | None = None
    unmap_bytes: int | None = None  # QMP query-blockstats delta, when a QMP socket is given
    unmap_operations: int | None = None
    pool_before: PoolUsage | None = None  # the dm-thin pool under the disk, if any
    pool_after: PoolUsage | None = None
    guest_trimmed: int | None = None  # the guest's figure on this disk's filesystems (explain)
    causes: list[Cause] | None = None  # None: not explained; []: explained, no known cause

    @property
    def pool_reclaimed(self) -> int | None:
        return pool_reclaimed(self.pool_before, self.pool_after)

    @property
    def reclaimed_bytes(self) -> int | None:
        if self.allocated_before is None or self.allocated_after is None:
            return None
        return self.allocated_before - self.allocated_after

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "target": self.target,
            "source": self.source,
            "allocated_before": self.allocated_before,
            "allocated_after": self.allocated_after,
            "reclaimed_bytes": self.reclaimed_bytes,
            "measured_by": self.measured_by,
        }
        if self.error:
            doc["error"] = self.error
        if self.unmap_bytes is not None:
            doc["unmap_bytes"] = self.unmap_bytes
            doc["unmap_operations"] = self.unmap_operations
        if self.pool_before is not None or self.pool_after is not None:
            doc["pool"] = pool_json(self.pool_before, self.pool_after)
        if self.causes is not None:
            doc["guest_trimmed"] = self.guest_trimmed
            doc["causes"] = [c.to_json() for c in self.causes]
        return doc


def pool_json(before: PoolUsage | None, after: PoolUsage | None) -> dict[str, Any]:
    """A disk's pool readings in trim's JSON and run's history: both, and the difference."""
    return {
        "before": before.to_json() if before else None,
        "after": after.to_json() if after else None,
        "reclaimed_bytes": pool_reclaimed(before, after),
    }


@dataclass
class TrimResult:
    domain: str
    status: str = TRIMMED
    reason: str | None = None
    paths: list[FstrimPath] = field(default_factory=list)
    disks: list[DiskResult] = field(default_factory=list)
    seconds: float = 0.0
    agent_seconds: float = 0.0  # time spent waiting for the guest's trim
    blockers: list[Blocker] = field(default_factory=list)  # why a no_effect trim had none
    os_id: str | None = None  # guest-get-osinfo's id, when asked
    explained: bool = False  # --explain ran: each disk's causes are in DiskResult.causes
    explain_note: str | None = None  # why explain says nothing, when it does not

    @property
    def windows(self) -> bool:
        return (self.os_id or "").lower() in ("mswindows", "windows")

    @property
    def guest_counted(self) -> bool:
        """Did the guest give any byte count? Windows' guest-fstrim gives none."""
        return any(p.trimmed is not None for p in self.paths)

    @property
    def guest_trimmed_bytes(self) -> int:
        return sum(p.trimmed or 0 for p in self.paths)

    @property
    def note(self) -> str | None:
        """What to say instead of a guest figure that does not exist."""
        if self.paths and not self.guest_counted and self.windows:
            return WINDOWS_NO_COUNTS.summary
        return None

    @property
    def causes(self) -> list[Cause]:
        return [c for d in self.disks for c in d.causes or []]

    @property
    def reclaimed_bytes(self) -> int | None:
        values = [d.reclaimed_bytes for d in self.disks if d.reclaimed_bytes is not None]
        return sum(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "status": self.status,
            "reason": self.reason,
            "paths": [p.to_json() for p in self.paths],
            "disks": [d.to_json() for d in self.disks],
            # Windows: no byte counts at all, not 0 (the note says so)
            "guest_trimmed_bytes": self.guest_trimmed_bytes if self.guest_counted else None,
            "reclaimed_bytes": self.reclaimed_bytes,
            "os_id": self.os_id,
            "note": self.note,
            "explained": self.explained,
            "explain_note": self.explain_note,
            "causes": [c.to_json() for c in self.causes],
            "seconds": round(self.seconds, 3),
            "agent_seconds": round(self.agent_seconds, 3),
            "blockers": [
                {
                    "disk": b.disk,
                    "layer": b.layer,
                    "reason": b.reason,
                    "fix": b.fix,
                    "command": b.command,
                }
                for b in self.blockers
            ],
        }


@dataclass(frozen=True)
class Blocker:
    """A layer the audit says drops discards on one disk, in the audit's own words."""

    disk: str
    layer: str  # LayerKind value: device, block_node, host_storage, guest_driver
    reason: str
    fix: str | None = None
    command: str | None = None  # the vmtrim fix command line for this target

    def sentence(self) -> str:
        """As ``vmtrim audit`` prints it: ``LAYER: REASON  → fix: FIX``."""
        text = f"{self.disk}: {self.layer}: {self.reason}"
        text += f"  → fix: {self.fix}" if self.fix else ""
        return text + (f" (run `{self.command}`)" if self.command else "")


def shortfall(result: TrimResult) -> bool:
    """True when the guest trimmed something real and the host got back far less.

    A guest that reports about nothing had nothing left to trim; a host figure that
    could not be measured says nothing either way.
    """
    if not result.guest_counted:  # Windows: there is no guest figure to compare with
        return False
    return falls_short(result.guest_trimmed_bytes, result.reclaimed_bytes)


def falls_short(guest: int | None, host: int | None) -> bool:
    """The guest trimmed something real and the host got back less than a tenth of it."""
    if guest is None or guest < NOTHING_TO_TRIM or host is None:
        return False
    return host < SHORTFALL_RATIO * guest


def blocking_layers(reports: list[DiskReport], command: str | None) -> list[Blocker]:
    """The layers below the guest filesystem that block discard, per measured disk."""
    found = []
    for report in reports:
        if report.exempt:
            continue
        for layer in report.layers:
            if layer.verdict is Verdict.BLOCK and layer.kind is not LayerKind.GUEST_FS:
                fixable = layer.kind.is_config
                found.append(
                    Blocker(
                        disk=report.disk.target or report.disk.ident,
                        layer=layer.kind.value,
                        reason=layer.reason,
                        fix=layer.fix,
                        command=command if fixable else None,
                    )
                )
    return found


class Agent(Protocol):
    """A guest agent. Raises AgentUnavailable (no agent, or no answer within ``timeout``)
    or AgentCommandFailed (it answered with an error)."""

    def fstrim(self, minimum: int, *, timeout: float) -> FstrimResult: ...

    def run(self, path: str, args: list[str], *, timeout: float) -> ExecStatus:
        """guest-exec ``path args`` and wait for it to exit."""
        ...


class Target(Protocol):
    """Something with a guest agent and disks: a libvirt domain or a bare QEMU."""

    name: str

    def skip_reason(self) -> str | None:
        """Why this target cannot be trimmed at all (e.g. not running), or None."""
        ...

    def disks(self) -> list[DiskRef]: ...

    def measure(self, disk: DiskRef) -> tuple[int, str]:
        """(allocated bytes, how it was measured)."""
        ...

    def agent(self, timeout: float) -> Agent:
        """The guest agent, ready for commands within ``timeout`` (a direct socket syncs)."""
        ...

    def unmap_counters(self) -> dict[str, tuple[int, int]] | None:
        """DiskRef.key -> (unmap_bytes, unmap_operations) from QMP; None without QMP."""
        ...

    def blockers(self) -> list[Blocker]:
        """What the audit's layers say drops discards; [] when nothing is known to."""
        ...

    def os_id(self, timeout: float) -> str | None:
        """guest-get-osinfo's ``id`` (``mswindows``, ``debian``...), None if it has none."""
        ...

    def pool_usage(self, disk: DiskRef) -> PoolUsage | None:
        """The dm-thin pool under the disk now; None when there is none or it is unknown."""
        ...

    def evidence(self, timeout: float) -> Evidence:
        """What ``--explain`` needs per disk (image, host storage, guest filesystems)."""
        ...

    def close(self) -> None:
        """Release the target's own connections (called once its run is over)."""
        ...


# The guest prints these digits: at most 19 (int64), and not the tail of a longer run.
_FSTRIM_BYTES = re.compile(r"\((\d{1,19}) bytes\)|(?<!\d)(\d{1,19}) bytes trimmed")
_INT64_MAX = 2**63 - 1
_TOO_LONG = re.compile(r"\d{20,} bytes")


def fstrim_one(agent: Agent, mountpoint: str, minimum: int, timeout: float) -> FstrimPath:
    """Trim one mountpoint: guest-fstrim cannot, so run the guest's fstrim via guest-exec.

    Parses both busybox (``/mnt: N bytes trimmed``) and util-linux
    (``/mnt: 200 MiB (N bytes) trimmed``) output.
    """
    args = ["-v", *(["-m", str(minimum)] if minimum else []), mountpoint]
    try:
        status = agent.run("fstrim", args, timeout=timeout)
    except AgentCommandFailed as exc:
        raise AgentCommandFailed(
            f"--mountpoint needs guest-exec and fstrim in the guest: {exc.message}",
            subject=exc.subject,
            command=exc.command,
            error_class=exc.error_class,
        ) from exc
    out = (status.out_data + status.err_data).decode("utf-8", "replace")
    if status.exitcode != 0 or status.signal:
        return FstrimPath(mountpoint, minimum=minimum, error=out.strip() or "fstrim failed")
    match = _FSTRIM_BYTES.search(out)
    trimmed = int(match.group(1) or match.group(2)) if match else None
    if (trimmed is not None and trimmed > _INT64_MAX) or _TOO_LONG.search(out):
        raise AgentCommandFailed(
            f"fstrim in the guest printed a byte count out of range for {mountpoint!r:.80}",
            command="guest-exec",
        )
    return FstrimPath(mountpoint, trimmed=trimmed, minimum=minimum)


def _measure_all(
    target: Target, disks: Sequence[DiskRef]
) -> list[tuple[int | None, str | None, str | None]]:
    """(bytes, how, error) per disk; one unreadable disk must not hide the others."""
    out: list[tuple[int | None, str | None, str | None]] = []
    for disk in disks:
        try:
            value, how = target.measure(disk)
            out.append((value, how, None))
        except VmtrimError as exc:
            out.append((None, None, exc.one_line()))
        except Exception as exc:
            out.append((None, None, f"{type(exc).__name__}: {exc}"))
    return out


@dataclass
class _Clock:
    """A target's deadline: it moves once, when the guest turns out to be Windows."""

    start: float
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


def trim_target(target: Target, options: TrimOptions) -> TrimResult:
    """Trim one target; never raises, never takes much longer than its timeout
    (``options.timeout``, or ``timeout_windows`` for a Windows guest)."""
    start = time.monotonic()
    clock = _Clock(start, start + options.timeout)
    pending: set[str] = set()  # calls still running in abandoned threads
    try:
        # The grace lets the agent's own deadline (the same instant) report first, with
        # its clearer reason; the run still ends within the documented bound.
        result = _until(lambda: _guarded(target, options, clock, pending), clock)
    except AgentUnavailable:
        # The abandoned run keeps its own TrimResult; this one is the caller's.
        pending.add("trim")
        result = TrimResult(
            domain=target.name,
            status=SKIPPED,
            reason=f"did not finish within --timeout {clock.deadline - start:g} s",
        )
    if result.status == TRIMMED and shortfall(result):
        _diagnose(result, target, clock.deadline + GRACE, pending)
    if options.explain and result.status in (TRIMMED, NO_EFFECT):
        _explain(result, target, clock.deadline + GRACE, pending)
    if not pending:
        # A connection an abandoned thread is still inside must not be closed under it;
        # the process exit reclaims it.
        with suppress(Exception):
            target.close()
    result.seconds = time.monotonic() - start
    log.debug("%s: %s in %.3f s (%s)", target.name, result.status, result.seconds, result.reason)
    return result


def _until(fn: Callable[[], TrimResult], clock: _Clock) -> TrimResult:
    """``fn`` in a daemon thread, abandoned at ``clock.deadline`` + GRACE; the deadline
    may move later while it runs (a Windows guest), so the wait follows it."""
    box: list[TrimResult] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(fn())
        finally:
            done.set()

    threading.Thread(target=run, name="vmtrim-trim", daemon=True).start()
    while not done.wait(max(0.0, clock.deadline + GRACE - time.monotonic())):
        if time.monotonic() >= clock.deadline + GRACE:
            raise AgentUnavailable("trim: no answer in time")
    return box[0]  # _guarded never raises


def _guarded(target: Target, options: TrimOptions, clock: _Clock, pending: set[str]) -> TrimResult:
    result = TrimResult(domain=target.name)
    try:
        _trim_into(result, target, options, clock, pending)
    except AgentUnavailable as exc:
        result.status, result.reason = SKIPPED, str(exc)
    except AgentCommandFailed as exc:
        result.status, result.reason = FAILED, str(exc)
    except VmtrimError as exc:  # e.g. unreadable domain XML
        result.status, result.reason = FAILED, exc.one_line()
    except Exception as exc:  # a vanished domain, a library bug: report, don't stop the run
        result.status, result.reason = FAILED, f"{type(exc).__name__}: {exc}"
    return result


def _bounded(what: str, call: Callable[[], T], deadline: float, pending: set[str]) -> T:
    """``call`` within what is left of the target's time, marked pending while it runs."""

    def run() -> T:
        try:
            return call()
        finally:
            pending.discard(what)  # done: its connection may be closed

    pending.add(what)
    return call_with_deadline(run, deadline - time.monotonic(), what)


def _one_line(exc: Exception) -> str:
    return exc.one_line() if isinstance(exc, VmtrimError) else f"{type(exc).__name__}: {exc}"


def _diagnose(result: TrimResult, target: Target, deadline: float, pending: set[str]) -> None:
    """The host got back far less than the guest trimmed: which layer dropped it?

    The audit runs after the trim, in what is left of the target's --timeout; the
    trim's result stands whatever the audit does.
    """
    said = (
        f"the host got back {_human(result.reclaimed_bytes)} of the"
        f" {_human(result.guest_trimmed_bytes)} the guest trimmed"
    )
    try:
        blockers = _bounded("audit", target.blockers, deadline, pending)
    except Exception as exc:  # the trim result stands; say why there is no verdict
        result.reason = f"{said}; the audit could not tell why: {_one_line(exc)}"
        return
    if not blockers:
        result.reason = (
            f"{said}; the audit finds no layer that drops discards"
            " (the space may already have been free on the host)"
        )
        return
    result.status = NO_EFFECT
    result.blockers = blockers
    result.reason = f"{said}: " + "; ".join(b.sentence() for b in blockers)


def _explain(result: TrimResult, target: Target, deadline: float, pending: set[str]) -> None:
    """--explain: the causes that apply to each disk that fell short (the trim stands)."""
    result.explained = True
    if result.paths and not result.guest_counted:
        result.explain_note = (
            f"{WINDOWS_NO_COUNTS.summary}: there is no guest figure to compare it with"
        )
        return
    try:
        evidence = _bounded(
            "explain", lambda: target.evidence(deadline - time.monotonic()), deadline, pending
        )
    except Exception as exc:
        result.explain_note = f"the causes could not be read: {_one_line(exc)}"
        return
    by_disk = guest_by_disk(result.paths, evidence.path_disks)
    whole = shortfall(result)  # without a path-to-disk map, the domain's figures decide
    short: set[str] = set()
    for disk in result.disks:
        disk.guest_trimmed = by_disk.get(disk.target)
        if (
            falls_short(disk.guest_trimmed, disk.reclaimed_bytes)
            if evidence.path_disks is not None
            else whole
        ):
            short.add(disk.target)
    any_short = whole or bool(short)
    if short:  # the image headers, host probes and guest sysfs only where they can explain
        try:
            _bounded("explain", lambda: evidence.fill(short), deadline, pending)
        except Exception as exc:
            result.explain_note = f"the causes could not be read: {_one_line(exc)}"
            return
    for disk in result.disks:
        facts = evidence.disks.get(disk.target)
        disk.causes = []
        if facts is None:
            continue
        if disk.target in short:
            disk.causes += disk_causes(facts)
        disk.causes += already_trimmed(facts, paths_on(disk.target, result.paths, evidence))
    if any_short and not result.causes:
        result.explain_note = (
            "no known cause applies: the space the guest trimmed may never have been"
            " allocated on the host (a first fstrim reports all free space)"
        )


def _human(n: int | None) -> str:
    from vmtrim.output import human_bytes

    return human_bytes(n)


def _os_id(target: Target, clock: _Clock, pending: set[str]) -> str | None:
    """guest-get-osinfo's id; an agent that cannot say (an old qemu-ga) is not Windows."""
    try:
        return _bounded("osinfo", lambda: target.os_id(clock.left()), clock.deadline, pending)
    except AgentCommandFailed:
        return None


def _pools(target: Target, disks: Sequence[DiskRef]) -> list[PoolUsage | None]:
    out: list[PoolUsage | None] = []
    for disk in disks:
        try:
            out.append(target.pool_usage(disk))
        except Exception as exc:  # the pool is extra: it never fails the trim
            log.debug("%s: pool of %s: %s", target.name, disk.target, exc)
            out.append(None)
    return out


def _trim_into(
    result: TrimResult, target: Target, options: TrimOptions, clock: _Clock, pending: set[str]
) -> None:
    reason = target.skip_reason()
    result.domain = target.name  # a QEMU target learns its -name from QMP here
    if reason:
        result.status, result.reason = SKIPPED, reason
        return
    if options.os_id is not None:
        result.os_id = options.os_id
    elif options.timeout_windows is not None:
        result.os_id = _os_id(target, clock, pending)
    if result.windows and options.timeout_windows is not None:
        clock.deadline = clock.start + options.timeout_windows
    disks = target.disks()
    pools_before = _pools(target, disks)
    before = _measure_all(target, disks)
    counters_before = target.unmap_counters()
    result.disks = [
        DiskResult(
            d.target, d.source, allocated_before=v, measured_by=how, error=err, pool_before=pool
        )
        for d, (v, how, err), pool in zip(disks, before, pools_before, strict=True)
    ]
    agent_start = time.monotonic()

    def trim_in_guest() -> list[FstrimPath]:
        pending.add("agent")
        try:
            agent = target.agent(clock.left())
            if options.mountpoint:
                return [fstrim_one(agent, options.mountpoint, options.minimum, clock.left())]
            return agent.fstrim(options.minimum, timeout=clock.left()).paths
        finally:
            pending.discard("agent")

    try:
        result.paths = call_with_deadline(
            trim_in_guest, clock.deadline - agent_start, "guest agent"
        )
    finally:
        result.agent_seconds = time.monotonic() - agent_start
    after = _measure_all(target, disks)
    for disk, (value, how, err) in zip(result.disks, after, strict=True):
        disk.allocated_after = value
        disk.measured_by = disk.measured_by or how
        disk.error = disk.error or err
    for disk, pool in zip(result.disks, _pools(target, disks), strict=True):
        disk.pool_after = pool
    counters_after = target.unmap_counters()
    if counters_before is not None and counters_after is not None:
        for ref, disk in zip(disks, result.disks, strict=True):
            key = ref.key or ref.target
            if key in counters_before and key in counters_after:
                (b0, o0), (b1, o1) = counters_before[key], counters_after[key]
                disk.unmap_bytes, disk.unmap_operations = b1 - b0, o1 - o0
    errors = [p for p in result.paths if p.error]
    if result.paths and len(errors) == len(result.paths):
        result.status = FAILED
        result.reason = "; ".join(f"{p.path}: {p.error}" for p in errors)
    elif not result.paths:
        result.reason = "the guest has no filesystem that can be trimmed"
    elif result.note:
        result.reason = result.note


def trim_all(
    targets: Iterable[Target],
    options: TrimOptions,
    on_done: Callable[[TrimResult], None] | None = None,
) -> list[TrimResult]:
    """Trim every target, ``options.parallel`` at a time; results in the targets' order."""
    targets = list(targets)
    with ThreadPoolExecutor(
        max_workers=max(1, options.parallel), thread_name_prefix="vmtrim-trim"
    ) as pool:
        futures = [pool.submit(trim_target, t, options) for t in targets]
        if on_done is not None:
            for future in futures:
                future.add_done_callback(lambda f: on_done(f.result()))
        return [f.result() for f in futures]
