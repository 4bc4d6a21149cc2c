"""``vmtrim fix -c URI -c URI DOMAIN...``: the named domains fixed on every host that has them.

Each host on its own bounded, kept-alive connection (:class:`~vmtrim.fleet.hosts.Fleet`);
a name is looked for on every host. Exit code: 3 when any host failed, else 1 when a
disk still blocks discard (or a name is on no host), else 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vmtrim.channels.libvirt import Connection
from vmtrim.errors import EXIT_ENVIRONMENT, EXIT_FINDINGS, EXIT_OK
from vmtrim.fix.libvirt import LiveFix, fix_live
from vmtrim.fix.policy import FixOptions
from vmtrim.fleet.hosts import Fleet, HostRun, choose_domains
from vmtrim.fleet.progress import FleetProgress

SCHEMA = "vmtrim.fix/1"


@dataclass
class HostFix:
    outcomes: list[LiveFix] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def fix_fleet(
    uris: Sequence[str],
    names: Sequence[str],
    options: FixOptions,
    *,
    dry_run: bool,
    restart: bool,
    restart_timeout: float,
    force: bool,
    hosts_parallel: int,
    connect_timeout: float,
    as_json: bool,
) -> int:
    with FleetProgress("fix", len(uris)) as progress:

        def work(conn: Connection) -> HostFix:
            chosen, missing = choose_domains(conn, names, False)
            progress.found(len(chosen))
            out = HostFix(missing=missing)
            for dom in chosen:
                out.outcomes.append(
                    fix_live(
                        conn,
                        dom,
                        options,
                        dry_run=dry_run,
                        restart=restart,
                        restart_timeout=restart_timeout,
                        force=force,
                    )
                )
                progress.domain_done(f"{conn.uri}: {out.outcomes[-1].domain}")
            return out

        fleet = Fleet(uris, hosts_parallel, connect_timeout, on_host_done=progress.host_done)
        runs = fleet.run(work)
    if as_json:
        from vmtrim.output import print_json

        print_json(SCHEMA, fleet_json(runs))
    else:
        render(runs, dry_run)
    return exit_code(runs)


def _nowhere(runs: Sequence[HostRun[HostFix]]) -> list[str]:
    reached = [set(r.value.missing) for r in runs if r.value is not None]
    return sorted(set.intersection(*reached)) if reached else []


def _blocking(outcome: LiveFix) -> bool:
    return any(skip.blocking for skip in outcome.result.skipped)


def exit_code(runs: Sequence[HostRun[HostFix]]) -> int:
    if any(r.failed for r in runs):
        return EXIT_ENVIRONMENT
    outcomes = [o for r in runs if r.value for o in r.value.outcomes]
    return EXIT_FINDINGS if _nowhere(runs) or any(map(_blocking, outcomes)) else EXIT_OK


def fleet_json(runs: Sequence[HostRun[HostFix]]) -> dict[str, Any]:
    """vmtrim.fix/1 with ``host`` on every domain, ``hosts`` and ``fleet``."""
    domains = [{"host": r.uri, **o.to_json()} for r in runs if r.value for o in r.value.outcomes]
    body: dict[str, Any] = {
        "domains": domains,
        "hosts": [
            {
                "host": r.uri,
                "status": "failed" if r.failed else "ok",
                "reason": r.error,
                "seconds": round(r.seconds, 3),
                "domains": len(r.value.outcomes) if r.value else 0,
            }
            for r in runs
        ],
        "fleet": {
            "hosts": len(runs),
            "failed_hosts": sum(1 for r in runs if r.failed),
            "domains": len(domains),
            "defined": sum(1 for d in domains if d["defined"]),
        },
    }
    if _nowhere(runs):
        body["not_found"] = _nowhere(runs)
    return body


def render(runs: Sequence[HostRun[HostFix]], dry_run: bool) -> None:
    """The diffs (--dry-run), then one row per domain grouped by host, then the total."""
    from vmtrim.output import Column, Row, Styled, print_line, render_table, write_stdout

    rows: list[Row] = []
    for run in runs:
        if run.failed:
            rows.append(
                Row(
                    [run.uri, "-", Styled("host failed", "red"), "-"], [f"host failed: {run.error}"]
                )
            )
            continue
        assert run.value is not None
        for o in run.value.outcomes:
            if dry_run and o.result.diff:
                write_stdout(o.result.diff)
            state = "restarted" if o.restarted else "defined" if o.defined else "unchanged"
            if dry_run:
                state = "would change" if o.result.changed else "unchanged"
            pending = "yes" if o.pending else "-"
            blocking = [s.reason for s in o.result.skipped if s.blocking]
            rows.append(Row([run.uri, o.domain, state, pending], blocking))
    columns = [
        Column("host", shorten="middle", min_width=16),
        Column("domain", shorten="end"),
        Column("fix"),
        Column("restart pending", priority=1),
    ]
    render_table(columns, rows, title="vmtrim fix (fleet)")
    outcomes = [o for r in runs if r.value for o in r.value.outcomes]
    print_line(
        f"fleet: {len(runs)} host(s), {sum(1 for r in runs if r.failed)} failed;"
        f" {len(outcomes)} domain(s), {sum(1 for o in outcomes if o.defined)} defined"
    )
