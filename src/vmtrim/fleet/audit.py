"""``vmtrim audit`` over many hosts: each host's live domains audited on its own connection.

A remote host's files are not ours (:func:`~vmtrim.fleet.hosts.is_remote`): its host
probes are off (``unknown``, with the reason) and its image headers are not read here.
Exit code: 3 when any host failed, else 1 when a disk blocks discard, else 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vmtrim.audit.engine import audit_domain
from vmtrim.audit.hostprobe import HostProbes
from vmtrim.channels.libvirt import Connection
from vmtrim.errors import EXIT_ENVIRONMENT, EXIT_FINDINGS, EXIT_OK
from vmtrim.fleet.hosts import Fleet, HostRun, choose_domains, is_remote
from vmtrim.fleet.progress import FleetProgress
from vmtrim.model import DiskReport, Domain, Verdict
from vmtrim.sources.libvirt_live import live_domain

SCHEMA = "vmtrim.audit/1"


@dataclass
class HostAudit:
    domains: list[Domain] = field(default_factory=list)
    reports: list[DiskReport] = field(default_factory=list)
    versions: tuple[str | None, str] | None = None
    missing: list[str] = field(default_factory=list)


def audit_host(
    conn: Connection,
    specs: Sequence[str],
    every: bool,
    *,
    timeout: float,
    probe: bool,
    progress: FleetProgress | None = None,
) -> HostAudit:
    chosen, missing = choose_domains(conn, specs, every)
    if progress is not None:
        progress.found(len(chosen))
    remote = is_remote(conn.uri)
    probes = HostProbes.choose(no_probe=not probe, remote_uri=conn.uri if remote else None)
    out = HostAudit(missing=missing, versions=conn.versions())
    for dom in chosen:
        domain = live_domain(conn, dom, timeout)
        out.domains.append(domain)
        out.reports += audit_domain(domain, probes, read_images=not remote)
        if progress is not None:
            progress.domain_done(f"{conn.uri}: {domain.name}")
    return out


def audit_fleet(
    uris: Sequence[str],
    *,
    names: Sequence[str],
    every: bool,
    timeout: float,
    probe: bool,
    hosts_parallel: int,
    connect_timeout: float,
    as_json: bool,
) -> int:
    with FleetProgress("audit", len(uris)) as progress:
        fleet = Fleet(uris, hosts_parallel, connect_timeout, on_host_done=progress.host_done)
        runs = fleet.run(
            lambda conn: audit_host(
                conn, names, every, timeout=timeout, probe=probe, progress=progress
            )
        )
    if as_json:
        from vmtrim.output import print_json

        print_json(SCHEMA, fleet_json(runs))
    else:
        render(runs)
    return exit_code(runs)


def exit_code(runs: Sequence[HostRun[HostAudit]]) -> int:
    if any(r.failed for r in runs):
        return EXIT_ENVIRONMENT
    blocks = any(rep.blocks for r in runs if r.value for rep in r.value.reports)
    return EXIT_FINDINGS if blocks else EXIT_OK


def fleet_json(runs: Sequence[HostRun[HostAudit]]) -> dict[str, Any]:
    """The vmtrim.audit/1 document, a ``host`` on every disk and domain, ``hosts``, ``fleet``."""
    hosts: list[dict[str, Any]] = []
    disks: list[dict[str, Any]] = []
    domains: list[dict[str, Any]] = []
    for run in runs:
        value = run.value or HostAudit()
        hv, lib = value.versions or (None, None)
        hosts.append(
            {
                "host": run.uri,
                "status": "failed" if run.failed else "ok",
                "reason": run.error,
                "seconds": round(run.seconds, 3),
                "qemu_version": hv,
                "libvirt_version": lib,
                "domains": len(value.domains),
                "blocking_disks": sum(1 for r in value.reports if r.blocks),
            }
        )
        disks += [{"host": run.uri, **r.to_json()} for r in value.reports]
        domains += [
            {
                "host": run.uri,
                "name": d.name,
                "machine": d.machine,
                "origin": d.origin.value,
                "notes": d.notes,
            }
            for d in value.domains
        ]
    reports = [rep for r in runs if r.value for rep in r.value.reports]
    return {
        "disks": disks,
        "domains": domains,
        "hosts": hosts,
        "fleet": {
            "hosts": len(runs),
            "failed_hosts": sum(1 for r in runs if r.failed),
            "domains": len(domains),
            "disks": len(reports),
            "blocking_disks": sum(1 for r in reports if r.blocks),
        },
    }


def render(runs: Sequence[HostRun[HostAudit]]) -> None:
    """One row per disk grouped by host, a failed host as one row; findings below; the total."""
    from vmtrim.output import Column, Row, Styled, print_line, render_table

    columns = [
        Column("host", shorten="middle", min_width=16),
        Column("domain", shorten="end"),
        Column("target"),
        Column("bus", priority=3),
        Column("source", shorten="middle", min_width=16, priority=2),
        Column("discard", priority=1),
        Column("verdict"),
    ]
    style = {Verdict.PASS: "green", Verdict.UNKNOWN: "yellow", Verdict.BLOCK: "bold red"}
    rows: list[Row] = []
    for run in runs:
        if run.failed:
            rows.append(
                Row(
                    [run.uri, "-", "-", "-", "-", "-", Styled("host failed", "red")],
                    [Styled(f"host failed: {run.error}", "red")],
                )
            )
            continue
        assert run.value is not None
        for rep in run.value.reports:
            disk = rep.disk
            rows.append(
                Row(
                    [
                        run.uri,
                        disk.domain,
                        disk.target or disk.ident,
                        disk.bus or "-",
                        disk.source or "-",
                        disk.discard or "(unset)",
                        Styled(rep.verdict.value, style[rep.verdict]),
                    ],
                    [
                        Styled(
                            f"{f.layer.value}: {f.message}" + (f"  → fix: {f.fix}" if f.fix else "")
                        )
                        for f in rep.sorted_findings()
                    ],
                )
            )
    render_table(columns, rows, title="vmtrim audit (fleet)")
    reports = [rep for r in runs if r.value for rep in r.value.reports]
    print_line(
        f"fleet: {len(runs)} host(s), {sum(1 for r in runs if r.failed)} failed;"
        f" {len(reports)} disk(s), {sum(1 for r in reports if r.blocks)} block discard"
    )
