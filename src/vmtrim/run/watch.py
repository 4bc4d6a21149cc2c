"""``vmtrim watch``: trim a domain after the events that leave space behind.

It subscribes to libvirt's domain events (``virConnectDomainEventRegisterAny``, with
libvirt's default event loop running in a thread of its own):

- a block job completed: copy (``virsh blockcopy``, a disk move) or commit (active
  or not): the new image holds every block the old one had, freed ones included;
- a migration into this host finished (``RESUMED`` / ``MIGRATED``): the copy
  arrived with the guest's freed blocks too;
- a domain started, restored, or reverted to a snapshot: its guest agent is not up
  yet, so the wait starts when the agent connects (``AGENT_LIFECYCLE`` connected,
  within ten minutes; a domain without an agent is let be, there is nothing to ask).

Each event (for a domain the policy selects) waits ``settle`` seconds (the policy's
``settle``; a new event for the same domain restarts the wait and adds its reason),
then the domain gets one pass of :func:`vmtrim.run.engine.process` (survey, audit,
trim, measure, estimate), recorded in the history as a ``watch`` run whose trigger is
the event. The trims run one at a time, each under the run lock, so ``vmtrim run``
and ``watch`` never trim at once.

SIGTERM or Ctrl-C stops it cleanly: a trim in progress finishes and is recorded,
then the connections close. A connection that drops (libvirtd restarted, the
keepalive timed out) is retried with exponential backoff (1 s doubling to 60 s);
every attempt and every reconnect is logged (events while disconnected are lost).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtrim._util.log import get_logger
from vmtrim.channels.libvirt import Connection, error_text, libvirt_module, open_connection
from vmtrim.channels.libvirt_events import start_event_loop
from vmtrim.errors import EnvironmentProblem, LockHeld
from vmtrim.run.policy import Policy

log = get_logger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
KEEPALIVE = (5, 3)  # seconds between probes, probes missed before the link is dead
AGENT_WAIT = 600.0  # a started domain whose agent has not connected by then is let be


def describe_lifecycle(libvirt: Any, event: int, detail: int) -> str | None:
    """The reason to trim for a lifecycle event, or None for events that do not free space."""
    if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
        return {
            libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED: "domain started",
            libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED: "domain restored",
            libvirt.VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT: "domain started from a snapshot",
        }.get(detail)  # STARTED/MIGRATED: the migration is not over until RESUMED/MIGRATED
    if event == libvirt.VIR_DOMAIN_EVENT_RESUMED and detail in (
        libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED,
        getattr(libvirt, "VIR_DOMAIN_EVENT_RESUMED_POSTCOPY", -1),
    ):
        return "migration into this host finished"
    return None


def describe_block_job(libvirt: Any, disk: str, kind: int, status: int) -> str | None:
    if status != libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED:
        return None
    name = {
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
        libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active commit",
    }.get(kind)
    return f"block job {name} on {disk} completed" if name else None


@dataclass
class Pending:
    uri: str
    uuid: str
    name: str
    due: float
    reasons: list[str] = field(default_factory=list)


@dataclass
class Link:
    """One URI: its connection (None while down) and the reconnect schedule."""

    uri: str
    conn: Connection | None = None
    callbacks: list[int] = field(default_factory=list)
    dropped: str | None = None  # why it closed, set from the event thread
    next_try: float = 0.0
    backoff: float = BACKOFF_FIRST
    attempts: int = 0


class Watcher:
    """Events in (event thread), trims out (the caller's thread, in :meth:`run`)."""

    def __init__(
        self,
        uris: Sequence[str],
        policy: Policy,
        *,
        db: str | Path | None = None,
        lock: str | Path | None = None,
        say: Callable[[str], None] = print,
        on_result: Callable[[Any], None] | None = None,
    ) -> None:
        self.links = [Link(uri) for uri in uris]
        self.policy = policy
        self.db = db
        self.lock = lock
        self.say = say
        self.on_result = on_result
        self.stop = threading.Event()
        self.wake = threading.Condition()
        self.pending: dict[tuple[str, str], Pending] = {}
        # Started or restored domains waiting for their agent: key -> (since, reason).
        self.starting: dict[tuple[str, str], tuple[float, str]] = {}

    # --- the event thread ---------------------------------------------------------------

    def _event(self, link: Link, dom: Any, reason: str) -> None:
        name = str(dom.name())
        if not self.policy.selects(name):
            log.debug("%s: %s (not selected by the policy)", name, reason)
            return
        key = (link.uri, str(dom.UUIDString()))
        with self.wake:
            item = self.pending.setdefault(key, Pending(link.uri, key[1], name, 0.0))
            item.due = time.monotonic() + self.policy.settle
            if reason not in item.reasons:
                item.reasons.append(reason)
            self.wake.notify()
        self.say(f"{name}: {reason}; trim in {self.policy.settle:g} s")

    def _started(self, link: Link, dom: Any, reason: str) -> None:
        """A booting guest's agent is not up yet: wait for it, then settle, then trim."""
        name = str(dom.name())
        if not self.policy.selects(name):
            return
        now = time.monotonic()
        with self.wake:
            for key, (since, _) in list(self.starting.items()):
                if now - since > AGENT_WAIT:
                    del self.starting[key]
            self.starting[(link.uri, str(dom.UUIDString()))] = (now, reason)
        self.say(f"{name}: {reason}; trim once its guest agent connects")

    def _agent(self, link: Link, dom: Any) -> None:
        with self.wake:
            waiting = self.starting.pop((link.uri, str(dom.UUIDString())), None)
        if waiting is not None and time.monotonic() - waiting[0] <= AGENT_WAIT:
            self._event(link, dom, f"{waiting[1]}; guest agent connected")

    def _register(self, link: Link) -> None:
        libvirt = libvirt_module()
        assert link.conn is not None
        raw = link.conn.conn

        def lifecycle(_c: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
            reason = describe_lifecycle(libvirt, event, detail)
            if reason and event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                self._started(link, dom, reason)
            elif reason:
                self._event(link, dom, reason)

        def agent(_c: Any, dom: Any, state: int, _reason: int, _o: Any) -> None:
            if state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED:
                self._agent(link, dom)

        def block_job(_c: Any, dom: Any, disk: str, kind: int, status: int, _o: Any) -> None:
            reason = describe_block_job(libvirt, disk, kind, status)
            if reason:
                self._event(link, dom, reason)

        def closed(_c: Any, why: int, _o: Any) -> None:
            names = {
                libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "an error",
                libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file",
                libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
                libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us",
            }
            link.dropped = names.get(why, f"reason {why}")
            with self.wake:
                self.wake.notify()

        raw.setKeepAlive(*KEEPALIVE)
        raw.registerCloseCallback(closed, None)
        link.callbacks = [
            raw.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
            ),
            raw.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block_job, None
            ),
            raw.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent, None
            ),
        ]

    # --- connections ----------------------------------------------------------------------

    def _connect(self, link: Link) -> bool:
        link.attempts += 1
        try:
            link.conn = open_connection(link.uri)
            link.dropped = None
            self._register(link)
        except (EnvironmentProblem, Exception) as exc:
            text = exc.message if isinstance(exc, EnvironmentProblem) else error_text(exc)
            self._drop(link)
            link.next_try = time.monotonic() + link.backoff
            self.say(f"{link.uri}: cannot connect: {text}; next try in {link.backoff:g} s")
            link.backoff = min(BACKOFF_MAX, link.backoff * 2)
            return False
        if link.attempts > 1:
            self.say(f"{link.uri}: reconnected after {link.attempts - 1} failed attempt(s)")
        link.attempts, link.backoff = 0, BACKOFF_FIRST
        return True

    def _drop(self, link: Link) -> None:
        if link.conn is not None:
            raw = link.conn.conn
            # On a connection that is already gone these fail: nothing is left to undo.
            for callback in link.callbacks:
                with contextlib.suppress(Exception):
                    raw.domainEventDeregisterAny(callback)
            with contextlib.suppress(Exception):
                raw.unregisterCloseCallback()
            link.conn.close()
        link.conn, link.callbacks = None, []

    def _check_links(self) -> None:
        for link in self.links:
            if link.conn is not None and link.dropped:
                self.say(f"{link.uri}: connection lost ({link.dropped}); reconnecting")
                self._drop(link)
                link.next_try = time.monotonic()
            if link.conn is None and time.monotonic() >= link.next_try:
                self._connect(link)

    # --- the main loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Watch until :attr:`stop` is set (a signal handler sets it)."""
        start_event_loop()
        for link in self.links:
            if self._connect(link):
                self.say(f"watching {link.uri} (settle {self.policy.settle:g} s)")
        while not self.stop.is_set():
            self._check_links()
            due = self._take_due()
            if due is not None:
                self._trim(due)
                continue
            with self.wake:
                self.wake.wait(timeout=self._sleep())
        for link in self.links:
            self._drop(link)

    def _sleep(self) -> float:
        now = time.monotonic()
        waits = [item.due - now for item in self.pending.values()]
        waits += [link.next_try - now for link in self.links if link.conn is None]
        return max(0.05, min([1.0, *waits]))

    def _take_due(self) -> Pending | None:
        with self.wake:
            now = time.monotonic()
            for key, item in sorted(self.pending.items(), key=lambda kv: kv[1].due):
                if item.due <= now:
                    del self.pending[key]
                    return item
        return None

    def _trim(self, item: Pending) -> None:
        from vmtrim.audit.hostprobe import HostProbes
        from vmtrim.run.engine import process
        from vmtrim.run.lock import run_lock
        from vmtrim.run.record import Recorder

        link = next(link for link in self.links if link.uri == item.uri)
        if link.conn is None:
            self.say(f"{item.name}: not trimmed: {item.uri} is disconnected")
            return
        libvirt = libvirt_module()
        try:
            dom = link.conn.conn.lookupByUUIDString(item.uuid)
        except libvirt.libvirtError as exc:
            self.say(f"{item.name}: not trimmed: {error_text(exc)}")
            return
        reason = "; ".join(item.reasons)
        waited = False
        while not self.stop.is_set():
            try:
                with run_lock(self.lock, wait=1.0):
                    outcome = process(
                        link.conn, dom, self.policy, HostProbes(local=link.conn.local)
                    )
                    recorder = Recorder(
                        self.db, "watch", policy_hash=self.policy.hash, trigger=reason
                    )
                    recorder.record(outcome.record)
                    recorder.finish()
                break
            except LockHeld as exc:
                if not waited:
                    self.say(f"{item.name}: waiting: {exc.message}")
                    waited = True
        else:
            return
        r = outcome.record
        from vmtrim.output import human_bytes

        got = f" {human_bytes(r.reclaimed)}" if r.reclaimed is not None else ""
        why = f": {r.reason}" if r.reason else ""
        self.say(f"{r.domain}: {r.status}{got} (after: {reason}){why}")
        if recorder.error is not None:
            self.say(f"{recorder.error.one_line()}; this result was not recorded")
        if self.on_result is not None:
            self.on_result((outcome, reason, recorder.error is None))
