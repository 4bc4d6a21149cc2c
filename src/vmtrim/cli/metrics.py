"""``vmtrim metrics``: the Prometheus metrics from the history, printed or as a textfile.

``--textfile DIR`` writes ``DIR/vmtrim.prom`` atomically for node_exporter's textfile
collector (point ``--collector.textfile.directory`` at DIR). Without it the metrics are
printed. A missing or corrupt database is ``vmtrim_history_up 0``, exit 0: the metric
says so. Exit 2 for a DIR that does not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmtrim.cli.options import db_option
from vmtrim.errors import EXIT_OK, BadInput


@click.command("metrics")
@click.option(
    "--textfile",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Write DIR/vmtrim.prom atomically (node_exporter's textfile collector).",
)
@db_option
def metrics(textfile: Path | None, db: Path | None) -> int:
    """Prometheus metrics from the history database (never asks a guest)."""
    from vmtrim.report.metrics import render, write_textfile

    if textfile is None:
        sys.stdout.buffer.write(render(db))
        sys.stdout.flush()
        return EXIT_OK
    if not textfile.is_dir() and textfile.suffix != ".prom":
        raise BadInput(
            "not a directory or a .prom file (give node_exporter's textfile directory)",
            str(textfile),
        )
    write_textfile(textfile, db)
    return EXIT_OK
