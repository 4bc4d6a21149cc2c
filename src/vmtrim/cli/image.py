"""``vmtrim image info|map``: read qcow2/raw allocation without QEMU.

The JSON paths import neither rich nor lxml: start-up time counts on big images.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from vmtrim.image.info import ImageInfo
    from vmtrim.image.map import Extents
    from vmtrim.image.pool import PoolEntry

FORMATS = click.Choice(["qcow2", "raw"])


@click.group("image")
def image() -> None:
    """Read qcow2 and raw allocation without QEMU."""


@image.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False, path_type=str))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one vmtrim.image/1 JSON document (several images or a directory: one "
    "vmtrim.image-pool/1 document listing one vmtrim.image/1 document per image).",
)
@click.option(
    "--scan-zeros", is_flag=True, help="Also read every data cluster to find all-zero ones (slow)."
)
@click.option(
    "-f", "--format", "fmt", type=FORMATS, default=None, help="Image format (default: probe)."
)
@click.option("--no-backing", is_flag=True, help="Do not follow the backing chain.")
def info(
    paths: tuple[str, ...], as_json: bool, scan_zeros: bool, fmt: str | None, no_backing: bool
) -> int:
    """Header, guest, host and reclaim figures of IMAGE and its backing chain.

    With several images, or a directory such as a libvirt pool (the files directly in
    it), one table of every image, most reclaimable first; an image that cannot be read
    is a row with its error, and the exit code is then 2.
    """
    import os

    if len(paths) > 1 or os.path.isdir(paths[0]):
        return _pool(paths, as_json, fmt)
    from vmtrim.image.info import SCHEMA, inspect

    path = paths[0]
    if scan_zeros:
        result = _with_progress(
            "scanning for zero clusters",
            lambda cb: inspect(
                path, scan_zeros=True, follow_backing=not no_backing, fmt=fmt, progress=cb
            ),
        )
    else:
        result = inspect(path, follow_backing=not no_backing, fmt=fmt)
    if as_json:
        from vmtrim.output import print_json

        print_json(SCHEMA, result.to_json())
    else:
        _render_info(result)
    return 0


def _pool(paths: tuple[str, ...], as_json: bool, fmt: str | None) -> int:
    from vmtrim.errors import EXIT_BAD_INPUT, EXIT_OK
    from vmtrim.image.pool import POOL_SCHEMA, scan_pool

    entries = scan_pool(paths, fmt)
    if as_json:
        from vmtrim.output import print_json

        print_json(POOL_SCHEMA, {"images": [e.to_json() for e in entries]})
    else:
        _render_pool(entries)
    return EXIT_BAD_INPUT if any(e.error for e in entries) else EXIT_OK


@image.command("map")
@click.argument("path", type=click.Path(dir_okay=True, readable=False, path_type=str))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one vmtrim.image-map/1 JSON document (extents as qemu-img map).",
)
@click.option(
    "-f", "--format", "fmt", type=FORMATS, default=None, help="Image format (default: probe)."
)
def map_(path: str, as_json: bool, fmt: str | None) -> int:
    """Guest extents of IMAGE, with the meaning of `qemu-img map --output=json`."""
    from vmtrim.image.map import SCHEMA, map_image

    extents = map_image(path, fmt)
    if as_json:
        _write_map_json(SCHEMA, path, extents)
    else:
        _render_map(path, extents)
    return 0


_FLAG_TEXT = [
    f'"present": {"true" if f & 1 else "false"}, "zero": {"true" if f & 2 else "false"}, '
    f'"data": {"true" if f & 4 else "false"}'
    for f in range(8)
]


def _write_map_json(schema: str, path: str, ext: Extents, chunk: int = 50_000) -> None:
    # Hundreds of thousands of extents: format lines directly, a chunk at a time,
    # instead of building dicts for json.dumps.
    out = sys.stdout
    out.write(
        f'{{\n  "schema": {json.dumps(schema)},\n  "filename": {json.dumps(path)},\n  "extents": ['
    )
    for lo in range(0, len(ext), chunk):
        sl = slice(lo, lo + chunk)
        flags = [_FLAG_TEXT[f] for f in ext.flags[sl].tolist()]
        tails = [f', "offset": {o}}}' if o >= 0 else "}" for o in ext.offset[sl].tolist()]
        lines = [
            f'    {{"start": {s}, "length": {n}, "depth": {d}, {f}{t}'
            for s, n, d, f, t in zip(
                ext.start[sl].tolist(),
                ext.length[sl].tolist(),
                ext.depth[sl].tolist(),
                flags,
                tails,
                strict=True,
            )
        ]
        out.write(("\n" if lo == 0 else ",\n") + ",\n".join(lines))
    out.write("\n  ]\n}\n")


def _with_progress(label: str, work: Any) -> ImageInfo:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from vmtrim.output import progress_console

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=progress_console(),  # stderr, or nowhere with --quiet
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result: ImageInfo = work(update)
    return result


def _info_rows(layer: ImageInfo) -> list[tuple[str, str]]:
    """(what, value) lines of one layer, in the order an admin reads them."""
    from vmtrim.output import human_bytes

    rows: list[tuple[str, str]] = []

    def row(name: str, value: Any, *, size: bool = False) -> None:
        if value is not None:
            rows.append((name, f"{human_bytes(value)} ({value} B)" if size else str(value)))

    g, h, r = layer.guest, layer.host, layer.reclaim
    row("format", layer.format)
    row("virtual size", layer.virtual_size, size=True)
    row("file size (ls)", layer.file_size, size=True)
    row("allocated (du)", layer.allocated_bytes, size=True)
    if layer.format == "qcow2":
        row("cluster size", layer.cluster_size, size=True)
        row("compat / refcount bits", f"{layer.compat} / {layer.refcount_bits}")
        on = [k for k, v in layer.features.items() if v is True]
        row("features", ", ".join(on) or "none")
        row("compression", layer.features["compression_type"])
        if layer.features.get("external_data_file"):
            row("external data file", layer.features["external_data_file"])
        row("snapshots", layer.snapshot_count)
        if layer.backing_file:
            fmt = f" ({layer.backing_format})" if layer.backing_format else ""
            row("backing file", f"{layer.backing_file} -> {layer.backing_path}{fmt}")
        row("allocated / total clusters", f"{layer.allocated_clusters} / {layer.total_clusters}")
        row("fragmented clusters", layer.fragmented_clusters)
        stored = human_bytes(g.compressed_bytes)
        row("compressed clusters", f"{layer.compressed_clusters} ({stored} stored)")
        if layer.leaks or layer.corruptions:
            row("qemu-img check: leaks / corruptions", f"{layer.leaks} / {layer.corruptions}")
    row("guest: data", g.data_bytes, size=True)
    row("guest: zero", g.zero_bytes, size=True)
    if layer.format == "qcow2":
        unalloc = human_bytes(g.unallocated_bytes)
        row("guest: unallocated (from backing)", f"{unalloc} in {g.unallocated_ranges} ranges")
        if g.data_subclusters is not None:
            row(
                "guest: data / zero / unallocated subclusters",
                f"{g.data_subclusters} / {g.zero_subclusters} / {g.unallocated_subclusters}",
            )
        row("host: clusters in use", f"{h.clusters_in_use} ({human_bytes(h.bytes_in_use)})")
        row(
            "host: shared clusters (refcount >= 2)",
            f"{h.shared_clusters} ({human_bytes(h.shared_bytes)})",
        )
        row("host: leaked clusters", f"{h.leaked_clusters} ({human_bytes(h.leaked_bytes)})")
        row("host: metadata", h.metadata_bytes, size=True)
        row("host: image end offset", h.image_end_offset, size=True)
    row("host: punched holes", h.punched_hole_bytes, size=True)
    if h.unwritten_bytes:
        row("host: unwritten (fallocated, stored)", h.unwritten_bytes, size=True)
    row("reclaim: most a full guest trim frees", r.max_trim_bytes, size=True)
    if r.max_trim_note:
        row("  why", r.max_trim_note)
    row("reclaim: wasted now", r.wasted_bytes, size=True)
    if layer.format == "qcow2":
        row("  leaks", r.leaked_bytes, size=True)
        row("  tail past image end", r.tail_bytes, size=True)
    row("  all-zero data (--scan-zeros)", r.zero_data_bytes, size=True)
    return rows


def _render_info(top: ImageInfo) -> None:
    from vmtrim.output import Column, render_table

    columns = [Column("what"), Column("value", shorten="middle", min_width=20)]
    for depth, layer in enumerate(top.chain()):
        title = layer.path + (f" (backing depth {depth})" if depth else "")
        render_table(columns, _info_rows(layer), title=title, show_header=False)


def _render_map(path: str, ext: Extents) -> None:
    """Like qemu-img map's human format: only ranges that hold data, where they live."""
    from vmtrim.output import Column, human_bytes, print_line, render_table

    totals = {"data": 0, "zero": 0, "unallocated": 0}
    rows: list[list[str | None]] = []
    for row in ext.rows():
        length = int(row["length"])
        if not row["present"]:
            totals["unallocated"] += length
        elif row["zero"]:
            totals["zero"] += length
        else:
            totals["data"] += length
        if row["data"] and not row["zero"]:
            offset = row.get("offset")
            rows.append(
                [
                    f"{row['start']:#x}",
                    f"{length:#x}",
                    f"{offset:#x}" if offset is not None else "compressed",
                    ext.files[int(row["depth"])] if ext.files else "",
                ]
            )
    columns = [
        Column("Offset", justify="right"),
        Column("Length", justify="right"),
        Column("Mapped to", justify="right"),
        Column("File", shorten="middle"),
    ]
    render_table(columns, rows, title=f"{path}: data extents")
    summary = ", ".join(f"{name} {human_bytes(n)}" for name, n in totals.items())
    print_line(f"{summary} in {len(ext)} extents")


