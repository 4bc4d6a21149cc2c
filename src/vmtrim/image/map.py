"""The guest-visible map of an image chain: ``vmtrim image map``.

Extents mean what ``qemu-img map --output=json`` means (block/io.c
``bdrv_co_block_status`` and qemu-img.c ``get_block_status``):

- ``depth``: the layer of the chain that answers for the range;
- ``present``: some layer holds it (data or a zero flag); unallocated in every
  layer is ``present: false, zero: true`` at the depth of the last layer asked;
- ``zero``/``data``: reads as zeros / is stored data;
- ``offset``: where it lives in that layer's file, when QEMU reports one.

Adjacent extents merge when every field matches and offsets are contiguous,
the way qemu-img coalesces them. A qcow2 that looks metadata-preallocated
(more clusters with a refcount than the file has blocks, QEMU's
``qcow2_detect_metadata_preallocation``) has its data clusters split by the
holes of the file, as QEMU does with BDRV_BLOCK_RECURSE.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmtrim.errors import ImageError
from vmtrim.image.allocation import extents_fd
from vmtrim.image.files import open_readonly
from vmtrim.image.qcow2 import (
    COMPRESSED,
    INVALID,
    NORMAL,
    UNALLOCATED_ALLOC,
    UNALLOCATED_PLAIN,
    ZERO_ALLOC,
    ZERO_PLAIN,
    Qcow2Reader,
    unique,
)
from vmtrim.image.scan import Scan, scan

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

NORMAL_IN_HOLE = 7  # a data cluster whose host range is a hole (metadata preallocation)
RAW_DATA = 8
RAW_HOLE = 9

# flags per kind: present, zero, data
_PRESENT = np.array([0, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=np.uint8)
_ZERO = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0, 1], dtype=np.uint8)
_DATA = np.array([0, 0, 0, 0, 1, 1, 0, 1, 1, 0], dtype=np.uint8)
_FLAGS = _PRESENT | (_ZERO << 1) | (_DATA << 2)

SCHEMA = "vmtrim.image-map/1"


@dataclass
class Runs:
    """Contiguous guest ranges of one layer: start, length, kind, host offset (-1: none)."""

    start: I64
    length: I64
    kind: U8
    host: I64

    def __len__(self) -> int:
        return len(self.start)

    def take(self, sel: npt.NDArray[np.bool_] | slice) -> Runs:
        return Runs(self.start[sel], self.length[sel], self.kind[sel], self.host[sel])

    def clip(self, a: int, b: int) -> Runs:
        ends = self.start + self.length
        i0 = int(np.searchsorted(ends, a, side="right"))
        i1 = int(np.searchsorted(self.start, b, side="left"))
        r = Runs(
            self.start[i0:i1].copy(),
            self.length[i0:i1].copy(),
            self.kind[i0:i1],
            self.host[i0:i1].copy(),
        )
        if len(r):
            cut = a - int(r.start[0])
            if cut > 0:
                r.start[0] += cut
                r.length[0] -= cut
                if r.host[0] >= 0:
                    r.host[0] += cut
            over = int(r.start[-1] + r.length[-1]) - b
            if over > 0:
                r.length[-1] -= over
        return r


def coalesce(start: I64, length: I64, key: I64, host: I64) -> tuple[I64, I64, I64, I64]:
    """Merge neighbours with the same key whose host offsets continue (or both have none)."""
    if len(start) == 0:
        return start, length, key, host
    prev_end_host = host[:-1] + length[:-1]
    same = (
        (key[1:] == key[:-1])
        & (start[1:] == start[:-1] + length[:-1])
        & (((host[1:] < 0) & (host[:-1] < 0)) | ((host[:-1] >= 0) & (host[1:] == prev_end_host)))
    )
    heads = np.concatenate(([True], ~same))
    first = np.flatnonzero(heads)
    group_len = np.add.reduceat(length, first)
    return start[first], group_len, key[first], host[first]


def qcow2_runs(reader: Qcow2Reader, s: Scan, *, recurse: bool = True) -> Runs:
    """The guest view of one qcow2 layer as coalesced runs of unit kinds."""
    units = s.units
    assert units is not None
    size = reader.header.size
    us = units.unit_size
    ustart = units.index * us
    keep = ustart < size
    ustart = ustart[keep]
    ulen = np.minimum(us, size - ustart)
    ukind = units.kind[keep]
    uhost = units.host[keep]
    if (ukind == INVALID).any():
        bad = int(ustart[np.argmax(ukind == INVALID)])
        raise reader.error(f"invalid subcluster bitmap at guest offset {bad}")
    uend = ustart + ulen
    gap_start = np.concatenate(([0], uend))
    gap_end = np.concatenate((ustart, [size]))
    has_gap = gap_end > gap_start
    gs = gap_start[has_gap]
    n_gap = len(gs)
    start = np.concatenate((ustart, gs))
    length = np.concatenate((ulen, gap_end[has_gap] - gs))
    kind = np.concatenate((ukind, np.full(n_gap, UNALLOCATED_PLAIN, np.uint8)))
    host = np.concatenate((uhost, np.full(n_gap, -1, np.int64)))
    order = np.argsort(start, kind="stable")
    st, ln, kd, hs = coalesce(
        start[order], length[order], kind[order].astype(np.int64), host[order]
    )
    runs = Runs(st, ln, kd.astype(np.uint8), hs)
    if recurse and s.metadata_prealloc and reader.header.data_file is None:
        runs = _split_by_holes(runs, reader.fd)
    return runs


def _split_by_holes(runs: Runs, fd: int) -> Runs:
    """Mark the parts of data runs whose host range is a hole (or past EOF) as zero."""
    size = os.fstat(fd).st_size
    ds, de = extents_fd(fd, size)
    out: list[tuple[int, int, int, int]] = []
    for st, ln, kd, hs in zip(
        runs.start.tolist(),
        runs.length.tolist(),
        runs.kind.tolist(),
        runs.host.tolist(),
        strict=True,
    ):
        if kd != NORMAL:
            out.append((st, ln, kd, hs))
            continue
        pos, end = hs, hs + ln
        i = int(np.searchsorted(de, pos, side="right"))
        while pos < end:
            if i < len(ds) and ds[i] <= pos:
                nxt = min(end, int(de[i]))
                piece_kind = NORMAL
                i += 1
            else:
                nxt = min(end, int(ds[i])) if i < len(ds) else end
                piece_kind = NORMAL_IN_HOLE
            out.append((st + pos - hs, nxt - pos, piece_kind, pos))
            pos = nxt
    arr = np.array(out, dtype=np.int64).reshape(-1, 4)
    st2, ln2, kd2, hs2 = coalesce(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
    return Runs(st2, ln2, kd2.astype(np.uint8), hs2)


def raw_runs(fd: int) -> tuple[int, Runs]:
    """A raw file maps onto itself; QEMU rounds its size up to 512 bytes."""
    size = os.fstat(fd).st_size
    virtual = -(-size // 512) * 512
    ds, de = extents_fd(fd, size)
    # [size, virtual) is past EOF: file-posix reports it as a hole
    bounds = unique(np.concatenate(([0, virtual], ds, de)).astype(np.int64))
    starts = bounds[:-1]
    is_data = np.zeros(len(starts), dtype=bool)
    if len(ds):
        idx = np.searchsorted(de, starts, side="right")
        inside = idx < len(ds)
        is_data[inside] = ds[idx[inside]] <= starts[inside]
    kind = np.where(is_data, RAW_DATA, RAW_HOLE).astype(np.int64)
    st, ln, kd, hs = coalesce(starts, np.diff(bounds), kind, starts.copy())
    return virtual, Runs(st, ln, kd.astype(np.uint8), hs)


@dataclass
class Layer:
    path: str
    size: int
    runs: Runs


@dataclass
class Extents:
    start: I64
    length: I64
    depth: I64
    flags: I64  # bit 0 present, bit 1 zero, bit 2 data
    offset: I64  # -1: none
    files: list[str] = field(default_factory=list)  # the file of each depth

    def __len__(self) -> int:
        return len(self.start)

    def rows(self) -> Iterator[dict[str, int | bool]]:
        for st, ln, dp, fl, off in zip(
            self.start.tolist(),
            self.length.tolist(),
            self.depth.tolist(),
            self.flags.tolist(),
            self.offset.tolist(),
            strict=True,
        ):
            row: dict[str, int | bool] = {
                "start": st,
                "length": ln,
                "depth": dp,
                "present": bool(fl & 1),
                "zero": bool(fl & 2),
                "data": bool(fl & 4),
            }
            if off >= 0:
                row["offset"] = off
            yield row


def _entries(runs: Runs, depth: int, bottom: bool) -> Extents:
    flags = _FLAGS[runs.kind].astype(np.int64)
    if not bottom:
        unalloc = (runs.kind == UNALLOCATED_PLAIN) | (runs.kind == UNALLOCATED_ALLOC)
        assert not unalloc.any()
    return Extents(runs.start, runs.length, np.full(len(runs), depth, np.int64), flags, runs.host)


def _resolve(layers: list[Layer], d: int, a: int, b: int) -> list[Extents]:
    runs = layers[d].runs.clip(a, b)
    if d == len(layers) - 1:
        return [_entries(runs, d, True)]
    unalloc = (runs.kind == UNALLOCATED_PLAIN) | (runs.kind == UNALLOCATED_ALLOC)
    parts = [_entries(runs.take(~unalloc), d, False)]
    below = layers[d + 1].size
    hole = runs.take(unalloc)
    for st, ln, hs in zip(
        hole.start.tolist(), hole.length.tolist(), hole.host.tolist(), strict=True
    ):
        end = st + ln
        if st < below:
            parts.extend(_resolve(layers, d + 1, st, min(end, below)))
        if end > below:
            # past the end of the backing file: zeros answered by this layer
            cut = max(st, below)
            off = hs + (cut - st) if hs >= 0 else -1
            parts.append(
                Extents(
                    np.array([cut]),
                    np.array([end - cut]),
                    np.array([d]),
                    np.array([2]),
                    np.array([off]),
                )
            )
    return parts


def compose(layers: list[Layer]) -> Extents:
    parts = _resolve(layers, 0, 0, layers[0].size)
    start = np.concatenate([p.start for p in parts]).astype(np.int64)
    order = np.argsort(start, kind="stable")
    length = np.concatenate([p.length for p in parts]).astype(np.int64)[order]
    depth = np.concatenate([p.depth for p in parts]).astype(np.int64)[order]
    flags = np.concatenate([p.flags for p in parts]).astype(np.int64)[order]
    offset = np.concatenate([p.offset for p in parts]).astype(np.int64)[order]
    start = start[order]
    keep = length > 0
    key = (depth[keep] << 3) | flags[keep]
    st, ln, kd, off = coalesce(start[keep], length[keep], key, offset[keep])
    return Extents(st, ln, kd >> 3, kd & 7, off)


def map_image(path: str | os.PathLike[str], fmt: str | None = None) -> Extents:
    """qemu-img map's extents for ``path`` and its backing chain."""
    from vmtrim.image.info import chain_paths

    layers: list[Layer] = []
    for layer_path, layer_fmt in chain_paths(os.fspath(path), fmt):
        if layer_fmt == "raw":
            fd = open_readonly(layer_path)
            try:
                size, runs = raw_runs(fd)
            finally:
                os.close(fd)
            layers.append(Layer(layer_path, size, runs))
            continue
        with Qcow2Reader(layer_path) as reader:
            s = scan(reader, want_units=True, check=False)
            layers.append(Layer(layer_path, reader.header.size, qcow2_runs(reader, s)))
    if not layers:
        raise ImageError("no layers", subject=os.fspath(path))
    if layers[0].size == 0:
        # qemu-img map prints one empty extent for an empty disk, with no flag set
        zero = np.zeros(1, np.int64)
        extents = Extents(zero, zero.copy(), zero.copy(), zero.copy(), np.full(1, -1, np.int64))
    else:
        extents = compose(layers)
    extents.files = [layer.path for layer in layers]
    return extents


__all__ = ["COMPRESSED", "SCHEMA", "ZERO_ALLOC", "ZERO_PLAIN", "Extents", "map_image"]
