"""Read-only parser for the qcow2 format (versions 2 and 3).

Works from QEMU's ``docs/interop/qcow2.txt``. Everything is big-endian. Tables
(L1, L2, refcount table and blocks) are read whole and decoded with numpy, so a
1 TiB image with hundreds of thousands of clusters is a few vector operations.

The counts follow ``qemu-img check`` (block/qcow2-refcount.c): which clusters are
*allocated*, *fragmented* and *compressed*, the recomputed reference count of every
host cluster, *leaks* (on-disk refcount above the recomputed one) and
*image-end-offset* (one past the highest cluster either side thinks is in use).

Any inconsistency that would make reading unsafe (a table past the end of the
file, an unaligned table, an impossible header field) raises
:class:`~vmtrim.errors.ImageError` naming the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmtrim.errors import ImageError
from vmtrim.image.files import open_readonly

MAGIC = b"QFI\xfb"

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1/L2 entries
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE
MAX_SNAPSHOT_EXTRA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
SNAPSHOT_HEADER = 40  # sizeof(QCowSnapshotHeader)
MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS  # QCOW2_MAX_BITMAP_DIRECTORY_SIZE
MAX_BACKING_NAME = 1023
SUBCLUSTERS = 32  # per cluster with extended L2

CRYPT_NAMES = {1: "AES", 2: "LUKS"}
COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}

# Per-unit (cluster, or subcluster with extended L2) kinds, as QEMU's
# QCow2SubclusterType. The map module turns them into qemu-img map flags.
UNALLOCATED_PLAIN = 0
UNALLOCATED_ALLOC = 1
ZERO_PLAIN = 2
ZERO_ALLOC = 3
NORMAL = 4
COMPRESSED = 5
INVALID = 6

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    disk_size: int | None
    extra_data_size: int = 16


@dataclass(frozen=True)
class Header:
    version: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    bitmap_directory: tuple[int, int, int] | None = None  # (count, size, offset)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entry_bytes(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_bytes

    @property
    def compat(self) -> str:
        return "0.10" if self.version == 2 else "1.1"


@dataclass
class _Extensions:
    backing_format: str | None = None
    data_file: str | None = None
    bitmaps: tuple[int, int, int] | None = None


def _be(fmt: str, data: bytes, offset: int = 0) -> tuple[int, ...]:
    return struct.unpack_from(">" + fmt, data, offset)


class Qcow2Reader:
    """One qcow2 file, opened read-only. Use as a context manager."""

    READ_BYTES = 1 << 20  # L2 tables read at a time: a buffer that stays in the CPU cache

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = open_readonly(self.path)
        try:
            self.file_size = os.fstat(self.fd).st_size
            self.header = self._read_header()
            self.snapshots = self._read_snapshots()
            self.bitmap_tables = self._read_bitmap_directory()
        except BaseException:
            os.close(self.fd)
            raise
        self._refcounts: U64 | None = None

    def __enter__(self) -> Qcow2Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- raw access --------------------------------------------------------

    def error(self, message: str) -> ImageError:
        return ImageError(message, subject=self.path)

    def pread(self, offset: int, length: int, what: str) -> bytes:
        """Read exactly ``length`` bytes or raise naming ``what`` was cut short."""
        if length <= 0:
            return b""
        if offset < 0 or offset + length > self.file_size:
            raise self.error(
                f"{what} at offset {offset} ({length} bytes) is past the end of the file"
                f" ({self.file_size} bytes); the image is truncated or corrupt"
            )
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise self.error(f"{what} at offset {offset}: short read; the file changed size")
        return data

    def _table(self, offset: int, count: int, what: str, *, align: bool = True) -> U64:
        if align and offset % self.header.cluster_size:
            raise self.error(f"{what} offset {offset} is not aligned to a cluster")
        data = self.pread(offset, count * 8, what)
        return np.frombuffer(data, dtype=">u8").astype(np.uint64)

    # -- header ------------------------------------------------------------

    def _read_header(self) -> Header:
        if self.file_size == 0:
            raise self.error("empty file: not a qcow2 image")
        head = os.pread(self.fd, 4096, 0)
        if head[:4] != MAGIC:
            raise self.error("not a qcow2 image (wrong magic)")
        if len(head) < 72:
            raise self.error(f"truncated qcow2 header ({len(head)} of 72 bytes)")
        (
            version,
            backing_offset,
            backing_size,
            cluster_bits,
            size,
            crypt,
            l1_size,
            l1_offset,
            rt_offset,
            rt_clusters,
            nb_snap,
            snap_offset,
        ) = _be("IQIIQIIQQIIQ", head, 4)
        if version not in (2, 3):
            raise self.error(f"unsupported qcow2 version {version} (only 2 and 3 exist)")
        fields: dict[str, int] = {}
        if version == 3:
            if len(head) < 104:
                raise self.error(f"truncated qcow2 v3 header ({len(head)} of 104 bytes)")
            incompat, compat, autoclear, rc_order, hdr_len = _be("QQQII", head, 72)
            fields = {
                "incompatible": incompat,
                "compatible": compat,
                "autoclear": autoclear,
                "refcount_order": rc_order,
                "header_length": hdr_len,
            }
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self.error(f"cluster_bits {cluster_bits} out of range 9..21")
        cluster_size = 1 << cluster_bits
        hdr_len = fields.get("header_length", 72)
        if version == 3 and (hdr_len < 104 or hdr_len > cluster_size or hdr_len % 8):
            raise self.error(f"header_length {hdr_len} out of range")
        if hdr_len > len(head):
            raise self.error(f"truncated qcow2 header ({len(head)} of {hdr_len} bytes)")
        rc_order = fields.get("refcount_order", 4)
        if rc_order > 6 or (version == 2 and rc_order != 4):
            raise self.error(f"refcount_order {rc_order} out of range")
        incompat = fields.get("incompatible", 0)
        if incompat & ~INCOMPAT_KNOWN:
            raise self.error(
                f"unknown incompatible feature bits {incompat & ~INCOMPAT_KNOWN:#x}; "
                "vmtrim cannot read this image safely"
            )
        if crypt:
            name = CRYPT_NAMES.get(crypt)
            if name is None:
                raise self.error(f"crypt_method {crypt} out of range")
            raise self.error(
                f"encrypted qcow2 ({name}): vmtrim cannot read the guest data of encrypted "
                "images, so it reports nothing for them"
            )
        compression = head[104] if hdr_len > 104 else 0
        if compression not in COMPRESSION_NAMES:
            raise self.error(f"compression type {compression} out of range")
        # QEMU's validate_compression_type: the bit is set exactly when the type is not zlib
        if compression and not incompat & INCOMPAT_COMPRESSION:
            raise self.error("compression type set without the compression-type feature bit")
        if not compression and incompat & INCOMPAT_COMPRESSION:
            raise self.error("compression-type feature bit set with the default zlib compression")
        if size >= 1 << 63:
            raise self.error(f"virtual size {size} out of range")
        entries_per_l2 = cluster_size // (16 if incompat & INCOMPAT_EXTL2 else 8)
        span = cluster_size * entries_per_l2
        needed_l1 = -(-size // span)
        if l1_size * 8 > MAX_L1_BYTES:
            raise self.error(f"l1_size {l1_size} out of range (L1 table over 32 MiB)")
        if needed_l1 > l1_size:
            raise self.error(
                f"L1 table has {l1_size} entries but the virtual size {size} needs {needed_l1}"
            )
        for name, off in (("L1 table", l1_offset), ("refcount table", rt_offset)):
            if off % cluster_size:
                raise self.error(f"{name} offset {off} is not aligned to a cluster")
        if l1_size and l1_offset + l1_size * 8 > self.file_size:
            raise self.error(f"L1 table at offset {l1_offset} is past the end of the file")
        if rt_clusters == 0 or rt_clusters * cluster_size > MAX_REFTABLE_BYTES:
            raise self.error(f"refcount_table_clusters {rt_clusters} out of range")
        if rt_offset + rt_clusters * cluster_size > self.file_size:
            raise self.error(f"refcount table at offset {rt_offset} is past the end of the file")
        if nb_snap > MAX_SNAPSHOTS:
            raise self.error(f"nb_snapshots {nb_snap} out of range (QEMU allows {MAX_SNAPSHOTS})")
        if nb_snap and (snap_offset % cluster_size or snap_offset + nb_snap * 40 >= 1 << 63):
            raise self.error(f"snapshot table offset {snap_offset} is not aligned to a cluster")
        if backing_offset > cluster_size:
            raise self.error(f"backing file name offset {backing_offset} is past the first cluster")

        backing: str | None = None
        if backing_offset:
            if backing_size > MAX_BACKING_NAME or backing_offset + backing_size > cluster_size:
                raise self.error("backing file name out of range")
            raw = self.pread(backing_offset, backing_size, "backing file name")
            backing = raw.decode("utf-8", "surrogateescape")
        extensions = self._read_extensions(hdr_len, backing_offset or cluster_size)
        if incompat & INCOMPAT_DATA_FILE and extensions.data_file is None:
            raise self.error("external data file feature set but no data file name")
        return Header(
            version=version,
            cluster_bits=cluster_bits,
            size=size,
            crypt_method=crypt,
            l1_size=l1_size,
            l1_table_offset=l1_offset,
            refcount_table_offset=rt_offset,
            refcount_table_clusters=rt_clusters,
            nb_snapshots=nb_snap,
            snapshots_offset=snap_offset,
            incompatible=incompat,
            compatible=fields.get("compatible", 0),
            autoclear=fields.get("autoclear", 0),
            refcount_order=rc_order,
            header_length=hdr_len,
            compression_type=compression,
            backing_file=backing,
            backing_format=extensions.backing_format,
            data_file=extensions.data_file,
            bitmap_directory=extensions.bitmaps,
        )

    def _read_extensions(self, start: int, end: int) -> _Extensions:
        """Header extensions live between the header and the backing name (or cluster 1)."""
        area = os.pread(self.fd, min(end, self.file_size), 0)
        out = _Extensions()
        pos = start
        while pos + 8 <= len(area):
            kind, length = _be("II", area, pos)
            pos += 8
            if kind == EXT_END:
                break
            if pos + length > len(area):
                raise self.error(f"header extension {kind:#x} runs past the first cluster")
            data = area[pos : pos + length]
            if kind == EXT_BACKING_FORMAT:
                out.backing_format = data.decode("utf-8", "replace")
            elif kind == EXT_DATA_FILE:
                out.data_file = data.decode("utf-8", "surrogateescape")
            elif kind == EXT_BITMAPS:
                if length < 24:
                    raise self.error("bitmaps header extension too short")
                nb, _reserved, dir_size, dir_offset = _be("IIQQ", data)
                if not 0 < nb <= MAX_BITMAPS:
                    raise self.error(f"bitmaps extension: {nb} bitmaps out of range 1..65535")
                if dir_size > MAX_BITMAP_DIRECTORY:
                    raise self.error(f"bitmap directory size {dir_size} out of range")
                if dir_offset % (1 << _be("I", area, 20)[0]):
                    raise self.error("bitmap directory offset is not aligned to a cluster")
                out.bitmaps = (nb, dir_size, dir_offset)
            pos += (length + 7) & ~7
        return out

    # -- snapshots and bitmaps --------------------------------------------

    def _read_snapshots(self) -> list[Snapshot]:
        """The snapshot table, with qcow2_do_read_snapshots' limits.

        The table is read through a window of whole megabytes, not four preads per
        entry: 65,536 snapshots are one pass.
        """
        h = self.header
        self.snapshots_size = 0
        if not h.nb_snapshots:
            return []
        out: list[Snapshot] = []
        window = _Window(self, "snapshot table")
        pos = h.snapshots_offset
        for i in range(h.nb_snapshots):
            pos = (pos + 7) & ~7
            fixed = window.read(pos, SNAPSHOT_HEADER)
            (
                l1_offset,
                l1_size,
                id_len,
                name_len,
                _date_s,
                _date_ns,
                _clock,
                vm_state,
                extra_len,
            ) = _be("QIHHIIQII", fixed)
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise self.error(
                    f"too much extra data in snapshot table entry {i} ({extra_len} > "
                    f"{MAX_SNAPSHOT_EXTRA} bytes); QEMU refuses the image"
                )
            pos += SNAPSHOT_HEADER
            extra = window.read(pos, min(extra_len, 16))
            pos += extra_len
            ident = window.read(pos, id_len)
            pos += id_len
            name = window.read(pos, name_len)
            pos += name_len
            if pos - h.snapshots_offset > MAX_SNAPSHOTS_BYTES:
                raise self.error("snapshot table is too big (over 64 MiB); QEMU refuses the image")
            disk_size = _be("Q", extra, 8)[0] if extra_len >= 16 else None
            if extra_len >= 8:
                vm_state = _be("Q", extra)[0]
            out.append(
                Snapshot(
                    ident.decode("utf-8", "replace"),
                    name.decode("utf-8", "replace"),
                    l1_offset,
                    l1_size,
                    vm_state,
                    disk_size,
                    extra_len,
                )
            )
        self.snapshots_size = pos - h.snapshots_offset
        return out

    def _read_bitmap_directory(self) -> dict[tuple[int, int], int]:
        """{(table offset, entries): directory entries naming it}, checked as QEMU opens it."""
        h = self.header
        if not (h.autoclear & AUTOCLEAR_BITMAPS) or h.bitmap_directory is None:
            return {}
        nb, dir_size, dir_offset = h.bitmap_directory
        directory = self.pread(dir_offset, dir_size, "bitmap directory")
        tables: dict[tuple[int, int], int] = {}
        names: set[bytes] = set()
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(directory):
                raise self.error("bitmap directory is truncated")
            table_offset, table_size, _flags, _type, _gran, name_len, extra_len = _be(
                "QIIBBHI", directory, pos
            )
            name = directory[pos + 24 + extra_len : pos + 24 + extra_len + name_len]
            if name in names:
                # bitmap_list_load refuses such a directory, and so does qemu-img
                raise self.error(f"bitmap {name.decode('utf-8', 'replace')!r} exists twice")
            names.add(name)
            pos += (24 + extra_len + name_len + 7) & ~7
            key = (table_offset, table_size)
            tables[key] = tables.get(key, 0) + 1
        return tables

    def bitmap_ranges(self) -> tuple[I64, I64, I64]:
        """(offsets, bytes, references) of what persistent bitmaps own.

        qemu-img check takes one reference per directory entry; entries that share a
        bitmap table are read once and weighted, so a directory fanning out to one
        table costs its size, not its size times the fan-out.
        """
        h = self.header
        empty = np.zeros(0, np.int64)
        if h.bitmap_directory is None or not self.bitmap_tables:
            return empty, empty, empty
        _nb, dir_size, dir_offset = h.bitmap_directory
        offsets = [np.array([dir_offset], np.int64)]
        sizes = [np.array([dir_size], np.int64)]
        weights = [np.ones(1, np.int64)]
        for (table_offset, table_size), refs in self.bitmap_tables.items():
            table = self._table(table_offset, table_size, "bitmap table")
            clusters = (table & np.uint64(OFFSET_MASK)).astype(np.int64)
            clusters = clusters[clusters != 0]
            offsets += [np.array([table_offset], np.int64), clusters]
            sizes += [np.array([table_size * 8], np.int64), np.full(len(clusters), h.cluster_size)]
            weights.append(np.full(1 + len(clusters), refs, np.int64))
        return np.concatenate(offsets), np.concatenate(sizes), np.concatenate(weights)

    # -- L1/L2 --------------------------------------------------------------

    def l1_table(self, offset: int | None = None, size: int | None = None) -> U64:
        h = self.header
        return self._table(
            h.l1_table_offset if offset is None else offset,
            h.l1_size if size is None else size,
            "L1 table",
        )

    def l2_entries(
        self, l1: U64, batch_bytes: int = 8 << 20
    ) -> Iterator[tuple[I64, I64, U64, U64 | None]]:
        """Yield the non-zero L2 entries of the tables ``l1`` points to, in guest order.

        Each batch is (L1 indices of its tables, entry position ``k * l2_entries + i``
        within the batch, entry values, extended-L2 bitmaps or None); a batch holds
        about as many entries as ``batch_bytes`` of full tables, however many
        mostly empty tables that takes. All-zero
        entries (unallocated clusters, most of a big sparse image) are never
        decoded: the tables are read a few at a time into a buffer small enough to stay
        in the CPU cache, searched there for non-zero words, and only those are
        gathered and swapped.

        A table several L1 entries point at (only a corrupt image has that) is read
        once, under the first of them: see :meth:`l2_sharing`.
        """
        l2_offsets = l1 & np.uint64(OFFSET_MASK)
        indices = np.flatnonzero(l2_offsets != 0)
        present = l2_offsets[indices].astype(np.int64)
        _, first = np.unique(present, return_index=True)
        if len(first) < len(present):
            keep = np.sort(first)
            indices, present = indices[keep], present[keep]
        yield from self.l2_tables(indices, present, batch_bytes)

    @staticmethod
    def l2_sharing(l1: U64) -> tuple[I64, I64]:
        """(distinct L2 table offsets, how many entries of ``l1`` point at each)."""
        present = (l1 & np.uint64(OFFSET_MASK)).astype(np.int64)
        present = present[present != 0]
        offsets, counts = np.unique(present, return_counts=True)
        return offsets, counts.astype(np.int64)

    def l2_tables(
        self, indices: I64, present: I64, batch_bytes: int = 8 << 20
    ) -> Iterator[tuple[I64, I64, U64, U64 | None]]:
        """:meth:`l2_entries` for tables at ``present``, labelled with ``indices``."""
        h = self.header
        cs = h.cluster_size
        bad = present % cs != 0
        if bad.any():
            k = int(np.argmax(bad))
            raise self.error(
                f"L2 table offset {int(present[k])} (L1 index {int(indices[k])}) is not "
                "aligned to a cluster"
            )
        past = present + cs > self.file_size
        if past.any():
            k = int(np.argmax(past))
            raise self.error(
                f"L2 table at offset {int(present[k])} (L1 index {int(indices[k])}) is past "
                f"the end of the file ({self.file_size} bytes); truncated or corrupt"
            )
        if not len(indices):
            return
        words_per_table = cs // 8
        step = 2 if h.extended_l2 else 1
        entries_per_table = words_per_table // step
        # a batch ends once it holds what batch_bytes of full tables hold: the callers'
        # arrays grow with the entries found, not with the tables searched, so a sparse
        # image is one batch and a full one is a table group of batch_bytes at a time
        limit = max(1, batch_bytes // h.l2_entry_bytes)
        # tables are read a few at a time into one buffer that stays in the CPU cache, so
        # each is searched where it was just copied (an mmap reads the page cache at page
        # granularity, behind a page fault and a TLB miss every 4 KiB: a third slower)
        per_read = max(1, min(batch_bytes, self.READ_BYTES) // cs)
        raw = bytearray(per_read * cs)
        view = memoryview(raw)
        buf = np.frombuffer(raw, np.uint64)
        nonzero = np.empty(len(buf), bool)
        offsets = present.tolist()
        first = found = 0  # the batch's first table, entries in it so far
        entries: list[I64] = []
        values: list[U64] = []
        maps: list[U64] = []
        for lo in range(0, len(offsets), per_read):
            group = offsets[lo : lo + per_read]
            for k, offset in enumerate(group):
                if os.preadv(self.fd, [view[k * cs : (k + 1) * cs]], offset) != cs:
                    raise self.error(
                        f"L2 table at offset {offset}: short read; the file changed size"
                    )
            n = len(group) * words_per_table
            # zero is zero in any byte order: no swap needed to find entries
            np.not_equal(buf[:n], 0, out=nonzero[:n])
            entry = np.flatnonzero(nonzero[:n]) // step
            if step == 2 and len(entry):
                entry = entry[np.concatenate(([True], entry[1:] != entry[:-1]))]
            values.append(buf[entry * step].byteswap())
            if step == 2:
                maps.append(buf[entry * step + 1].byteswap())
            entries.append(entry + (lo - first) * entries_per_table)
            found += len(entry)
            end = lo + len(group)
            if found >= limit or end == len(offsets):
                yield (
                    indices[first:end],
                    np.concatenate(entries),
                    np.concatenate(values),
                    np.concatenate(maps) if step == 2 else None,
                )
                first, found = end, 0
                entries, values, maps = [], [], []

    # -- refcounts -----------------------------------------------------------

    def refcount_table(self) -> U64:
        h = self.header
        return self._table(
            h.refcount_table_offset,
            h.refcount_table_clusters * h.cluster_size // 8,
            "refcount table",
        )

    def refcounts(self, nb_clusters: int) -> U64:
        """On-disk refcounts of host clusters ``0 .. nb_clusters-1``."""
        if self._refcounts is not None and len(self._refcounts) >= nb_clusters:
            return self._refcounts[:nb_clusters]
        h = self.header
        cs = h.cluster_size
        per_block = cs * 8 // h.refcount_bits
        out = np.zeros(nb_clusters, dtype=np.uint64)
        table = self.refcount_table()
        for i, entry in enumerate(table[: -(-nb_clusters // per_block)].tolist()):
            off = entry & REFT_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                raise self.error(f"refcount block {i} offset {off} is not aligned to a cluster")
            block = decode_refcounts(self.pread(off, cs, f"refcount block {i}"), h.refcount_order)
            lo = i * per_block
            hi = min(nb_clusters, lo + per_block)
            out[lo:hi] = block[: hi - lo]
        self._refcounts = out
        return out

    def refblock_offsets(self) -> list[int]:
        """Offsets of every refcount block, checked against the file."""
        cs = self.header.cluster_size
        out = []
        for i, entry in enumerate(self.refcount_table().tolist()):
            off = entry & REFT_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                raise self.error(f"refcount block {i} offset {off} is not aligned to a cluster")
            if off + cs > self.file_size:
                raise self.error(
                    f"refcount block {i} at offset {off} is past the end of the "
                    f"file ({self.file_size} bytes); truncated or corrupt"
                )
            out.append(off)
        return out

    def unit_kinds(self, entries: U64, bitmaps: U64 | None) -> U8:
        """Kind of every unit: shape [n, l2] without, [n, l2, 32] with extended L2."""
        types = cluster_types(entries, self.header.data_file is not None, bitmaps is not None)
        if bitmaps is None:
            return types
        bit = np.arange(SUBCLUSTERS, dtype=np.uint64)
        alloc = ((bitmaps[..., None] >> bit) & np.uint64(1)) != 0
        zero = ((bitmaps[..., None] >> (bit + np.uint64(32))) & np.uint64(1)) != 0
        shape = alloc.shape
        t = np.broadcast_to(types[..., None], shape)
        conflict = np.broadcast_to(((bitmaps & (bitmaps >> np.uint64(32))) != 0)[..., None], shape)
        any_alloc = np.broadcast_to(((bitmaps & np.uint64(0xFFFF_FFFF)) != 0)[..., None], shape)
        out = np.full(shape, UNALLOCATED_PLAIN, dtype=np.uint8)
        normal = t == NORMAL
        out[normal & ~alloc & ~zero] = UNALLOCATED_ALLOC
        out[normal & alloc] = NORMAL
        out[normal & zero] = ZERO_ALLOC
        out[normal & conflict] = INVALID
        unalloc = t == UNALLOCATED_PLAIN
        out[unalloc & zero] = ZERO_PLAIN
        out[unalloc & any_alloc] = INVALID
        out[t == COMPRESSED] = COMPRESSED
        return out

    def compressed_extent(self, entries: U64) -> tuple[U64, U64]:
        """(host offset, bytes) of compressed L2 entries, as QEMU parses them."""
        cb = self.header.cluster_bits
        shift = 62 - (cb - 8)
        offset = entries & np.uint64((1 << shift) - 1)
        sectors = ((entries >> np.uint64(shift)) & np.uint64((1 << (cb - 8)) - 1)) + np.uint64(1)
        return offset, sectors * np.uint64(512) - (offset & np.uint64(511))


class _Window:
    """Sequential reads of a table of unknown length through one buffer (1 MiB at a time)."""

    STEP = 1 << 20

    def __init__(self, reader: Qcow2Reader, what: str) -> None:
        self.reader = reader
        self.what = what
        self.start = 0
        self.data = b""

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        end = offset + length
        if offset < self.start or end > self.start + len(self.data):
            size = max(length, self.STEP)
            size = min(size, max(length, self.reader.file_size - offset))
            self.start = offset
            self.data = self.reader.pread(offset, size, self.what)
        return self.data[offset - self.start : end - self.start]


def unique(values: I64) -> I64:
    """np.unique without its masked-array check, which imports numpy.ma (16 ms)."""
    s = np.sort(values)
    if len(s) < 2:
        return s
    out: I64 = s[np.concatenate(([True], s[1:] != s[:-1]))]
    return out


def cluster_types(entries: U64, data_file: bool, subclusters: bool) -> U8:
    """QEMU's qcow2_get_cluster_type, vectorised (ZERO_* only without subclusters)."""
    offset = entries & np.uint64(OFFSET_MASK)
    has_offset = offset != 0
    if data_file:
        has_offset |= (entries & np.uint64(OFLAG_COPIED)) != 0
    out = np.where(has_offset, NORMAL, UNALLOCATED_PLAIN).astype(np.uint8)
    if not subclusters:
        zero = (entries & np.uint64(OFLAG_ZERO)) != 0
        out[zero] = np.where(offset[zero] != 0, ZERO_ALLOC, ZERO_PLAIN)
    out[(entries & np.uint64(OFLAG_COMPRESSED)) != 0] = COMPRESSED
    return out


def decode_refcounts(block: bytes, order: int) -> U64:
    """Refcount block bytes -> one integer per cluster (sub-byte widths are LSB first)."""
    if order >= 3:
        dtype = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}[order]
        return np.frombuffer(block, dtype=dtype).astype(np.uint64)
    bits = 1 << order
    raw = np.frombuffer(block, dtype=np.uint8)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    vals = (raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(-1).astype(np.uint64)
