"""``vmtrim image info``: its options, declared once, and its body, without click.

:mod:`vmtrim.cli.image` builds the click command from :data:`OPTIONS` and calls
:func:`info`. The common invocation, ``vmtrim image info [FLAG...] PATH...`` with
only the flags of :data:`OPTIONS`, is also parsed here by :func:`fast_args`, so
that reading a big image does not first pay for importing click (20 ms, an eighth
of the run on the benchmark's image). Anything else (``-f``, ``--help``, ``--``,
an unknown option, a path that starts with ``-``, no path, global options) is left
to click, which parses or refuses it. The tests run a set of argvs, bad ones
included, both ways and compare stdout, stderr and exit codes byte for byte.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from vmtrim.image.info import ImageInfo
    from vmtrim.image.pool import PoolEntry

__all__ = ["OPTIONS", "Option", "fast_args", "info"]


class Option:
    """One option of ``image info``: a flag, or with ``choices`` a value from them."""

    __slots__ = ("choices", "decls", "dest", "help")

    def __init__(
        self, *decls: str, dest: str, help: str, choices: tuple[str, ...] | None = None
    ) -> None:
        self.decls = decls
        self.dest = dest
        self.help = help
        self.choices = choices

    @property
    def is_flag(self) -> bool:
        return self.choices is None

    @property
    def default(self) -> bool | None:
        return False if self.is_flag else None


OPTIONS: tuple[Option, ...] = (
    Option(
        "--json",
        dest="as_json",
        help="Print one vmtrim.image/1 JSON document (several images or a directory: one "
        "vmtrim.image-pool/1 document listing one vmtrim.image/1 document per image).",
    ),
    Option(
        "--scan-zeros",
        dest="scan_zeros",
        help="Also read every data cluster to find all-zero ones (slow).",
    ),
    Option(
        "-f",
        "--format",
        dest="fmt",
        choices=("qcow2", "raw"),
        help="Image format (default: probe).",
    ),
    Option("--no-backing", dest="no_backing", help="Do not follow the backing chain."),
)


def fast_args(args: list[str]) -> dict[str, Any] | None:
    """:func:`info`'s keyword arguments for ``[FLAG...] PATH...``, or None for click.

    Only the flags of :data:`OPTIONS`, each token exactly as declared, and paths that
    do not start with ``-`` are read; any other token means click parses the argv
    (and gives its error or help), so this parser never refuses anything itself.
    """
    flags = {decl: o.dest for o in OPTIONS if o.is_flag for decl in o.decls}
    kwargs: dict[str, Any] = {o.dest: o.default for o in OPTIONS}
    paths: list[str] = []
    for arg in args:
        if arg in flags:
            kwargs[flags[arg]] = True
        elif arg.startswith("-"):
            return None
        else:
            paths.append(arg)
    if not paths:
        return None
    return {"paths": tuple(paths), **kwargs}


def info(
    paths: tuple[str, ...], as_json: bool, scan_zeros: bool, fmt: str | None, no_backing: bool
) -> int:
    """The body of ``vmtrim image info``; returns the exit code."""
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


def _with_progress(
    label: str, work: Callable[[Callable[[int, int], None]], ImageInfo]
) -> ImageInfo:
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

        return work(update)


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
