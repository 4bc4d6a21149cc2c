"""What a coarse qcow2 cluster costs: the matrix of issue 13, measured in one lab guest.

qcow2 clusters of 64 KiB, 512 KiB and 2 MiB; ext4 in the guest with online discard
(``mount -o discard``) against ``fstrim`` (the anchor: what a periodic trim does);
scattered freed files of 4 KiB, 64 KiB, 1 MiB and 16 MiB (each freed file sits between
files that stay). One more disk has 2 MiB clusters with the device told the cluster
(``discard_granularity=2M``), under fstrim: what ``vmtrim fix --discard-granularity auto``
changes. For each cell: the bytes the guest freed (statfs in the guest), the bytes the
host got back (``du -B1`` of the qcow2), and the ratio.

One boot, seven virtio-blk data disks; see tests/granularity_support.py.

    .venv/bin/python bench/bench_granularity.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from granularity_support import (  # noqa: E402
    COUNTS,
    KiB,
    LabDisk,
    MiB,
    booted,
    cell,
    guest_granularity,
    size_text,
)

DISKS = [
    LabDisk(f"c{size_text(cluster).replace(' ', '').lower()}-{mode}", cluster, mode)
    for cluster in (64 * KiB, 512 * KiB, 2 * MiB)
    for mode in ("online", "fstrim")
] + [LabDisk("c2mib-fstrim-dg2m", 2 * MiB, "fstrim", 2 * MiB)]
# small files freed next to each other, one at a time (a journal commit each)
ADJACENT = (4 * KiB, 64 * KiB)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the cells as JSON")
    args = parser.parse_args()
    start = time.monotonic()
    rows = []
    with booted(DISKS) as guest:
        told = {disk.name: guest_granularity(guest, disk) for disk in DISKS}
        for disk in DISKS:
            for size in COUNTS:
                rows.append(cell(guest, disk, size))
            if disk.device_granularity is None:
                for size in ADJACENT:
                    rows.append(cell(guest, disk, size, pattern="adjacent"))
        info = guest.info
    seconds = time.monotonic() - start
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
        return
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(f"# QEMU {info['qemu_version']} ({info['accel']}), {info['machine']}; {seconds:.0f} s")
    print()
    print("| cluster | guest frees by | guest told | freed files | guest freed | host got back |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mode = r.disk.mode + (
            f", discard_granularity={size_text(r.disk.device_granularity)}"
            if r.disk.device_granularity
            else ""
        )
        print(
            f"| {size_text(r.disk.cluster)} | {mode} | {told[r.disk.name]} B"
            f" | {r.files} x {size_text(r.size)}, {r.pattern} | {r.guest_freed / MiB:.2f} MiB"
            f" | {r.host_freed / MiB:.2f} MiB ({r.ratio:.2f}) |"
        )


if __name__ == "__main__":
    main()
