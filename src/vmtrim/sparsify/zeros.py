"""``sparsify --zeros``: discard the data clusters of the top image that read all zero.

vmtrim's reader (:func:`vmtrim.image.map_image`) finds the top layer's data extents
and :func:`vmtrim.image.info.zero_blocks` the cluster-sized blocks in them that hold
only zeros; ``qemu-io`` discards those guest ranges, so QEMU itself rewrites the qcow2
metadata (a zero cluster over a backing file, a free one otherwise). No byte of qcow2
metadata is written here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from vmtrim.errors import EnvironmentProblem
from vmtrim.image.info import zero_blocks
from vmtrim.image.map import map_image

RAW_GRANULARITY = 64 * 1024


def zero_ranges(path: Path, fmt: str, granularity: int) -> list[tuple[int, int]]:
    """Guest (start, length) ranges of the top layer's all-zero data blocks, merged."""
    ext = map_image(str(path), fmt)
    top = (ext.depth == 0) & ((ext.flags & 4) != 0) & ((ext.flags & 2) == 0) & (ext.offset >= 0)
    ranges: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, length, offset in zip(
            ext.start[top].tolist(), ext.length[top].tolist(), ext.offset[top].tolist(), strict=True
        ):
            # Whole blocks only: a partial cluster cannot be freed.
            first = -(-start // granularity) * granularity
            last = (start + length) // granularity * granularity
            if last <= first:
                continue
            found = zero_blocks(
                fd,
                np.array([offset + first - start]),
                np.array([last - first]),
                granularity,
            )
            for host in found.tolist():
                guest = start + (host - offset)
                if ranges and ranges[-1][0] + ranges[-1][1] == guest:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + granularity)
                else:
                    ranges.append((guest, granularity))
    finally:
        os.close(fd)
    return ranges


def discard_zero_clusters(path: Path, fmt: str) -> int:
    """Discard every all-zero data block of the top image through qemu-io; bytes discarded."""
    granularity = RAW_GRANULARITY
    if fmt == "qcow2":
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        granularity = int(json.loads(info.stdout)["cluster-size"])
    ranges = zero_ranges(path, fmt, granularity)
    if not ranges:
        return 0
    script = "".join(f"discard {start} {length}\n" for start, length in ranges) + "quit\n"
    proc = subprocess.run(
        ["qemu-io", "-f", fmt, "-d", "unmap", str(path)],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [ln for ln in proc.stdout.splitlines() if "discard failed" in ln]
    if proc.returncode != 0 or errors:
        tail = (errors or proc.stderr.strip().splitlines() or ["?"])[-1]
        raise EnvironmentProblem(f"qemu-io discard failed: {tail}", subject=str(path))
    return sum(length for _, length in ranges)
