"""What the history says about every disk now, and what came back over time.

Both the Prometheus metrics and the HTML report are views of the same few queries
over :mod:`vmtrim.history`: the latest result of each (host, domain, disk), the
reclaimed bytes summed per disk, the trims per status, and the last run of each kind.
Only fleet runs count (``run``, ``trim``, ``watch``); verify cells are kept apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmtrim.history.store import FLEET_KINDS, History


@dataclass(frozen=True)
class DiskState:
    """The latest recorded result of one disk, with its reclaimed total."""

    host: str
    domain: str
    target: str
    source: str
    virtual: int | None
    allocated: int | None
    guest_used: int | None
    reclaimable: int | None
    verdict: str | None
    layer: str | None
    reason: str | None
    seen: float
    reclaimed_total: int


@dataclass(frozen=True)
class TrimCount:
    host: str
    domain: str
    status: str
    count: int


@dataclass(frozen=True)
class LastRun:
    kind: str
    started: float
    ended: float | None


def _marks(items: Sequence[str]) -> str:
    return ", ".join("?" * len(items))


def disk_states(history: History, kinds: Sequence[str] = FLEET_KINDS) -> list[DiskState]:
    """One row per (host, domain, target): its latest result, and everything it gave back.

    SQLite takes the bare columns from the row that holds MAX(started), so this is one
    pass over the results. Negative "reclaimed" (the disk grew while it was trimmed) does
    not count against the total: a counter never goes down.
    """
    sql = (
        "SELECT runs.host, r.domain, d.target, COALESCE(d.source, ''), d.virtual_size,"
        " COALESCE(d.allocated_after, d.allocated_before), d.guest_used,"
        " COALESCE(d.reclaimable_after, d.reclaimable_before), d.verdict, d.blocking_layer,"
        " d.blocking_reason, MAX(r.started),"
        " SUM(CASE WHEN d.reclaimed > 0 THEN d.reclaimed ELSE 0 END)"
        " FROM disk_results d JOIN domain_results r ON r.id = d.result_id"
        " JOIN runs ON runs.id = r.run_id"
        f" WHERE runs.kind IN ({_marks(kinds)})"
        " GROUP BY runs.host, r.domain, d.target ORDER BY runs.host, r.domain, d.target"
    )
    with history._guard():
        return [DiskState(*row) for row in history.db.execute(sql, list(kinds))]


def trim_counts(history: History, kinds: Sequence[str] = FLEET_KINDS) -> list[TrimCount]:
    sql = (
        "SELECT runs.host, r.domain, r.status, COUNT(*)"
        " FROM domain_results r JOIN runs ON runs.id = r.run_id"
        f" WHERE runs.kind IN ({_marks(kinds)})"
        " GROUP BY runs.host, r.domain, r.status ORDER BY runs.host, r.domain, r.status"
    )
    with history._guard():
        return [TrimCount(*row) for row in history.db.execute(sql, list(kinds))]


def last_runs(history: History, kinds: Sequence[str] = FLEET_KINDS) -> list[LastRun]:
    """The most recent run of each kind (finished or not)."""
    sql = (
        "SELECT kind, MAX(started), ended FROM runs"
        f" WHERE kind IN ({_marks(kinds)}) GROUP BY kind ORDER BY kind"
    )
    with history._guard():
        return [LastRun(*row) for row in history.db.execute(sql, list(kinds))]


@dataclass(frozen=True)
class ResultPoint:
    """One domain result over time: its disks' allocation and guest use, what came back."""

    run_id: int
    domain: str
    started: float
    status: str
    allocated: int | None
    guest_used: int | None
    reclaimed: int


def result_points(
    history: History, since: float | None = None, kinds: Sequence[str] = FLEET_KINDS
) -> list[ResultPoint]:
    """Every fleet result since ``since``, oldest first, with its disks summed."""
    params: list[object] = list(kinds)
    where = f"runs.kind IN ({_marks(kinds)})"
    if since is not None:
        where += " AND r.started >= ?"
        params.append(since)
    sql = (
        "SELECT r.run_id, r.domain, r.started, r.status,"
        " SUM(COALESCE(d.allocated_after, d.allocated_before)), SUM(d.guest_used),"
        " SUM(CASE WHEN d.reclaimed > 0 THEN d.reclaimed ELSE 0 END)"
        " FROM domain_results r JOIN runs ON runs.id = r.run_id"
        " JOIN disk_results d ON d.result_id = r.id"
        f" WHERE {where} GROUP BY r.id ORDER BY r.started, r.id"
    )
    with history._guard():
        return [ResultPoint(*row) for row in history.db.execute(sql, params)]
