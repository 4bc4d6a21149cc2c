"""The L2 reader's batches: however the tables are grouped into reads and batches, the
entries it yields are the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from image_support import create, qemu_io
from vmtrim.image.qcow2 import Qcow2Reader

# (cluster size, extended L2, virtual size, more writes): enough entries in each for
# several batches of one cluster's worth (512-byte clusters: an L2 table per 32 KiB)
CASES = [
    ("512", "off", "64M", []),
    ("16k", "on", "64M", []),
    ("64k", "off", "2G", ["write -z 512M 1280M"]),  # 20,480 zero clusters: metadata only
]


def _entries(reader: Qcow2Reader, batch_bytes: int) -> tuple[int, list[tuple[int, ...]]]:
    """(batches, [(L1 index, entry, value, bitmap)]) in guest order."""
    l2n = reader.header.l2_entries
    rows: list[tuple[int, ...]] = []
    batches = 0
    for idx, entry, ent, bitmaps in reader.l2_entries(reader.l1_table(), batch_bytes):
        batches += 1
        maps = bitmaps if bitmaps is not None else np.zeros(len(ent), np.uint64)
        for e, v, b in zip(entry.tolist(), ent.tolist(), maps.tolist(), strict=True):
            rows.append((int(idx[e // l2n]), e % l2n, v, b))
    return batches, rows


@pytest.mark.parametrize(("cluster_size", "extended_l2", "size", "more"), CASES)
def test_batches_yield_the_same_entries(
    tmp_path: Path, cluster_size: str, extended_l2: str, size: str, more: list[str]
) -> None:
    img = create(tmp_path / "t.qcow2", size, cluster_size=cluster_size, extended_l2=extended_l2)
    # scattered writes, zero clusters and a discard: entries in many tables
    qemu_io(
        img,
        *(f"write -P {i % 250 + 1} {i * 1_310_720 + i * 4096} 8k" for i in range(48)),
        "write -P 7 24M 40M",  # full tables too
        "write -z 5M 64k",
        "discard 20M 16k",
        *more,
    )
    with Qcow2Reader(img) as reader:
        cs = reader.header.cluster_size
        whole = _entries(reader, 8 << 20)
        assert whole[0] == 1 and len(whole[1]) > 48
        for batch_bytes in (cs, 3 * cs, 64 * cs):
            batches, rows = _entries(reader, batch_bytes)
            assert rows == whole[1]
            # a batch ends once it holds batch_bytes of entries: at most twice that
            limit = batch_bytes // reader.header.l2_entry_bytes
            assert batches >= len(rows) // (2 * limit)
        assert _entries(reader, cs)[0] > 1
