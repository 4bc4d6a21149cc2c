"""Recording into the history without ever losing a result.

:class:`Recorder` opens the database and writes each result as it comes. If the
database is corrupt, locked or unwritable, it keeps the first error, stops writing,
and lets the command go on: the command prints its results, then says they were not
recorded and exits 3 (:meth:`Recorder.report`).

:func:`record_trim` and :func:`record_verify` are the one call ``vmtrim trim`` and
``vmtrim verify`` make after their work.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vmtrim.errors import EXIT_ENVIRONMENT, HistoryUnavailable
from vmtrim.history.store import DiskRecord, DomainRecord, History

if TYPE_CHECKING:
    from vmtrim.trim.engine import DiskResult, TrimResult
    from vmtrim.verify.engine import CellResult


class Recorder:
    """One run in the history, written domain by domain; failures are kept, not raised."""

    def __init__(
        self,
        db: str | Path | None,
        kind: str,
        *,
        policy_hash: str | None = None,
        trigger: str | None = None,
    ) -> None:
        self.error: HistoryUnavailable | None = None
        self.history: History | None = None
        self.run_id: int | None = None
        self.recorded = 0
        try:
            self.history = History.open(db)
            self.run_id = self.history.begin_run(kind, policy_hash=policy_hash, trigger=trigger)
        except HistoryUnavailable as exc:
            self.error = exc
            self.close()

    @property
    def path(self) -> str | None:
        return str(self.history.path) if self.history else None

    def record(self, result: DomainRecord) -> None:
        if self.history is None or self.run_id is None:
            return
        try:
            self.history.record(self.run_id, result)
            self.recorded += 1
        except HistoryUnavailable as exc:
            self.error = exc
            self.close()

    def finish(self) -> None:
        if self.history is not None and self.run_id is not None:
            try:
                self.history.end_run(self.run_id)
            except HistoryUnavailable as exc:
                self.error = exc
        self.close()

    def close(self) -> None:
        if self.history is not None:
            self.history.close()
            self.history = None

    def report(self) -> int | None:
        """Say on stderr that results were not recorded; EXIT_ENVIRONMENT, or None if all was."""
        if self.error is None:
            return None
        note = (
            f" ({self.recorded} result(s) before the failure were recorded)"
            if self.recorded
            else ""
        )
        sys.stderr.write(
            f"vmtrim: {self.error.one_line()}; these results were not recorded{note}\n"
        )
        return EXIT_ENVIRONMENT


def trim_record(result: TrimResult, uri: str | None = None) -> DomainRecord:
    """A ``vmtrim trim`` result as a history record (no audit: verdicts stay unknown)."""
    blockers = getattr(result, "blockers", None) or []
    record = DomainRecord(
        domain=result.domain,
        status=result.status,
        reason=result.reason,
        uri=uri,
        blocking_layer=blockers[0].layer if blockers else None,
        seconds=result.seconds,
        agent_seconds=result.agent_seconds,
        guest_trimmed=result.guest_trimmed_bytes if result.guest_counted else None,
        disks=[
            DiskRecord(
                target=d.target,
                source=d.source,
                allocated_before=d.allocated_before,
                allocated_after=d.allocated_after,
                unmap_bytes=d.unmap_bytes,
                unmap_operations=d.unmap_operations,
                measured_by=d.measured_by,
                error=d.error,
                blocking_layer=next((b.layer for b in blockers if b.disk == d.target), None),
                guest_trimmed=d.guest_trimmed,
            )
            for d in result.disks
        ],
    )
    for disk, measured in zip(record.disks, result.disks, strict=True):
        add_pool_and_causes(disk, measured)
    return record


def add_pool_and_causes(disk: DiskRecord, measured: DiskResult) -> None:
    """The trim's pool readings and --explain causes of one disk, into its record."""
    pool = measured.pool_before or measured.pool_after
    if pool is not None:
        disk.pool, disk.pool_discards = pool.pool, pool.discards
    if measured.pool_before is not None:
        disk.pool_used_before = measured.pool_before.used_bytes
        disk.pool_percent_before = measured.pool_before.data_percent
    if measured.pool_after is not None:
        disk.pool_used_after = measured.pool_after.used_bytes
        disk.pool_percent_after = measured.pool_after.data_percent
    if measured.causes is not None:
        disk.causes = json.dumps(
            [
                {k: v for k, v in c.to_json().items() if k in ("id", "disk", "evidence", "facts")}
                for c in measured.causes
            ]
        )


def record_trim(
    results: Sequence[TrimResult], db: str | Path | None = None, uri: str | None = None
) -> int | None:
    """Record a ``vmtrim trim``; None when recorded, else the exit code (3) after saying so.

    ``uri`` is the -c option (resolved here as the trim resolved it), None for --qga.
    """
    from vmtrim.channels.libvirt import resolve_uri

    uri = resolve_uri(uri) if uri is not None else None
    return record_all(db, "trim", [trim_record(result, uri) for result in results])


def record_all(db: str | Path | None, kind: str, records: Sequence[DomainRecord]) -> int | None:
    """One run of ``kind`` with ``records``; None when recorded, else 3 after saying so."""
    recorder = Recorder(db, kind, trigger="command line")
    for record in records:
        recorder.record(record)
    recorder.finish()
    return recorder.report()


def cell_name(cell: CellResult) -> str:
    return f"{cell.bus}/{cell.format}/{cell.mode}/{cell.discard}/{cell.fs}"


def verify_record(cell: CellResult) -> DomainRecord:
    """A verify cell as a history record: its name is the cell, its kind 'verify'."""
    reason: str | None
    if cell.error:
        status, reason = "failed", cell.error
    elif not cell.ok:
        status, reason = "failed", f"expected {cell.expected}, measured {cell.measured}"
    else:
        status = "trimmed" if cell.measured == "reclaim" else "no_effect"
        reason = cell.expected_because or None
    return DomainRecord(
        domain=cell_name(cell),
        status=status,
        reason=reason,
        seconds=cell.seconds,
        guest_trimmed=cell.trimmed_reported,
        disks=[
            DiskRecord(
                target=cell.bus,
                allocated_before=cell.allocated_before,
                allocated_after=cell.allocated_after,
                guest_trimmed=cell.trimmed_reported,
                measured_by="du",
                error=cell.trim_error,
            )
        ],
    )


def record_verify(cells: Sequence[CellResult], db: str | Path | None = None) -> int | None:
    """Record ``vmtrim verify`` cells as one verify run, apart from the fleet's domains."""
    return record_all(db, "verify", [verify_record(cell) for cell in cells])
