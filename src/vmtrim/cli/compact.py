"""``vmtrim compact IMAGE``: rewrite a shut-off image so that ``ls -l`` shrinks."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("compact")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check and print the plan; change nothing.")
@click.option(
    "--keep-backup", is_flag=True, help="Keep the original as IMAGE.<time>.bak (a hard link)."
)
@click.option(
    "--drop-snapshots", is_flag=True, help="Compact an image with internal snapshots (drops them)."
)
@click.option("--compress", is_flag=True, help="Write compressed qcow2 clusters (qemu-img -c).")
@click.option(
    "-c", "--connect", "uri", metavar="URI", help="libvirt URI asked whether a domain uses IMAGE."
)
@click.option("--json", "as_json", is_flag=True, help="Print one vmtrim.compact/1 JSON document.")
def compact(
    image: Path,
    dry_run: bool,
    keep_backup: bool,
    drop_snapshots: bool,
    compress: bool,
    uri: str | None,
    as_json: bool,
) -> int:
    """Rewrite IMAGE with qemu-img convert, compare, and rename it into place.

    The format, cluster size, compat level, backing file and qcow2 options stay as
    they were; owner, mode and extended attributes (the SELinux label) too. An image
    in use (QEMU's image lock, or a running libvirt domain) is refused with exit 3.
    """
    from vmtrim.output import (
        Column,
        human_bytes,
        print_json,
        print_line,
        print_note,
        progress_console,
        render_table,
    )
    from vmtrim.sparsify.compact import SCHEMA
    from vmtrim.sparsify.compact import compact as run_compact

    with progress_console().status(f"compacting {image}"):
        result = run_compact(
            image,
            dry_run=dry_run,
            keep_backup=keep_backup,
            drop_snapshots=drop_snapshots,
            compress=compress,
            uri=uri,
        )
    if as_json:
        print_json(SCHEMA, result.to_json())
        return 0
    for leftover in result.removed_leftovers:
        print_note(f"removed {leftover}, left by a compact that was stopped")
    if dry_run:
        print_line(f"would run: {' '.join(result.command)}")
        print_note("dry run: nothing was changed")
        return 0
    rows = [
        ["ls -l", human_bytes(result.size_before), human_bytes(result.size_after)],
        ["du", human_bytes(result.allocated_before), human_bytes(result.allocated_after)],
    ]
    backing = f", backing {result.backing}" if result.backing else ""
    render_table(
        [Column("size"), Column("before", "right"), Column("after", "right")],
        rows,
        title=f"{result.path} ({result.format}{backing})",
    )
    if result.backup:
        print_note(f"the original is kept as {result.backup}")
    return 0
