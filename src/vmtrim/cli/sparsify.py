"""``vmtrim sparsify IMAGE``: give a shut-off image's free space back, in place."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("sparsify")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--dry-run", is_flag=True, help="Boot with the image read-only and say what would be done."
)
@click.option(
    "--zeros", is_flag=True, help="Also discard the top image's data clusters that read all zero."
)
@click.option(
    "-c", "--connect", "uri", metavar="URI", help="libvirt URI asked whether a domain uses IMAGE."
)
@click.option(
    "--key",
    "key_specs",
    multiple=True,
    metavar="[ID:file:]FILE",
    help="Open LUKS volumes with the key in FILE (all of them, or the one ID names: sda2 or"
    " its LUKS UUID). The whole file is tried, then its first line. Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.sparsify/1 JSON document.")
def sparsify(
    image: Path,
    dry_run: bool,
    zeros: bool,
    uri: str | None,
    key_specs: tuple[str, ...],
    as_json: bool,
) -> int:
    """Trim every filesystem of IMAGE through the lab guest, in place.

    Whole-disk filesystems, GPT and MBR partitions and LVM volumes; ext2/3/4, xfs,
    btrfs and vfat are mounted with safe options and fstrimmed, swap is discarded
    behind its header (signature, UUID and label kept). A filesystem whose journal
    needs replaying, LUKS without a --key, unknown partitions and the space between
    partitions are left alone, with the reason. With --key, a LUKS volume is opened
    in the appliance (the key travels over its control port, never on a command
    line), what it holds is trimmed, and it is closed again; its header is only
    read. A key that opens none of its volumes: they are left alone, the rest is
    done, exit 2. Backing files are opened read-only. An image in use (QEMU's image
    lock, or a running libvirt domain) is refused with exit 3.
    """
    from vmtrim.output import print_json, print_note, progress_console
    from vmtrim.sparsify.engine import SCHEMA, WrongKey, parse_key
    from vmtrim.sparsify.engine import sparsify as run_sparsify
    from vmtrim.vm.guest import cleanup_on_signals

    keys = [parse_key(spec) for spec in key_specs]
    wrong: WrongKey | None = None
    with cleanup_on_signals(), progress_console().status(f"sparsify {image}") as status:
        try:
            result = run_sparsify(
                image,
                dry_run=dry_run,
                zeros=zeros,
                uri=uri,
                on_step=lambda text: status.update(f"sparsify {image}: {text}"),
                keys=keys,
            )
        except WrongKey as exc:  # the rest was done: report it, then fail with the one line
            wrong, result = exc, exc.result
    from vmtrim.errors import HistoryUnavailable
    from vmtrim.sparsify.engine import record_history

    try:
        record_history(result)
    except HistoryUnavailable as exc:  # the image is sparsified all the same: say so, go on
        print_note(f"not recorded: {exc.one_line()}", err=True)
    if as_json:
        print_json(SCHEMA, result.to_json())
    else:
        _render(result)
    if wrong is not None:
        raise wrong
    return 1 if any(fs.action == "failed" for fs in result.filesystems) else 0


def _render(result: object) -> None:
    from vmtrim.output import Column, Row, human_bytes, print_line, print_note, render_table
    from vmtrim.sparsify.engine import SparsifyResult

    assert isinstance(result, SparsifyResult)
    rows: list[Row] = []
    for fs in result.filesystems:
        details = [f"error: {fs.error}"] if fs.error else []
        rows.append(
            Row(
                [
                    fs.device,
                    fs.type,
                    human_bytes(fs.size),
                    fs.action,
                    human_bytes(fs.fitrim_bytes) if fs.fitrim_bytes is not None else "-",
                    human_bytes(fs.freed) if fs.freed is not None else "-",
                ],
                details,
            )
        )
    for left in result.left_alone:
        size = human_bytes(left.size) if left.size is not None else "-"
        rows.append(Row([left.device, left.type, size, "left alone", "-", "-"], [left.reason]))
    render_table(
        [
            Column("device", shorten="middle"),
            Column("type"),
            Column("size", "right"),
            Column("action"),
            Column("fitrim says", "right", priority=1),
            Column("host freed", "right"),
        ],
        rows,
        title=f"{result.path} ({result.format})",
    )
    after = result.allocated_after
    if result.dry_run:
        print_line(f"host allocation: {human_bytes(result.allocated_before)}")
        print_note("dry run: the image was attached read-only; nothing was changed")
        return
    print_line(
        f"host allocation: {human_bytes(result.allocated_before)} -> {human_bytes(after)}"
        + (f" (freed {human_bytes(result.allocated_before - after)})" if after is not None else "")
    )
    for warning in result.warnings:
        print_note(f"appliance: {warning}")
    if result.zeros_discarded:
        print_note(f"--zeros discarded {human_bytes(result.zeros_discarded)} of all-zero clusters")
    if result.backing:
        print_note(f"backing file {result.backing} was opened read-only and is unchanged")
    print_note("fitrim says: an upper bound from FITRIM; host freed: du before and after")
