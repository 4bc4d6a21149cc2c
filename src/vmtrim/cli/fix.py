"""``vmtrim fix``: rewrite libvirt XML or a QEMU command line so discard passes.

Output modes: the new text on stdout (default), ``--dry-run`` (a unified diff,
nothing written), ``-o FILE`` (written atomically; an existing FILE is backed up
first), ``--in-place`` (a 0600 timestamped backup beside the file, then an atomic
replace). A summary of the changes and the disks left alone goes to stderr, or
everything into one ``vmtrim.fix/1`` document with ``--json``. What a change does to
the guest (``--bus scsi``: new driver and device names) is printed before the change
is written, and is the document's ``warnings`` list.

Exit codes: 0 changed, or nothing to change ("already enabled"; also when the only
disks are cdroms, luns, read-only or shared disks, which fix leaves alone on
purpose); 1 a writable disk still blocks discard at the configuration and fix could
not change it (for example virtio-blk on a machine type before 4.0 without
``--bus scsi``; the other disks are still fixed and written); 2 bad input or usage
(also a ``--discard-granularity`` that is not a power of two of at least 512 bytes);
3 environment (a write failed; ``--restart`` timed out without ``--force``); 4 internal
error; 130 interrupted; 141 stdout closed early.

``--discard-granularity`` and ``--ssd`` change the QEMU device (see
:mod:`vmtrim.fix.xml` for the libvirt routes by release); a setting a device model does
not take (IDE's 512 only, no ``rotation_rate`` on virtio-blk) is a warning, not an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from vmtrim.cli.options import hosts_options
from vmtrim.errors import EXIT_FINDINGS, EXIT_OK, BadInput
from vmtrim.fix.policy import SCHEMA, FixOptions, FixResult

if TYPE_CHECKING:
    from vmtrim._util.files import FileUpdate
    from vmtrim.fix.libvirt import Progress


@click.command("fix")
@click.option("--xml", "xml_file", metavar="FILE", help="libvirt domain XML ('-' for stdin).")
@click.option("--qemu-args", "args_file", metavar="FILE",
              help="A QEMU command line: shell text or NUL-separated ('-' for stdin).")  # fmt: skip
@click.option("--detect-zeroes", type=click.Choice(["unmap", "on", "off"]),
              help="Also set detect-zeroes (unmap: zero writes become discards).")  # fmt: skip
@click.option("--bus", type=click.Choice(["scsi"]),
              help="Move disks whose device cannot pass discard onto virtio-scsi.")  # fmt: skip
@click.option("--all-disks", is_flag=True, help="With --bus scsi: move every disk.")
@click.option("--discard-granularity", "granularity", metavar="auto|BYTES",
              help="Set the QEMU device's discard_granularity (4096, 64K, 1M, ...; a power"
              " of two >= 512), or auto: the unit the layers below it free (qcow2 cluster,"
              " host block, thin chunk). 32K or 64K is the remedy for the May 2026 Windows"
              " retrim failure.")  # fmt: skip
@click.option("--ssd", is_flag=True,
              help="Show disks as solid state (rotation_rate=1; scsi, ide and sata disks):"
              " Windows trims only disks it sees as SSDs.")  # fmt: skip
@click.option("--libvirt-version", "libvirt_version", metavar="X.Y",
              help="With --xml and --discard-granularity/--ssd: the libvirt release the XML is"
              " for (default: this host's libvirt). It decides <blockio> (10.0),"
              " <qemu:override> (8.2) or <qemu:commandline>.")  # fmt: skip
@click.option("--modernize", is_flag=True,
              help="QEMU: legacy -drive if=ide|scsi|virtio becomes if=none + -device.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Print a unified diff; write nothing.")
@click.option("-o", "--output", "output", metavar="FILE", help="Write the new text to FILE.")
@click.option("--in-place", is_flag=True,
              help="Replace the input file atomically, after a 0600 backup beside it.")  # fmt: skip
@click.option("--force", is_flag=True,
              help="With -o or --in-place: replace a read-only or hard-linked file"
              " (the hard link is broken). With --restart: destroy (power off) a domain"
              " still running after --restart-timeout.")  # fmt: skip
@click.option("--no-probe", is_flag=True,
              help="Do not probe host filesystems (the input is from another host).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.fix/1 JSON document.")
@hosts_options(
    "Fix defined libvirt domains (default URI: $LIBVIRT_DEFAULT_URI); repeat for hosts.",
    "Fix on N hosts at once.",
)
@click.option(
    "--restart", is_flag=True, help="With -c: power-cycle a running domain so the fix takes effect."
)
@click.option(
    "--restart-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    metavar="S",
    help="With --restart: wait S s for shutdown.",
)
@click.argument("names", nargs=-1, metavar="[DOMAIN...]")
def fix(
    xml_file: str | None,
    args_file: str | None,
    detect_zeroes: str | None,
    bus: str | None,
    all_disks: bool,
    granularity: str | None,
    ssd: bool,
    libvirt_version: str | None,
    modernize: bool,
    dry_run: bool,
    output: str | None,
    in_place: bool,
    force: bool,
    no_probe: bool,
    as_json: bool,
    uris: tuple[str, ...] = (),
    restart: bool = False,
    restart_timeout: float = 120.0,
    names: tuple[str, ...] = (),
    hosts_file: str | None = None,
    hosts_parallel: int = 8,
    connect_timeout: float = 15.0,
) -> int:
    """Rewrite libvirt XML or a QEMU command line so discard passes.

    The new text goes to stdout, or with --dry-run a unified diff; -o FILE and
    --in-place write atomically after a backup; -c URI DOMAIN redefines the domain
    (--restart power-cycles it so the fix takes effect). --discard-granularity and
    --ssd change what the QEMU device tells the guest: in libvirt XML through
    <blockio discard_granularity> (libvirt >= 10.0) and <target rotation_rate>
    (>= 7.3), else <qemu:override> (>= 8.2) or <qemu:commandline> -set; on a QEMU
    command line as -device properties. The summary says which.

    \b
    Exit codes: 0 changed, or nothing to change; 1 a writable disk still blocks
    discard at the configuration and fix could not change it; 2 bad input or usage;
    3 environment (a write failed, --restart timed out); 4 internal error,
    130 interrupted, 141 stdout closed early.
    """
    device = _device_options(granularity, ssd, libvirt_version)
    if libvirt_version and (args_file or uris or names or hosts_file):
        raise click.UsageError("--libvirt-version applies to --xml FILE only")
    if hosts_file or len(uris) > 1:  # many hosts: vmtrim.fleet (exit 3 if a host failed)
        if xml_file or args_file or output or in_place or modernize or not names:
            raise click.UsageError("--hosts/-c URI -c URI need DOMAIN names, and no files")
        from vmtrim.fleet.fix import fix_fleet
        from vmtrim.fleet.hosts import host_list

        return fix_fleet(
            host_list(uris, hosts_file),
            names,
            FixOptions(detect_zeroes=detect_zeroes, bus=bus, all_disks=all_disks, **device),
            dry_run=dry_run,
            restart=restart,
            restart_timeout=restart_timeout,
            force=force,
            hosts_parallel=hosts_parallel,
            connect_timeout=connect_timeout,
            as_json=as_json,
        )
    uri = uris[0] if uris else None
    if uri or names:
        if xml_file or args_file or output or in_place or modernize:
            raise click.UsageError(
                "-c/DOMAIN cannot be mixed with --xml, --qemu-args, -o, --in-place or --modernize"
            )
        options = FixOptions(detect_zeroes=detect_zeroes, bus=bus, all_disks=all_disks, **device)
        return fix_libvirt(
            uri,
            names,
            options,
            dry_run=dry_run,
            restart=restart,
            restart_timeout=restart_timeout,
            force=force,
            as_json=as_json,
        )
    if restart:
        raise click.UsageError("--restart needs -c URI DOMAIN")
    if (xml_file is None) == (args_file is None):
        raise click.UsageError("give exactly one of --xml FILE or --qemu-args FILE")
    if sum((dry_run, output is not None, in_place)) > 1:
        raise click.UsageError("--dry-run, -o and --in-place exclude each other")
    if all_disks and bus is None:
        raise click.UsageError("--all-disks needs --bus scsi")
    if modernize and xml_file is not None:
        raise click.UsageError("--modernize applies to --qemu-args only")
    path = xml_file if xml_file is not None else args_file
    assert path is not None
    if in_place and path == "-":
        raise click.UsageError("--in-place needs a file, not stdin")
    if xml_file is not None and (granularity or ssd) and not libvirt_version:
        device["libvirt_version"] = _local_libvirt_version(no_probe)
    options = FixOptions(
        detect_zeroes=detect_zeroes, bus=bus, all_disks=all_disks, modernize=modernize, **device
    )
    from contextlib import ExitStack

    from vmtrim._util.files import update_file

    with ExitStack() as stack:  # --in-place: locked from the read to the write
        edit = stack.enter_context(update_file(path, force=force)) if in_place else None
        data = edit.data if edit is not None else None
        result = run_fix(path, options, xml=xml_file is not None, probe=not no_probe, data=data)
        if not as_json:
            print_warnings(result.warnings)
        written, backup = _write(result, path, output=output, edit=edit, force=force)
    if as_json:
        from vmtrim.output import print_json

        body: dict[str, Any] = {
            **result.to_json(),
            "mode": "dry-run"
            if dry_run
            else "in-place"
            if in_place
            else "output"
            if output
            else "stdout",
            "written": written,
            "backup": backup,
            "diff": result.diff,
        }
        if not (dry_run or in_place or output):
            body["text"] = result.new_text
        print_json(SCHEMA, body)
    else:
        if dry_run:
            click.echo(result.diff, nl=False)
        elif not (in_place or output):
            click.echo(result.new_text, nl=False)
        summarize(result, written=written, backup=backup)
        print_remaining([(None, result)])
    return EXIT_FINDINGS if any(skip.blocking for skip in result.skipped) else EXIT_OK


def _device_options(granularity: str | None, ssd: bool, version: str | None) -> dict[str, Any]:
    """The FixOptions fields of --discard-granularity, --ssd and --libvirt-version."""
    from vmtrim._util.versions import parse_version
    from vmtrim.fix.policy import parse_granularity

    options: dict[str, Any] = {"ssd": ssd}
    if granularity is not None:
        options["discard_granularity"] = parse_granularity(granularity)
    if version is not None:
        parsed = parse_version(version)
        if parsed is None or not version.strip()[:1].isdigit():
            raise BadInput(f"{version!r} is not a version (10.0, 9.0.0)", "--libvirt-version")
        options["libvirt_version"] = parsed
    return options


def _local_libvirt_version(no_probe: bool) -> Any:
    """The libvirt release an XML file is fixed for when --libvirt-version is not given."""
    from vmtrim.fix.libvirt import local_libvirt_version

    version = None if no_probe else local_libvirt_version()
    if version is None:
        why = "--no-probe: the XML is from another host" if no_probe else "no libvirt here"
        raise BadInput(
            f"--discard-granularity and --ssd on libvirt XML depend on the libvirt release"
            f" ({why}): give --libvirt-version X.Y",
            "--libvirt-version",
        )
    return version


def run_fix(
    path: str, options: FixOptions, *, xml: bool, probe: bool = True, data: bytes | None = None
) -> FixResult:
    """Fix ``data`` (else read ``path``, '-' for stdin) as libvirt XML or a QEMU command line."""
    from vmtrim._util.files import read_input
    from vmtrim.audit.hostprobe import HostProbes

    subject = "<stdin>" if path == "-" else path
    data = read_input(path) if data is None else data
    probes = HostProbes() if probe else HostProbes.no_probe()
    if not xml:
        from vmtrim.fix.qemu import fix_qemu_args

        return fix_qemu_args(data, options, subject=subject, probes=probes)
    from vmtrim.fix.xml import fix_domain_xml

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text: {exc.reason} at byte {exc.start}", subject) from exc
    return fix_domain_xml(text, options, subject=subject, probes=probes)


def _write(
    result: FixResult, path: str, *, output: str | None, edit: FileUpdate | None, force: bool
) -> tuple[str | None, str | None]:
    """Write as asked; returns (written path, backup path). Nothing is written on no change."""
    from vmtrim._util.files import update_file

    if edit is not None:  # --in-place: back up the bytes that were parsed, then replace
        if not result.changed:
            return None, None
        backup = edit.replace(result.new_text)
        return path, str(backup) if backup else None
    if output is not None:
        with update_file(output, force=force, create=True) as target:
            backup = target.replace(result.new_text, new_file_mode=0o600)
        return output, str(backup) if backup else None
    return None, None


def summarize(result: FixResult, *, written: str | None, backup: str | None) -> None:
    """The human summary on stderr: a table of changes, the disks left alone, the write.

    Everything printed is escaped plain text (never rich markup): after an --in-place
    write nothing here can fail on a hostile path or disk name.
    """
    from vmtrim.output import Column, print_line, print_note, render_table

    if result.changes:
        render_table(
            [
                Column("disk"),
                Column("setting"),
                Column("old", shorten="end"),
                Column("new", shorten="end"),
            ],
            [[c.disk or "(domain)", c.setting, c.old or "-", c.new or "-"] for c in result.changes],
            title=f"vmtrim fix: {result.subject}",
            stderr=True,
        )
    if result.already:
        print_note(f"already enabled: {_names(result.already)}", err=True)
    for skip in result.skipped:
        mark = "✗" if skip.blocking else "·"
        print_line(f"{mark} left alone: {skip.disk}: {skip.reason}", err=True)
    if not result.changed:
        if not result.fixed and not result.already:
            print_note("nothing to fix: no writable disk that fix can change", err=True)
        else:
            print_note("already enabled: nothing to change", err=True)
    if written:
        print_line(f"wrote {written}" + (f" (backup: {backup})" if backup else ""), err=True)


def print_warnings(warnings: list[str]) -> None:
    """What the change does to the guest, on stderr, before it is made."""
    from vmtrim.output import print_line

    for warning in warnings:
        print_line(f"! warning: {warning}", err=True)


def print_remaining(results: list[tuple[str | None, FixResult]]) -> None:
    """What no configuration can fix, once per run: the same advice for many disks (or
    domains) is one line."""
    from vmtrim.output import print_note

    grouped: dict[tuple[str, str, str, str | None], list[str]] = {}
    for domain, result in results:
        for item in result.remaining:
            key = (item.verdict, item.layer, item.reason, item.fix)
            grouped.setdefault(key, []).append(f"{domain}:{item.disk}" if domain else item.disk)
    for (verdict, layer, reason, fix_text), disks in grouped.items():
        how = f" ({fix_text})" if fix_text else ""
        print_note(f"! still {verdict} at {layer} ({_names(disks)}): {reason}{how}", err=True)


def _names(names: list[str], shown: int = 8) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, … ({len(names)} disks)"


def fix_libvirt(
    uri: str | None,
    names: tuple[str, ...],
    options: FixOptions,
    *,
    dry_run: bool,
    restart: bool,
    restart_timeout: float,
    force: bool,
    as_json: bool,
) -> int:
    """``fix -c URI DOMAIN...``: see :mod:`vmtrim.fix.libvirt` for the steps."""
    from vmtrim.channels.libvirt import connection, select_domains
    from vmtrim.fix.libvirt import POWER_CYCLE_NOTE, fix_live
    from vmtrim.output import print_line

    if not names:
        raise click.UsageError("name the domain(s) to fix")
    with connection(uri) as conn, _shutdown_progress() as progress:
        outcomes = [
            fix_live(
                conn,
                dom,
                options,
                dry_run=dry_run,
                restart=restart,
                restart_timeout=restart_timeout,
                force=force,
                warn=None if as_json else print_warnings_one,
                progress=progress,
            )
            for dom in select_domains(conn, names, every=False)
        ]
    if as_json:
        from vmtrim.output import print_json

        print_json(SCHEMA, {"domains": [o.to_json() for o in outcomes]})
    for outcome in outcomes if not as_json else []:
        if dry_run:
            click.echo(outcome.result.diff, nl=False)
        summarize(outcome.result, written=None, backup=outcome.backup)
        if outcome.defined:
            print_line(
                f"{outcome.domain}: defined the fixed XML; read back: no difference left"
                + (f" (backup: {outcome.backup})" if outcome.backup else ""),
                err=True,
            )
        if outcome.restarted:
            how = " (destroyed after the shutdown timeout: --force)" if outcome.forced else ""
            print_line(f"{outcome.domain}: restarted{how}: the fix is in effect", err=True)
        elif outcome.pending:
            print_line(f"{outcome.domain}: {POWER_CYCLE_NOTE}", err=True)
    if not as_json:
        several = len(outcomes) > 1
        print_remaining([(o.domain if several else None, o.result) for o in outcomes])
    blocking = any(skip.blocking for o in outcomes for skip in o.result.skipped)
    return EXIT_FINDINGS if blocking else EXIT_OK


def print_warnings_one(warning: str) -> None:
    print_warnings([warning])


@contextmanager
def _shutdown_progress() -> Iterator[Progress | None]:
    """A status line on stderr while --restart waits; none off a terminal or with --quiet."""
    from vmtrim.output import progress_console, safe_text

    out = progress_console()
    if not out.is_terminal or out.quiet:
        yield None
        return
    with out.status("") as status:

        def show(domain: str, waited: float, timeout: float) -> None:
            status.update(
                safe_text(
                    f"{domain}: waiting for the shutdown (guest agent, then ACPI):"
                    f" {waited:.0f} s of {timeout:g} s"
                )
            )

        yield show
