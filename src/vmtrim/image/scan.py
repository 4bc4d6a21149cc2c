"""One pass over a qcow2 image's tables: qemu-img check's counts and the guest map.

The reference counting mirrors ``qcow2_check_refcounts`` in QEMU's
block/qcow2-refcount.c: every cluster the header, the active and snapshot L1/L2
tables, the snapshot table, the refcount table and blocks, and persistent bitmaps
point at gets one reference; comparing that with the on-disk refcounts gives
leaks (on disk > referenced) and corruptions (on disk < referenced), and the
highest cluster either side uses gives image-end-offset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmtrim.image.qcow2 import (
    COMPRESSED,
    INVALID,
    NORMAL,
    OFFSET_MASK,
    SUBCLUSTERS,
    UNALLOCATED_ALLOC,
    UNALLOCATED_PLAIN,
    ZERO_ALLOC,
    ZERO_PLAIN,
    Qcow2Reader,
    cluster_types,
)

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]


@dataclass
class Units:
    """Guest units (clusters, or subclusters with extended L2) that are not plain holes."""

    unit_size: int
    index: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    kind: U8 = field(default_factory=lambda: np.zeros(0, np.uint8))
    host: I64 = field(default_factory=lambda: np.zeros(0, np.int64))  # -1: no offset


@dataclass
class Scan:
    cluster_size: int
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    compressed_bytes: int = 0
    data_clusters: int = 0
    zero_clusters: int = 0
    unit_counts: dict[int, int] = field(default_factory=dict)  # kind -> units
    image_end_offset: int = 0
    leaks: int = 0
    corruptions: int = 0
    clusters_in_use: int = 0
    shared_clusters: int = 0
    metadata_clusters: int = 0
    metadata_prealloc: bool = False
    leaked_index: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    exclusive_data_host: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    exclusive_compressed_bytes: int = 0
    units: Units | None = None


def _expand(start: I64, nbytes: I64, cluster_bits: int) -> I64:
    """Host cluster indices covered by byte ranges (inc_refcounts on each)."""
    keep = nbytes > 0
    first = start[keep] >> cluster_bits
    last = (start[keep] + nbytes[keep] - 1) >> cluster_bits
    span = last - first
    if not len(span) or int(span.max()) == 0:
        return first
    reps = span + 1
    base = np.repeat(first, reps)
    step = np.arange(int(reps.sum()), dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
    out: I64 = base + step
    return out


def _range(offset: int, nbytes: int, cluster_bits: int) -> I64:
    if nbytes <= 0:
        return np.zeros(0, np.int64)
    return _expand(np.array([offset], np.int64), np.array([nbytes], np.int64), cluster_bits)


def scan(reader: Qcow2Reader, *, want_units: bool = False, check: bool = True) -> Scan:
    """Walk the tables once. ``check=False`` skips the snapshot tables and the
    refcount comparison (all ``map`` needs is the guest view)."""
    h = reader.header
    cs = h.cluster_size
    cb = h.cluster_bits
    res = Scan(cluster_size=cs)
    res.total_clusters = -(-h.size // cs)
    meta: list[I64] = [_range(0, cs, cb)]
    data: list[I64] = []
    unit_parts: list[tuple[I64, U8, I64]] = []
    counts = np.zeros(8, dtype=np.int64)
    exclusive_candidates: list[I64] = []
    compressed_host: list[tuple[I64, I64]] = []
    # active L2 tables and data clusters: (host offset, COPIED flag, refcount taken as 1)
    copied: list[tuple[I64, npt.NDArray[np.bool_], bool]] = []
    l2n = h.l2_entries
    data_file = h.data_file is not None

    def walk(l1_offset: int, l1_size: int, active: bool) -> None:
        l1 = reader.l1_table(l1_offset, l1_size)
        meta.append(_range(l1_offset, l1_size * 8, cb))
        l2_offsets = (l1[l1 != 0] & np.uint64(OFFSET_MASK)).astype(np.int64)
        meta.append(l2_offsets >> cb)
        if active:
            has_l2 = l2_offsets != 0
            copied.append((l2_offsets[has_l2], (l1[l1 != 0][has_l2] >> np.uint64(63)) != 0, False))
        for idx, entry, ent, bitmaps in reader.l2_entries(l1):
            row = entry // l2n
            col = entry % l2n
            ctype = cluster_types(ent, data_file, bitmaps is not None)
            offset = (ent & np.uint64(OFFSET_MASK)).astype(np.int64)
            with_host = (ctype == NORMAL) | (ctype == ZERO_ALLOC)
            comp = ctype == COMPRESSED
            c_off, c_len = reader.compressed_extent(ent[comp])
            if not data_file:
                data.append(offset[with_host] >> cb)
                misaligned = offset[with_host] % cs != 0
                if misaligned.any():
                    res.corruptions += int(misaligned.sum())
                    data.append((offset[with_host][misaligned] + cs - 1) >> cb)
            data.append(_expand(c_off.astype(np.int64), c_len.astype(np.int64), cb))
            if not active:
                continue
            res.allocated_clusters += int(with_host.sum() + comp.sum())
            res.compressed_clusters += int(comp.sum())
            res.compressed_bytes += int(c_len.sum())
            res.data_clusters += int((ctype == NORMAL).sum())
            res.zero_clusters += int(((ctype == ZERO_PLAIN) | (ctype == ZERO_ALLOC)).sum())
            # fragmentation restarts in every L2 table (next_contiguous_offset is local)
            hr = row[with_host]
            ho = offset[with_host]
            same_table = hr[1:] == hr[:-1]
            res.fragmented_clusters += int((same_table & (ho[1:] != ho[:-1] + cs)).sum())
            res.fragmented_clusters += int(comp.sum())
            exclusive_candidates.append(offset[ctype == NORMAL])
            copied.append((offset[with_host], (ent[with_host] >> np.uint64(63)) != 0, data_file))
            compressed_host.append((c_off.astype(np.int64), c_len.astype(np.int64)))
            vunit = idx[row].astype(np.int64) * l2n + col
            if bitmaps is None:
                kinds = ctype
                uindex = vunit
                host = np.where(with_host, offset, -1)
            else:
                kinds2 = reader.unit_kinds(ent, bitmaps)
                kinds = kinds2.reshape(-1)
                uindex = (vunit[:, None] * SUBCLUSTERS + np.arange(SUBCLUSTERS)).reshape(-1)
                sub = cs // SUBCLUSTERS
                host2 = offset[:, None] + np.arange(SUBCLUSTERS, dtype=np.int64) * sub
                has = (kinds2 == NORMAL) | (kinds2 == ZERO_ALLOC) | (kinds2 == UNALLOCATED_ALLOC)
                host = np.where(has, host2, -1).reshape(-1)
            counts[:] += np.bincount(kinds, minlength=8)[:8]
            if want_units:
                keep = kinds != UNALLOCATED_PLAIN
                unit_parts.append((uindex[keep], kinds[keep], host[keep]))

    walk(h.l1_table_offset, h.l1_size, True)
    if not check:
        nb = -(-reader.file_size // cs)
        res.clusters_in_use = int((reader.refcounts(nb) > 0).sum())
        _detect_prealloc(reader, res)
        res.units = _units(h.extended_l2, cs, unit_parts) if want_units else None
        return res
    for snap in reader.snapshots:
        walk(snap.l1_table_offset, snap.l1_size, False)
    meta.append(_range(h.snapshots_offset, reader.snapshots_size, cb))
    meta.append(_range(h.refcount_table_offset, h.refcount_table_clusters * cs, cb))
    for off, nbytes in reader.bitmap_ranges():
        meta.append(_range(off, nbytes, cb))
    refblocks = reader.refblock_offsets()
    meta.append(np.array(refblocks, dtype=np.int64) >> cb)

    res.unit_counts = {k: int(counts[k]) for k in range(7) if counts[k]}
    if counts[INVALID]:
        res.corruptions += int(counts[INVALID])
    _compare(reader, res, meta, data)

    # guest-trim upper bound: active data clusters nothing else shares
    ondisk_all = reader.refcounts(-(-reader.file_size // cs))
    res.corruptions += _copied_mismatches(ondisk_all, copied, cb)
    if exclusive_candidates:
        cand = np.concatenate(exclusive_candidates)
        ci = cand >> cb
        inside = ci < len(ondisk_all)
        ok = np.zeros(len(cand), dtype=bool)
        ok[inside] = ondisk_all[ci[inside]] == 1
        res.exclusive_data_host = cand[ok]
    for c_off, c_len in compressed_host:
        ci = c_off >> cb
        inside = ci < len(ondisk_all)
        ok = np.zeros(len(c_off), dtype=bool)
        ok[inside] = ondisk_all[ci[inside]] == 1
        res.exclusive_compressed_bytes += int(c_len[ok].sum())

    res.units = _units(h.extended_l2, cs, unit_parts) if want_units else None
    return res


def _copied_mismatches(
    ondisk: U64, entries: list[tuple[I64, npt.NDArray[np.bool_], bool]], cluster_bits: int
) -> int:
    """QEMU's check_oflag_copied: COPIED must be set exactly when the refcount is 1."""
    bad = 0
    for offsets, flags, assume_one in entries:
        if assume_one:
            bad += int((~flags).sum())
            continue
        idx = offsets >> cluster_bits
        refcount = np.zeros(len(idx), dtype=np.uint64)
        inside = idx < len(ondisk)
        refcount[inside] = ondisk[idx[inside]]
        bad += int(((refcount == 1) != flags).sum())
    return bad


