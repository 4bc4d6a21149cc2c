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
    MAX_L1_BYTES,
    NORMAL,
    OFFSET_MASK,
    SUBCLUSTERS,
    UNALLOCATED_ALLOC,
    UNALLOCATED_PLAIN,
    ZERO_ALLOC,
    ZERO_PLAIN,
    Qcow2Reader,
    cluster_types,
    unique,
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
    shared_l2_tables: int = 0  # active L2 tables more than one L1 entry names
    leaked_index: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    exclusive_data_host: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    # host clusters a discard of the whole guest disk would free (refcount drops to 0)
    trim_freed: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    # host clusters only internal snapshots hold (deleting them all would free these)
    snapshot_only: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    # guest clusters that hold data (not zero, not unallocated), as qemu-img measure counts
    data_guest_clusters: int = 0
    units: Units | None = None


class _Refs:
    """The references qemu-img check takes, as clusters with a count each.

    Regions follow QEMU's qcow2_inc_refcounts_imrt: one that reaches a whole cluster
    or more past the end of the file is one corruption and is not counted, so a
    bogus offset can neither move image-end-offset nor size an array.
    """

    def __init__(self, cluster_bits: int, file_len: int) -> None:
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.file_len = file_len
        self.clusters: list[I64] = []
        self.weights: list[I64] = []
        self.beyond = 0

    def add(self, start: I64, nbytes: I64 | int, weight: I64 | int = 1) -> None:
        start = np.asarray(start, np.int64)
        size = np.broadcast_to(np.asarray(nbytes, np.int64), start.shape)
        w = np.broadcast_to(np.asarray(weight, np.int64), start.shape)
        keep = size > 0
        past = keep & (start + size - self.file_len >= self.cs)
        self.beyond += int(w[past].sum())
        keep &= ~past
        start, size, w = start[keep], size[keep], w[keep]
        if not len(start):
            return
        first = start >> self.cb
        reps = ((start + size - 1) >> self.cb) - first + 1
        if int(reps.max()) == 1:
            self.clusters.append(first)
            self.weights.append(w)
            return
        step = np.arange(int(reps.sum()), dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
        self.clusters.append(np.repeat(first, reps) + step)
        self.weights.append(np.repeat(w, reps))

    def one(self, offset: int, nbytes: int, weight: int = 1) -> None:
        self.add(np.array([offset], np.int64), nbytes, weight)

    def arrays(self) -> tuple[I64, I64]:
        if not self.clusters:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self.clusters), np.concatenate(self.weights)


def _counts(clusters: I64, weights: I64, nb: int) -> U64:
    # float64 weights are exact to 2^53 references, far past any real count
    counted = np.bincount(clusters, weights=weights.astype(np.float64), minlength=nb)
    return counted.astype(np.uint64)


def _lookup(keys: I64, values: I64, at: I64) -> I64:
    """values[keys == at] for sorted unique ``keys`` (every ``at`` is present)."""
    out: I64 = values[np.searchsorted(keys, at)]
    return out


def _merge(offsets: I64, counts: I64, more: I64, more_counts: I64) -> tuple[I64, I64]:
    both = np.concatenate((offsets, more))
    uniq, inverse = np.unique(both, return_inverse=True)
    total = np.bincount(inverse, weights=np.concatenate((counts, more_counts)))
    return uniq, total.astype(np.int64)


