"""``vmtrim image info|map``: read qcow2/raw allocation without QEMU.

The JSON paths import neither rich nor lxml: start-up time counts on big images.
``image info``'s options and body are in :mod:`vmtrim.cli.image_info`, which
:func:`vmtrim.cli.run` also calls without click for the common argvs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from vmtrim.cli import image_info
from vmtrim.cli.image_info import OPTIONS

if TYPE_CHECKING:
    from vmtrim.image.map import Extents

FORMATS = click.Choice(["qcow2", "raw"])


@click.group("image")
def image() -> None:
    """Read qcow2 and raw allocation without QEMU."""


def _options(command: Callable[..., int]) -> Callable[..., int]:
    """``image info``'s click options, built from :data:`~vmtrim.cli.image_info.OPTIONS`."""
    for opt in reversed(OPTIONS):
        if opt.is_flag:
            command = click.option(*opt.decls, opt.dest, is_flag=True, help=opt.help)(command)
        else:
            choice = click.Choice(list(opt.choices or ()))
            command = click.option(
                *opt.decls, opt.dest, type=choice, default=opt.default, help=opt.help
            )(command)
    return command


@image.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False, path_type=str))
@_options
def info(**kwargs: Any) -> int:
    """Header, guest, host and reclaim figures of IMAGE and its backing chain.

    With several images, or a directory such as a libvirt pool (the files directly in
    it), one table of every image, most reclaimable first; an image that cannot be read
    is a row with its error, and the exit code is then 2.
    """
    return image_info.info(**kwargs)


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
