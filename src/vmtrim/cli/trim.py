"""``vmtrim trim``: trim guests through their agent and show what the host got back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import click

from vmtrim.errors import EXIT_FINDINGS, EXIT_OK, BadInput
from vmtrim.trim.engine import (
    NOT_RUNNING,
    SCHEMA,
    TRIMMED,
    UPPER_BOUND_NOTE,
    DiskResult,
    Target,
    TrimOptions,
    TrimResult,
)


@click.command("trim")
@click.option(
    "-c", "--connect", "uri", metavar="URI", help="libvirt URI (default: $LIBVIRT_DEFAULT_URI)."
)
@click.option("--all", "every", is_flag=True, help="Trim every running domain.")
@click.option(
    "--minimum",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="BYTES",
    help="Skip free ranges smaller than this.",
)
@click.option(
    "--mountpoint",
    metavar="PATH",
    help="Trim only this guest mountpoint (runs fstrim through guest-exec).",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Trim N domains at a time.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="S",
    help="Skip a domain whose agent has not finished after S seconds.",
)
@click.option(
    "--qga", "qga", metavar="SOCKET", help="QEMU without libvirt: the guest agent's unix socket."
)
@click.option(
    "--qmp",
    "qmp",
    metavar="SOCKET",
    help="With --qga: the QMP socket, for disks and unmap counters.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.trim/1 JSON document.")
@click.argument("domains", nargs=-1, metavar="[DOMAIN...]")
def trim(
    uri: str | None,
    every: bool,
    minimum: int,
    mountpoint: str | None,
    parallel: int,
    timeout: float,
    qga: str | None,
    qmp: str | None,
    as_json: bool,
    domains: tuple[str, ...],
) -> int:
    """Trim guests through the guest agent and measure what the host got back.

    \b
    The guest's "trimmed" figures are upper bounds; the host's allocation,
    measured before and after, is what really came back.
    Exit: 0 every domain trimmed, 1 a domain was skipped or failed,
    2 bad input, 3 connection error.
    """
    options = TrimOptions(
        minimum=minimum, mountpoint=mountpoint, timeout=timeout, parallel=parallel
    )
    with ExitStack() as stack:
        if qga or qmp:
            if uri or every or domains:
                raise BadInput(
                    "--qga/--qmp talk to QEMU directly: give no -c, DOMAIN or --all",
                    subject="--qga",
                )
            if not qga:
                raise BadInput("trim needs the guest agent: add --qga SOCKET", subject="--qmp")
            from vmtrim.trim.qemu import QemuTarget

            targets: Sequence[Target] = [stack.enter_context(QemuTarget.open(qga, qmp))]
        else:
            from vmtrim.channels.libvirt import connection, select_domains
            from vmtrim.trim.libvirt import LibvirtTarget

            conn = stack.enter_context(connection(uri))
            targets = [LibvirtTarget(conn, d) for d in select_domains(conn, domains, every)]
        results = _run(targets, options, show_progress=True)
    if as_json:
        from vmtrim.output import print_json

        print_json(SCHEMA, {"note": UPPER_BOUND_NOTE, "domains": [r.to_json() for r in results]})
    else:
        _table(results)
    ok = all(r.status == TRIMMED or r.reason == NOT_RUNNING for r in results)
    return EXIT_OK if ok else EXIT_FINDINGS


def _run(targets: Sequence[Target], options: TrimOptions, show_progress: bool) -> list[TrimResult]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vmtrim.output import console
    from vmtrim.trim.engine import trim_all

    err = console(stderr=True)
    progress = Progress(
        TextColumn("trim"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=err,
        transient=True,
        disable=not (show_progress and err.is_terminal),
    )
    with progress:
        task = progress.add_task("", total=len(targets))
        done: Callable[[TrimResult], None] = lambda r: progress.update(  # noqa: E731
            task, advance=1, description=f"{r.domain}: {r.status}"
        )
        return trim_all(targets, options, on_done=done)


def _table(results: Sequence[TrimResult]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from vmtrim.output import console, human_bytes

    table = Table(
        title="vmtrim trim",
        caption="guest says: upper bound from FITRIM; reclaimed: measured on the host",
    )
    for name in (
        "domain",
        "status",
        "disk",
        "source",
        "before",
        "after",
        "reclaimed",
        "guest says",
        "secs",
    ):
        numeric = name in ("before", "after", "reclaimed", "guest says", "secs")
        table.add_column(
            name,
            justify="right" if numeric else "left",
            overflow="fold",
            no_wrap=name == "status",
            min_width=7 if name == "status" else None,
        )
    for r in results:
        rows: list[DiskResult | None] = [*r.disks] or [None]
        for i, d in enumerate(rows):
            first = i == 0
            table.add_row(
                r.domain if first else "",
                (r.status if first else ""),
                d.target if d else "-",
                (d.source or "-") if d else "-",
                human_bytes(d.allocated_before) if d else "-",
                human_bytes(d.allocated_after) if d else "-",
                human_bytes(d.reclaimed_bytes) if d else "-",
                human_bytes(r.guest_trimmed_bytes) if first and r.paths else "",
                f"{r.seconds:.2f}" if first else "",
            )
    out = console()
    out.print(table)
    # Reasons are sentences: below the table, not squeezed into a column.
    for r in results:
        if r.reason:
            out.print(f"{escape(r.domain)}: {r.status}: {escape(r.reason)}")
        for p in r.paths:
            if p.error:
                out.print(f"{escape(r.domain)}: {escape(p.path)}: {escape(p.error)}")