def _render_pool(entries: list[PoolEntry]) -> None:
    """One row per image, most reclaimable first; failures are rows with their error."""
    from vmtrim.output import Column, Row, Styled, human_bytes, render_table

    def size(n: int | None) -> str:
        return "-" if n is None else human_bytes(n)

    columns = [
        Column("image", shorten="middle", min_width=16),
        Column("reclaimable", justify="right"),
        Column("virtual", justify="right", priority=3),
        Column("allocated", justify="right"),
        Column("data", justify="right", priority=2),
        Column("zero", justify="right", priority=4),
        Column("unallocated", justify="right", priority=4),
        Column("leaked", justify="right", priority=1),
        Column("snapshots only", justify="right", priority=2),
        Column("fragmented", justify="right", priority=3),
        Column("end offset", justify="right", priority=2),
        Column("measure", justify="right", priority=3),
    ]
    rows: list[Row] = []
    failed = 0
    for e in entries:
        i = e.info
        if i is None:
            failed += 1
            rows.append(
                Row(
                    [e.path, Styled("error", "red"), *["-"] * (len(columns) - 2)],
                    details=[e.error],
                )
            )
            continue
        frag = "-"
        if i.allocated_clusters:
            frag = f"{100 * (i.fragmented_clusters or 0) / i.allocated_clusters:.1f}%"
        end: str | Styled = size(i.image_end_offset)
        if i.image_end_offset and i.measure_required and i.image_end_offset > i.measure_required:
            end = Styled(f"{end} !", "yellow")  # grown past what a copy would need
        rows.append(
            Row(
                [
                    e.path,
                    size(i.reclaim.max_trim_bytes),
                    size(i.virtual_size),
                    size(i.allocated_bytes),
                    size(i.guest.data_bytes),
                    size(i.guest.zero_bytes),
                    size(i.guest.unallocated_bytes) if i.format == "qcow2" else "-",
                    size(i.host.leaked_bytes),
                    size(i.reclaim.snapshot_only_bytes),
                    frag,
                    end,
                    size(i.measure_required),
                ],
                details=[f"{i.corruptions} corruptions (qemu-img check)"] if i.corruptions else [],
            )
        )
    notes = [
        "reclaimable: what discarding every guest disk would give back (du); end offset "
        "'!': past what qemu-img measure says a copy needs",
    ]
    if failed:
        notes.append(f"{failed} of {len(entries)} images could not be read")
    render_table(columns, rows, title=f"{len(entries)} images", notes=notes)
