"""The lines below a trim's rows, one renderer for every table that shows trims.

``vmtrim trim``, its fleet form (``--hosts``, each line after its host) and ``vmtrim
run`` (from the history's disk records) print the same lines for a disk:

- its thin pool before and after::

    sdb: thin pool vg/pool (discards=passdown): data 61.20 % (300.0 MiB) ->
      40.10 % (196.0 MiB), got back 104.0 MiB  (one line)

- with ``--explain`` (always on in ``run``), when it fell short, the figures and one line
  per cause, its stable id first::

    sdb: got back 0 B of the 24.0 MiB the guest trimmed on it
    sdb: why: internal_snapshots: ...

and, for a trim, the domain's own lines around them: before, the reason (or the blockers
of a ``no_effect`` domain) and the paths that failed; after, what ``--explain`` could not
say (or that no disk fell short).

Plain functions of plain values, returning table cells (:data:`vmtrim.output.Cell`):
the table escapes them; nothing here is read as markup.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from vmtrim.output import Cell, Styled, human_bytes

if TYPE_CHECKING:
    from vmtrim.history.store import DiskRecord
    from vmtrim.storage.pool import PoolUsage
    from vmtrim.trim.engine import DiskResult, TrimResult

#: A status's colour in the trim tables (colour only on a colour terminal).
STATUS_STYLE = {"trimmed": "green", "no_effect": "red", "skipped": "yellow", "failed": "red"}


class Reading(NamedTuple):
    """One reading of a thin pool's data usage."""

    percent: float | None
    used_bytes: int | None


def pool_line(
    target: str,
    pool: str,
    discards: str | None,
    before: Reading | None,
    after: Reading | None,
    got_back: int | None,
) -> str:
    """``sdb: thin pool vg/pool (discards=passdown): data 61.20 % (300.0 MiB) -> ...``."""

    def reading(r: Reading | None) -> str:
        if r is None or r == (None, None):
            return "?"
        percent = "?" if r.percent is None else f"{r.percent:.2f} %"
        return f"{percent} ({human_bytes(r.used_bytes)})"

    tail = f", got back {human_bytes(got_back)}" if got_back is not None else ""
    return (
        f"{target}: thin pool {pool} (discards={discards}): data"
        f" {reading(before)} -> {reading(after)}{tail}"
    )


def cause_lines(
    target: str,
    reclaimed: int | None,
    guest_trimmed: int | None,
    causes: Sequence[tuple[str, str]],
) -> list[Cell]:
    """A disk's explained causes, ``(id, evidence)`` each: the figures, then one line each."""
    if not causes:
        return []
    lines: list[Cell] = []
    if guest_trimmed:
        lines.append(
            Styled(
                f"{target}: got back {human_bytes(reclaimed)} of the"
                f" {human_bytes(guest_trimmed)} the guest trimmed on it",
                "yellow",
            )
        )
    return lines + [f"{target}: why: {id_}: {evidence}" for id_, evidence in causes]


def _reading(u: PoolUsage | None) -> Reading | None:
    return None if u is None else Reading(u.data_percent, u.used_bytes)


def disk_lines(d: DiskResult) -> list[Cell]:
    """A trimmed disk's pool line and its causes (with ``--explain``)."""
    lines: list[Cell] = []
    pool = d.pool_before or d.pool_after
    if pool is not None:
        before, after = _reading(d.pool_before), _reading(d.pool_after)
        lines.append(pool_line(d.target, pool.pool, pool.discards, before, after, d.pool_reclaimed))
    causes = [(c.id, c.evidence) for c in d.causes or []]
    return lines + cause_lines(d.target, d.reclaimed_bytes, d.guest_trimmed, causes)


def record_lines(d: DiskRecord) -> list[Cell]:
    """The same lines for a disk as the history records it (``vmtrim run``)."""
    lines: list[Cell] = []
    if d.pool:
        before = Reading(d.pool_percent_before, d.pool_used_before)
        after = Reading(d.pool_percent_after, d.pool_used_after)
        lines.append(pool_line(d.target, d.pool, d.pool_discards, before, after, d.pool_reclaimed))
    causes = [(c["id"], c["evidence"]) for c in json.loads(d.causes)] if d.causes else []
    return lines + cause_lines(d.target, d.reclaimed, d.guest_trimmed, causes)


def detail_lines(r: TrimResult) -> list[Cell]:
    """The lines below a domain's rows: why, which path failed, what blocks discard,
    then each disk's lines, then what ``--explain`` could not say."""
    lines: list[Cell] = []
    if r.blockers:
        lines.append(
            Styled(
                f"{r.status}: the host got back {human_bytes(r.reclaimed_bytes)} of the"
                f" {human_bytes(r.guest_trimmed_bytes)} the guest trimmed",
                "red",
            )
        )
        lines += [Styled(f"✗ {b.sentence()}", "red") for b in r.blockers]
    elif r.reason:
        lines.append(f"{r.status}: {r.reason}")
    errors = [f"{p.path}: {p.error}" for p in r.paths if p.error]
    lines += [e for e in errors if e not in (r.reason or "")]  # a failed domain's reason has them
    for d in r.disks:
        lines += disk_lines(d)
    if r.explained:
        if r.explain_note:
            lines.append(f"explain: {r.explain_note}")
        elif not r.causes:
            lines.append("explain: no disk fell short of what the guest trimmed on it")
    return lines
