"""``vmtrim history``: what each domain got back, run after run, from the history database.

Fleet domains (``run``, ``trim``, ``watch``) by default; ``--verify`` shows the verify
cells instead, which are kept apart. Exit codes: 0, 2 bad input, 3 the database is
corrupt, locked or from a newer vmtrim.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vmtrim.cli.options import db_option
from vmtrim.errors import EXIT_OK, BadInput

if TYPE_CHECKING:
    from vmtrim.history.query import DomainSummary

SCHEMA = "vmtrim.history/1"
SPARKS = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 24


@click.command("history")
@click.option(
    "--since",
    metavar="AGE|DATE",
    help="Only results newer than this: an age (30d, 12h) or a date (2026-11-01).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.history/1 JSON document.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one line per domain.")
@click.option("--verify", "verify_cells", is_flag=True, help="Show verify cells, not domains.")
@db_option
@click.argument("domains", nargs=-1, metavar="[DOMAIN...]")
def history(
    since: str | None,
    as_json: bool,
    as_csv: bool,
    verify_cells: bool,
    db: Path | None,
    domains: tuple[str, ...],
) -> int:
    """Per domain: runs, total and last reclaimed, last status, allocation over time.

    \b
    Exit: 0, 2 bad input, 3 the database is corrupt, locked or from a newer vmtrim.
    """
    from vmtrim.history.query import domain_summaries
    from vmtrim.history.store import FLEET_KINDS, History, default_db_path

    if as_json and as_csv:
        raise click.UsageError("--json and --csv: choose one")
    since_ts = parse_since(since) if since else None
    kinds = ("verify",) if verify_cells else FLEET_KINDS
    path = db or default_db_path()
    summaries: list[DomainSummary] = []
    if path.exists():
        sparkline = not (as_json or as_csv) and _terminal()
        with History.open(path, create=False) as store:
            summaries = domain_summaries(store, domains, since_ts, kinds, with_allocation=sparkline)
    if as_json:
        from vmtrim.output import print_json

        print_json(
            SCHEMA,
            {
                "db": str(path),
                "since": since_ts,
                "kinds": list(kinds),
                "domains": [s.to_json() for s in summaries],
            },
        )
    elif as_csv:
        _csv(summaries)
    else:
        _table(summaries, path)
    return EXIT_OK


def parse_since(text: str) -> float:
    """'30d' -> now minus 30 days; '2026-11-01' -> that local midnight. BadInput otherwise."""
    from vmtrim.run.policy import parse_duration

    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadInput(
            "not an age (30d, 12h) or a date (2026-11-01)", subject=f"--since {text}"
        ) from None


def _terminal() -> bool:
    from vmtrim.output import console

    return console().is_terminal


def sparkline(values: list[int], points: int = SPARK_POINTS) -> str:
    """The last ``points`` values as block characters, lowest ▁ to highest █."""
    values = values[-points:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(
        SPARKS[0 if span == 0 else round((v - low) / span * (len(SPARKS) - 1))] for v in values
    )


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _csv(summaries: list[DomainSummary]) -> None:
    import csv
    import sys

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(
        ["domain", "runs", "total_reclaimed", "last_reclaimed", "last_status", "last", "reason"]
    )
    for s in summaries:
        writer.writerow(
            [
                s.domain,
                s.runs,
                s.total_reclaimed,
                "" if s.last_reclaimed is None else s.last_reclaimed,
                s.last_status,
                datetime.fromtimestamp(s.last_started).isoformat(timespec="seconds"),
                s.last_reason or "",
            ]
        )


def _table(summaries: list[DomainSummary], path: Path) -> None:
    from vmtrim.output import Column, Row, Styled, human_bytes, print_line, render_table

    if not summaries:
        print_line(f"no results recorded (in {path})")
        return
    styles = {"trimmed": "green", "blocked": "red", "failed": "bold red", "skipped": "yellow"}
    spark = any(s.allocation for s in summaries)
    rows = [
        Row(
            [
                s.domain,
                str(s.runs),
                human_bytes(s.total_reclaimed),
                human_bytes(s.last_reclaimed),
                Styled(s.last_status, styles.get(s.last_status)),
                _when(s.last_started),
                *([sparkline([b for _, b in s.allocation])] if spark else []),
            ],
            details=[s.last_reason] if s.last_reason and s.last_status != "trimmed" else [],
        )
        for s in summaries
    ]
    render_table(
        [
            Column("domain", shorten="middle"),
            Column("runs", justify="right"),
            Column("reclaimed", justify="right"),
            Column("last reclaimed", justify="right"),
            Column("last status"),
            Column("last run", priority=2),
            *([Column("allocation", priority=1)] if spark else []),
        ],
        rows,
        notes=["allocation: the host allocation after each run, oldest left"] if spark else [],
    )