def scan(reader: Qcow2Reader, *, want_units: bool = False, check: bool = True) -> Scan:
    """Walk the tables once. ``check=False`` skips the snapshot tables and the
    refcount comparison (all ``map`` needs is the guest view).

    Every L2 table is read once however many L1 entries (of the active table and of
    every snapshot) point at it; its references are weighted by that number, so
    65,536 snapshots of one L1 table, or a crafted L1 whose entries all name one L2
    table, cost what the metadata on disk costs.
    """
    h = reader.header
    cs = h.cluster_size
    cb = h.cluster_bits
    res = Scan(cluster_size=cs)
    res.total_clusters = -(-h.size // cs)
    file_len = -(-reader.file_size // 512) * 512
    meta = _Refs(cb, file_len)
    data = _Refs(cb, file_len)
    discarded = _Refs(cb, file_len)  # what a full guest discard would unreference
    held = _Refs(cb, file_len)  # what only snapshots reference
    meta.one(0, cs)
    l2n = h.l2_entries
    data_file = h.data_file is not None
    unit_parts: list[tuple[I64, U8, I64]] = []
    counts = np.zeros(8, dtype=np.float64)
    exclusive_candidates: list[I64] = []
    # active L2 tables and data clusters: (host offset, COPIED flag, weight, refcount taken as 1)
    copied: list[tuple[I64, npt.NDArray[np.bool_], I64, bool]] = []

    active_l1 = reader.l1_table()
    act_off, act_n = reader.l2_sharing(active_l1)
    shared = act_n > 1
    res.shared_l2_tables = int(shared.sum())
    if not check and res.shared_l2_tables:
        at = int(act_off[np.argmax(shared)])
        raise reader.error(
            f"L2 table at offset {at} is named by {int(act_n[np.argmax(shared)])} L1 entries: "
            "the image is corrupt (qemu-img check counts it); vmtrim does not map it"
        )
    all_off, all_n = act_off, act_n
    snap_groups: dict[tuple[int, int], int] = {}
    if check:
        for snap in reader.snapshots:
            if snap.l1_table_offset % cs or snap.l1_size * 8 > MAX_L1_BYTES:
                res.corruptions += 1  # qemu-img check skips such an entry
                continue
            key = (snap.l1_table_offset, snap.l1_size)
            snap_groups[key] = snap_groups.get(key, 0) + 1
        for (l1_at, l1_len), n in snap_groups.items():
            more, more_n = reader.l2_sharing(reader.l1_table(l1_at, l1_len))
            all_off, all_n = _merge(all_off, all_n, more, more_n * n)
    meta.one(h.l1_table_offset, h.l1_size * 8)
    for (l1_at, l1_len), n in snap_groups.items():
        meta.one(l1_at, l1_len * 8, n)
    meta.add(all_off, cs, all_n)
    has_l1 = active_l1 != 0
    l1_l2 = (active_l1[has_l1] & np.uint64(OFFSET_MASK)).astype(np.int64)
    has_l2 = l1_l2 != 0
    copied.append(
        (
            l1_l2[has_l2],
            (active_l1[has_l1][has_l2] >> np.uint64(63)) != 0,
            np.ones(int(has_l2.sum()), np.int64),
            False,
        )
    )

    def table_refs(ent: U64, bitmaps: U64 | None, w_all: I64) -> tuple[U8, I64, U64, U64]:
        """References and per-entry corruptions every L1 reference to a table adds."""
        ctype = cluster_types(ent, data_file, bitmaps is not None)
        offset = (ent & np.uint64(OFFSET_MASK)).astype(np.int64)
        with_host = (ctype == NORMAL) | (ctype == ZERO_ALLOC)
        comp = ctype == COMPRESSED
        c_off, c_len = reader.compressed_extent(ent[comp])
        misaligned = with_host & (offset % cs != 0)
        if not check and misaligned.any():
            bad = int(offset[np.argmax(misaligned)])
            raise reader.error(
                f"data cluster offset {bad} is not aligned to a cluster; qemu-img map "
                "refuses the image too"
            )
        res.corruptions += int(w_all[misaligned].sum())
        # QEMU: the COPIED flag must never be set on a compressed cluster
        res.corruptions += int(w_all[comp & ((ent >> np.uint64(63)) != 0)].sum())
        if bitmaps is not None:
            invalid = (reader.unit_kinds(ent, bitmaps) == INVALID).any(axis=1)
            res.corruptions += int(w_all[invalid].sum())
        if not check:  # the map needs no reference counts
            return ctype, offset, c_off, c_len
        if not data_file:
            data.add(offset[with_host], cs, w_all[with_host])
        data.add(c_off.astype(np.int64), c_len.astype(np.int64), w_all[comp])
        return ctype, offset, c_off, c_len

    for idx, entry, ent, bitmaps in reader.l2_entries(active_l1):
        row = entry // l2n
        col = entry % l2n
        table_at = (active_l1[idx] & np.uint64(OFFSET_MASK)).astype(np.int64)
        w_all = _lookup(all_off, all_n, table_at)[row]
        w_act = _lookup(act_off, act_n, table_at)[row]
        ctype, offset, c_off, c_len = table_refs(ent, bitmaps, w_all)
        with_host = (ctype == NORMAL) | (ctype == ZERO_ALLOC)
        comp = ctype == COMPRESSED
        res.allocated_clusters += int(w_act[with_host | comp].sum())
        res.compressed_clusters += int(w_act[comp].sum())
        res.compressed_bytes += int((c_len.astype(np.int64) * w_act[comp]).sum())
        res.data_clusters += int(w_act[ctype == NORMAL].sum())
        res.zero_clusters += int(w_act[(ctype == ZERO_PLAIN) | (ctype == ZERO_ALLOC)].sum())
        # fragmentation restarts in every L2 table (next_contiguous_offset is local)
        hr = row[with_host]
        ho = offset[with_host]
        broken = (hr[1:] == hr[:-1]) & (ho[1:] != ho[:-1] + cs)
        res.fragmented_clusters += int(w_act[with_host][1:][broken].sum())
        res.fragmented_clusters += int(w_act[comp].sum())
        exclusive_candidates.append(offset[ctype == NORMAL])
        copied.append(
            (offset[with_host], (ent[with_host] >> np.uint64(63)) != 0, w_act[with_host], data_file)
        )
        if check and not data_file:
            # qcow2 discard frees normal, zero-allocated and compressed clusters alike
            discarded.add(offset[with_host], cs, w_act[with_host])
            discarded.add(c_off.astype(np.int64), c_len.astype(np.int64), w_act[comp])
        vunit = idx[row].astype(np.int64) * l2n + col
        if bitmaps is None:
            kinds = ctype
            uindex = vunit
            host = np.where(with_host, offset, -1)
            w_units = w_act
        else:
            kinds2 = reader.unit_kinds(ent, bitmaps)
            kinds = kinds2.reshape(-1)
            uindex = (vunit[:, None] * SUBCLUSTERS + np.arange(SUBCLUSTERS)).reshape(-1)
            sub = cs // SUBCLUSTERS
            host2 = offset[:, None] + np.arange(SUBCLUSTERS, dtype=np.int64) * sub
            has = (kinds2 == NORMAL) | (kinds2 == ZERO_ALLOC) | (kinds2 == UNALLOCATED_ALLOC)
            host = np.where(has, host2, -1).reshape(-1)
            w_units = np.repeat(w_act, SUBCLUSTERS)
        counts += np.bincount(kinds, weights=w_units.astype(np.float64), minlength=8)[:8]
        has_data = (kinds == NORMAL) | (kinds == COMPRESSED)
        per_cluster = 1 if bitmaps is None else SUBCLUSTERS
        res.data_guest_clusters += len(unique(uindex[has_data] // per_cluster))
        if want_units:
            keep = kinds != UNALLOCATED_PLAIN
            unit_parts.append((uindex[keep], kinds[keep], host[keep]))
    res.unit_counts = {k: int(counts[k]) for k in range(7) if counts[k]}
    nb = -(-file_len // cs)

    if not check:
        res.clusters_in_use = int((reader.refcounts(nb) > 0).sum())
        _detect_prealloc(reader, res)
        res.units = _units(h.extended_l2, cs, unit_parts) if want_units else None
        return res

    # tables only snapshots point at: their references, nothing else
    snap_only = np.setdiff1d(all_off, act_off, assume_unique=True)
    snap_w = _lookup(all_off, all_n, snap_only)
    # label each table by its position in snap_only, to find its weight
    for pos, entry, ent, bitmaps in reader.l2_tables(np.arange(len(snap_only)), snap_only):
        ctype, offset, c_off, c_len = table_refs(ent, bitmaps, snap_w[pos][entry // l2n])
        with_host = (ctype == NORMAL) | (ctype == ZERO_ALLOC)
        if not data_file:
            held.add(offset[with_host], cs)
            held.add(c_off.astype(np.int64), c_len.astype(np.int64))
    held.add(snap_only, cs)
    for l1_at, l1_len in snap_groups:
        held.one(l1_at, l1_len * 8)
    held.one(h.snapshots_offset, reader.snapshots_size)
    if h.version >= 3:
        # QEMU's snapshot table check: v3 entries carry at least vm_state_size and disk_size
        res.corruptions += sum(1 for s in reader.snapshots if s.extra_data_size < 16)
    meta.one(h.snapshots_offset, reader.snapshots_size)
    meta.one(h.refcount_table_offset, h.refcount_table_clusters * cs)
    b_off, b_size, b_refs = reader.bitmap_ranges()
    meta.add(b_off, b_size, b_refs)
    refblocks = np.array(reader.refblock_offsets(), dtype=np.int64)
    _compare(reader, res, meta, data, refblocks, nb)

    # guest-trim upper bound: active data clusters nothing else shares
    ondisk_all = reader.refcounts(nb)
    res.corruptions += _copied_mismatches(ondisk_all, copied, cb)
    if exclusive_candidates:
        # unique: two entries naming one cluster (a corrupt image) free it once
        cand = unique(np.concatenate(exclusive_candidates))
        ci = cand >> cb
        inside = ci < len(ondisk_all)
        ok = np.zeros(len(cand), dtype=bool)
        ok[inside] = ondisk_all[ci[inside]] == 1
        res.exclusive_data_host = cand[ok]
    d_cl, d_w = discarded.arrays()
    res.snapshot_only = _minus(
        unique(held.arrays()[0]), unique(np.concatenate((d_cl, act_off >> cb)))
    )
    if len(d_cl):
        gone = _counts(d_cl, d_w, max(len(ondisk_all), int(d_cl.max()) + 1))[: len(ondisk_all)]
        res.trim_freed = np.flatnonzero((ondisk_all > 0) & (ondisk_all <= gone))

    res.units = _units(h.extended_l2, cs, unit_parts) if want_units else None
    return res


def _minus(a: I64, b: I64) -> I64:
    """Sorted unique ``a`` without what sorted unique ``b`` holds."""
    if not len(b):
        return a
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    out: I64 = a[b[at] != a]
    return out


def _copied_mismatches(
    ondisk: U64, entries: list[tuple[I64, npt.NDArray[np.bool_], I64, bool]], cluster_bits: int
) -> int:
    """QEMU's check_oflag_copied: COPIED must be set exactly when the refcount is 1."""
    bad = 0
    for offsets, flags, weights, assume_one in entries:
        if assume_one:
            bad += int(weights[~flags].sum())
            continue
        idx = offsets >> cluster_bits
        refcount = np.zeros(len(idx), dtype=np.uint64)
        inside = idx < len(ondisk)
        refcount[inside] = ondisk[idx[inside]]
        bad += int(weights[(refcount == 1) != flags].sum())
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


def _compare(
    reader: Qcow2Reader, res: Scan, meta: _Refs, data: _Refs, refblocks: I64, nb: int
) -> None:
    """compare_refcounts, after check_refblocks has taken the refcount blocks' references."""
    cs = reader.header.cluster_size
    cb = reader.header.cluster_bits
    m_cl, m_w = meta.arrays()
    d_cl, d_w = data.arrays()
    rb = refblocks >> cb
    top = max([nb - 1, *(int(a.max()) for a in (m_cl, d_cl, rb) if len(a))])
    nb = top + 1  # QEMU grows its array for the semi-allocated last cluster
    computed = _counts(np.concatenate((m_cl, d_cl)), np.concatenate((m_w, d_w)), nb)
    # check_refblocks runs last: a block whose cluster something else already uses
    # (or an earlier block) is one corruption, and the comparison below finds another
    seen: dict[int, int] = {}
    for cluster in rb.tolist():
        seen[cluster] = seen.get(cluster, 0) + 1
        if int(computed[cluster]) + seen[cluster] != 1:
            res.corruptions += 1
    computed += np.bincount(rb, minlength=nb).astype(np.uint64)
    res.corruptions += meta.beyond + data.beyond
    bits = reader.header.refcount_bits
    if bits < 64:
        # inc_refcounts stops at refcount_max: every reference past it is one corruption
        top_count = np.uint64((1 << bits) - 1)
        over = computed > top_count
        res.corruptions += int((computed[over] - top_count).sum())
        computed[over] = top_count
    # unsigned, as QEMU reads them: a 64-bit refcount of 2^63 is huge, not negative
    ondisk = reader.refcounts(nb)
    res.leaks = int((ondisk > computed).sum())
    res.corruptions += int((ondisk < computed).sum())
    res.leaked_index = np.flatnonzero(ondisk > computed)
    used = np.flatnonzero((ondisk > 0) | (computed > 0))
    highest = int(used[-1]) if len(used) else 0
    res.image_end_offset = (highest + 1) * cs
    res.clusters_in_use = int((ondisk > 0).sum())
    res.shared_clusters = int((ondisk >= 2).sum())
    res.metadata_clusters = len(unique(np.concatenate((m_cl, rb))))
    _detect_prealloc(reader, res)
