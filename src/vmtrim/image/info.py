"""Inspect a qcow2 or raw disk image without QEMU: ``vmtrim image info``.

:func:`inspect` returns an :class:`ImageInfo` with the header facts, the guest
view (what the guest sees where), the host view (what the file holds) and the
reclaim view (what a trim could give back, what is wasted now), for the image
and, through ``backing``, for every layer of its backing chain.

Counts named after ``qemu-img check`` (allocated, fragmented, compressed
clusters, image-end-offset, leaks) mean exactly what qemu-img means by them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vmtrim.errors import ImageError
from vmtrim.image.allocation import Coverage, extents_fd, stored_extents
from vmtrim.image.files import open_readonly
from vmtrim.image.qcow2 import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSED,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    NORMAL,
    UNALLOCATED_ALLOC,
    UNALLOCATED_PLAIN,
    ZERO_ALLOC,
    ZERO_PLAIN,
    Qcow2Reader,
)

if TYPE_CHECKING:
    from vmtrim.image.scan import Scan

SCHEMA = "vmtrim.image/1"
MAX_CHAIN = 256
Progress = Callable[[int, int], None]


@dataclass
class GuestView:
    data_bytes: int = 0
    zero_bytes: int = 0
    unallocated_bytes: int = 0
    unallocated_ranges: int = 0
    data_clusters: int | None = None
    zero_clusters: int | None = None
    data_subclusters: int | None = None
    zero_subclusters: int | None = None
    unallocated_subclusters: int | None = None
    compressed_clusters: int | None = None
    compressed_bytes: int | None = None


@dataclass
class HostView:
    clusters_in_use: int | None = None
    bytes_in_use: int | None = None
    shared_clusters: int | None = None
    shared_bytes: int | None = None
    leaked_clusters: int | None = None
    leaked_bytes: int | None = None
    metadata_bytes: int | None = None
    image_end_offset: int | None = None
    punched_hole_bytes: int = 0  # within the file size, stored nowhere (FIEMAP)
    unwritten_bytes: int = 0  # stored, but reserved by fallocate and never written


@dataclass
class ReclaimView:
    max_trim_bytes: int = 0  # what discarding the whole guest disk would give back (du)
    max_trim_note: str | None = None
    wasted_bytes: int = 0
    leaked_bytes: int = 0
    tail_bytes: int = 0
    zero_data_bytes: int | None = None  # only with scan_zeros
    snapshot_only_bytes: int = 0  # stored clusters only internal snapshots hold


@dataclass
class ImageInfo:
    path: str
    format: str  # 'qcow2' | 'raw'
    virtual_size: int
    file_size: int
    allocated_bytes: int
    cluster_size: int | None = None
    version: int | None = None
    compat: str | None = None
    refcount_bits: int | None = None
    features: dict[str, Any] = field(default_factory=dict)
    snapshot_count: int = 0
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    backing_file: str | None = None
    backing_path: str | None = None
    backing_format: str | None = None
    backing: ImageInfo | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    image_end_offset: int | None = None
    # `qemu-img measure -O qcow2` with this image's cluster size and refcount width
    # (64 KiB and 16 for raw); None when a backing file holds part of the data
    measure_required: int | None = None
    leaks: int | None = None
    corruptions: int | None = None
    guest: GuestView = field(default_factory=GuestView)
    host: HostView = field(default_factory=HostView)
    reclaim: ReclaimView = field(default_factory=ReclaimView)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``vmtrim.image/1`` (without the schema field)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "backing":
                out[name] = value.to_json() if value is not None else None
            elif name in ("guest", "host", "reclaim"):
                out[name] = dict(value.__dict__)
            else:
                out[name] = value
        return out

    def chain(self) -> list[ImageInfo]:
        layers: list[ImageInfo] = []
        node: ImageInfo | None = self
        while node is not None:
            layers.append(node)
            node = node.backing
        return layers


def probe_format(path: str) -> str:
    """QEMU's format name for ``path``, probed as qemu-img probes (see image.probe)."""
    from vmtrim.image.probe import probe_fd

    fd = open_readonly(path)
    try:
        return probe_fd(fd, path)
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror}", subject=path) from exc
    finally:
        os.close(fd)


def readable_format(path: str, fmt: str | None) -> str:
    """``fmt``, or the probed format; any format but qcow2 and raw is refused."""
    from vmtrim.image.probe import NAMES

    found = fmt or probe_format(path)
    if found not in ("qcow2", "raw"):
        name = NAMES.get(found, found)
        raise ImageError(f"{name} image: not supported, use qemu-img", subject=path)
    return found


