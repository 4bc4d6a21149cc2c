"""``vmtrim audit``: which layer blocks discard on each disk, and how to fix it.

Exit codes: 0 no disk blocks, 1 a disk blocks discard, 2 bad input, 3 environment.
Cdroms, read-only and empty drives are listed but never fail the run; ``unknown``
layers (for example the guest, without a guest agent) do not fail it either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from vmtrim.cli.options import hosts_options
from vmtrim.errors import EXIT_FINDINGS, EXIT_OK, BadInput
from vmtrim.model import DiskReport, Domain, Layer, LayerKind, Severity, Verdict

if TYPE_CHECKING:
    from vmtrim.output import Cell, Column

SCHEMA = "vmtrim.audit/1"

_LAYER_HEADERS = {
    LayerKind.GUEST_FS: "guest fs",
    LayerKind.GUEST_DRIVER: "guest drv",
    LayerKind.DEVICE: "device",
    LayerKind.BLOCK_NODE: "qemu block",
    LayerKind.HOST_STORAGE: "host",
}
_VERDICT_STYLE = {Verdict.PASS: "green", Verdict.UNKNOWN: "yellow", Verdict.BLOCK: "bold red"}
_SEVERITY_MARK = {
    Severity.BLOCK: ("✗", "red"),
    Severity.WARNING: ("!", "yellow"),
    Severity.INFO: ("·", "dim"),
}


@click.command("audit")
@click.option(
    "--xml",
    "xml_files",
    metavar="FILE",
    multiple=True,
    help="libvirt domain XML as `virsh dumpxml` prints it ('-' for stdin).",
)
@click.option(
    "--qemu-args",
    "args_files",
    metavar="FILE",
    multiple=True,
    help="A QEMU command line: shell text or NUL-separated ('-' for stdin).",
)
@click.option(
    "--pid",
    "pids",
    metavar="PID",
    type=int,
    multiple=True,
    help="A running QEMU process (reads /proc/PID/cmdline).",
)
@click.option(
    "--qmp",
    "qmp_sockets",
    metavar="SOCKET",
    multiple=True,
    help="A running QEMU's QMP socket: live devices and nodes, discard from its command line.",
)
@click.option(
    "--no-probe",
    is_flag=True,
    help="Do not probe host filesystems/devices (the input is from another host).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.audit/1 JSON document.")
@hosts_options(
    "Audit live libvirt domains (default URI: $LIBVIRT_DEFAULT_URI); repeat for hosts.",
    "Audit N hosts at once.",
)
@click.option("--all", "every", is_flag=True, help="With -c: every domain.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="S",
    help="With -c: wait S seconds for a guest agent; with --qmp, for QEMU.",
)
@click.argument("names", nargs=-1, metavar="[DOMAIN...]")
def audit(
    xml_files: tuple[str, ...],
    args_files: tuple[str, ...],
    pids: tuple[int, ...],
    no_probe: bool,
    as_json: bool,
    uris: tuple[str, ...] = (),
    every: bool = False,
    timeout: float = 10.0,
    names: tuple[str, ...] = (),
    qmp_sockets: tuple[str, ...] = (),
    hosts_file: str | None = None,
    hosts_parallel: int = 8,
    connect_timeout: float = 15.0,
) -> int:
    """Trace every disk's discard path layer by layer and say what blocks it.

    One row per disk with each layer's verdict; below it, what blocks, what to
    change, and why a layer is unknown. On a terminal the table fits its width
    (long paths are shortened in the middle); piped, every row is one whole line.
    --json has every value in full.

    \b
    Exit codes: 0 no disk blocks discard (unknown layers do not fail), 1 a disk
    blocks discard, 2 bad input, 3 environment (libvirt, QMP), 4 internal error,
    130 interrupted, 141 stdout closed early.
    """
    from vmtrim.sources.libvirt_xml import parse_domain_file
    from vmtrim.sources.qemu_args import read_args_file, read_pid

    if hosts_file or len(uris) > 1:  # many hosts: vmtrim.fleet (exit 3 if a host failed)
        if xml_files or args_files or pids or qmp_sockets:
            raise click.UsageError("--hosts/-c cannot be mixed with --xml/--qemu-args/--pid/--qmp")
        from vmtrim.fleet.audit import audit_fleet
        from vmtrim.fleet.hosts import host_list

        return audit_fleet(
            host_list(uris, hosts_file),
            names=names,
            every=every,
            timeout=timeout,
            probe=not no_probe,
            hosts_parallel=hosts_parallel,
            connect_timeout=connect_timeout,
            as_json=as_json,
        )
    uri = uris[0] if uris else None
    if uri or every or names:  # live libvirt domains (vmtrim.sources.libvirt_live)
        if xml_files or args_files or pids or qmp_sockets:
            raise click.UsageError(
                "-c/DOMAIN/--all cannot be mixed with --xml/--qemu-args/--pid/--qmp"
            )
        from vmtrim.sources.libvirt_live import audit_live

        live, extra, local = audit_live(uri, names, every, timeout)
        remote = None if local else str(extra["connection"]["uri"])
        return report_domains(
            live, probe=not no_probe, remote_uri=remote, as_json=as_json, extra=extra
        )
    if not (xml_files or args_files or pids or qmp_sockets):
        raise click.UsageError(
            "give --xml FILE, --qemu-args FILE, --pid PID, --qmp SOCKET or -c URI DOMAIN"
        )
    if [*xml_files, *args_files].count("-") > 1:
        raise BadInput("stdin ('-') can be read only once", subject="audit")
    domains = [parse_domain_file(path) for path in xml_files]
    domains += [read_args_file(path) for path in args_files]
    domains += [read_pid(pid) for pid in pids]
    if qmp_sockets:
        from vmtrim.sources.qmp import read_qmp

        domains += [read_qmp(path, timeout) for path in qmp_sockets]
    return report_domains(domains, probe=not no_probe, as_json=as_json)


def report_domains(
    domains: list[Domain],
    *,
    probe: bool = True,
    remote_uri: str | None = None,
    as_json: bool = False,
    extra: dict[str, Any] | None = None,
) -> int:
    """Audit ``domains``, print the table or the JSON document, and return the exit code.

    Shared with the live (``-c URI``) audit, which builds its domains elsewhere.
    """
    from vmtrim.audit.engine import audit_domain
    from vmtrim.audit.hostprobe import HostProbes

    probes = HostProbes.choose(no_probe=not probe, remote_uri=remote_uri)
    reports = [r for domain in domains for r in audit_domain(domain, probes)]
    if as_json:
        from vmtrim.output import print_json

        print_json(
            SCHEMA,
            {
                "disks": [r.to_json() for r in reports],
                "domains": [
                    {
                        "name": d.name,
                        "machine": d.machine,
                        "origin": d.origin.value,
                        "notes": d.notes,
                    }
                    for d in domains
                ],
                **(extra or {}),
            },
        )
    else:
        render(domains, reports)
    return EXIT_FINDINGS if any(r.blocks for r in reports) else EXIT_OK


def _cells(report: DiskReport) -> list[str]:
    disk = report.disk
    return [
        disk.domain,
        disk.target or disk.ident,
        disk.bus or "-",
        disk.source or "-",
        disk.format or "-",
        disk.discard or "(unset)",
    ]


def _columns() -> list[Column]:
    from vmtrim.output import Column

    # On a narrow terminal the path is shortened first, then columns go: format, bus,
    # discard, then the layers right to left; the findings below still name the layer.
    return [
        Column("domain", shorten="end"),
        Column("target"),
        Column("bus", priority=4),
        Column("source", shorten="middle", min_width=16),
        Column("format", priority=5),
        Column("discard", priority=3),
        *(Column(header, priority=1) for header in _LAYER_HEADERS.values()),
        Column("verdict"),
    ]


def render(domains: list[Domain], reports: list[DiskReport]) -> None:
    """One row per disk, its findings (worst first) and unknown reasons below it.

    An ``unknown`` layer's reason shared by several disks of a domain (no guest agent)
    is printed once after the table, not on every disk.
    """
    from vmtrim.audit.granularity import describe_stack
    from vmtrim.output import Row, Styled, print_line, print_note, render_table

    # (domain, layer, reason) -> the disks whose layer is unknown for that reason
    shared: dict[tuple[str, LayerKind, str], list[Layer]] = {}
    targets: dict[tuple[str, LayerKind, str], list[str]] = {}
    for r in reports:
        for layer in _unknown(r):
            key = (r.disk.domain, layer.kind, layer.reason)
            shared.setdefault(key, []).append(layer)
            targets.setdefault(key, []).append(r.disk.target or r.disk.ident)
    rows = []
    for report in reports:
        layers = [report.layer(kind).verdict for kind in _LAYER_HEADERS]
        # The verdict cell names the exemption ("cdrom"); a longer reason goes below.
        exempt_kind, _, why = (report.exempt or "").partition(":")
        verdict = report.verdict.value + (f" ({exempt_kind})" if exempt_kind else "")
        details = [
            Styled(_line(_SEVERITY_MARK[f.severity][0], f.layer, f.message, f.fix),
                   _SEVERITY_MARK[f.severity][1])
            for f in report.sorted_findings()
        ]  # fmt: skip
        if why:
            details.append(Styled(f"· not counted: {report.exempt}", "dim"))
        details += [
            Styled(_line("?", layer.kind, f"unknown: {layer.reason}", layer.fix), "yellow")
            for layer in _unknown(report)
            if len(shared[(report.disk.domain, layer.kind, layer.reason)]) == 1
        ]
        units = describe_stack(report.granularity)
        if units:  # the discard unit down the stack, last; coarser layers have findings
            details.append(Styled(f"· granularity: {units}", "dim"))
        cells: list[Cell] = [
            *_cells(report),
            *(Styled(v.value, _VERDICT_STYLE[v]) for v in layers),
            Styled(verdict, _VERDICT_STYLE[report.verdict]),
        ]
        rows.append(Row(cells, details))
    render_table(_columns(), rows)
    if not reports:
        print_line("no disks found")
    for (name, kind, reason), same in shared.items():
        if len(same) > 1:
            on = f"unknown on {name} ({', '.join(targets[name, kind, reason])})"
            print_line(_line("?", kind, f"{on}: {reason}", same[0].fix), style="yellow")
    for domain in domains:
        for note in domain.notes:
            print_note(f"note: {domain.name}: {note}")
    blocking = sum(1 for r in reports if r.blocks)
    exempt = sum(1 for r in reports if r.exempt)
    passing = sum(1 for r in reports if r.verdict is Verdict.PASS and not r.exempt)
    print_line(
        f"{len(reports)} disk(s): {blocking} block discard, {passing} pass,"
        f" {len(reports) - blocking - passing - exempt} unknown, {exempt} not counted"
        " (cdrom, read-only or empty)"
    )


def _unknown(report: DiskReport) -> list[Layer]:
    return [layer for layer in report.layers if layer.verdict is Verdict.UNKNOWN]


def _line(mark: str, kind: LayerKind, message: str, fix: str | None) -> str:
    return f"{mark} {kind.value}: {message}" + (f"  → fix: {fix}" if fix else "")
