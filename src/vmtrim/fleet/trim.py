"""``vmtrim trim`` over many hosts: each host's domains trimmed on that host's connections.

Measurement on a remote host (see :func:`~vmtrim.fleet.hosts.is_remote`) goes through
libvirt: a pool volume (``<disk type='volume'>``) by the storage-volume API
(``virStorageVolGetInfo``, which re-reads the volume), any other disk by
``virDomainGetBlockInfo``'s allocation. ``measured_by`` says which, per disk.

The JSON and the table carry what a single-host trim does (``--explain``'s causes, each
disk's thin pool); the table's lines below a domain are trim's, after the host.

Exit code: 3 when any host failed (unreachable, refused, timed out, dropped), else 1
when a domain was not trimmed, else 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmtrim.channels.libvirt import Connection, error_text, libvirt_module
from vmtrim.errors import EXIT_ENVIRONMENT, EXIT_FINDINGS, EXIT_OK, EnvironmentProblem
from vmtrim.fleet.hosts import Fleet, HostRun, choose_domains, connect_host, is_remote
from vmtrim.fleet.progress import FleetProgress
from vmtrim.image.allocation import allocated_bytes
from vmtrim.model import StorageKind
from vmtrim.sources.libvirt_xml import parse_domain_xml
from vmtrim.trim.engine import (
    SCHEMA,
    TRIMMED,
    UPPER_BOUND_NOTE,
    DiskRef,
    DiskResult,
    TrimOptions,
    TrimResult,
    trim_all,
)
from vmtrim.trim.libvirt import LibvirtTarget, measurable

if TYPE_CHECKING:
    from vmtrim.output import Cell

#: How a record hook stores one host's results: None when done, else an exit code.
Recorder = Callable[[Sequence[TrimResult], str], "int | None"]


@dataclass(frozen=True)
class FleetDiskRef(DiskRef):
    pool: str | None = None  # set for <disk type='volume'>
    volume: str | None = None


class FleetTarget(LibvirtTarget):
    """A domain on one host of a fleet: its own bounded, kept-alive connection, and
    measured through libvirt when the host is remote."""

    def __init__(self, conn: Connection, dom: Any, connect_timeout: float) -> None:
        super().__init__(conn, dom)
        self.host = conn.uri
        self.connect_timeout = connect_timeout

    @property
    def dom(self) -> Any:
        with self._lock:
            if self._dom is None:
                self._own = connect_host(self.host, self.connect_timeout)
                libvirt = libvirt_module()
                try:
                    self._dom = self._own.conn.lookupByUUIDString(self.uuid)
                except libvirt.libvirtError as exc:
                    raise EnvironmentProblem(error_text(exc), subject=self.name) from exc
            return self._dom

    def disks(self) -> list[DiskRef]:
        from vmtrim.channels.libvirt import fetch_domain_xml

        remote = is_remote(self.host)
        refs: list[DiskRef] = []
        for disk in parse_domain_xml(fetch_domain_xml(self.dom), subject=self.name).disks:
            if not measurable(disk):
                continue
            pool = volume = None
            if disk.storage is StorageKind.VOLUME and disk.source:
                pool, _, volume = disk.source.partition("/")
            local = None if remote or disk.storage is not StorageKind.FILE else disk.source
            refs.append(
                FleetDiskRef(
                    target=disk.target or disk.ident,
                    source=disk.source,
                    local_file=local,
                    pool=pool,
                    volume=volume,
                )
            )
        return refs

    def measure(self, disk: DiskRef) -> tuple[int, str]:
        if disk.local_file:
            return allocated_bytes(disk.local_file), "du"
        if isinstance(disk, FleetDiskRef) and disk.pool and disk.volume:
            libvirt = libvirt_module()
            conn = self.dom.connect()
            try:
                vol = conn.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume)
                return int(vol.info()[2]), "storageVolume"
            except libvirt.libvirtError as exc:
                raise EnvironmentProblem(
                    f"storage volume {disk.source}: {error_text(exc)}", subject=self.name
                ) from exc
        return int(self.dom.blockInfo(disk.target)[1]), "blockInfo"


@dataclass
class HostTrim:
    """One host's share of the run."""

    results: list[TrimResult] = field(default_factory=list)
    not_running: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    record_error: int | None = None


def trim_host(
    conn: Connection,
    domains: Sequence[str],
    every: bool,
    options: TrimOptions,
    connect_timeout: float,
    progress: FleetProgress | None = None,
) -> HostTrim:
    chosen, missing = choose_domains(conn, domains, every, running_only=True)
    out = HostTrim(missing=missing)
    if every:
        picked = {str(d.UUIDString()) for d in chosen}  # type: ignore[attr-defined]
        everything, _ = choose_domains(conn, (), True)
        out.not_running = sorted(
            str(d.name())  # type: ignore[attr-defined]
            for d in everything
            if str(d.UUIDString()) not in picked  # type: ignore[attr-defined]
        )
    targets = [FleetTarget(conn, d, connect_timeout) for d in chosen]
    if progress is not None:
        progress.found(len(targets))

    def done(r: TrimResult) -> None:
        if progress is not None:
            progress.domain_done(f"{conn.uri}: {r.domain}: {r.status}")

    out.results = trim_all(targets, options, on_done=done)
    return out