def resolve_backing(image_path: str, name: str) -> str:
    """Backing names are relative to the directory of the image that names them."""
    if name.startswith("json:") or ("://" in name and not name.startswith("file://")):
        raise ImageError(
            f"backing file {name!r} uses a protocol vmtrim cannot read", subject=image_path
        )
    if name.startswith("file:"):
        name = name[5:].removeprefix("//")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def chain_paths(path: str, fmt: str | None = None) -> list[tuple[str, str]]:
    """[(path, format)] from ``path`` down its backing chain, checked for loops and gaps."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    current: str | None = path
    while current is not None:
        real = os.path.realpath(current)
        if real in seen:
            raise ImageError(f"backing chain loops back to {current}", subject=path)
        if len(out) >= MAX_CHAIN:
            # each layer nests one level in --json and in the map's resolution
            raise ImageError(f"backing chain deeper than {MAX_CHAIN} layers", subject=path)
        seen.add(real)
        layer_fmt = readable_format(current, fmt)
        out.append((current, layer_fmt))
        if layer_fmt == "raw":
            break
        with Qcow2Reader(current) as reader:
            name, fmt = reader.header.backing_file, reader.header.backing_format
        if not name:
            break
        below = resolve_backing(current, name)
        if not os.path.exists(below):
            raise ImageError(
                f"backing file {name!r} not found (looked at {below})", subject=current
            )
        current = below
    return out


def inspect(
    path: str | os.PathLike[str],
    *,
    scan_zeros: bool = False,
    follow_backing: bool = True,
    fmt: str | None = None,
    progress: Progress | None = None,
    header_only: bool = False,
) -> ImageInfo:
    """Read ``path`` (qcow2 or raw) read-only and return what it holds.

    With ``follow_backing`` every layer of the backing chain is inspected too
    and linked through :attr:`ImageInfo.backing`. With ``header_only`` the qcow2
    L2/refcount scan is skipped: header facts, sizes and allocation only, and the
    cluster counts and views stay unset (what audit needs, without reading metadata).
    """
    path = os.fspath(path)
    layers = chain_paths(path, fmt) if follow_backing else [(path, readable_format(path, fmt))]
    infos: list[ImageInfo] = []
    for layer_path, layer_fmt in layers:
        if layer_fmt == "raw":
            infos.append(_inspect_raw(layer_path, scan_zeros, progress))
        else:
            with Qcow2Reader(layer_path) as reader:
                infos.append(_inspect_qcow2(reader, scan_zeros, progress, header_only))
    for upper, lower in itertools.pairwise(infos):
        upper.backing = lower
        # guest discards reach the top layer only: a backing file never shrinks
        lower.reclaim.max_trim_bytes = 0
        lower.reclaim.max_trim_note = "backing file: guest discards never reach it"
    return infos[0]


def _file_facts(fd: int, path: str) -> tuple[int, int, Coverage, int]:
    """(size, du bytes, what the filesystem stores, unwritten bytes)."""
    st = os.fstat(fd)
    try:
        stored = stored_extents(fd, st.st_size)
    except OSError as exc:
        raise ImageError(f"cannot read allocation: {exc.strerror}", subject=path) from exc
    return (
        st.st_size,
        st.st_blocks * 512,
        Coverage(stored.starts, stored.ends),
        stored.unwritten_bytes,
    )


def _inspect_raw(path: str, scan_zeros: bool, progress: Progress | None) -> ImageInfo:
    fd = open_readonly(path)
    try:
        size, allocated, cov, unwritten = _file_facts(fd, path)
        info = ImageInfo(
            path=path,
            format="raw",
            virtual_size=-(-size // 512) * 512,
            file_size=size,
            allocated_bytes=allocated,
        )
        data = cov.total
        info.guest.data_bytes = data
        info.guest.zero_bytes = size - data
        info.host.punched_hole_bytes = size - data
        info.host.unwritten_bytes = unwritten
        info.reclaim.max_trim_bytes = data
        seek_starts, seek_ends = extents_fd(fd, size)
        info.measure_required = measure_required(
            info.virtual_size, 65536, 4, False, _clusters_touched(seek_starts, seek_ends, 65536)
        )
        if scan_zeros:
            blocks = zero_blocks(fd, cov.starts, cov.ends - cov.starts, 4096, progress)
            zero = int(cov.within(blocks, np.full(len(blocks), 4096, np.int64)).sum())
            info.reclaim.zero_data_bytes = zero
            info.reclaim.wasted_bytes = zero
    finally:
        os.close(fd)
    return info


def _inspect_qcow2(
    reader: Qcow2Reader, scan_zeros: bool, progress: Progress | None, header_only: bool = False
) -> ImageInfo:
    from vmtrim.image.scan import scan

    h = reader.header
    cs = h.cluster_size
    size, allocated, cov, unwritten = _file_facts(reader.fd, reader.path)
    info = ImageInfo(
        path=reader.path,
        format="qcow2",
        virtual_size=h.size,
        file_size=size,
        allocated_bytes=allocated,
        cluster_size=cs,
        version=h.version,
        compat=h.compat,
        refcount_bits=h.refcount_bits,
        features={
            "dirty": bool(h.incompatible & INCOMPAT_DIRTY),
            "corrupt": bool(h.incompatible & INCOMPAT_CORRUPT),
            "lazy_refcounts": bool(h.compatible & COMPAT_LAZY_REFCOUNTS),
            "extended_l2": h.extended_l2,
            "compression_type": COMPRESSION_NAMES[h.compression_type],
            "external_data_file": h.data_file,
            "bitmaps": h.bitmap_directory[0] if h.bitmap_directory else 0,
        },
        snapshot_count=len(reader.snapshots),
        snapshots=[
            {"id": s.id, "name": s.name, "vm_state_size": s.vm_state_size, "disk_size": s.disk_size}
            for s in reader.snapshots
        ],
        backing_file=h.backing_file,
        backing_format=h.backing_format,
    )
    if h.backing_file:
        # a protocol backing (nbd://, json:) has no path; following it is what fails
        with contextlib.suppress(ImageError):
            info.backing_path = resolve_backing(reader.path, h.backing_file)
    if header_only:
        return info
    s = scan(reader, want_units=True)
    info.total_clusters = s.total_clusters
    info.allocated_clusters = s.allocated_clusters
    info.fragmented_clusters = s.fragmented_clusters
    info.compressed_clusters = s.compressed_clusters
    info.image_end_offset = s.image_end_offset
    info.leaks = s.leaks
    info.corruptions = s.corruptions

    g = info.guest
    unit = cs // 32 if h.extended_l2 else cs
    uc = s.unit_counts
    data_units = uc.get(NORMAL, 0)
    zero_units = uc.get(ZERO_PLAIN, 0) + uc.get(ZERO_ALLOC, 0)
    g.data_clusters = s.data_clusters
    g.zero_clusters = s.zero_clusters
    if h.extended_l2:
        g.data_subclusters = data_units
        g.zero_subclusters = zero_units
        total_units = -(-h.size // unit)
        g.unallocated_subclusters = total_units - sum(
            v for k, v in uc.items() if k not in (UNALLOCATED_PLAIN, UNALLOCATED_ALLOC)
        )
    g.compressed_clusters = s.compressed_clusters
    g.compressed_bytes = s.compressed_bytes
    g.data_bytes = min(h.size, (data_units + uc.get(COMPRESSED, 0)) * unit)
    g.zero_bytes = min(h.size - g.data_bytes, zero_units * unit)
    g.unallocated_bytes = max(0, h.size - g.data_bytes - g.zero_bytes)
    g.unallocated_ranges = _unallocated_ranges(reader, s) if g.unallocated_bytes else 0

    hv = info.host
    hv.clusters_in_use = s.clusters_in_use
    hv.bytes_in_use = s.clusters_in_use * cs
    hv.shared_clusters = s.shared_clusters
    hv.shared_bytes = s.shared_clusters * cs
    hv.leaked_clusters = s.leaks
    leaked = cov.within(s.leaked_index * cs, np.full(len(s.leaked_index), cs, np.int64))
    hv.leaked_bytes = int(leaked.sum())
    hv.metadata_bytes = s.metadata_clusters * cs
    hv.image_end_offset = s.image_end_offset
    hv.punched_hole_bytes = size - cov.total
    hv.unwritten_bytes = unwritten

    r = info.reclaim
    excl = s.exclusive_data_host
    freed = s.trim_freed * cs
    r.max_trim_bytes = int(cov.within(freed, np.full(len(freed), cs, np.int64)).sum())
    if h.data_file is not None:
        r.max_trim_note = "guest data lives in the external data file"
    r.leaked_bytes = hv.leaked_bytes
    held = s.snapshot_only * cs
    r.snapshot_only_bytes = int(cov.within(held, np.full(len(held), cs, np.int64)).sum())
    if not h.backing_file:
        info.measure_required = measure_required(
            h.size, cs, h.refcount_order, h.extended_l2, s.data_guest_clusters
        )
    end = min(s.image_end_offset, size)
    r.tail_bytes = cov.total - int(cov.upto(np.array([end], np.int64))[0])
    r.wasted_bytes = r.leaked_bytes + r.tail_bytes
    if scan_zeros:
        # only clusters the host stores: a zero cluster that is a hole wastes nothing
        stored = np.sort(excl[cov.within(excl, np.full(len(excl), cs, np.int64)) > 0])
        lengths = np.full(len(stored), cs, np.int64)
        blocks = zero_blocks(reader.fd, stored, lengths, cs, progress)
        r.zero_data_bytes = int(cov.within(blocks, np.full(len(blocks), cs, np.int64)).sum())
        r.wasted_bytes += r.zero_data_bytes
    return info


def _clusters_touched(starts: Any, ends: Any, cs: int) -> int:
    """Distinct ``cs``-sized clusters the [start, end) extents touch."""
    first = np.asarray(starts, np.int64) // cs
    last = (np.asarray(ends, np.int64) - 1) // cs
    total = int((last - first + 1).sum())
    # an extent ending in the cluster the next one starts in counts it once
    shared = int((first[1:] == last[:-1]).sum()) if len(first) > 1 else 0
    return total - shared


def _refcount_metadata(clusters: int, cs: int, refcount_order: int) -> int:
    """qcow2_refcount_metadata_size: refcount blocks and table for ``clusters``, themselves
    included (the fixed point QEMU iterates to)."""
    per_table_cluster = cs // 8
    per_block = cs * 8 // (1 << refcount_order)
    table = blocks = 0
    n = -1
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cs


def measure_required(
    virtual: int, cs: int, refcount_order: int, extended_l2: bool, data_clusters: int
) -> int:
    """What ``qemu-img measure -O qcow2`` prints as required (block/qcow2.c qcow2_measure):
    the metadata of a fully allocated image, minus its data, plus the data clusters."""
    aligned = -(-virtual // cs) * cs  # qcow2_measure rounds the size up to a cluster
    l2e = 16 if extended_l2 else 8
    meta = cs  # header
    nl2e = -(-(aligned // cs) // (cs // l2e)) * (cs // l2e)
    meta += nl2e * l2e
    nl1e = -(-(nl2e * l2e // cs) // (cs // 8)) * (cs // 8)
    meta += nl1e * 8
    meta += _refcount_metadata((meta + aligned) // cs, cs, refcount_order)
    return meta + data_clusters * cs


def _unallocated_ranges(reader: Qcow2Reader, s: Scan) -> int:
    """Number of maximal guest ranges the top layer leaves to its backing file."""
    units = s.units
    assert units is not None
    size = reader.header.size
    us = units.unit_size
    alloc = units.kind != UNALLOCATED_ALLOC
    index = units.index[alloc & (units.index * us < size)]  # sorted: the walk is in order
    if not len(index):
        return 1 if size else 0
    gaps = int(np.count_nonzero(np.diff(index) > 1))
    return gaps + int(index[0] > 0) + int((int(index[-1]) + 1) * us < size)


def zero_blocks(
    fd: int, starts: Any, lengths: Any, granularity: int, progress: Progress | None = None
) -> npt.NDArray[np.int64]:
    """Offsets of the ``granularity`` blocks of the given ranges that hold only zeros."""
    total = int(np.sum(lengths))
    done = 0
    found: list[npt.NDArray[np.int64]] = []
    chunk = max(granularity, (4 << 20) // granularity * granularity)
    for start, length in zip(
        np.asarray(starts).tolist(), np.asarray(lengths).tolist(), strict=True
    ):
        pos = start
        end = start + length
        while pos < end:
            n = min(chunk, end - pos)
            buf = os.pread(fd, n, pos)
            if not buf:
                break
            usable = len(buf) // granularity * granularity
            if usable:
                blocks = np.frombuffer(buf, dtype=np.uint8, count=usable).reshape(-1, granularity)
                found.append(pos + np.flatnonzero(~blocks.any(axis=1)) * granularity)
            pos += n
            done += n
            if progress is not None:
                progress(done, total)
    return np.concatenate(found) if found else np.zeros(0, np.int64)