def _units(extended_l2: bool, cs: int, parts: list[tuple[I64, U8, I64]]) -> Units:
    units = Units(unit_size=cs // SUBCLUSTERS if extended_l2 else cs)
    if parts:
        units.index = np.concatenate([p[0] for p in parts])
        units.kind = np.concatenate([p[1] for p in parts])
        units.host = np.concatenate([p[2] for p in parts])
    return units


def _detect_prealloc(reader: Qcow2Reader, res: Scan) -> None:
    """QEMU's qcow2_detect_metadata_preallocation: more clusters in use than stored."""
    real = os.fstat(reader.fd).st_blocks * 512 // res.cluster_size
    threshold = max(real * 10 // 9, real + 2)
    res.metadata_prealloc = res.clusters_in_use > threshold


def _compare(reader: Qcow2Reader, res: Scan, meta: list[I64], data: list[I64]) -> None:
    cs = reader.header.cluster_size
    nb = -(-(-(-reader.file_size // 512) * 512) // cs)
    meta_refs = np.concatenate(meta) if meta else np.zeros(0, np.int64)
    refs = np.concatenate([meta_refs, *data])
    inside = refs < nb
    computed = np.bincount(refs[inside], minlength=nb)
    ondisk = reader.refcounts(nb).astype(np.int64)
    res.leaks = int((ondisk > computed).sum())
    res.corruptions += int((ondisk < computed).sum())
    res.leaked_index = np.flatnonzero(ondisk > computed)
    used = np.flatnonzero((ondisk > 0) | (computed > 0))
    highest = int(used[-1]) if len(used) else 0
    outside = refs[~inside]
    if len(outside):
        # referenced past the end of the file: nothing on disk counts them
        uniq = np.unique(outside)
        res.corruptions += len(uniq)
        highest = max(highest, int(uniq[-1]))
    res.image_end_offset = (highest + 1) * cs
    res.clusters_in_use = int((ondisk > 0).sum())
    res.shared_clusters = int((ondisk >= 2).sum())
    meta_in = meta_refs[meta_refs < nb]
    res.metadata_clusters = int(np.count_nonzero(np.bincount(meta_in, minlength=nb)))
    res.metadata_clusters += len(set(meta_refs[meta_refs >= nb].tolist()))
    _detect_prealloc(reader, res)
