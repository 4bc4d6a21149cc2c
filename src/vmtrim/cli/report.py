"""``vmtrim report``: one self-contained HTML file about the fleet's space (no network)."""

from __future__ import annotations

from pathlib import Path

import click

from vmtrim.cli.options import db_option
from vmtrim.errors import EXIT_OK


@click.command("report")
@db_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("vmtrim-report.html"),
    show_default=True,
    help="Where to write the HTML file.",
)
@click.option(
    "--since",
    default="90d",
    show_default=True,
    metavar="AGE|DATE",
    help="The period the charts and the reclaimed total cover.",
)
def report(db: Path | None, output: Path, since: str) -> int:
    """Write an HTML report: fleet summary, charts, top wasters, blocked disks."""
    from vmtrim._util.files import atomic_write
    from vmtrim.cli.history import parse_since
    from vmtrim.history.store import History
    from vmtrim.output import print_note
    from vmtrim.report.html import render_report

    since_ts = parse_since(since)
    with History.open(db, create=False) as history:
        page = render_report(history, since_ts)
    atomic_write(output, page.encode())
    print_note(f"wrote {output}", err=True)
    return EXIT_OK