def trim_fleet(
    uris: Sequence[str],
    *,
    domains: Sequence[str],
    every: bool,
    options: TrimOptions,
    hosts_parallel: int,
    connect_timeout: float,
    as_json: bool,
    record: Recorder | None = None,
) -> int:
    """Trim on every host, print the JSON document or the grouped table, return the exit code."""
    lock = threading.Lock()
    with FleetProgress("trim", len(uris)) as progress:
        fleet = Fleet(uris, hosts_parallel, connect_timeout, on_host_done=progress.host_done)

        def work(conn: Connection) -> HostTrim:
            host = trim_host(conn, domains, every, options, connect_timeout, progress)
            if record is not None:
                with lock:  # one writer at a time on the history database
                    host.record_error = record(host.results, conn.uri)
            return host

        start = time.monotonic()
        runs = fleet.run(work)
        seconds = time.monotonic() - start
    if as_json:
        from vmtrim.output import print_json

        print_json(SCHEMA, fleet_json(runs, every, seconds))
    else:
        render(runs)
    return exit_code(runs)


def exit_code(runs: Sequence[HostRun[HostTrim]]) -> int:
    if any(r.failed or (r.value and r.value.record_error) for r in runs):
        return EXIT_ENVIRONMENT
    results = [x for r in runs if r.value for x in r.value.results]
    if nowhere(runs):
        return EXIT_FINDINGS  # a named domain is on no host
    return EXIT_OK if all(x.status == TRIMMED for x in results) else EXIT_FINDINGS


def nowhere(runs: Sequence[HostRun[HostTrim]]) -> list[str]:
    """Named domains that no reachable host has."""
    reached = [set(r.value.missing) for r in runs if r.value is not None]
    return sorted(set.intersection(*reached)) if reached else []


def _reclaimed(results: Sequence[TrimResult]) -> int:
    return sum(r.reclaimed_bytes or 0 for r in results)


def fleet_json(
    runs: Sequence[HostRun[HostTrim]], every: bool, seconds: float | None = None
) -> dict[str, Any]:
    """The vmtrim.trim/1 document with a ``host`` on every domain, ``hosts`` and ``fleet``."""
    hosts, domains = [], []
    for run in runs:
        value = run.value or HostTrim()
        hosts.append(
            {
                "host": run.uri,
                "status": "failed" if run.failed else "ok",
                "reason": run.error,
                "seconds": round(run.seconds, 3),
                "domains": len(value.results),
                "reclaimed_bytes": _reclaimed(value.results),
                **({"not_running": value.not_running} if every else {}),
            }
        )
        domains += [{"host": run.uri, **r.to_json()} for r in value.results]
    every_result = [x for r in runs if r.value for x in r.value.results]
    missing = nowhere(runs)
    body: dict[str, Any] = {
        "note": UPPER_BOUND_NOTE,
        "hosts": hosts,
        "domains": domains,
        "fleet": {
            "hosts": len(runs),
            "failed_hosts": sum(1 for r in runs if r.failed),
            "domains": len(every_result),
            "trimmed": sum(1 for r in every_result if r.status == TRIMMED),
            "reclaimed_bytes": _reclaimed(every_result),
            "seconds": None if seconds is None else round(seconds, 3),  # all hosts, wall
        },
    }
    if missing:
        body["not_found"] = missing
    return body


def render(runs: Sequence[HostRun[HostTrim]]) -> None:
    """One table, grouped by host (the hosts' order), a failed host as one row, the fleet total.

    Below a domain's rows, the lines ``vmtrim trim`` prints there (the reason or blockers,
    each disk's thin pool and ``--explain`` causes: :mod:`vmtrim.trim.render`), each
    after its host, as every row starts with it."""
    from vmtrim.output import Column, Row, Styled, human_bytes, print_line, render_table
    from vmtrim.trim.render import STATUS_STYLE, detail_lines

    columns = [
        Column("host", shorten="middle", min_width=16),
        Column("domain", shorten="end", min_width=16),
        Column("status", min_width=9),
        Column("disk", priority=3),
        Column("before", justify="right", priority=4),
        Column("after", justify="right", priority=4),
        Column("reclaimed", justify="right"),
        Column("measured", priority=2),
        Column("secs", justify="right", priority=5),
    ]
    rows: list[Row] = []
    for run in runs:
        if run.failed:
            rows.append(
                Row(
                    [run.uri, "-", Styled("failed", "red"), *["-"] * 5, f"{run.seconds:.2f}"],
                    [Styled(f"host failed: {run.error}", "red")],
                )
            )
            continue
        assert run.value is not None
        if not run.value.results:
            rows.append(Row([run.uri, "-", "-", *["-"] * 5, f"{run.seconds:.2f}"], ["no domains"]))
        for r in run.value.results:
            disks: list[DiskResult | None] = [*r.disks] or [None]
            for i, d in enumerate(disks):
                first, last = i == 0, i == len(disks) - 1
                rows.append(
                    Row(
                        [
                            run.uri,
                            r.domain if first else "",
                            Styled(r.status, STATUS_STYLE.get(r.status)) if first else "",
                            d.target if d else "-",
                            human_bytes(d.allocated_before) if d else "-",
                            human_bytes(d.allocated_after) if d else "-",
                            human_bytes(d.reclaimed_bytes) if d else "-",
                            (d.measured_by or "-") if d else "-",
                            f"{r.seconds:.2f}" if first else "",
                        ],
                        [_on(run.uri, line) for line in detail_lines(r)] if last else (),
                    )
                )
    render_table(columns, rows, title="vmtrim trim (fleet)")
    results = [x for r in runs if r.value for x in r.value.results]
    failed = [r for r in runs if r.failed]
    print_line(
        f"fleet: {len(runs)} host(s), {len(failed)} failed; {len(results)} domain(s),"
        f" {sum(1 for x in results if x.status == TRIMMED)} trimmed;"
        f" reclaimed {human_bytes(_reclaimed(results))}"
    )


def _on(host: str, line: Cell) -> Cell:
    """A line below a domain's rows, after its host (as each row starts with it)."""
    from vmtrim.output import Styled

    if isinstance(line, Styled):
        return Styled(f"{host}: {line.text}", line.style)
    return f"{host}: {line or ''}"
