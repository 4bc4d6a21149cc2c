"""``vmtrim trim``: trim guests through their agent and show what the host got back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import click

from vmtrim.cli.options import hosts_options
from vmtrim.errors import EXIT_FINDINGS, EXIT_OK, BadInput
from vmtrim.facts import TRIM_CAUSES, WINDOWS_TRIM_TIMEOUT
from vmtrim.trim.engine import (
    SCHEMA,
    TRIMMED,
    UPPER_BOUND_NOTE,
    DiskResult,
    Target,
    TrimOptions,
    TrimResult,
)

CAPTION = "guest says: upper bound from FITRIM; reclaimed: measured on the host"
DEFAULT_TIMEOUT = 60.0


def _lists_cause_ids(f: Callable[..., int]) -> Callable[..., int]:
    """Put the explain cause ids (the facts table's, in its order) into the help."""
    import textwrap

    ids = "Explain causes (--explain; ids for scripts): " + ", ".join(TRIM_CAUSES) + "."
    lines = textwrap.wrap(ids, width=70, break_long_words=False, break_on_hyphens=False)
    f.__doc__ = (f.__doc__ or "").replace("{cause_ids}", "\n    ".join(lines))
    return f


@click.command("trim")
@hosts_options(
    "libvirt URI (default: $LIBVIRT_DEFAULT_URI); repeat it for several hosts.",
    "Work on N hosts at once (--parallel is per host).",
)
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Trim every running domain (shut-off domains are counted, not listed).",
)
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
    default=None,
    metavar="S",
    help="Skip a domain whose whole trim (agent, QMP, measuring) is not done after S"
    f" seconds [default: {DEFAULT_TIMEOUT:g}; {WINDOWS_TRIM_TIMEOUT:g} for a guest whose"
    " agent says Windows: its retrim takes minutes].",
)
@click.option(
    "--explain",
    is_flag=True,
    help="For each disk whose host figure fell clearly short of what the guest trimmed"
    " on it, list the causes that apply (with a stable id and the evidence).",
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
@click.option("--no-history", is_flag=True, help="Do not record this trim in the history.")
@click.option("--db", "history_db", metavar="FILE", help="The history database to record in.")
@click.argument("domains", nargs=-1, metavar="[DOMAIN...]")
@_lists_cause_ids
def trim(
    uris: tuple[str, ...],
    every: bool,
    minimum: int,
    mountpoint: str | None,
    parallel: int,
    timeout: float | None,
    qga: str | None,
    qmp: str | None,
    as_json: bool,
    domains: tuple[str, ...],
    no_history: bool = False,
    history_db: str | None = None,
    hosts_file: str | None = None,
    hosts_parallel: int = 8,
    connect_timeout: float = 15.0,
    explain: bool = False,
) -> int:
    """Trim guests through the guest agent and measure what the host got back.

    \b
    The guest's "trimmed" figures are upper bounds; the host's allocation,
    measured before and after, is what really came back.
    \b
    Status of each domain:
      trimmed    the host measured the result
      no_effect  the guest trimmed but the host got back (nearly) nothing, and
                 the audit names the layer that drops discards (and the fix)
      skipped    not running, no agent, or no answer within --timeout
      failed     the agent answered with an error or an unusable reply
    \b
    A disk on an LVM thin pool shows the pool's data usage before and after.
    Windows guests report no byte counts: the host figure is the measurement.
    \b
    {cause_ids}
    \b
    Exit codes: 0 every selected domain trimmed, 1 a domain was no_effect,
    skipped or failed (a named shut-off domain is skipped), 2 bad input,
    3 environment (connection, history), 4 internal error, 130 interrupted,
    141 stdout closed early. --all selects the running domains only, so
    shut-off ones do not change the exit code.
    """
    options = TrimOptions(
        minimum=minimum,
        mountpoint=mountpoint,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        parallel=parallel,
        explain=explain,
        # an explicit --timeout is every guest's; the default is longer for Windows
        timeout_windows=WINDOWS_TRIM_TIMEOUT if timeout is None else timeout,
    )
    if hosts_file or len(uris) > 1:  # many hosts: vmtrim.fleet (exit 3 if a host failed)
        if qga or qmp:
            raise BadInput("--qga/--qmp talk to one QEMU: give no -c or --hosts", subject="--qga")
        from vmtrim.fleet.hosts import host_list
        from vmtrim.fleet.trim import trim_fleet

        record = None if no_history else _recorder(history_db)
        return trim_fleet(
            host_list(uris, hosts_file),
            domains=domains,
            every=every,
            options=options,
            hosts_parallel=hosts_parallel,
            connect_timeout=connect_timeout,
            as_json=as_json,
            record=record,
        )
    uri = uris[0] if uris else None
    shut_off: list[str] = []
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

            targets: Sequence[Target] = [
                stack.enter_context(QemuTarget.open(qga, qmp, timeout=options.timeout))
            ]
        else:
            from vmtrim.channels.libvirt import connection, select_domains
            from vmtrim.trim.libvirt import LibvirtTarget

            conn = stack.enter_context(connection(uri))
            chosen = select_domains(conn, domains, every, running_only=True)
            domain_targets = [LibvirtTarget(conn, d) for d in chosen]
            targets = domain_targets
            if every:
                picked = {t.uuid for t in domain_targets}
                shut_off = sorted(
                    str(d.name())
                    for d in select_domains(conn, (), True)
                    if str(d.UUIDString()) not in picked
                )
        results = _run(targets, options, show_progress=True)
    if as_json:
        from vmtrim.output import print_json

        body: dict[str, Any] = {"note": UPPER_BOUND_NOTE, "domains": [r.to_json() for r in results]}
        if every:
            body["not_running"] = shut_off
        print_json(SCHEMA, body)
    else:
        render(results, shut_off)
    if not no_history:  # history (vmtrim.run.record): exit 3 if it could not be recorded
        from vmtrim.run.record import record_trim

        return record_trim(results, history_db, None if qga else uri) or exit_code(results)
    return exit_code(results)


def _recorder(db: str | None) -> Callable[[Sequence[TrimResult], str], int | None]:
    """The fleet records each host's trims as a trim run of that host's URI."""
    from vmtrim.run.record import record_trim

    return lambda results, uri: record_trim(results, db, uri)


def exit_code(results: Sequence[TrimResult]) -> int:
    """0 only when every selected domain was trimmed; no_effect/skipped/failed are 1."""
    return EXIT_OK if all(r.status == TRIMMED for r in results) else EXIT_FINDINGS


def _run(targets: Sequence[Target], options: TrimOptions, show_progress: bool) -> list[TrimResult]:
    from vmtrim.fleet.progress import count_progress
    from vmtrim.output import safe_text
    from vmtrim.trim.engine import trim_all

    progress = count_progress("trim", show=show_progress)
    with progress:
        task = progress.add_task("", total=len(targets))
        done: Callable[[TrimResult], None] = lambda r: progress.update(  # noqa: E731
            task, advance=1, description=safe_text(f"{r.domain}: {r.status}")
        )
        return trim_all(targets, options, on_done=done)


def render(results: Sequence[TrimResult], shut_off: Sequence[str] = ()) -> None:
    """One row per disk; the reason, path errors and blockers below the domain's rows.

    Domain names, paths, sources and errors come from guests and other users:
    the shared table escapes them and never reads them as markup.
    """
    from vmtrim.output import Column, Row, Styled, human_bytes, print_line, render_table
    from vmtrim.trim.render import STATUS_STYLE, detail_lines

    columns = [
        Column("domain", shorten="end", min_width=16),
        Column("status", min_width=9),
        Column("disk", priority=3),
        Column("source", shorten="middle", min_width=16, priority=2),
        Column("before", justify="right", priority=4),
        Column("after", justify="right", priority=4),
        Column("reclaimed", justify="right"),
        Column("guest says", justify="right", priority=1),
        Column("secs", justify="right", priority=5),
    ]
    rows: list[Row] = []
    for r in results:
        disks: list[DiskResult | None] = [*r.disks] or [None]
        for i, d in enumerate(disks):
            first, last = i == 0, i == len(disks) - 1
            rows.append(
                Row(
                    [
                        r.domain if first else "",
                        Styled(r.status, STATUS_STYLE.get(r.status)) if first else "",
                        d.target if d else "-",
                        (d.source or "-") if d else "-",
                        human_bytes(d.allocated_before) if d else "-",
                        human_bytes(d.allocated_after) if d else "-",
                        human_bytes(d.reclaimed_bytes) if d else "-",
                        _guest_says(r) if first else "",
                        f"{r.seconds:.2f}" if first else "",
                    ],
                    detail_lines(r) if last else (),
                )
            )
    render_table(columns, rows, title="vmtrim trim", notes=[CAPTION])
    if shut_off:
        print_line(
            f"{len(shut_off)} shut-off domain(s) not trimmed (--all trims running domains):"
            f" {', '.join(shut_off)}"
        )


def _guest_says(r: TrimResult) -> str:
    from vmtrim.output import human_bytes

    if not r.paths:
        return ""
    return "-" if r.note else human_bytes(r.guest_trimmed_bytes)  # Windows: no count, not 0
